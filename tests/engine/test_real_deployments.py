"""The guarantees against what real servers and deployments do (issue 11): a Retry-After longer
than the lock's TTL, server errors that quote documents, another writer bumping the summary
version over a pending fold, and the Butler editing an event while it is being compressed."""

from __future__ import annotations

import logging
import traceback
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import monitoring
from pymongo.database import Database

from butler_memory.core.errors import CompressionError, StaleOwnLockError, StoreError
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED
from butler_memory.operations.engine import Engine
from butler_memory.storage.locks import UserLock, UserLocks
from butler_memory.storage.profiles import PENDING_FIELD
from tests.engine.conftest import Rig
from tests.engine.helpers import (
    Doc,
    archive_of,
    events_of,
    insert_events,
    make_events,
    profile_of,
    set_profile,
    small_settings,
    snapshot,
    summary_version,
)
from tools.fake_openai import default_responder
from tools.services import MongoService


class Killed(BaseException):
    """Stands for a SIGKILL at a checkpoint in an in-process test (the kill matrix uses real ones)."""


def kill_at(step: str) -> Any:
    def checkpoint(reached: str) -> None:
        if reached == step:
            raise Killed(step)

    return checkpoint


# -- finding 6: the lock outlives one LLM call, retries and Retry-After included -------------------


SHORT_LOCK = {"lock_ttl_seconds": 2, "llm_timeout_seconds": 0.9}
"""A lock TTL (2 s) that one LLM call (0.9 s at most) fits in."""


def test_the_lock_stays_ours_through_a_retry_after_longer_than_its_ttl(rig: Rig) -> None:
    settings = small_settings(**SHORT_LOCK)
    engine = rig.engine(settings, max_retries=1, timeout=0.9)
    insert_events(rig.db, "u1", 14)
    held_during_call: list[bool] = []

    def responder(request: Doc) -> str:
        # Another compression (the bot) tries the user's lock while ours waits on the LLM.
        held_during_call.append(not rig.redis.set(settings.lock_key("u1"), "the-bot", nx=True, px=5000))
        return default_responder(request)

    rig.llm.push_status(429, headers={"Retry-After": "3"})  # the openai client honours it: 3 s > TTL 2 s
    rig.llm.set_responder(responder)

    result = engine.compress("u1")

    assert held_during_call == [True], "the lock expired while the call waited: another holder got in"
    assert result.status == COMPRESSED and result.events_folded == 11, result
    assert rig.redis.keys("*") == [], "the lock must be released at the end"


# -- finding 7: no exception text that can carry a document -------------------------------------


def test_a_database_error_quoting_a_document_is_sanitised(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"CANARY-{uuid.uuid4().hex}"
    engine = rig.engine(small_settings())
    insert_events(rig.db, "u1", 14, content=lambda u, i: f"{u}-e{i:03d}: {canary} {i}")
    # A unique index the archive write violates: the server's error quotes the key and the whole op.
    archive = rig.db["user_memory_archive"]
    archive.create_index("content", unique=True)
    archive.insert_one({"_id": "other", "user_id": "u2", "content": f"u1-e004: {canary} 4"})

    with pytest.raises(CompressionError) as info:
        engine.compress("u1")

    error = info.value
    assert isinstance(error, StoreError) and error.user_id == "u1", repr(error)
    shown = "".join(traceback.format_exception(error)) + repr(error) + caplog.text
    assert canary not in shown, "a database error carried event content into an exception or a log"
    assert "BulkWriteError" in str(error) and "11000" in str(error), str(error)
    assert len(events_of(rig.db, "u1")) == 14, "nothing may be deleted when the archive write failed"
    assert (profile_of(rig.db, "u1") or {})[PENDING_FIELD] is not None, "the summary's pending fold remains"


# -- finding 9: a pending fold is cleared whoever bumped the version ---------------------------------


def test_a_pending_fold_is_cleared_after_another_writer_bumped_the_version(rig: Rig) -> None:
    settings = small_settings(max_events_per_chunk=5)
    engine = rig.engine(settings)
    insert_events(rig.db, "u1", 20)
    with pytest.raises(Killed):
        engine.compress("u1", checkpoint=kill_at("committed"))
    assert summary_version(rig.db, "u1") == 1
    # The bot's inline compression stores its own summary meanwhile; it knows nothing of our pending fold.
    set_profile(rig.db, "u1", memory_summary="- Сводка бота.", memory_summary_version=2)
    requests_before = len(rig.llm.chat_requests)

    result = engine.compress("u1")

    assert result.status == COMPRESSED, result
    profile = profile_of(rig.db, "u1") or {}
    assert profile[PENDING_FIELD] is None, "the pending fold must be cleared"
    assert len(events_of(rig.db, "u1")) == 3
    assert len(rig.llm.chat_requests) - requests_before == result.chunks, "no LLM call may be wasted"
    again = engine.compress("u1")
    assert again.status != "failed", again


# -- finding 11: an event edited during its compression is not deleted ---------------------------


def test_an_event_edited_during_the_llm_call_is_kept(rig: Rig) -> None:
    engine = rig.engine(small_settings())
    insert_events(rig.db, "u1", 14)

    def responder(request: Doc) -> str:
        # The Butler re-tags and corrects an old event while the LLM is summarising its old version.
        rig.db["user_memory"].update_one({"_id": "u1-e002"}, {"$set": {"content": "исправлено", "tags": ["corrected"]}})
        return default_responder(request)

    rig.llm.set_responder(responder)

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    remaining = events_of(rig.db, "u1")
    assert remaining["u1-e002"]["content"] == "исправлено", "the newer version of an edited event was deleted"
    assert sorted(remaining) == ["u1-e002", "u1-e011", "u1-e012", "u1-e013"]
    assert archive_of(rig.db, "u1")["u1-e002"]["content"] != "исправлено", "the archive holds what was summarised"


def test_an_event_edited_before_a_pending_fold_is_finished_is_kept(rig: Rig) -> None:
    engine = rig.engine(small_settings())
    insert_events(rig.db, "u1", 14)
    with pytest.raises(Killed):
        engine.compress("u1", checkpoint=kill_at("committed"))
    rig.db["user_memory"].update_one({"_id": "u1-e005"}, {"$set": {"content": "новая версия"}})

    engine.compress("u1")

    remaining = events_of(rig.db, "u1")
    assert remaining.get("u1-e005", {}).get("content") == "новая версия", "recovery deleted an edited event"


ODD_NAMES = {"meta.source": "ios", "$client": {"app.version": "2.1", "$build": 7}}
"""Top-level field names with a dot and a ``$`` (valid since MongoDB 5.0), and such names inside."""


def test_unchanged_event_with_a_dotted_field_name_is_deleted_after_its_fold(rig: Rig) -> None:
    """Deleting a summarised event never reads its field names as query syntax (second review)."""
    settings = small_settings()
    events = make_events("u1", 14)
    for ev in events:
        ev.update(ODD_NAMES)
    rig.db["user_memory"].insert_many(events)

    result = rig.engine(settings).compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    left = events_of(rig.db, "u1")
    # Nothing changed these events; they are summarised, so they must be gone (else every fold summarises them again).
    assert len(left) == settings.keep_last_n, f"{len(left)} events left, {result.events_deleted} deleted"
    assert len(archive_of(rig.db, "u1")) == 11


def test_an_event_with_a_dotted_field_name_edited_during_the_llm_call_is_kept(rig: Rig) -> None:
    """The whole-document match stays a guard against an edit, whatever the field names (second review)."""
    events = make_events("u1", 14)
    for ev in events:
        ev.update(ODD_NAMES)
    rig.db["user_memory"].insert_many(events)

    def responder(request: Doc) -> str:
        rig.db["user_memory"].update_one({"_id": "u1-e002"}, {"$set": {"tags": ["corrected"]}})  # a field added
        rig.db["user_memory"].update_one(
            {"_id": "u1-e004"},
            [{"$replaceWith": {"$setField": {"field": "meta.source", "input": "$$ROOT", "value": "web"}}}],
        )
        return default_responder(request)

    rig.llm.set_responder(responder)

    result = rig.engine(small_settings()).compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    remaining = events_of(rig.db, "u1")
    assert sorted(remaining) == ["u1-e002", "u1-e004", "u1-e011", "u1-e012", "u1-e013"], sorted(remaining)
    assert remaining["u1-e004"]["meta.source"] == "web", "the newer version of an edited event was deleted"


def test_an_event_with_a_dotted_field_name_is_moved_to_the_quarantine(rig: Rig) -> None:
    """Quarantining removes the event from user_memory however its fields are named (second review)."""
    settings = small_settings()
    events = make_events("u1", 14)
    for ev in events:
        ev.update(ODD_NAMES)
    events[2]["content"] = "x" * (settings.max_event_chars + 1)
    rig.db["user_memory"].insert_many(events)

    result = rig.engine(settings).compress("u1")

    assert result.status == COMPRESSED and result.events_quarantined == 1, result
    assert "u1-e002" not in events_of(rig.db, "u1"), "the quarantined event is still in user_memory"
    record = rig.db["user_memory_quarantine"].find_one({"_id": "u1-e002"})
    assert record is not None and record["event"]["meta.source"] == "ios"


# -- finding 8: a retry after a kill does not read its own stale lock as someone else's -----------

HOLDER = "memory_compression|scheduled__2026-01-01|compress_user|3"


def locked_user(rig: Rig, holder: str) -> tuple[Settings, Engine, UserLock]:
    """Give u1 14 events and take u1's lock for ``holder``; return the short-lock settings, an engine
    on them (LLM timeout 0.9 s) and the lock taken."""
    settings = small_settings(**SHORT_LOCK)
    engine = rig.engine(settings, timeout=0.9)
    insert_events(rig.db, "u1", 14)
    lock = UserLocks(rig.redis, settings).acquire("u1", holder=holder)
    assert lock is not None
    return settings, engine, lock


def test_a_retry_waits_out_the_lock_its_killed_attempt_left(rig: Rig) -> None:
    _, engine, _killed = locked_user(rig, HOLDER)  # never released: the attempt died

    result = engine.compress("u1", holder=HOLDER)

    assert result.status == COMPRESSED and result.events_folded == 11, result


def test_a_lock_of_another_holder_is_still_skipped(rig: Rig) -> None:
    settings, engine, other = locked_user(rig, HOLDER.replace("|3", "|4"))

    assert engine.compress("u1", holder=HOLDER).status == "skipped_locked"
    other.release()
    rig.redis.set(settings.lock_key("u1"), "the-bot's-own-token", px=2000)
    assert engine.compress("u1", holder=HOLDER).status == "skipped_locked"


def test_an_earlier_attempt_that_is_still_alive_fails_the_retry(rig: Rig) -> None:
    _, engine, alive = locked_user(rig, HOLDER)
    before = snapshot(rig.db, "u1")

    with alive.kept_alive(), pytest.raises(StaleOwnLockError) as info:
        engine.compress("u1", holder=HOLDER)

    assert info.value.retryable, "Airflow must come back later, not count it as done"
    assert snapshot(rig.db, "u1") == before
    alive.release()


# -- finding 4: majority writes and reads where the invariant depends on them --------------------


class Commands(monitoring.CommandListener):
    """Every command a client sends, as the server received it."""

    def __init__(self) -> None:
        self.seen: list[Doc] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.seen.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_commit_archive_and_delete_are_majority_writes_and_the_profile_a_majority_read(
    mongo_service: MongoService, rig: Rig
) -> None:
    listener = Commands()
    client = mongo_service.client(event_listeners=[listener])
    db = client[f"wc_{uuid.uuid4().hex[:8]}"]
    try:
        engine = replace(rig, db=db).engine(small_settings())  # the rig on the listened client's database
        insert_events(db, "u1", 14)
        listener.seen.clear()

        result = engine.compress("u1")
    finally:
        client.drop_database(db.name)
        client.close()

    assert result.status == COMPRESSED, result
    writes = [
        c
        for c in listener.seen
        if next(iter(c)) in ("update", "delete", "insert") and c[next(iter(c))] != "memory_compression_runs"
    ]
    kinds = {(next(iter(c)), c[next(iter(c))]) for c in writes}
    assert {("update", "user_profiles"), ("update", "user_memory_archive"), ("delete", "user_memory")} <= kinds, kinds
    for command in writes:
        if command[next(iter(command))] in ("user_profiles", "user_memory_archive", "user_memory"):
            assert command.get("writeConcern", {}).get("w") == "majority", command.get("writeConcern")
    profile_reads = [c for c in listener.seen if c.get("find") == "user_profiles"]
    assert profile_reads and all(c.get("readConcern", {}).get("level") == "majority" for c in profile_reads)


# -- finding 10: compound and mixed-type ids; one short query per chunk ----------------------------


def test_compound_and_mixed_type_ids_are_folded(rig: Rig) -> None:
    settings = small_settings(max_events_per_chunk=4)
    engine = rig.engine(settings)
    start = datetime(2026, 1, 1)
    ids: list[Any] = [{"chat": 7, "n": i} if i % 3 == 0 else ObjectId() if i % 3 == 1 else f"s{i}" for i in range(14)]
    rig.db["user_memory"].insert_many(
        [
            {
                "_id": _id,
                "user_id": "u1",
                "role": "user",
                "content": f"turn {i}",
                "created_at": start + timedelta(seconds=i // 2),
            }
            for i, _id in enumerate(ids)
        ]
    )
    with pytest.raises(Killed):  # killed between chunks: the re-run compares ids against the fold target
        engine.compress("u1", checkpoint=kill_at("cleared"))

    result = engine.compress("u1")

    assert result.status == COMPRESSED, result
    assert len(events_of_any(rig.db, "u1")) == 3


def events_of_any(db: Database[Doc], user_id: str) -> list[Doc]:
    return list(db["user_memory"].find({"user_id": user_id}))


def test_a_huge_user_is_folded_over_runs_without_holding_every_key(rig: Rig) -> None:
    settings = small_settings(max_fold_events=20, max_events_per_chunk=10)
    engine = rig.engine(settings)
    insert_events(rig.db, "u1", 60)

    first = engine.compress("u1")
    assert first.events_folded == 20, "one run folds at most max_fold_events"
    assert sorted(events_of(rig.db, "u1"))[0] == "u1-e020", "the oldest go first"
    while engine.compress("u1").status == COMPRESSED:
        pass
    assert len(events_of(rig.db, "u1")) == 3
