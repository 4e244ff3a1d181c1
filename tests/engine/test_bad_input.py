"""Malformed Butler data: a bad event is quarantined and its user folded; a bad profile fails that user only."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from pymongo.database import Database
from redis.backoff import NoBackoff
from redis.retry import Retry

from butler_memory.core.errors import CompressionError, InvalidProfileError, LockUnavailableError
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD, failed_result
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.storage.locks import UserLocks
from tests.engine.helpers import (
    archive_of,
    events_of,
    insert_events,
    make_engine,
    profile_of,
    set_profile,
    small_settings,
    snapshot,
)
from tools.services import free_port

Doc = dict[str, Any]
BAD_EVENT = "bad-e002"
"""The corrupted event: among those a compression folds (not the newest keep_last_n)."""


def update_event(update: Doc) -> Callable[[Database[Doc], Settings], None]:
    """Return a corruption applying a MongoDB update to the bad user's event e002."""

    def corrupt(db: Database[Doc], settings: Settings) -> None:
        db["user_memory"].update_one({"_id": BAD_EVENT}, update)

    return corrupt


def huge_content(db: Database[Doc], settings: Settings) -> None:
    """Make the bad event one character longer than max_event_chars."""
    db["user_memory"].update_one({"_id": BAD_EVENT}, {"$set": {"content": "x" * (settings.max_event_chars + 1)}})


EVENT_CORRUPTIONS: dict[str, tuple[Callable[[Database[Doc], Settings], None], str]] = {
    "content-missing": (update_event({"$unset": {"content": ""}}), "content"),
    "content-not-a-string": (update_event({"$set": {"content": {"text": "hi"}}}), "content"),
    "content-too-long": (huge_content, "content"),
    "created_at-missing": (update_event({"$unset": {"created_at": ""}}), "created_at"),
    "created_at-a-string": (update_event({"$set": {"created_at": "2026-01-01"}}), "created_at"),
    "role-missing": (update_event({"$unset": {"role": ""}}), "role"),
}


@pytest.mark.parametrize("corruption", list(EVENT_CORRUPTIONS.values()), ids=list(EVENT_CORRUPTIONS))
def test_a_bad_event_is_quarantined_and_the_rest_of_its_user_is_folded(
    corruption: tuple[Callable[[Database[Doc], Settings], None], str],
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
) -> None:
    corrupt, field = corruption
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings, OfflineSummarizer())
    for user_id in ("bad", "good"):
        insert_events(mongo_db, user_id, 14)
    corrupt(mongo_db, settings)
    bad = mongo_db["user_memory"].find_one({"_id": BAD_EVENT})
    assert bad is not None

    outcomes = {backlog.user_id: engine.compress(backlog.user_id, run_id="r1") for backlog in engine.scan()}

    result = outcomes["bad"]
    assert result.status == COMPRESSED and result.events_quarantined == 1, result
    assert result.events_folded == 14 - settings.keep_last_n - 1, result
    assert outcomes["good"].status == COMPRESSED and outcomes["good"].events_quarantined == 0
    assert len(events_of(mongo_db, "bad")) == settings.keep_last_n, "the bad event blocked its user's fold"
    assert BAD_EVENT not in archive_of(mongo_db, "bad"), "a quarantined event is in no summary"
    record = mongo_db["user_memory_quarantine"].find_one({"_id": BAD_EVENT})
    assert record is not None, "the bad event was dropped instead of quarantined"
    assert record["event"] == bad, "the quarantine must keep the event exactly as it was"
    assert (record["user_id"], record["field"], record["run_id"]) == ("bad", field, "r1"), record
    assert "xxxxxxxx" not in record["problem"] and "hi" not in record["problem"], "the reason quotes content"
    summary = (profile_of(mongo_db, "bad") or {}).get("memory_summary", "")
    assert "bad-e002" not in summary, "the quarantined event reached the summary"
    assert redis_client.keys("*") == [], "the lock must be released"


def test_a_user_with_bad_events_drains_over_runs(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    """Today's bad event and tomorrow's: every run folds what it can, the backlog shrinks to keep_last_n."""
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings, OfflineSummarizer())
    insert_events(mongo_db, "u1", 30)
    mongo_db["user_memory"].update_one({"_id": "u1-e000"}, {"$set": {"content": ["not", "text"]}})
    mongo_db["user_memory"].update_one({"_id": "u1-e005"}, {"$set": {"content": "x" * (settings.max_event_chars + 1)}})
    first = engine.compress("u1")
    assert (first.status, first.events_quarantined, first.events_after) == (COMPRESSED, 2, settings.keep_last_n)

    insert_events(mongo_db, "u1", 20, first=30)
    mongo_db["user_memory"].update_one({"_id": "u1-e031"}, {"$unset": {"role": ""}})
    second = engine.compress("u1")

    assert (second.status, second.events_quarantined, second.events_after) == (COMPRESSED, 1, settings.keep_last_n)
    assert sorted(d["_id"] for d in mongo_db["user_memory_quarantine"].find()) == ["u1-e000", "u1-e005", "u1-e031"]
    third = engine.compress("u1")
    assert third.status == SKIPPED_BELOW_THRESHOLD, "the backlog must be drained, not fail again"


def test_a_bad_profile_fails_its_user_clearly_and_not_the_others(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings, OfflineSummarizer())
    for user_id in ("bad", "good"):
        insert_events(mongo_db, user_id, 14)
    set_profile(mongo_db, "bad", memory_summary=42)
    before = snapshot(mongo_db, "bad")

    outcomes: dict[str, Any] = {}
    for backlog in engine.scan():  # "bad" first: ties are ordered by user id
        try:
            outcomes[backlog.user_id] = engine.compress(backlog.user_id).status
        except CompressionError as exc:
            outcomes[backlog.user_id] = exc

    error = outcomes["bad"]
    assert isinstance(error, InvalidProfileError), f"expected InvalidProfileError for the bad user, got {error!r}"
    message = str(error)
    assert "'bad'" in message and "'memory_summary'" in message, f"the error must name the user and field: {message}"
    assert not error.retryable, "bad data does not heal by retrying"
    assert failed_result("bad", error).error == message
    assert outcomes["good"] == COMPRESSED, "one user's bad data stopped another user"
    assert len(events_of(mongo_db, "good")) == settings.keep_last_n
    assert snapshot(mongo_db, "bad") == before, "the bad user's data was changed"
    assert redis_client.keys("*") == [], "a failed user's lock must be released"


def test_unreachable_redis_fails_closed_and_writes_nothing(mongo_db: Database[Doc]) -> None:
    settings = small_settings()
    # No retries: redis-py's default backoff would only make the refusal slower.
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    locks = UserLocks(dead, settings)
    engine = make_engine(mongo_db, dead, settings)
    insert_events(mongo_db, "u1", 14)
    before = snapshot(mongo_db, "u1")
    try:
        with pytest.raises(LockUnavailableError) as info:
            engine.compress("u1")
        with pytest.raises(LockUnavailableError, match="unreachable"):
            locks.ping()
    finally:
        dead.close()

    assert info.value.retryable and "'u1'" in str(info.value), info.value
    assert snapshot(mongo_db, "u1") == before, "a compression without a lock wrote to MongoDB"
    assert mongo_db.list_collection_names() == ["user_memory"], "nothing else may be created without a lock"


def test_silent_redis_times_out_through_the_connection_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch, airflow_conns: object
) -> None:
    """A Redis host that accepts and never answers fails closed within the configured timeout."""
    from butler_memory.orchestration.connections import user_locks

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    monkeypatch.setenv(
        "AIRFLOW_CONN_REDIS_DEFAULT", json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": port})
    )
    locks = user_locks(small_settings().replace(redis_timeout_seconds=0.2))
    started = time.monotonic()
    try:
        with pytest.raises(LockUnavailableError, match="TimeoutError"):
            locks.ping()
    finally:
        locks.close()
        silent.close()
    # redis-py retries a timed-out command a few times; without a timeout it would wait forever.
    assert time.monotonic() - started < 30, "the lock client has no socket timeout"


def test_a_user_the_daily_run_compresses_can_be_forgotten_by_the_cli(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """The scan and compress_user take only the ids the forget CLI accepts, so every summarised user can be erased (third review)."""
    from butler_memory.cli import build_parser
    from butler_memory.core.errors import InvalidUserIdError

    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings)
    longest, too_long, spaced = "u" * 200, "u" * 201, "alice smith"
    for user_id in (longest, too_long, spaced):
        insert_events(mongo_db, user_id, 14)

    assert [b.user_id for b in engine.scan()] == [longest]
    assert engine.compress(longest, run_id="r1").status == COMPRESSED
    build_parser().parse_args(["forget", "--user", longest])  # no SystemExit: the CLI erases it
    for user_id in (too_long, spaced):
        with pytest.raises(InvalidUserIdError, match="is not a user id"):
            engine.compress(user_id, run_id="r1")
        assert mongo_db["user_memory_summaries"].count_documents({"user_id": user_id}) == 0
        assert mongo_db["user_memory"].count_documents({"user_id": user_id}) == 14


@pytest.mark.parametrize("slack", [64, 0])
def test_ids_that_are_not_user_ids_take_no_place_in_the_scan(
    slack: int, mongo_db: Database[Doc], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The largest backlogs belong to ids the job cannot take: the scan still returns ``limit`` users,
    so the full reconciliation's "fewer than asked: every one" holds (third review). With no slack in
    the ``$limit``, the scan asks again for as many more as it left out."""
    from butler_memory.storage import events

    monkeypatch.setattr(events, "SCAN_SLACK", slack)
    engine = make_engine(mongo_db, redis_client, small_settings())
    for user_id, n in (("u" * 201, 40), ("alice smith", 30), ("u1", 20), ("u2", 19), ("u3", 18)):
        insert_events(mongo_db, user_id, n)

    assert [b.user_id for b in engine.store.scan(10, 2)] == ["u1", "u2"]
    assert [b.user_id for b in engine.store.scan(10, 5)] == ["u1", "u2", "u3"]
