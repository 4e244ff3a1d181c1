"""Summary history: one entry per committed version, a baseline for a summary that predates it, retention."""

from __future__ import annotations

from typing import Any

import redis
from pymongo.database import Database

from butler_memory.storage.history import BASELINE, FOLD
from butler_memory.storage.store import MemoryStore
from tests.engine.helpers import history_of, insert_events, make_engine, profile_of, set_profile, small_settings

Doc = dict[str, Any]


def test_every_committed_version_is_kept_with_its_metadata(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    settings = small_settings(threshold=10, keep_last_n=3, max_events_per_chunk=4)
    events = insert_events(mongo_db, "u1", 15)
    result = make_engine(mongo_db, redis_client, settings).compress("u1", run_id="r1")

    history = history_of(mongo_db, "u1")
    assert [e["version"] for e in history] == list(range(1, result.summary_version + 1)) == [1, 2, 3]
    assert [e["covers"]["count"] for e in history] == [4, 4, 4]
    assert history[0]["covers"]["first"]["event_id"] == events[0]["_id"]
    assert history[-1]["covers"]["last"]["event_id"] == events[11]["_id"]
    assert history[-1]["text"] == profile_of(mongo_db, "u1")["memory_summary"]
    assert {(e["kind"], e["run_id"], e["summarizer"], e["model"], e["prompt_version"]) for e in history} == {
        (FOLD, "r1", "offline", None, None)
    }
    assert [e["base_version"] for e in history] == [0, 1, 2]
    assert history[-1]["created_at"] == profile_of(mongo_db, "u1")["memory_compressed_at"]

    store = MemoryStore(mongo_db, settings)
    assert [e.version for e in store.history.lineage("u1", through=3)] == [3, 2, 1]
    assert store.history.version("u1", 0).text == ""  # type: ignore[union-attr]
    assert "text" not in store.history.versions("u1", through=3)[0].metadata()
    assert store.history.users_of_run("r1") == ["u1"]


def test_a_summary_from_before_history_is_recorded_as_a_baseline(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    set_profile(mongo_db, "u1", memory_summary="- Кошка Муся.", memory_summary_version=7)
    insert_events(mongo_db, "u1", 12)
    make_engine(mongo_db, redis_client, small_settings()).compress("u1")

    history = history_of(mongo_db, "u1")
    assert [(e["version"], e["kind"]) for e in history] == [(7, BASELINE), (8, FOLD)]
    assert history[0]["text"] == "- Кошка Муся."
    assert history[1]["base_version"] == 7


def test_history_retention_is_a_ttl_index_that_follows_the_setting(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    MemoryStore(mongo_db, small_settings(history_retention_days=30)).ensure_indexes()
    MemoryStore(mongo_db, small_settings(history_retention_days=7)).ensure_indexes()
    indexes = mongo_db["user_memory_summaries"].index_information()
    assert indexes["created_at_ttl"]["expireAfterSeconds"] == 7 * 86400
    unique = [i for i in indexes.values() if i["key"] == [("user_id", 1), ("version", 1)]]
    assert unique and unique[0].get("unique") is True
