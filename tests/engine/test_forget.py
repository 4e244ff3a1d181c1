"""Forgetting events: planted facts are gone from the summary, every kept history version and the
archive; the user's other facts survive; what cannot be rebuilt is said; bad input changes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError, ErasurePendingError, ForgetInputError
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED
from butler_memory.operations import erasure, forget
from butler_memory.operations.engine import Engine, erase_events
from butler_memory.operations.forget_plan import build_request
from butler_memory.storage.profiles import FORGET_FIELD
from tests.engine.conftest import OpenAIFactory
from tests.engine.erasure_helpers import (
    FACT_USER,
    FACTS,
    OTHER,
    SECRET,
    canary_content,
    fact_content,
    fact_responder,
    fact_settings,
    fold_an_event_twice,
    mongo_mentions,
    quarantine_one,
)
from tests.engine.helpers import START, insert_events, make_engine, profile_of, prompt_events, raise_at, snapshot
from tools.fake_openai import FakeOpenAI

Doc = dict[str, Any]


def seeded(db: Database[Doc], client: redis.Redis, settings: Settings, summarizer: Any = None) -> Engine:
    """Compress FACT_USER (30 events with planted facts) into versions 1..5, and OTHER as well."""
    engine = make_engine(db, client, settings, summarizer)
    insert_events(db, FACT_USER, 30, content=fact_content)
    insert_events(db, OTHER, 30, content=canary_content)
    for user_id in (FACT_USER, OTHER):
        result = engine.compress(user_id, run_id="seed")
        assert result.status == COMPRESSED and result.summary_version == 5, result
    summary = profile_of(db, FACT_USER)["memory_summary"]
    assert all(fact in summary for fact in FACTS.values()), f"the seed summary should hold every fact:\n{summary}"
    return engine


def eid(i: int, user_id: str = FACT_USER) -> str:
    """Return the Butler event_id of a user's i-th event."""
    return f"{user_id}-e{i:03d}"


def history_versions(db: Database[Doc], user_id: str = FACT_USER) -> dict[int, Doc]:
    """Return a user's history entries by version."""
    return {d["version"]: d for d in db["user_memory_summaries"].find({"user_id": user_id})}


def whole_db(db: Database[Doc]) -> Doc:
    """Return every document of every collection."""
    return {name: list(db[name].find()) for name in sorted(db.list_collection_names())}


def assert_forgotten(db: Database[Doc], gone: list[str], kept: list[str]) -> None:
    """The facts in ``gone`` are nowhere (any collection); those in ``kept`` are in the summary and
    in the newest history version."""
    assert mongo_mentions(db, gone) == [], "a forgotten fact is still stored"
    summary = profile_of(db, FACT_USER)["memory_summary"]
    newest = max(history_versions(db).values(), key=lambda d: d["version"])
    for fact in kept:
        assert fact in summary, f"a fact that was not forgotten was lost: {fact!r}\n{summary}"
        assert fact in newest["text"], f"the newest history version lacks {fact!r}"
    assert newest["text"] == summary and newest["version"] == profile_of(db, FACT_USER)["memory_summary_version"]


def test_forgetting_an_event_rebuilds_the_summary_without_its_fact_and_keeps_the_others(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    other_before = {name: list(mongo_db[name].find({"user_id": OTHER})) for name in mongo_db.list_collection_names()}

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert result.status == forget.FORGOTTEN, result
    assert_forgotten(mongo_db, [FACTS[14]], [f for i, f in FACTS.items() if i != 14])
    # Event 14 was folded by version 3: versions 3..5 saw it and are dropped; v6 is built on v2.
    assert (result.summary_version, result.rebuilt_from_version, result.versions_dropped) == (6, 2, [3, 4, 5])
    assert sorted(history_versions(mongo_db)) == [1, 2, 6]
    v6 = history_versions(mongo_db)[6]
    assert v6["kind"] == "forget" and v6["base_version"] == 2 and v6["covers"]["count"] == 14, v6
    assert set(v6["guards"]) == {"facts", "language", "injection"}, "the rebuild goes through the guards like a fold"
    assert result.events_refolded == 14 and result.removed == {"events": 0, "archive": 1}
    assert result.lost == {}, "every needed event was in the archive"
    profile = profile_of(mongo_db, FACT_USER)
    assert profile[FORGET_FIELD] is None and profile["memory_pending_fold"] is None
    assert mongo_db["user_memory_archive"].count_documents({"user_id": FACT_USER}) == 26
    for name, docs in other_before.items():
        assert list(mongo_db[name].find({"user_id": OTHER})) == docs, f"{name}: the other user changed"
    (record,) = mongo_db["memory_erasures"].find()
    assert record["kind"] == "events" and record["state"] == "done" and record["_id"] == result.erasure_id
    assert FACT_USER not in str(record) and eid(14) not in str(record), "the audit record names the user or event"
    assert record["summary"]["versions_dropped"] == [[3, 5]]
    # A compression afterwards builds on the rebuilt summary.
    insert_events(mongo_db, FACT_USER, 10, first=30, content=fact_content)
    assert engine.compress(FACT_USER).status == COMPRESSED
    assert_forgotten(mongo_db, [FACTS[14]], [f for i, f in FACTS.items() if i != 14])


def test_forgetting_through_the_openai_compatible_server_never_shows_it_the_forgotten_fact(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_responder(fact_responder)
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings, make_openai(timeout=settings.llm_timeout_seconds))
    llm.reset()
    llm.set_responder(fact_responder)

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(8), eid(20)])

    assert result.status == forget.FORGOTTEN and result.rebuilt_from_version == 1, result
    assert_forgotten(mongo_db, [FACTS[8], FACTS[20]], [FACTS[2], FACTS[14], FACTS[24]])
    seen = [ev["text"] for request in llm.chat_requests for ev in prompt_events(request)]
    assert seen and FACTS[8] not in seen and FACTS[20] not in seen, "a forgotten event was sent to the LLM"
    assert FACTS[14] in seen and FACTS[24] in seen, "the kept events after the base must be re-folded"
    assert all(FACTS[8] not in str(r) for r in llm.chat_requests), "the forgotten fact reached the LLM"


def test_forgetting_a_time_range(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)

    since, until = START + timedelta(minutes=19), START + timedelta(minutes=21)  # events 19 and 20
    result = forget.forget_events(
        FACT_USER, engine=engine, secret=SECRET, since=since.isoformat(), until=until.isoformat()
    )

    assert result.status == forget.FORGOTTEN and result.removed == {"events": 0, "archive": 2}, result
    assert result.versions_dropped == [4, 5] and result.rebuilt_from_version == 3
    assert_forgotten(mongo_db, [FACTS[20]], [f for i, f in FACTS.items() if i != 20])
    again = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=since, until=until)
    assert again.status == "already_erased", again


@pytest.mark.parametrize("by", ["event_ids", "range"])
def test_forgetting_again_changes_nothing_in_history_or_data(
    by: str, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # Issue 23.3: the same forget again (a retried task, the Butler calling twice) adds no version,
    # drops none, writes no second audit record and moves no event.
    engine = seeded(mongo_db, redis_client, fact_settings())
    since, until = START + timedelta(minutes=13), START + timedelta(minutes=15)  # events 13 and 14
    ask: dict[str, Any] = {"event_ids": [eid(13), eid(14)]} if by == "event_ids" else {"since": since, "until": until}
    assert forget.forget_events(FACT_USER, engine=engine, secret=SECRET, **ask).status == forget.FORGOTTEN
    done = whole_db(mongo_db)

    again = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, run_id="forget-again", **ask)

    assert again.status == "already_erased" and again.summary_version is None, again
    assert whole_db(mongo_db) == done, "a second forget of the same events wrote something"


def test_forgetting_a_raw_event_leaves_the_summary_alone(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    summary = profile_of(mongo_db, FACT_USER)["memory_summary"]

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(28)])

    assert result.summary_version is None and result.versions_dropped == [] and result.removed["events"] == 1
    assert profile_of(mongo_db, FACT_USER)["memory_summary"] == summary
    assert sorted(history_versions(mongo_db)) == [1, 2, 3, 4, 5]
    assert mongo_db["user_memory"].count_documents({"event_id": eid(28)}) == 0


def test_what_the_archive_no_longer_holds_is_named_not_invented(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    # Retention took version 1's archived events and versions 1..2 of the history.
    mongo_db["user_memory_archive"].delete_many({"user_id": FACT_USER, "summary_version": 1})
    mongo_db["user_memory_summaries"].delete_many({"user_id": FACT_USER, "version": {"$in": [1, 2]}})

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert result.rebuilt_from_version == 0 and result.summary_version == 6, result
    assert result.lost["versions_without_history"] == [[1, 2]], result.lost
    assert any("no longer in the history" in note for note in result.notes), result.notes
    summary = profile_of(mongo_db, FACT_USER)["memory_summary"]
    assert FACTS[2] not in summary, "a fact whose events and versions are gone cannot come back"
    assert FACTS[8] in summary and FACTS[20] in summary and FACTS[24] in summary
    assert mongo_mentions(mongo_db, [FACTS[14]]) == []


def test_a_compression_refuses_the_user_while_a_forget_is_unfinished(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    mongo_db["user_profiles"].update_one({"user_id": FACT_USER}, {"$set": {FORGET_FIELD: {"id": "x"}}})
    insert_events(mongo_db, FACT_USER, 20, first=30, content=fact_content)

    with pytest.raises(ErasurePendingError):
        engine.compress(FACT_USER)


BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "another-users-event": {"event_ids": [eid(3, OTHER)]},
    "unknown-event": {"event_ids": ["no-such-event"]},
    "inverted-range": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    "empty-range": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00+00:00"},
    "malformed-iso": {"since": "yesterday", "until": "2026-01-01T00:00:00Z"},
    "only-since": {"since": "2026-01-01T00:00:00Z"},
    "ids-and-range": {"event_ids": [eid(3)], "since": "2026-01-01", "until": "2026-01-02"},
    "nothing-in-range": {"since": "2027-01-01", "until": "2027-01-02"},
    "since-before-year-1-in-utc": {"since": "0001-01-01T00:00:00+01:00", "until": "2026-01-01T00:00:00Z"},
    "until-after-9999-in-utc": {"since": "2026-01-01T00:00:00Z", "until": "9999-12-31T23:59:59-01:00"},
    "nothing-asked": {},
}


@pytest.mark.parametrize("request_", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_input_is_refused_clearly_and_changes_nothing(
    request_: dict[str, Any], mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    before = whole_db(mongo_db)

    with pytest.raises(ForgetInputError) as info:
        forget.forget_events(FACT_USER, engine=engine, secret=SECRET, **request_)

    assert not info.value.retryable
    assert all(fact not in str(info.value) for fact in FACTS.values())
    assert whole_db(mongo_db) == before
    assert redis_client.keys("*") == []


@pytest.mark.parametrize(
    ("since", "until"),
    [("0001-01-01T00:00:00+01:00", "2026-01-01T00:00:00Z"), ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00")],
)
def test_a_time_out_of_range_in_utc_is_a_forget_input_error(since: str, until: str) -> None:
    """A time the form accepts but UTC cannot hold (year 0 or 10000) is a ForgetInputError (second review)."""
    with pytest.raises(ForgetInputError, match="outside the years 1 to 9999"):
        build_request(None, since, until)


def test_an_unknown_user_is_refused(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = seeded(mongo_db, redis_client, fact_settings())
    before = whole_db(mongo_db)

    with pytest.raises(ForgetInputError, match="'nobody': unknown"):
        forget.forget_events("nobody", engine=engine, secret=SECRET, event_ids=[eid(3)])

    assert whole_db(mongo_db) == before


def test_dry_run_plans_and_changes_nothing(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = seeded(mongo_db, redis_client, fact_settings())
    before = whole_db(mongo_db)

    plan = forget.forget_events(FACT_USER, engine=engine, secret=None, event_ids=[eid(14)], dry_run=True)

    assert plan.status == "dry_run" and plan.versions_dropped == [3, 4, 5] and plan.rebuilt_from_version == 2
    assert plan.events_refolded == 14
    assert whole_db(mongo_db) == before


def test_a_second_forget_builds_on_the_first(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = seeded(mongo_db, redis_client, fact_settings())
    forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    second = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(20)])

    # Event 20 was re-folded into v6 by the first forget: v6 is dropped, v7 is rebuilt on v2 again.
    assert (second.summary_version, second.rebuilt_from_version, second.versions_dropped) == (7, 2, [6]), second
    assert sorted(history_versions(mongo_db)) == [1, 2, 7]
    assert_forgotten(mongo_db, [FACTS[14], FACTS[20]], [FACTS[2], FACTS[8], FACTS[24]])


def test_neither_a_refold_nor_a_rollback_brings_a_forgotten_fact_back(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = seeded(mongo_db, redis_client, fact_settings())
    forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(8)])

    refolded = engine.refold(FACT_USER, run_id="refold-after-forget")
    assert refolded.status == "refolded", refolded
    rolled = engine.rollback(FACT_USER, "seed", rollback_id="rollback-after-forget", allow_missing=True)

    assert rolled.status in ("rolled_back", "refused"), rolled
    assert mongo_mentions(mongo_db, [FACTS[8]]) == [], f"a forgotten fact came back (rollback: {rolled.status})"


def test_the_butlers_call_forgets_events_and_logs_no_content(
    mongo_db: Database[Doc], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from butler_memory.llm.offline import OfflineSummarizer

    settings = fact_settings()
    seeded(mongo_db, redis_client, settings)
    caplog.set_level(logging.DEBUG)

    done = erase_events(
        FACT_USER,
        db=mongo_db,
        redis_client=redis_client,
        summarizer=OfflineSummarizer(),
        secret=SECRET.decode(),
        event_ids=[eid(14)],
        settings=settings,
    )

    assert done["status"] == forget.FORGOTTEN and done["summary_version"] == 6, done
    assert_forgotten(mongo_db, [FACTS[14]], [f for i, f in FACTS.items() if i != 14])
    text = json.dumps(done, default=str) + "\n".join(r.getMessage() for r in caplog.records)
    assert not [fact for fact in FACTS.values() if fact in text], "content in the result or the logs"


def test_the_butlers_call_for_events_given_no_events_refuses_and_never_erases_the_user(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """``erase_events`` is for events only: with neither ids nor a range it must not fall through to
    the whole-user erasure that ``Engine.forget`` runs for the same (empty) request."""
    from butler_memory.llm.offline import OfflineSummarizer

    settings = fact_settings()
    seeded(mongo_db, redis_client, settings)
    before = snapshot(mongo_db, FACT_USER)
    butler = {"db": mongo_db, "redis_client": redis_client, "summarizer": OfflineSummarizer(), "settings": settings}

    for nothing in ({}, {"event_ids": []}, {"since": None, "until": None}):
        with pytest.raises(ForgetInputError, match="give event ids"):
            erase_events(FACT_USER, secret=SECRET.decode(), **butler, **nothing)
    assert snapshot(mongo_db, FACT_USER) == before, "nothing was changed"


def test_forgetting_events_waits_for_an_unfinished_user_erasure(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    from butler_memory.storage.profiles import ERASING_FIELD

    engine = seeded(mongo_db, redis_client, fact_settings())
    mongo_db["user_profiles"].update_one({"user_id": FACT_USER}, {"$set": {ERASING_FIELD: "an-erasure"}})
    before = whole_db(mongo_db)

    with pytest.raises(ErasurePendingError):
        forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert whole_db(mongo_db) == before


class Killed(Exception):
    """Stands in for a kill at a checkpoint (the kill matrix does it with SIGKILL)."""


def test_a_version_committed_on_top_of_an_interrupted_forget_is_rebuilt_too(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = seeded(mongo_db, redis_client, fact_settings())

    def die_after_delete(step: str) -> None:
        if step == "deleted":
            raise Killed

    with pytest.raises(Killed):
        forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)], checkpoint=die_after_delete)
    # The bot's inline compression, not knowing the intent, folds on top of the summary that still has the fact.
    profile = profile_of(mongo_db, FACT_USER)
    mongo_db["user_profiles"].update_one(
        {"user_id": FACT_USER},
        {"$set": {"memory_summary": profile["memory_summary"] + "\n- Bot note.", "memory_summary_version": 6}},
    )

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert result.status == forget.FORGOTTEN and result.summary_version == 7, result
    assert result.versions_dropped == [3, 4, 5, 6] and result.rebuilt_from_version == 2
    assert result.lost["versions_without_history"] == [[6, 6]], "the bot's version is not in the history: said so"
    assert_forgotten(mongo_db, [FACTS[14]], [f for i, f in FACTS.items() if i != 14])


SUB_MS_SINCE = START + timedelta(minutes=18, seconds=30, microseconds=123_456)
SUB_MS_UNTIL = START + timedelta(minutes=20, seconds=30, microseconds=654_321)  # events 19 and 20
"""A range with datetime.now()-style bounds: MongoDB stores dates to the millisecond only."""


def test_forgetting_a_range_again_with_sub_millisecond_bounds_is_already_erased(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A retried range forget with sub-millisecond bounds is already_erased, as with whole seconds (second review)."""
    engine = seeded(mongo_db, redis_client, fact_settings())
    first = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=SUB_MS_SINCE, until=SUB_MS_UNTIL)
    assert first.status == forget.FORGOTTEN and first.removed == {"events": 0, "archive": 2}, first

    again = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=SUB_MS_SINCE, until=SUB_MS_UNTIL)

    assert again.status == "already_erased", again


def test_a_killed_range_forget_re_run_with_sub_millisecond_bounds_reports_the_forget(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A killed sub-millisecond range forget, re-run alike, finishes and says forgotten (second review)."""
    engine = seeded(mongo_db, redis_client, fact_settings())
    with pytest.raises(Killed):
        forget.forget_events(
            FACT_USER,
            engine=engine,
            secret=SECRET,
            since=SUB_MS_SINCE,
            until=SUB_MS_UNTIL,
            checkpoint=raise_at("deleted", Killed),
        )
    redis_client.flushdb()  # the killed run's lock expired

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=SUB_MS_SINCE, until=SUB_MS_UNTIL)

    assert result.status == forget.FORGOTTEN, result
    assert_forgotten(mongo_db, [FACTS[20]], [f for i, f in FACTS.items() if i != 20])


def test_sub_millisecond_bounds_forget_exactly_the_events_of_the_range(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """Bounds round up to the millisecond: an event stored in since's millisecond but before since stays,
    one in until's millisecond but before until goes, exactly [since, until) (second review)."""
    engine = seeded(mongo_db, redis_client, fact_settings())
    since = START + timedelta(minutes=19, microseconds=500)  # after event 19 (stored at .000)
    until = START + timedelta(minutes=20, microseconds=500)  # after event 20 (stored at .000)

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=since, until=until)

    assert result.status == forget.FORGOTTEN and result.removed == {"events": 0, "archive": 1}, result
    assert mongo_db["user_memory_archive"].count_documents({"event_id": {"$in": [eid(19), eid(20)]}}) == 1
    assert mongo_db["user_memory_archive"].count_documents({"event_id": eid(19)}) == 1, "event 19 precedes since"
    again = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=since, until=until)
    assert again.status == "already_erased", again


def test_an_llm_outage_leaves_the_forget_unfinished_and_the_re_run_finishes_it(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    from butler_memory.core.errors import LLMError

    settings = fact_settings()
    llm.set_responder(fact_responder)
    engine = seeded(mongo_db, redis_client, settings, make_openai(timeout=settings.llm_timeout_seconds))
    llm.set_default_status(500)

    with pytest.raises(LLMError):
        forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])
    assert profile_of(mongo_db, FACT_USER)[FORGET_FIELD] is not None, "the intent must stay for the re-run"
    assert mongo_db["user_memory_archive"].count_documents({"event_id": eid(14)}) == 0, "forgetting comes first"
    with pytest.raises(ErasurePendingError):
        engine.compress(FACT_USER)

    llm.set_default_status(None)
    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert result.status == forget.FORGOTTEN and result.summary_version == 6, result
    assert_forgotten(mongo_db, [FACTS[14]], [f for i, f in FACTS.items() if i != 14])


def test_forgetting_an_event_folded_twice_drops_every_version_that_saw_it(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # Event 8 was folded by v2 (as first written) and again by v6 (after the Butler re-tagged it):
    # both versions, and every one built on them, hold its fact.
    engine = fold_an_event_twice(mongo_db, redis_client, fact_settings())
    assert FACTS[8] in history_versions(mongo_db)[2]["text"]

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(8)])

    assert result.status == forget.FORGOTTEN, result
    assert (result.rebuilt_from_version, result.versions_dropped) == (1, [2, 3, 4, 5, 6, 7]), result
    assert mongo_mentions(mongo_db, [FACTS[8]]) == [], "the forgotten fact is still stored"
    assert sorted(history_versions(mongo_db)) == [1, 8]
    summary = profile_of(mongo_db, FACT_USER)["memory_summary"]
    assert all(fact in summary for i, fact in FACTS.items() if i != 8), summary


def test_forgetting_a_quarantined_event_removes_it_from_the_quarantine(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    quarantine_one(mongo_db, settings, FACT_USER)  # as a compression moves an event it cannot fold
    summary = profile_of(mongo_db, FACT_USER)["memory_summary"]

    done = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(900)])

    assert done.status == forget.FORGOTTEN, done
    assert mongo_db["user_memory_quarantine"].count_documents({}) == 0, "the forgotten event stayed in quarantine"
    assert profile_of(mongo_db, FACT_USER)["memory_summary"] == summary


def test_the_engine_front_forgets_events_or_the_whole_user_and_refuses_both_at_once(
    mongo_db: Database[Any], redis_client: redis.Redis
) -> None:
    """``Engine.forget``, the one entry of the erasure DAG, the CLI and ``erase_events``, picks the operation."""
    settings = fact_settings()
    engine = seeded(mongo_db, redis_client, settings)
    before = snapshot(mongo_db, FACT_USER)

    with pytest.raises(ForgetInputError, match="include_events is for forgetting the whole user"):
        engine.forget(FACT_USER, secret=SECRET, event_ids=[eid(14)], include_events=True)
    assert snapshot(mongo_db, FACT_USER) == before, "a contradiction changes nothing"

    some = engine.forget(FACT_USER, secret=SECRET, event_ids=[eid(14)])
    assert some.status == forget.FORGOTTEN and some.kind == "events", some
    whole = engine.forget(FACT_USER, secret=SECRET, include_events=True)
    assert whole.kind == "user" and whole.status == erasure.ERASED, whole
    assert mongo_db["user_memory"].count_documents({"user_id": FACT_USER}) == 0


def test_a_compression_stalled_before_its_commit_does_not_bring_back_an_event_a_forget_removed_meanwhile(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A run stalled past its lock's TTL after its history write commits nothing over a forget of live
    events done meanwhile, though that forget left the summary version as it was (third review)."""
    settings = fact_settings()
    insert_events(mongo_db, FACT_USER, 14, content=fact_content)  # fact 2 is in the first chunk (e000..e005)
    slow, other = make_engine(mongo_db, redis_client, settings), make_engine(mongo_db, redis_client, settings)
    seen: dict[str, Any] = {}

    def stall_then_forget(step: str) -> None:
        # The slow run summarised its first chunk (fact 2 in it), extended its lock and wrote its
        # history entry; before its commit it stalls past the lock's TTL, and the Butler's deletion
        # flow forgets event 2 (live, folded by no version) with the free lock, and returns.
        if step != "recorded" or seen:
            return
        redis_client.delete(settings.lock_key(FACT_USER))
        seen["forget"] = forget.forget_events(FACT_USER, [eid(2)], engine=other, secret=SECRET)

    with pytest.raises(ConcurrentUpdateError):
        slow.compress(FACT_USER, run_id="r-slow", checkpoint=stall_then_forget)

    assert seen["forget"].status == forget.FORGOTTEN, seen["forget"]
    # The forget returned "forgotten": the fact must be nowhere, whatever the stale run did afterwards.
    assert mongo_mentions(mongo_db, [FACTS[2]]) == [], "a forgotten event's fact is back in the memory"


def test_a_forget_resumed_while_an_erasure_is_unfinished_stops_before_its_rebuild(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A killed forget re-run while an erasure of the whole user is unfinished says so before any LLM
    call: its rebuild's commit would be refused (an erasure wins) after paying for it (third review)."""
    engine = seeded(mongo_db, redis_client, fact_settings())
    with pytest.raises(Killed):
        forget.forget_events(
            FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)], checkpoint=raise_at("deleted", Killed)
        )
    redis_client.flushdb()  # the killed run's lock expired
    mongo_db["user_profiles"].update_one({"user_id": FACT_USER}, {"$set": {"memory_erasing": "e-unfinished"}})
    before = history_versions(mongo_db)

    with pytest.raises(ErasurePendingError, match="erasure of the whole user is unfinished"):
        forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert history_versions(mongo_db) == before and profile_of(mongo_db, FACT_USER)[FORGET_FIELD] is not None
