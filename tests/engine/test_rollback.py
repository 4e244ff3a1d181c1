"""Rollback of a run: the drill (snapshot, run, roll back: equal exactly), refusals, dry run, cascade."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pymongo
import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError, LockLostError, StoreError
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD
from butler_memory.operations import erasure
from butler_memory.operations.engine import Engine
from butler_memory.operations.rollback import DRY_RUN, NOT_CHANGED, REFUSED, ROLLED_BACK
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.profiles import PENDING_FIELD, ROLLBACK_FIELD, VERSION_FIELD
from butler_memory.storage.store import MemoryStore
from tests.engine.erasure_helpers import FACT_USER, SECRET, fact_settings, fold_an_event_twice
from tests.engine.helpers import (
    START,
    AfterWrite,
    Doc,
    archive_of,
    events_of,
    history_of,
    insert_events,
    make_engine,
    profile_of,
    raise_at,
    small_settings,
    snapshot,
)
from tools.services import MongoService

SETTINGS = small_settings(threshold=10, keep_last_n=5, max_events_per_chunk=5)
LATER = START + timedelta(days=1)
LATEST = START + timedelta(days=2)


class Crash(Exception):
    """Stands in for a kill at a checkpoint (the kill matrix kills for real)."""


def crash_at(step: str) -> Callable[[str], None]:
    """Return a checkpoint that raises Crash at ``step``."""
    return raise_at(step, Crash)


def two_runs(db: Database[Doc], engine: Engine) -> Doc:
    """Run r0 on 20 events (v1-v3), add 15 events, snapshot, run r1 (v4-v6); return the snapshot."""
    insert_events(db, "u1", 20)
    assert engine.compress("u1", run_id="r0").summary_version == 3
    insert_events(db, "u1", 15, first=20, start=LATER)
    before = snapshot(db, "u1")
    assert engine.compress("u1", run_id="r1").summary_version == 6
    return before


def assert_back_to(db: Database[Doc], before: Doc, version: int) -> None:
    """user_memory (by _id and content), the archive and the profile equal the snapshot, but for the version."""
    after = snapshot(db, "u1")
    assert after["events"] == before["events"], "user_memory differs from the snapshot"
    assert after["archive"] == before["archive"], "the archive differs from the snapshot"
    profile, old = dict(after["profile"]), dict(before["profile"] or {})
    assert profile.pop(VERSION_FIELD) == version
    old.pop(VERSION_FIELD, None)
    assert profile == old, "profile fields differ from the snapshot"


def test_rollback_drill_restores_user_memory_and_profile_exactly(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    before = two_runs(mongo_db, engine)
    v3_text = history_of(mongo_db, "u1")[2]["text"]

    result = engine.rollback("u1", "r1", rollback_id="rb1")

    assert result.status == ROLLED_BACK, result
    assert (result.from_version, result.to_version, result.restored_version) == (6, 7, 3)
    assert result.undoes == [6, 5, 4] and result.undone_runs == ["r1"] and result.events_restored == 15
    assert_back_to(mongo_db, before, 7)
    history = history_of(mongo_db, "u1")
    assert [e["version"] for e in history] == [1, 2, 3, 4, 5, 6, 7], "history must only grow"
    assert history[-1]["kind"] == "rollback" and history[-1]["base_version"] == 3
    assert history[-1]["text"] == v3_text == profile_of(mongo_db, "u1")["memory_summary"]
    assert history[-1]["run_id"] == "rb1" and history[-1]["covers"] is None

    # Idempotent: once done, the same rollback changes nothing.
    done = snapshot(mongo_db, "u1")
    again = engine.rollback("u1", "r1", rollback_id="rb2")
    assert again.status == NOT_CHANGED and "already rolled back" in again.message
    assert snapshot(mongo_db, "u1") == done

    # The restored events fold again in the next run, once each.
    assert engine.compress("u1", run_id="r2").status == COMPRESSED
    assert len(events_of(mongo_db, "u1")) == SETTINGS.keep_last_n
    assert len(archive_of(mongo_db, "u1")) == 30


def test_rollback_of_a_first_run_returns_every_event(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    original = insert_events(mongo_db, "u1", 20)
    engine.compress("u1", run_id="r0")
    result = engine.rollback("u1", "r0", rollback_id="rb")
    assert result.status == ROLLED_BACK and result.restored_version == 0
    assert events_of(mongo_db, "u1") == {ev["_id"]: ev for ev in original}
    assert archive_of(mongo_db, "u1") == {}
    profile = profile_of(mongo_db, "u1")
    assert profile["memory_summary"] == "" and profile["memory_compressed_through"] is None
    assert ROLLBACK_FIELD not in profile


def test_an_event_field_named_like_an_archive_field_survives_a_rollback(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """An event's own run_id, summary_version(s) or archived_at comes back from the archive as it was folded (third review)."""
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    insert_events(mongo_db, "u1", 20)
    own = {"run_id": "butler-agent-run-7", "summary_version": "butler-v2", "summary_versions": ["a"], "archived_at": 1}
    mongo_db["user_memory"].update_many({"user_id": "u1"}, {"$set": own})
    before = events_of(mongo_db, "u1")

    assert engine.compress("u1", run_id="r1").status == COMPRESSED
    assert len(events_of(mongo_db, "u1")) == SETTINGS.keep_last_n
    assert {doc["run_id"] for doc in archive_of(mongo_db, "u1").values()} == {"r1"}, "the archive's own run_id"
    assert engine.rollback("u1", "r1", rollback_id="rb1").status == ROLLED_BACK

    after = events_of(mongo_db, "u1")
    assert after.keys() == before.keys()
    changed = sorted(i for i in before if after[i] != before[i])
    assert not changed, f"{len(changed)} restored event(s) lost or changed their own fields, e.g. {changed[:1]}"


def test_dry_run_writes_nothing_and_says_what_would_change(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    two_runs(mongo_db, engine)
    before = snapshot(mongo_db, "u1")
    result = engine.rollback("u1", "r1", rollback_id="rb", dry_run=True)
    assert result.status == DRY_RUN
    assert (result.from_version, result.restored_version, result.undoes, result.events_restored) == (
        6,
        3,
        [6, 5, 4],
        15,
    )
    assert "v3 as v7" in result.message
    assert snapshot(mongo_db, "u1") == before


def test_a_later_run_is_named_and_rolled_back_only_with_cascade(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    original = insert_events(mongo_db, "u1", 20)
    engine.compress("u1", run_id="r0")
    later = insert_events(mongo_db, "u1", 15, first=20, start=LATER)
    engine.compress("u1", run_id="r1")
    before = snapshot(mongo_db, "u1")

    refused = engine.rollback("u1", "r0", rollback_id="rb")
    assert refused.status == REFUSED
    assert "r1 (v6, v5, v4)" in refused.message and "--cascade" in refused.message
    assert snapshot(mongo_db, "u1") == before, "a refused rollback changed something"

    result = engine.rollback("u1", "r0", rollback_id="rb", cascade=True)
    assert result.status == ROLLED_BACK and result.undone_runs == ["r1", "r0"] and result.restored_version == 0
    assert events_of(mongo_db, "u1") == {ev["_id"]: ev for ev in original + later}
    assert archive_of(mongo_db, "u1") == {}


def test_events_no_longer_archived_refuse_unless_allowed(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    two_runs(mongo_db, engine)
    mongo_db["user_memory_archive"].delete_many({"summary_version": 5})  # as retention would
    before = snapshot(mongo_db, "u1")

    refused = engine.rollback("u1", "r1", rollback_id="rb")
    assert refused.status == REFUSED and "5 of the 15 events" in refused.message
    assert snapshot(mongo_db, "u1") == before

    result = engine.rollback("u1", "r1", rollback_id="rb", allow_missing=True)
    assert result.status == ROLLED_BACK and result.events_missing == 5 and result.events_restored == 10


def test_a_compression_finishes_an_interrupted_rollback_first(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    before = two_runs(mongo_db, engine)
    with pytest.raises(Crash):
        engine.rollback("u1", "r1", rollback_id="rb", checkpoint=crash_at("restored"))
    assert ROLLBACK_FIELD in profile_of(mongo_db, "u1")

    quiet = make_engine(mongo_db, redis_client, SETTINGS.replace(threshold=50, keep_last_n=5))
    assert quiet.compress("u1", run_id="r2").status == SKIPPED_BELOW_THRESHOLD
    assert_back_to(mongo_db, before, 7)


def test_a_rollback_run_is_not_rolled_back(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    two_runs(mongo_db, engine)
    engine.rollback("u1", "r1", rollback_id="rb")
    result = engine.rollback("u1", "rb", rollback_id="rb-of-rb")
    assert result.status == REFUSED and "is a rollback" in result.message


def test_a_database_error_quoting_a_restored_event_is_sanitised(
    mongo_db: Database[Doc], redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"CANARY-{uuid.uuid4().hex}"
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    insert_events(mongo_db, "u1", 20, content=lambda u, i: f"{u}-e{i:03d}: {canary} {i}")
    engine.compress("u1", run_id="r0")
    # A unique index the restore violates: the server's error quotes the key, i.e. the event's content.
    mongo_db["user_memory"].create_index("content", unique=True)
    mongo_db["user_memory"].insert_one({"_id": "other", "user_id": "u2", "content": f"u1-e000: {canary} 0"})

    with pytest.raises(StoreError) as info:
        engine.rollback("u1", "r0", rollback_id="rb")

    error = info.value
    assert error.user_id == "u1" and "during rollback" in str(error), str(error)
    shown = "".join(traceback.format_exception(error)) + repr(error) + caplog.text
    assert canary not in shown, "a database error carried event content into an exception or a log"


def test_rolling_back_runs_that_folded_an_event_twice_restores_every_event(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # Run r1 folded event 8 as first written (v2); the Butler re-tagged it meanwhile, so run r2
    # folded it again (v6). Undoing r1 and what built on it must find every event r1 folded.
    settings = fact_settings()
    engine = fold_an_event_twice(mongo_db, redis_client, settings)

    result = engine.rollback(FACT_USER, "r1", rollback_id="rb", cascade=True)

    assert result.status == ROLLED_BACK, result
    assert (result.events_missing, result.events_restored, result.restored_version) == (0, 37, 0), result
    events = events_of(mongo_db, FACT_USER)
    assert len(events) == 40 and events[f"{FACT_USER}-e008"]["tags"] == ["starred"], "the Butler's edit stays"
    assert archive_of(mongo_db, FACT_USER) == {}
    assert profile_of(mongo_db, FACT_USER)["memory_summary"] == ""


def rollback_overtaken(
    mongo_service: MongoService, db: Database[Doc], client: redis.Redis, takeover: Callable[[], object]
) -> None:
    """Fold 15 of 20 events (run r0), then roll r0 back on a client of its own; right after its first
    batch of events is back in user_memory its lock expires and ``takeover`` runs (another holder)."""
    settings = small_settings(threshold=10, keep_last_n=5, max_events_per_chunk=5, delete_batch_size=2)
    insert_events(db, "u1", 20)
    assert make_engine(db, client, settings).compress("u1", run_id="r0").events_folded == 15

    def expire_then_takeover() -> None:
        client.delete(settings.lock_key("u1"))  # the TTL ran out (a slow batch, a paused process)
        takeover()

    watch = AfterWrite("user_memory", expire_then_takeover)
    own: pymongo.MongoClient[Doc] = mongo_service.client(event_listeners=[watch])
    try:
        with pytest.raises(LockLostError):
            make_engine(own[db.name], client, settings).rollback("u1", "r0", rollback_id="rb")
    finally:
        own.close()
    assert watch.fired


def test_a_rollback_overtaken_after_its_lock_expired_writes_nothing_more(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # The compression that takes the user finishes the rollback itself, then folds the events again.
    engine = make_engine(mongo_db, redis_client, small_settings(threshold=10, keep_last_n=5, max_events_per_chunk=5))
    taken: list[Any] = []
    rollback_overtaken(mongo_service, mongo_db, redis_client, lambda: taken.append(engine.compress("u1", run_id="c2")))

    assert [(r.status, r.events_folded) for r in taken] == [(COMPRESSED, 15)]
    live, archived = events_of(mongo_db, "u1"), archive_of(mongo_db, "u1")
    assert len(live) == 5 and set(live).isdisjoint(archived), "an event is live and in the summary at once"
    assert len(archived) == 15 and ROLLBACK_FIELD not in profile_of(mongo_db, "u1")


def test_a_rollback_overtaken_by_an_erasure_brings_no_erased_event_back(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    erased: list[Any] = []

    def erase() -> None:
        store, locks = MemoryStore(mongo_db, settings), UserLocks(redis_client, settings)
        erased.append(
            erasure.forget_user("u1", settings=settings, store=store, locks=locks, secret=SECRET, events=True)
        )

    rollback_overtaken(mongo_service, mongo_db, redis_client, erase)

    assert [r.status for r in erased] == [erasure.ERASED]
    assert events_of(mongo_db, "u1") == {} and archive_of(mongo_db, "u1") == {}, "an erased event came back"


def stall_then_roll_back(
    step: str, redis_client: redis.Redis, settings: Settings, other: Engine, run_id: str, seen: dict[str, Any]
) -> Callable[[str], None]:
    """Return a checkpoint that, the first time ``step`` is reached, stands for the run stalling there
    past its lock's TTL (u1's lock key goes) while ``other`` rolls ``run_id`` back with the free lock;
    the rollback's result goes into ``seen``."""

    def stall(reached: str) -> None:
        if reached != step or seen:
            return
        redis_client.delete(settings.lock_key("u1"))
        seen["rollback"] = other.rollback("u1", run_id, rollback_id="rb1")

    return stall


def test_compression_whose_lock_expired_after_commit_does_not_delete_events_a_rollback_put_back(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A run stalled past its lock's TTL after its commit archives and deletes nothing more (second review)."""
    settings = small_settings()
    slow, other = make_engine(mongo_db, redis_client, settings), make_engine(mongo_db, redis_client, settings)
    insert_events(mongo_db, "u1", 14)
    seen: dict[str, Any] = {}
    # The slow run stalls (GC pause, VM freeze, partition) past the lock's TTL right after its commit,
    # and the operator's rollback of that very run takes the free lock and finishes.
    stall_after_commit = stall_then_roll_back("committed", redis_client, settings, other, "r-slow", seen)

    with pytest.raises(LockLostError):
        slow.compress("u1", run_id="r-slow", checkpoint=stall_after_commit)

    assert seen["rollback"].status == ROLLED_BACK, seen["rollback"]
    profile = profile_of(mongo_db, "u1")
    assert (profile[VERSION_FIELD], profile["memory_summary"], profile[PENDING_FIELD]) == (2, "", None), profile
    # The summary in effect is v0's (empty) again: every one of the 14 events must be live, none archived.
    live = events_of(mongo_db, "u1")
    assert len(live) == 14, f"{14 - len(live)} event(s) the rollback put back were deleted by the stale run"
    assert archive_of(mongo_db, "u1") == {}, "the stale run archived again what the rollback took out"
    assert other.compress("u1").events_folded == 11, "the next run folds them once"


def test_a_pending_fold_finished_by_a_run_whose_lock_expired_deletes_nothing_a_rollback_put_back(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """Finishing a killed run's fold is fenced like the fold's own archive and delete (second review)."""
    settings = small_settings()
    finisher, other = make_engine(mongo_db, redis_client, settings), make_engine(mongo_db, redis_client, settings)
    insert_events(mongo_db, "u1", 14)
    with pytest.raises(Crash):
        finisher.compress("u1", run_id="r-killed", checkpoint=crash_at("committed"))
    seen: dict[str, Any] = {}
    # The finishing run's lock expires after its archive, and the killed run is undone meanwhile.
    stall_after_archive = stall_then_roll_back("pending_archived", redis_client, settings, other, "r-killed", seen)

    with pytest.raises(LockLostError):
        finisher.compress("u1", run_id="r-next", checkpoint=stall_after_archive)

    assert seen["rollback"].status == ROLLED_BACK, seen["rollback"]
    assert len(events_of(mongo_db, "u1")) == 14, "the stale run deleted events the rollback put back"
    assert archive_of(mongo_db, "u1") == {} and profile_of(mongo_db, "u1")[PENDING_FIELD] is None


def test_a_fold_no_longer_pending_is_not_deleted_by_its_run(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    """With the lock still held, a pending fold another writer finished or an erasure began stops the delete (second review)."""
    settings = small_settings()
    insert_events(mongo_db, "u1", 14)

    def finished_elsewhere(step: str) -> None:
        if step == "archived":
            mongo_db["user_profiles"].update_one({"user_id": "u1"}, {"$set": {PENDING_FIELD: None}})

    with pytest.raises(ConcurrentUpdateError, match="finished by another run"):
        make_engine(mongo_db, redis_client, settings).compress("u1", checkpoint=finished_elsewhere)

    assert len(events_of(mongo_db, "u1")) == 14, "a fold no longer pending deleted its events"


def test_undo_then_undo_again_ends_before_the_first_run(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    # Roll back the newest run, then the one before: the first rollback only restored r0's own last
    # version, it built nothing on r0, so the second undo needs no --cascade (issue 23.1).
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    first = insert_events(mongo_db, "u1", 20)
    before_r0 = snapshot(mongo_db, "u1")
    engine.compress("u1", run_id="r0")
    later = insert_events(mongo_db, "u1", 15, first=20, start=LATER)
    assert engine.compress("u1", run_id="r1").summary_version == 6
    assert engine.rollback("u1", "r1", rollback_id="rb1").status == ROLLED_BACK

    dry = engine.rollback("u1", "r0", rollback_id="rb0", dry_run=True)
    result = engine.rollback("u1", "r0", rollback_id="rb0")

    assert dry.status == DRY_RUN and dry.events_missing == 0, dry
    assert result.status == ROLLED_BACK and result.restored_version == 0, result
    assert result.undone_runs == ["r0"], "the rollback of r1 is not a run built on r0"
    assert events_of(mongo_db, "u1") == {ev["_id"]: ev for ev in first + later}, "every event is back, once"
    assert archive_of(mongo_db, "u1") == {} == before_r0["archive"]
    profile = profile_of(mongo_db, "u1")
    assert profile["memory_summary"] == "" and profile[VERSION_FIELD] == 8 and ROLLBACK_FIELD not in profile


def undo_r1_then_fold_r2(db: Database[Doc], engine: Engine) -> Doc:
    """Run r0 (v1-v3) and r1 (v4-v6), roll r1 back (v7 = v3's text, watermark and time), run r2 on top;
    return the profile as it was at v7."""
    insert_events(db, "u1", 20)
    engine.compress("u1", run_id="r0")
    insert_events(db, "u1", 15, first=20, start=LATER)
    engine.compress("u1", run_id="r1")
    time.sleep(0.05)  # each commit at its own millisecond: a time taken from the wrong one shows
    assert engine.rollback("u1", "r1", rollback_id="rb1").status == ROLLED_BACK
    at_v7 = profile_of(db, "u1")
    time.sleep(0.05)
    insert_events(db, "u1", 5, first=35, start=LATEST)
    engine.compress("u1", run_id="r2")
    time.sleep(0.05)
    return at_v7


def assert_profile_back_at(db: Database[Doc], at: Doc) -> None:
    """Check the profile holds the text and bookkeeping it held at an earlier version."""
    after = profile_of(db, "u1")
    assert after["memory_summary"] == at["memory_summary"]
    assert after["memory_compressed_through"] == at["memory_compressed_through"]
    assert after["memory_compressed_at"] == at["memory_compressed_at"], (
        "rolling back to a rollback version set memory_compressed_at to the time of that rollback, "
        "not the profile's value at that version"
    )


def test_rolling_back_to_a_rollback_version_restores_its_compressed_at(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """Undoing a run back to a rollback's version restores that version's memory_compressed_at (third review)."""
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    at_v7 = undo_r1_then_fold_r2(mongo_db, engine)

    result = engine.rollback("u1", "r2", rollback_id="rb2")

    assert result.status == ROLLED_BACK and result.restored_version == 7, result
    assert_profile_back_at(mongo_db, at_v7)


def test_rolling_back_to_a_rollback_entry_written_without_compressed_at_restores_its_time(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A rollback entry from before entries held compressed_at is followed to the version it restored (third review)."""
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    at_v7 = undo_r1_then_fold_r2(mongo_db, engine)
    mongo_db["user_memory_summaries"].update_one({"user_id": "u1", "version": 7}, {"$unset": {"compressed_at": ""}})

    assert engine.rollback("u1", "r2", rollback_id="rb2").status == ROLLED_BACK
    assert_profile_back_at(mongo_db, at_v7)
