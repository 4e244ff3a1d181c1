"""Events the Butler writes while a compression runs are never folded, archived or deleted."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.summarizer import Summary, SummaryRequest
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import (
    START,
    archive_of,
    events_of,
    insert_events,
    make_engine,
    small_settings,
    texts_seen,
)
from tools.fake_openai import FakeOpenAI, default_responder

Doc = dict[str, Any]


def late_event(event_id: str, created_at: Any) -> Doc:
    """Return an event of user u1 written during the compression."""
    return {
        "_id": event_id,
        "event_id": event_id,
        "user_id": "u1",
        "role": "user",
        "content": f"{event_id}: written while compressing.",
        "created_at": created_at,
        "tags": ["late"],
    }


class WritingResponder:
    """Answer like the default fake LLM; on the first request, first write the given events."""

    def __init__(self, db: Database[Doc], events: list[Doc]) -> None:
        self.db = db
        self.pending = events
        self.written: list[Doc] = []

    def __call__(self, request: Doc) -> str:
        """Write the pending events (once), then answer."""
        if self.pending:
            self.db["user_memory"].insert_many([dict(ev) for ev in self.pending])
            self.written, self.pending = self.pending, []
        return default_responder(request)


def test_events_arriving_during_the_llm_call_survive_whatever_their_timestamp(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(max_events_per_chunk=4)
    engine = make_engine(mongo_db, redis_client, settings, make_openai())
    original = insert_events(mongo_db, "u1", 15)  # folds e000..e011 in chunks of 4
    late = [
        late_event("u1-a-old", START - timedelta(days=30)),  # older than everything being folded
        late_event("u1-e005a", original[5]["created_at"]),  # same instant as a folded event, _id right after it
        late_event("u1-b-mid", START + timedelta(minutes=8, seconds=30)),  # inside chunk 3's key range
        late_event("u1-z-new", START + timedelta(days=1)),
    ]

    writer = WritingResponder(mongo_db, late)
    llm.set_responder(writer)

    result = engine.compress("u1")

    written = writer.written
    assert len(written) == 4, "the responder must have written the late events"
    remaining, archive = events_of(mongo_db, "u1"), archive_of(mongo_db, "u1")
    assert result.status == COMPRESSED and result.events_folded == 12 and result.chunks == 3, result
    for ev in written:
        assert ev["_id"] in remaining, f"late event {ev['_id']} was deleted"
        assert remaining[ev["_id"]]["content"] == ev["content"], f"late event {ev['_id']} was changed"
        assert ev["_id"] not in archive, f"late event {ev['_id']} was archived"
    assert sorted(archive) == [ev["_id"] for ev in original[:12]], "exactly the selected events are archived"
    seen = texts_seen(llm.chat_requests)
    assert not [ev for ev in written if ev["content"] in seen], "a late event reached the summariser"
    assert result.events_after == 3 + len(written), result


class WritingSummarizer(OfflineSummarizer):
    """Summarise offline; before each call, write one more event with the oldest possible timestamp."""

    name = "writing"

    def __init__(self, db: Database[Doc]) -> None:
        self.inner = OfflineSummarizer()
        self.db = db
        self.written: list[Doc] = []

    def summarize(self, request: SummaryRequest) -> Summary:
        """Write an old-dated event for the same user, then summarise."""
        ev = late_event(f"u1-0-late-{len(self.written)}", START - timedelta(minutes=1 + len(self.written)))
        self.db["user_memory"].insert_one(dict(ev))
        self.written.append(ev)
        return self.inner.summarize(request)

    def close(self) -> None:
        """Nothing to close."""


def test_events_arriving_between_chunks_survive_and_a_rerun_folds_them(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings(max_events_per_chunk=4)
    summarizer = WritingSummarizer(mongo_db)
    engine = make_engine(mongo_db, redis_client, settings, summarizer)
    original = insert_events(mongo_db, "u1", 15)

    first = engine.compress("u1")

    late_ids = {ev["_id"] for ev in summarizer.written}
    assert first.chunks == 3 and len(late_ids) == 3, (first, late_ids)
    assert late_ids <= set(events_of(mongo_db, "u1")), "an event written between chunks was deleted"
    assert not late_ids & set(archive_of(mongo_db, "u1")), "an event written between chunks was archived"
    assert set(archive_of(mongo_db, "u1")) == {ev["_id"] for ev in original[:12]}

    # 3 kept + 3 late = 6 events: under the threshold, nothing to do until more arrive.
    insert_events(mongo_db, "u1", 8, first=15)
    second = engine.compress("u1")

    assert second.status == COMPRESSED, second
    assert late_ids <= set(archive_of(mongo_db, "u1")), "the next run folds the late events like any other"


def test_events_arriving_right_after_selection_are_not_folded(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # Written between the fold list and the first read of the events, inside the fold list's key
    # range: the read sees them (secantus materialises a cursor when it opens, so an insert during
    # the LLM call would not be seen; a real MongoDB cursor can see it on a later getMore).
    engine = make_engine(mongo_db, redis_client, small_settings(max_events_per_chunk=4))
    original = insert_events(mongo_db, "u1", 15)
    late = [
        late_event("u1-e000a", original[0]["created_at"]),  # same instant as the first folded event
        late_event("u1-e005a", original[5]["created_at"]),
        late_event("u1-b-mid", START + timedelta(minutes=8, seconds=30)),
    ]

    def write_late(step: str) -> None:
        if step == "selected":
            mongo_db["user_memory"].insert_many([dict(ev) for ev in late])

    result = engine.compress("u1", checkpoint=write_late)

    remaining, archive = events_of(mongo_db, "u1"), archive_of(mongo_db, "u1")
    assert result.events_folded == 12, result
    for ev in late:
        assert ev["_id"] in remaining and ev["_id"] not in archive, f"late event {ev['_id']} was folded"
    assert sorted(archive) == [ev["_id"] for ev in original[:12]]
