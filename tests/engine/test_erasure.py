"""Forgetting a user: every place we write is searched afterwards; bad input changes nothing."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import UTC, datetime
from typing import Any

import pymongo
import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError, ErasurePendingError, ForgetInputError, LockBusyError
from butler_memory.core.settings import Settings
from butler_memory.fold.report import build_report
from butler_memory.freshness.backoff import FailureBackoff
from butler_memory.operations import audit, erasure
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.profiles import ERASING_FIELD
from butler_memory.storage.store import MemoryStore
from tests.engine.erasure_helpers import (
    CANARY,
    FACT_USER,
    FACTS,
    OTHER,
    OTHER_CANARY,
    SECRET,
    SHARED_KEY,
    TARGET,
    TEST_KEY_PATTERN,
    fact_content,
    fact_settings,
    mongo_mentions,
    quarantine_one,
    redis_mentions,
    seed_everywhere,
)
from tests.engine.helpers import (
    DocumentsRead,
    events_of,
    insert_events,
    make_engine,
    profile_of,
    set_profile,
    small_settings,
)
from tools.services import MongoService

Doc = dict[str, Any]


@pytest.fixture
def registered_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register a per-user key pattern and a shared key, as a module keeping such keys would."""
    monkeypatch.setattr(erasure, "USER_KEY_PATTERNS", [*erasure.USER_KEY_PATTERNS, lambda s: TEST_KEY_PATTERN])
    monkeypatch.setattr(erasure, "SHARED_REDIS_MEMBERS", [*erasure.SHARED_REDIS_MEMBERS, lambda s: SHARED_KEY])


def forget(db: Database[Doc], client: redis.Redis, settings: Settings, user_id: str = TARGET, **kwargs: Any) -> Any:
    """Run forget_user with the test secret."""
    return erasure.forget_user(
        user_id,
        settings=settings,
        store=MemoryStore(db, settings),
        locks=UserLocks(client, settings),
        secret=SECRET,
        **kwargs,
    )


def everything(db: Database[Doc], client: redis.Redis) -> Doc:
    """Return every document of every collection and every Redis key with its value."""
    return {
        "mongo": {name: list(db[name].find({})) for name in sorted(db.list_collection_names())},
        "redis": sorted(redis_mentions(client, [TARGET, OTHER, "lock"])),
    }


def test_forgetting_a_user_leaves_no_trace_of_them_anywhere_and_the_other_user_intact(
    mongo_db: Database[Doc], redis_client: redis.Redis, registered_keys: None, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    for user_id in (TARGET, OTHER):
        quarantine_one(mongo_db, settings, user_id)
    assert mongo_mentions(mongo_db, [TARGET, CANARY]), "the seed should have put the user everywhere"
    other_before = {name: list(mongo_db[name].find({"user_id": OTHER})) for name in mongo_db.list_collection_names()}

    result = forget(mongo_db, redis_client, settings, events=True, requested_by="test")

    assert result.status == erasure.ERASED, result
    assert mongo_mentions(mongo_db, [TARGET, CANARY]) == [], "a document still names the user or holds their content"
    assert redis_mentions(redis_client, [TARGET, CANARY]) == [], "a Redis key still names the user"
    # The other user lost nothing.
    for name, docs in other_before.items():
        assert list(mongo_db[name].find({"user_id": OTHER})) == docs, f"{name}: the other user's documents changed"
    assert redis_client.get(TEST_KEY_PATTERN.format(user_id=OTHER)) == f"pending for {OTHER}".encode()
    assert redis_client.smembers(SHARED_KEY) == {OTHER.encode()}
    assert redis_client.zrange(settings.doorbell_key, 0, -1) == [OTHER.encode()], (
        "the doorbell record of the other user"
    )
    runs = {doc["run_id"]: doc for doc in mongo_db[settings.runs_collection].find()}
    assert [u["user_id"] for u in runs["seed-run"]["users"]] == [OTHER]
    assert runs["failed-run"]["failed_user_ids"] == []
    assert mongo_mentions(mongo_db, [OTHER_CANARY]), "the other user's content should still be there"
    # The audit record: counts, a reference, no id, no content.
    records = list(mongo_db[settings.erasures_collection].find())
    assert len(records) == 1, records
    record = records[0]
    assert record["subject"] == audit.subject_ref(SECRET, TARGET) == result.subject
    assert record["state"] == "done" and record["_id"] == result.erasure_id
    assert record["removed"] == result.removed
    assert result.removed == {
        "events": 3,
        "archive": 22,
        "quarantine": 1,
        "history": 2,  # version 1 of the compression and the planted one
        "run_documents": 3,  # two runs and a catch-up run
        "profile_fields": result.removed["profile_fields"],
        "redis_keys": 4,  # the per-user key, the shared set, the doorbell's record and its ring numbers
    }, result.removed
    assert result.removed["profile_fields"] >= 4
    assert record["left"] == {} == result.left
    assert audit.audit_records(MemoryStore(mongo_db, settings), SECRET, TARGET) == records
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert CANARY not in logged and CANARY not in json.dumps(result.to_dict()), "content in the logs or the result"


def test_forgetting_again_finds_the_erasure_done_and_writes_nothing(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    first = forget(mongo_db, redis_client, settings, events=True)
    before = everything(mongo_db, redis_client)

    again = forget(mongo_db, redis_client, settings, events=True)

    assert again.status == audit.ALREADY_ERASED and again.erasure_id == first.erasure_id, again
    assert everything(mongo_db, redis_client) == before


def test_without_events_the_butlers_events_stay_and_the_result_says_so(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)

    result = forget(mongo_db, redis_client, settings)

    assert result.status == erasure.ERASED
    assert len(events_of(mongo_db, TARGET)) == settings.keep_last_n, "user_memory is the Butler's to delete here"
    assert result.removed["events"] == 0 and result.left == {"events": settings.keep_last_n}
    assert any("still in user_memory" in note for note in result.notes), result.notes
    assert profile_of(mongo_db, TARGET) is None
    assert mongo_db["user_memory_archive"].count_documents({"user_id": TARGET}) == 0


def test_the_butlers_own_profile_fields_stay(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    set_profile(mongo_db, TARGET, language="en", display_name="Ada")

    forget(mongo_db, redis_client, settings, events=True)

    assert profile_of(mongo_db, TARGET) == {"user_id": TARGET, "language": "en", "display_name": "Ada"}


def test_dry_run_counts_and_changes_nothing(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    before = everything(mongo_db, redis_client)

    result = forget(mongo_db, redis_client, settings, events=True, dry_run=True)

    assert result.status == audit.DRY_RUN
    assert result.removed["events"] == 3 and result.removed["archive"] == 22, result.removed
    assert everything(mongo_db, redis_client) == before


@pytest.mark.parametrize("user_id", ["nobody-here", "", "   ", None, 42])
def test_an_unknown_or_malformed_user_is_refused_and_nothing_changes(
    user_id: Any, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    before = everything(mongo_db, redis_client)

    with pytest.raises(ForgetInputError) as info:
        forget(mongo_db, redis_client, settings, user_id=user_id, events=True)

    assert repr(user_id) in str(info.value), info.value
    assert not info.value.retryable
    assert everything(mongo_db, redis_client) == before


def test_an_erasure_waits_for_a_running_compression_and_gives_up_at_its_bound(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings(erasure_lock_wait_seconds=1)
    insert_events(mongo_db, TARGET, 5)
    key = settings.lock_key(TARGET)
    redis_client.set(key, "a-compression", px=60_000)
    before = everything(mongo_db, redis_client)

    with pytest.raises(LockBusyError) as info:
        forget(mongo_db, redis_client, settings, events=True)
    assert info.value.retryable and f"{TARGET!r}" in str(info.value)
    assert everything(mongo_db, redis_client) == before, "an erasure without the lock changed something"

    # The holder finishes while the erasure waits: the erasure then goes ahead.
    redis_client.pexpire(key, 300)
    result = forget(mongo_db, redis_client, settings.replace(erasure_lock_wait_seconds=10), events=True)
    assert result.status == erasure.ERASED and events_of(mongo_db, TARGET) == {}


def test_a_compression_refuses_a_user_whose_erasure_is_unfinished(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    insert_events(mongo_db, TARGET, 14)
    set_profile(mongo_db, TARGET, **{ERASING_FIELD: "an-erasure-id"})
    engine = make_engine(mongo_db, redis_client, settings)

    with pytest.raises(ErasurePendingError) as info:
        engine.compress(TARGET)

    assert info.value.retryable and f"{TARGET!r}" in str(info.value)
    assert len(events_of(mongo_db, TARGET)) == 14
    assert redis_client.keys("*") == [], "the refused compression must release its lock"


def test_the_butlers_call_erases_with_plain_clients(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)

    done = erasure.erase_user(
        TARGET, db=mongo_db, redis_client=redis_client, secret=SECRET.decode(), events=True, settings=settings
    )

    assert done["status"] == erasure.ERASED
    assert json.dumps(done, default=str).count(TARGET) == 0, "the result names the user"
    assert mongo_mentions(mongo_db, [TARGET, CANARY]) == []


def test_a_short_secret_is_refused() -> None:
    from butler_memory.core.settings import SettingsError

    with pytest.raises(SettingsError, match="BUTLER_MEMORY_ERASURE_SECRET"):
        audit.erasure_secret({audit.SECRET_ENV: "short"})
    assert audit.erasure_secret({audit.SECRET_ENV: "x" * 16}) == b"x" * 16


def test_lock_waits_do_not_block_other_threads_forever(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    """Two erasures of one user at once: one erases, the other waits and then finds it done."""
    settings = small_settings(erasure_lock_wait_seconds=20)
    seed_everywhere(mongo_db, redis_client, settings)
    results: list[Any] = []

    def run() -> None:
        with redis.Redis(**redis_client.connection_pool.connection_kwargs) as client:
            results.append(forget(mongo_db, client, settings, events=True))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(r.status for r in results) == [audit.ALREADY_ERASED, erasure.ERASED], results
    assert mongo_db[settings.erasures_collection].count_documents({}) == 1


def test_an_erasure_reads_only_the_run_documents_naming_the_user(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """Issue 26, item 7: every run, catch-up run and state document was read three times per erasure."""
    settings = small_settings()
    MemoryStore(mongo_db, settings).ensure_indexes()
    store = MemoryStore(mongo_db, settings)
    day = datetime(2026, 6, 1, tzinfo=UTC)
    for i in range(60):  # a run history that does not name the user
        rows = [{"user_id": OTHER, "status": "compressed"}]
        store.save_run(build_report(run_id=f"r{i}", scanned=[OTHER], results=rows, started_at=day, finished_at=day))
    for i, kind in enumerate(["daily", "catchup"]):
        rows = [{"user_id": TARGET, "status": "failed", "error": f"user {TARGET!r}: failed"}]
        doc = build_report(
            run_id=f"t{i}", scanned=[TARGET, OTHER], results=rows, started_at=day, finished_at=day, kind=kind
        )
        store.save_run(doc)
    listener = DocumentsRead({settings.runs_collection, settings.catchup_runs_collection})
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_service.uri, event_listeners=[listener])
    try:
        result = forget(client[mongo_db.name], redis_client, settings)
    finally:
        client.close()

    assert result.status == erasure.ERASED and result.removed["run_documents"] == 2, result
    # The two documents naming the user, read to count them and to scrub them; none left afterwards.
    assert listener.read == 2 * 2, "an erasure read run documents that do not name the user"
    assert mongo_mentions(mongo_db, [TARGET]) == []
    assert [d.get("user_ids") for d in mongo_db[settings.runs_collection].find({"run_id": "t0"})] == [[OTHER]]


def test_a_user_erasure_removes_the_users_backoff_key(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    """The failure back-off hash is a per-user key like the lock, and goes with the user (second review)."""
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    FailureBackoff(redis_client, settings).record_failure(TARGET, "GuardRejected")
    FailureBackoff(redis_client, settings).record_failure(OTHER, "GuardRejected")
    assert redis_client.exists(settings.backoff_key_pattern.format(user_id=TARGET))

    result = forget(mongo_db, redis_client, settings, events=True)

    assert result.status == erasure.ERASED, result
    left = [k.decode() for k in redis_client.scan_iter("butler:memory:backoff:*")]
    assert left == [settings.backoff_key_pattern.format(user_id=OTHER)], left


def test_every_per_user_key_setting_is_erased() -> None:
    """Each ``*_key_pattern`` setting naming ``{user_id}`` is a key a user erasure deletes (second review)."""
    per_user = sorted(
        f.name
        for f in dataclasses.fields(Settings)
        if f.name.endswith("_key_pattern") and "{user_id}" in str(f.default)
    )
    assert per_user and sorted(erasure.USER_KEY_SETTINGS) == per_user
    settings = small_settings()
    keys = erasure.redis_user_keys(settings, TARGET)
    assert all(getattr(settings, name).format(user_id=TARGET) in keys for name in per_user), keys


def test_a_run_document_keeps_another_users_id_that_contains_the_erased_one() -> None:
    """Only the erased id goes from a run document, not an id that contains it (second review)."""
    doc = {
        "user_ids": ["alice", "alice@example.com", "tg:alice"],
        "users": [{"user_id": "alice"}, {"user_id": "alice+work", "error": "user 'alice+work': failed"}],
        "backlog": {"alice": 3, "alice:2": 4},
        "error": "first 'alice', then 'alice:2'",
    }
    assert erasure.scrub(doc, "alice", erasure.id_pattern("alice")) == {
        "user_ids": ["alice@example.com", "tg:alice"],
        "users": [{"user_id": "alice+work", "error": "user 'alice+work': failed"}],
        "backlog": {"alice:2": 4},
        "error": "first '[erased]', then 'alice:2'",
    }


def test_a_compression_stalled_before_its_commit_writes_nothing_over_a_whole_user_erasure(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A run stalled past its lock's TTL after its history write commits nothing over an erasure done
    meanwhile, though the erasure removed the version its first commit would match (third review)."""
    settings = fact_settings()
    insert_events(mongo_db, FACT_USER, 14, content=fact_content)
    mongo_db["user_profiles"].insert_one({"user_id": FACT_USER, "name": "the Butler's own field"})
    slow = make_engine(mongo_db, redis_client, settings)
    seen: dict[str, Any] = {}

    def stall_then_erase(step: str) -> None:
        # The slow run wrote its history entry; before its commit it stalls past the lock's TTL, and
        # the user asks to be erased (their events too) with the free lock.
        if step != "recorded" or seen:
            return
        redis_client.delete(settings.lock_key(FACT_USER))
        seen["erasure"] = erasure.forget_user(
            FACT_USER, settings=settings, store=slow.store, locks=slow.locks, secret=SECRET, events=True
        )

    with pytest.raises(ConcurrentUpdateError):
        slow.compress(FACT_USER, run_id="r-slow", checkpoint=stall_then_erase)

    assert seen["erasure"].status == erasure.ERASED, seen["erasure"]
    profile = profile_of(mongo_db, FACT_USER) or {}
    assert profile == {"user_id": FACT_USER, "name": "the Butler's own field"}, f"the stale run committed: {profile}"
    assert mongo_mentions(mongo_db, list(FACTS.values())) == [], "an erased user's fact is back in the memory"


def test_the_erasures_during_the_largest_run_are_found_without_a_command_over_16_mb(mongo_db: Database[Doc]) -> None:
    """A run's report looks up the erasures requested since it began among all its users: 204,800 at
    the most, whose references in one ``$in`` made a command over MongoDB's 16 MB (third review)."""
    store = MemoryStore(mongo_db, Settings())
    users = [f"{i:08d}-4e0f-4b1c-9a7d-3c0ffee{i:05d}" for i in range(204_800)]
    started = datetime.now(UTC)
    log = audit.AuditLog(store)
    log.coll.insert_one({"subject": audit.subject_ref(SECRET, users[7]), "kind": "user", "requested_at": started})
    log.coll.insert_one(
        {"subject": audit.subject_ref(SECRET, users[9]), "kind": "user", "requested_at": datetime(2026, 1, 1)}
    )
    assert log.erased_since(SECRET, users, started) == {users[7]}
