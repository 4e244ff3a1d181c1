"""Summary history: one entry per committed version, a baseline for a summary that predates it, retention."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError
from butler_memory.fold.compression import COMPRESSED
from butler_memory.operations.rollback import ROLLED_BACK
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


class Killed(Exception):
    """Stands in for a kill at a checkpoint."""


def test_a_version_the_butler_committed_over_an_orphan_entry_is_the_baseline_a_rollback_restores(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A killed run's entry for a version the profile never reached is not the Butler's text of that version (second review)."""
    engine = make_engine(mongo_db, redis_client, small_settings(threshold=10, keep_last_n=5, max_events_per_chunk=5))
    insert_events(mongo_db, "u1", 20)
    assert engine.compress("u1", run_id="seed").summary_version == 3
    insert_events(mongo_db, "u1", 10, first=20)
    recorded: list[str] = []

    def die_at_the_second_entry(step: str) -> None:
        if step == "recorded":
            recorded.append(step)
            if len(recorded) == 2:  # v5 is written, never committed
                raise Killed

    with pytest.raises(Killed):
        engine.compress("u1", run_id="r2", checkpoint=die_at_the_second_entry)
    redis_client.flushdb()  # its lock expired
    orphan = mongo_db["user_memory_summaries"].find_one({"user_id": "u1", "version": 5})
    assert profile_of(mongo_db, "u1")["memory_summary_version"] == 4 and orphan is not None, "the state under test"
    butler_v5 = profile_of(mongo_db, "u1")["memory_summary"] + "\n- Заметка бота."
    set_profile(
        mongo_db,
        "u1",
        memory_summary=butler_v5,
        memory_summary_version=5,
        memory_pending_fold=None,
        memory_fold_target=None,
    )
    insert_events(mongo_db, "u1", 10, first=30)
    r3 = engine.compress("u1", run_id="r3")
    assert r3.status == COMPRESSED and r3.summary_version >= 6, r3

    rolled = engine.rollback("u1", "r3", rollback_id="undo-r3")

    assert rolled.status == ROLLED_BACK and rolled.restored_version == 5, rolled
    assert profile_of(mongo_db, "u1")["memory_summary"] == butler_v5, "the rollback restored text no profile held"
    baseline = history_of(mongo_db, "u1")[4]
    assert (baseline["version"], baseline["kind"], baseline["run_id"]) == (5, BASELINE, None)


def test_history_retention_is_a_ttl_index_that_follows_the_setting(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    MemoryStore(mongo_db, small_settings(history_retention_days=30)).ensure_indexes()
    MemoryStore(mongo_db, small_settings(history_retention_days=7)).ensure_indexes()
    indexes = mongo_db["user_memory_summaries"].index_information()
    assert indexes["created_at_ttl"]["expireAfterSeconds"] == 7 * 86400
    unique = [i for i in indexes.values() if i["key"] == [("user_id", 1), ("version", 1)]]
    assert unique and unique[0].get("unique") is True


def test_a_compression_whose_history_write_lands_after_a_takeover_leaves_the_takers_history_entry(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A run whose history write is delayed past its lock's TTL (a MongoDB failover, a paused VM) while
    another run took the user and committed that version replaces nothing: the entry stays the one of the
    run that committed it, and a rollback of that run undoes it (third review)."""
    settings = small_settings()
    insert_events(mongo_db, "u1", 14)
    slow, other = make_engine(mongo_db, redis_client, settings), make_engine(mongo_db, redis_client, settings)
    write = slow.store.history.write_version
    taken: list[Any] = []

    def delayed_write(entry: Any, still_ours: Any) -> None:
        if not taken and entry.kind == FOLD:
            # The slow run's write is in flight past its lock's TTL. Meanwhile the Butler edits event 0
            # and the next run takes the free lock and folds the user (v1, its own text).
            redis_client.delete(settings.lock_key("u1"))
            mongo_db["user_memory"].update_one({"_id": "u1-e000"}, {"$set": {"content": "u1-e000: edited, rain."}})
            taken.append(other.compress("u1", run_id="r-taker"))
        write(entry, still_ours)

    slow.store.history.write_version = delayed_write  # type: ignore[method-assign]
    with pytest.raises(ConcurrentUpdateError):
        slow.compress("u1", run_id="r-slow")

    assert taken[0].status == COMPRESSED and taken[0].summary_version == 1, taken
    profile = profile_of(mongo_db, "u1") or {}
    v1 = next(e for e in history_of(mongo_db, "u1") if e["version"] == 1)
    assert (v1["run_id"], v1["text"]) == ("r-taker", profile["memory_summary"]), "v1 is the stale run's entry"
    assert other.rollback("u1", "r-taker", rollback_id="rb").status == ROLLED_BACK
