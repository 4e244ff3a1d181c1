"""compress_user's invariants against real MongoDB and Redis: exactly-once folding, rolling
summaries, chunking, output validation, locks, thresholds and the scan."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from datetime import timedelta
from typing import Any

import pytest
import redis
from bson import ObjectId
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError, InvalidSummaryError, LockLostError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD, SKIPPED_LOCKED
from butler_memory.fold.metrics import StatsdMetrics
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.storage.archive import ARCHIVE_FIELDS
from butler_memory.storage.events import Backlog
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import (
    START,
    archive_of,
    events_of,
    insert_events,
    make_engine,
    profile_of,
    prompt_events,
    prompt_summary,
    set_profile,
    small_settings,
    snapshot,
    summary_version,
    system_message,
    texts_seen,
    user_message,
    watermark,
)
from tools.fake_openai import FakeOpenAI
from tools.services import StatsdSink

Doc = dict[str, Any]
BOOKKEEPING = ARCHIVE_FIELDS  # our fields on an archived event


COUNTED = {"summary_language": "ru", "fact_guard": "warn"}
"""Settings for counted_responder: Russian replies whose counter changes (a dropped number, warned)."""


def counted_responder() -> Any:
    """Return a responder answering 'Сводка N: ...' with N counting up, so every summary is unique."""
    counter = itertools.count(1)

    def respond(request: Doc) -> str:
        return f"Сводка {next(counter)}: пользователь любит чай, живёт в Казани ({len(prompt_events(request))})."

    return respond


# -- exactly once --------------------------------------------------------------------------------


def test_events_are_folded_exactly_once_and_the_newest_stay_untouched(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    settings = small_settings(max_events_per_chunk=4)
    engine = make_engine(mongo_db, redis_client, settings, OfflineSummarizer(), statsd_metrics)
    original = {ev["_id"]: ev for ev in insert_events(mongo_db, "u1", 15)}
    insert_events(mongo_db, "other", 12)
    other_before = events_of(mongo_db, "other")

    first = engine.compress("u1", run_id="run-1")
    # New events arrive; a second run folds the old survivors and part of the new ones.
    original.update({ev["_id"]: ev for ev in insert_events(mongo_db, "u1", 10, first=15)})
    second = engine.compress("u1", run_id="run-2")

    remaining, archive = events_of(mongo_db, "u1"), archive_of(mongo_db, "u1")
    assert (first.status, second.status) == (COMPRESSED, COMPRESSED), (first, second)
    assert first.events_folded == 12 and first.chunks == 3, f"15 events, keep 3, chunks of 4: {first}"
    assert second.events_folded == 10 and second.chunks == 3, f"13 events, keep 3, chunks of 4: {second}"
    removed = set(original) - set(remaining)
    assert first.events_folded + second.events_folded == len(removed) == first.events_deleted + second.events_deleted
    assert set(archive) == removed, "the archive must hold exactly the removed events"
    newest = sorted(original)[-3:]
    assert sorted(remaining) == newest, "exactly the newest keep_last_n events must remain"
    for event_id in newest:
        assert remaining[event_id] == original[event_id], f"kept event {event_id} was modified"
    for event_id, doc in archive.items():
        assert {k: v for k, v in doc.items() if k not in BOOKKEEPING} == original[event_id], (
            f"archived {event_id} differs from the original event"
        )
    # Chunks of 4 (12 folded in run 1, 10 in run 2) get versions 1..3 and 4..6, in order.
    versions = [archive[i]["summary_version"] for i in sorted(archive)]
    assert versions == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 2, versions
    assert [archive[i]["run_id"] for i in sorted(archive)] == ["run-1"] * 12 + ["run-2"] * 10
    assert summary_version(mongo_db, "u1") == second.summary_version == 6
    last = original[sorted(removed)[-1]]
    assert watermark(mongo_db, "u1") == (last["created_at"], last["_id"]), "watermark must be the last folded event"
    assert profile_of(mongo_db, "u1")["memory_pending_fold"] is None, "a finished run leaves no pending fold"
    assert events_of(mongo_db, "other") == other_before, "another user's events were touched"
    lines = statsd.wait_for(lambda ls: sum(line.startswith(m.EVENTS_DELETED_TOTAL) for line in ls) >= 6)
    folded = sum(int(line.split(":")[1].split("|")[0]) for line in lines if line.startswith(m.EVENTS_FOLDED_TOTAL))
    assert folded == 22, f"events_folded_total counters must add up to 22, got {folded}: {lines}"


def test_previous_summary_reaches_the_next_prompt(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(max_events_per_chunk=5, **COUNTED)
    engine = make_engine(mongo_db, redis_client, settings, make_openai())
    set_profile(mongo_db, "u1", memory_summary="- Аллергия на орехи.")
    llm.set_responder(counted_responder())
    insert_events(mongo_db, "u1", 13)

    first = engine.compress("u1")
    after_first = profile_of(mongo_db, "u1")["memory_summary"]
    insert_events(mongo_db, "u1", 8, first=13)
    second = engine.compress("u1")

    requests = llm.chat_requests
    assert (first.chunks, second.chunks) == (2, 2), (first, second)
    summaries = [prompt_summary(r) for r in requests]
    assert summaries[0] == "- Аллергия на орехи.", "the stored summary must ride in the first prompt"
    assert summaries[1].startswith("Сводка 1:"), "chunk 2 must refine chunk 1's summary"
    assert summaries[2] == after_first, "the second run's prompt must carry the first run's stored summary"
    assert summaries[3].startswith("Сводка 3:")
    assert profile_of(mongo_db, "u1")["memory_summary"].startswith("Сводка 4:")


def test_long_history_is_chunked_and_each_event_reaches_the_llm_once(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    # Chunk budget: 700 tokens less the instructions and the summary (o200k_base, as the fake counts).
    settings = small_settings(summary_max_tokens=50, max_event_chars=300, prompt_budget_tokens=700, **COUNTED)
    summarizer = make_openai()
    engine = make_engine(mongo_db, redis_client, settings, summarizer)
    llm.set_responder(counted_responder())
    events = insert_events(mongo_db, "u1", 40, content=lambda u, i: f"{u}-e{i:03d}: " + "слово " * (i % 7 * 7))

    result = engine.compress("u1")

    requests = llm.chat_requests
    folded = [ev["content"] for ev in events[:-3]]
    assert result.events_folded == 37 and result.chunks == len(requests) > 1, result
    assert texts_seen(requests) == folded, "every folded event must reach the LLM exactly once, in order"
    for number, request in enumerate(requests, 1):
        tokens = summarizer.count_tokens(system_message(request)) + summarizer.count_tokens(user_message(request))
        assert tokens <= settings.prompt_budget_tokens, (
            f"prompt {number} is {tokens} tokens, over the budget {settings.prompt_budget_tokens}"
        )
    assert sorted(events_of(mongo_db, "u1")) == [ev["_id"] for ev in events[-3:]]


# -- bad output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    ["", "   \n", "x" * 1801, "I'm sorry, I can't help with that.", "N/A", "Nothing meaningful."],
    ids=["empty", "blank", "over-long", "refusal", "placeholder", "nothing-meaningful"],
)
def test_bad_llm_output_fails_and_changes_nothing(
    reply: str, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings()  # summary_max_chars = 1800
    engine = make_engine(mongo_db, redis_client, settings, make_openai())
    set_profile(mongo_db, "u1", memory_summary="- Аллергия на орехи.", memory_summary_version=3)
    insert_events(mongo_db, "u1", 14)
    before = snapshot(mongo_db, "u1")
    llm.push_reply(reply)

    with pytest.raises(InvalidSummaryError) as info:
        engine.compress("u1")

    assert "'u1'" in str(info.value), f"the error must name the user: {info.value}"
    assert not info.value.retryable, "a bad summary is not retried blindly"
    assert snapshot(mongo_db, "u1") == before, "a bad summary changed the database"
    assert redis_client.keys("*") == [], "the lock must be released after a failure"


def test_bad_output_in_a_later_chunk_keeps_earlier_chunks_and_deletes_nothing_of_its_own(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(max_events_per_chunk=5, summary_language="ru")
    engine = make_engine(mongo_db, redis_client, settings, make_openai())
    events = insert_events(mongo_db, "u1", 13)
    llm.push_reply("- Пользователь любит чай.")
    llm.push_reply("I'm sorry, I can't do that.")

    with pytest.raises(InvalidSummaryError):
        engine.compress("u1")

    assert sorted(archive_of(mongo_db, "u1")) == [ev["_id"] for ev in events[:5]], "chunk 1 was committed"
    assert sorted(events_of(mongo_db, "u1")) == [ev["_id"] for ev in events[5:]], "chunk 2 must stay"
    profile = profile_of(mongo_db, "u1")
    assert (profile["memory_summary"], profile["memory_summary_version"]) == ("- Пользователь любит чай.", 1)


# -- locks ---------------------------------------------------------------------------------------


def test_a_lock_held_by_another_holder_skips_the_user_and_is_left_alone(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings, metrics=statsd_metrics)
    insert_events(mongo_db, "u1", 14)
    before = snapshot(mongo_db, "u1")
    other = redis_client.lock(settings.lock_key("u1"), timeout=30)
    assert other.acquire(blocking=False)

    result = engine.compress("u1")

    assert result.status == SKIPPED_LOCKED, result
    assert snapshot(mongo_db, "u1") == before, "a skipped user was changed"
    assert redis_client.get(settings.lock_key("u1")) == other.local.token, "the other holder's lock was touched"
    statsd.wait_for(lambda lines: f"{m.USERS_SKIPPED_LOCKED_TOTAL}:1|c" in lines)
    other.release()


class TakeOverSummarizer(OfflineSummarizer):
    """Summarise offline, but first let another holder take the lock over (as after a TTL expiry)."""

    name = "take-over"

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.inner = OfflineSummarizer()
        self.client = client
        self.key = key
        self.token: bytes | None = None

    def summarize(self, request: SummaryRequest) -> Summary:
        """Replace our lock with another holder's, then summarise."""
        self.client.delete(self.key)
        other = self.client.lock(self.key, timeout=30)
        assert other.acquire(blocking=False)
        self.token = other.local.token
        return self.inner.summarize(request)

    def close(self) -> None:
        """Nothing to close."""


def test_a_lock_lost_mid_run_writes_nothing_and_the_new_holder_keeps_it(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    summarizer = TakeOverSummarizer(redis_client, settings.lock_key("u1"))
    engine = make_engine(mongo_db, redis_client, settings, summarizer)
    insert_events(mongo_db, "u1", 14)
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.")
    before = snapshot(mongo_db, "u1")

    with pytest.raises(LockLostError) as info:
        engine.compress("u1")

    assert info.value.retryable and "'u1'" in str(info.value), info.value
    assert snapshot(mongo_db, "u1") == before, "a compression that lost its lock wrote anyway"
    assert summarizer.token is not None
    assert redis_client.get(settings.lock_key("u1")) == summarizer.token, "our release deleted the new holder's lock"


def test_below_threshold_is_skipped_and_changes_nothing(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings)
    insert_events(mongo_db, "u1", 10)
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.")
    before = snapshot(mongo_db, "u1")

    result = engine.compress("u1")

    assert result.status == SKIPPED_BELOW_THRESHOLD and result.events_before == result.events_after == 10, result
    assert snapshot(mongo_db, "u1") == before
    assert redis_client.keys("*") == [], "the lock must be released"


def test_the_lock_is_released_after_a_successful_run(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings)
    insert_events(mongo_db, "u1", 14)

    assert engine.compress("u1").status == COMPRESSED
    assert redis_client.keys("*") == [], "the lock must be released"
    assert UserLocks(redis_client, settings).acquire("u1") is not None, "the user must be lockable again"


# -- scan and indexes ----------------------------------------------------------------------------


def test_scan_orders_by_backlog_limits_and_restricts(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings())
    for user_id, n in {"a": 12, "b": 30, "c": 20, "d": 5, "e": 20, "f": 10}.items():
        insert_events(mongo_db, user_id, n)

    assert engine.scan() == [Backlog("b", 30), Backlog("c", 20), Backlog("e", 20), Backlog("a", 12)]
    assert engine.scan(limit=2) == [Backlog("b", 30), Backlog("c", 20)]
    assert engine.scan(user_ids=["a", "d", "e", "nobody"]) == [Backlog("e", 20), Backlog("a", 12)]
    assert engine.scan(user_ids=[]) == []
    assert [f.name for f in dataclasses.fields(Backlog)] == ["user_id", "events"], "the scan returns ids and counts"


def test_non_string_user_ids_take_no_place_in_the_scan_and_are_counted(
    mongo_db: Database[Doc], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings())
    insert_events(mongo_db, "a", 12)
    insert_events(mongo_db, "b", 15)
    for bad_id, n in ((1, 40), (ObjectId(), 35), (None, 30)):  # bigger backlogs than any real user
        mongo_db["user_memory"].insert_many(
            [{"user_id": bad_id, "role": "user", "content": "x", "created_at": START} for _ in range(n)]
        )
    caplog.set_level(logging.WARNING, logger="butler_memory.storage.events")

    assert engine.scan(limit=2) == [Backlog("b", 15), Backlog("a", 12)], "non-string ids took places in the run"
    (warning,) = [r.getMessage() for r in caplog.records if "not strings" in r.getMessage()]
    assert "left out 3 user id(s)" in warning and "105 events" in warning, warning
    assert engine.store.count_over_threshold(10) == 2, "the users left over count non-string ids too"


def test_indexes_are_created_idempotently_and_retention_is_updated(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    # The Butler's own equivalent index under another name must not make ours fail.
    mongo_db["user_profiles"].create_index([("user_id", 1)], name="butler_profiles_by_user")
    store = MemoryStore(mongo_db, settings)

    store.ensure_indexes()
    store.ensure_indexes()
    make_engine(mongo_db, redis_client, settings).scan()

    def keys(collection: str) -> dict[str, Any]:
        return {name: info for name, info in mongo_db[collection].index_information().items() if name != "_id_"}

    events = keys("user_memory")
    assert sorted(info["key"] for info in events.values()) == [
        [("created_at", 1), ("user_id", 1)],  # the catch-up scan's "who wrote since"
        [("user_id", 1), ("created_at", 1), ("_id", 1)],
    ], events
    assert len(keys("user_profiles")) == 1, keys("user_profiles")
    # Run documents: by run id, by the users they name (erasure), and a retention (issue 26, item 7).
    for collection in ("memory_compression_runs", "memory_compression_catchup_runs"):
        runs = keys(collection)
        assert sorted((info["key"], info.get("unique"), info.get("expireAfterSeconds")) for info in runs.values()) == [
            ([("finished_at", 1)], None, 90 * 86400),
            ([("run_id", 1)], True, None),
            ([("user_ids", 1)], None, None),
        ], runs
    archive = keys("user_memory_archive")
    assert archive["archived_at_ttl"]["expireAfterSeconds"] == 90 * 86400, archive
    assert len(archive) == 2, archive

    MemoryStore(mongo_db, settings.replace(archive_retention_days=30, runs_retention_days=7)).ensure_indexes()

    assert keys("user_memory_archive")["archived_at_ttl"]["expireAfterSeconds"] == 30 * 86400
    assert keys("memory_compression_runs")["finished_at_ttl"]["expireAfterSeconds"] == 7 * 86400
    assert keys("memory_compression_catchup_runs")["finished_at_ttl"]["expireAfterSeconds"] == 7 * 86400


def test_every_collection_of_the_store_writes_with_the_configured_write_concern(mongo_db: Database[Doc]) -> None:
    """History and the erasure audit log used the server's default write concern (issue 26, item 8)."""
    from butler_memory.operations.audit import AuditLog
    from butler_memory.operations.erasure import _job_collections

    settings = small_settings(mongo_write_concern="2", mongo_write_timeout_ms=1234)
    store = MemoryStore(mongo_db, settings)
    expected = {"w": 2, "wtimeout": 1234}
    colls = [store.events, store.profiles, store.archive_coll, store.runs, store.state, store.catchup_runs]
    colls += [store.history.coll, AuditLog(store).coll, *_job_collections(store)]
    assert {c.name: c.write_concern.document for c in colls} == {c.name: expected for c in colls}


# -- an interrupted run's fold target --------------------------------------------------------------


def test_a_fold_target_left_by_a_killed_run_is_finished_under_the_threshold(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings)
    events = insert_events(mongo_db, "u1", 10)  # at the threshold: not due on its own
    target = {"created_at": events[4]["created_at"], "event_id": events[4]["_id"]}
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.", memory_summary_version=2, memory_fold_target=target)

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 5, result
    assert sorted(archive_of(mongo_db, "u1")) == [ev["_id"] for ev in events[:5]], "fold exactly up to the target"
    profile = profile_of(mongo_db, "u1")
    assert profile["memory_fold_target"] is None and profile["memory_summary_version"] == 3, profile


def test_a_fold_target_with_nothing_left_to_fold_is_cleared(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings)
    events = insert_events(mongo_db, "u1", 8, first=2)
    gone = {"created_at": events[0]["created_at"] - timedelta(minutes=1), "event_id": "u1-e001"}
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.", memory_summary_version=2, memory_fold_target=gone)

    result = engine.compress("u1")

    assert result.status == SKIPPED_BELOW_THRESHOLD, result
    assert sorted(events_of(mongo_db, "u1")) == [ev["_id"] for ev in events], "no event may be folded"
    assert profile_of(mongo_db, "u1")["memory_fold_target"] is None, "a spent fold target must be cleared"


def test_a_fold_target_whose_events_are_all_quarantined_is_cleared(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """The resumed fold list's events are all oversized: quarantined, nothing folded, and the spent
    target is cleared (second review: it stayed, and a batch commit read the user as stale)."""
    settings = small_settings(max_event_chars=300)
    engine = make_engine(mongo_db, redis_client, settings)
    events = insert_events(mongo_db, "u1", 10, content=lambda user_id, i: "x" * 400 if i <= 4 else f"event {i}")
    target = {"created_at": events[4]["created_at"], "event_id": events[4]["_id"]}
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.", memory_summary_version=2, memory_fold_target=target)

    engine.compress("u1")

    assert mongo_db["user_memory_quarantine"].count_documents({"user_id": "u1"}) == 5
    profile = profile_of(mongo_db, "u1")
    assert profile["memory_fold_target"] is None and profile["memory_summary_version"] == 2, profile


def test_a_multi_chunk_run_records_its_target_until_the_last_chunk(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(max_events_per_chunk=4))
    events = insert_events(mongo_db, "u1", 15)
    targets: list[Any] = []

    def record(step: str) -> None:
        if step == "committed":
            targets.append(profile_of(mongo_db, "u1")["memory_fold_target"])

    engine.compress("u1", checkpoint=record)

    last = {"created_at": events[11]["created_at"], "event_id": events[11]["_id"]}
    assert targets == [last, last, None], f"the fold target must name the last folded event until the end: {targets}"


def test_a_dry_run_scan_creates_no_indexes(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings())
    insert_events(mongo_db, "a", 12)

    assert engine.scan(dry_run=True) == [Backlog("a", 12)]
    assert engine.compress("a", dry_run=True).events_folded == 9

    assert mongo_db.list_collection_names() == ["user_memory"], "a dry run created collections"
    assert list(mongo_db["user_memory"].index_information()) == ["_id_"], "a dry run created indexes"


class RacingSummarizer(OfflineSummarizer):
    """Summarise offline, but let the bot's inline compression store a newer summary meanwhile."""

    name = "racing"

    def __init__(self, db: Database[Doc]) -> None:
        self.inner = OfflineSummarizer()
        self.db = db

    def summarize(self, request: SummaryRequest) -> Summary:
        """Bump the profile's summary version, then summarise."""
        self.db["user_profiles"].update_one(
            {"user_id": request.user_id}, {"$set": {"memory_summary": "- Новее.", "memory_summary_version": 8}}
        )
        return self.inner.summarize(request)

    def close(self) -> None:
        """Nothing to close."""


def test_a_summary_changed_under_us_is_never_overwritten(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(), RacingSummarizer(mongo_db))
    set_profile(mongo_db, "u1", memory_summary="- Старое.", memory_summary_version=7)
    events = insert_events(mongo_db, "u1", 14)

    with pytest.raises(ConcurrentUpdateError) as info:
        engine.compress("u1")

    assert info.value.retryable and "'u1'" in str(info.value), info.value
    profile = profile_of(mongo_db, "u1")
    assert (profile["memory_summary"], profile["memory_summary_version"]) == ("- Новее.", 8), (
        "the newer summary was lost"
    )
    assert sorted(events_of(mongo_db, "u1")) == [ev["_id"] for ev in events], "events were deleted without a commit"
    assert archive_of(mongo_db, "u1") == {}
