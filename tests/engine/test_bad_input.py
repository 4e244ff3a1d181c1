"""Malformed Butler data fails one user with an error naming the user and the field; others go on."""

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

from butler_memory.compression import COMPRESSED, failed_result
from butler_memory.errors import CompressionError, InvalidEventError, InvalidProfileError, LockUnavailableError
from butler_memory.locks import UserLocks
from butler_memory.offline import OfflineSummarizer
from butler_memory.settings import Settings
from tests.engine.helpers import events_of, insert_events, make_engine, set_profile, small_settings, snapshot
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


def numeric_summary(db: Database[Doc], settings: Settings) -> None:
    """Store a number where the profile's summary belongs."""
    set_profile(db, "bad", memory_summary=42)


CORRUPTIONS: dict[str, tuple[Callable[[Database[Doc], Settings], None], type[CompressionError], str]] = {
    "content-missing": (update_event({"$unset": {"content": ""}}), InvalidEventError, "content"),
    "content-not-a-string": (update_event({"$set": {"content": {"text": "hi"}}}), InvalidEventError, "content"),
    "content-too-long": (huge_content, InvalidEventError, "content"),
    "created_at-missing": (update_event({"$unset": {"created_at": ""}}), InvalidEventError, "created_at"),
    "created_at-a-string": (update_event({"$set": {"created_at": "2026-01-01"}}), InvalidEventError, "created_at"),
    "role-missing": (update_event({"$unset": {"role": ""}}), InvalidEventError, "role"),
    "summary-a-number": (numeric_summary, InvalidProfileError, "memory_summary"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_bad_input_fails_its_user_clearly_and_not_the_others(
    corruption: tuple[Callable[[Database[Doc], Settings], None], type[CompressionError], str],
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
) -> None:
    corrupt, expected, field = corruption
    settings = small_settings()
    engine = make_engine(mongo_db, redis_client, settings, OfflineSummarizer())
    for user_id in ("bad", "good"):
        insert_events(mongo_db, user_id, 14)
    set_profile(mongo_db, "bad", memory_summary="- Кошка Муся.")
    corrupt(mongo_db, settings)
    before = snapshot(mongo_db, "bad")

    outcomes: dict[str, Any] = {}
    for backlog in engine.scan():  # "bad" first: ties are ordered by user id
        try:
            outcomes[backlog.user_id] = engine.compress(backlog.user_id).status
        except CompressionError as exc:
            outcomes[backlog.user_id] = exc

    error = outcomes["bad"]
    assert isinstance(error, expected), f"expected {expected.__name__} for the bad user, got {error!r}"
    message = str(error)
    assert "'bad'" in message and f"'{field}'" in message, f"the error must name the user and {field!r}: {message}"
    if expected is InvalidEventError:
        assert BAD_EVENT in message, f"the error must name the event: {message}"
    assert "xxxxxxxx" not in message, f"the error quotes content: {message}"
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
    from butler_memory.connections import user_locks

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
