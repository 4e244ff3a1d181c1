"""A bulk import stamps thousands of events with one time: reads stay linear, one run stays bounded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED
from tests.engine.helpers import DocumentsRead, events_of, insert_events, make_engine, small_settings
from tools.services import MongoService

Doc = dict[str, Any]


@pytest.fixture
def counted(mongo_service: MongoService) -> Iterator[tuple[Database[Doc], DocumentsRead]]:
    """Return a database of its own on a client that counts the events read from user_memory."""
    listener = DocumentsRead({"user_memory"})
    client = mongo_service.client(event_listeners=[listener])
    db = client[f"same_{uuid.uuid4().hex[:8]}"]
    yield db, listener
    client.drop_database(db.name)
    client.close()


def test_one_timestamp_for_every_event_reads_each_event_once(
    counted: tuple[Database[Doc], DocumentsRead], redis_client: redis.Redis
) -> None:
    db, listener = counted
    n = 1000
    settings = small_settings(max_events_per_chunk=100)
    engine = make_engine(db, redis_client, settings)
    insert_events(db, "u1", n, start=datetime(2026, 1, 1), step=timedelta(0))
    listener.read = 0

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == n - settings.keep_last_n, result
    assert len(events_of(db, "u1")) == settings.keep_last_n
    # The fold list's keys once, then each folded event once to summarise it and once to compare it
    # right before its delete (a time range per chunk re-read all n per chunk).
    assert listener.read <= 3 * n + settings.keep_last_n, f"{listener.read} documents read for {n} events"


def test_one_run_folds_at_most_max_fold_events_when_every_timestamp_is_equal(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    settings = small_settings(max_fold_events=20, max_events_per_chunk=10)
    engine = make_engine(mongo_db, redis_client, settings)
    insert_events(mongo_db, "u1", 60, start=datetime(2026, 1, 1), step=timedelta(0))

    first = engine.compress("u1")

    assert first.events_folded == 20, f"one run folds at most max_fold_events, folded {first.events_folded}"
    assert sorted(events_of(mongo_db, "u1"))[0] == "u1-e020", "the oldest (created_at, _id) go first"
    runs = 1
    while engine.compress("u1").status == COMPRESSED:
        runs += 1
    assert len(events_of(mongo_db, "u1")) == settings.keep_last_n
    assert sorted(events_of(mongo_db, "u1")) == ["u1-e057", "u1-e058", "u1-e059"], "the newest stay"
    assert runs == 3, f"57 events at 20 a run take 3 runs, took {runs}"
