"""Erasure wins every race (issue 23, item 4): a user erased while a compression of them is in flight
is named by nothing the run writes afterwards (run document, per-user outcomes, history, archive)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from butler_memory.core.settings import Settings
from butler_memory.operations import audit, erasure
from tests.dags.test_dag_run import dag, llm_pool, seed_users, world

__all__ = ["dag", "llm_pool", "world"]  # fixtures used by this module's tests

GONE, STAYS = "u-erased-midflight", "u-stays"
SECRET = "a-test-secret-of-32-characters!!"


def names(db: Any, user_id: str) -> dict[str, int]:
    """Return {collection: documents naming the user anywhere in them}."""
    found = {}
    for name in db.list_collection_names():
        hits = sum(1 for doc in db[name].find() if user_id in json.dumps(doc, default=str))
        if hits:
            found[name] = hits
    return found


def test_an_erasure_while_the_user_is_compressed_leaves_nothing_naming_them(
    dag: Any, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, redis, llm = world["db"], world["redis"], world["llm"]
    monkeypatch.setenv(audit.SECRET_ENV, SECRET)
    seed_users(db, {GONE: 60, STAYS: 60})
    llm.set_latency(1.5)  # every reply is slow: the erasure asks while the compression holds the lock
    lock_key = Settings().lock_key(GONE)
    outcome: dict[str, Any] = {}

    def erase_when_in_flight() -> None:
        # pymongo and redis-py only (the Butler's own call): Airflow's client is the DAG run's, in this process.
        deadline = time.monotonic() + 120
        while not redis.exists(lock_key) and time.monotonic() < deadline:  # the compression took the lock
            time.sleep(0.02)
        outcome["result"] = erasure.erase_user(GONE, db=db, redis_client=redis, secret=SECRET, events=True)

    eraser = threading.Thread(target=erase_when_in_flight, daemon=True)
    eraser.start()
    run = dag.test(run_conf={})
    eraser.join(timeout=180)

    assert outcome["result"]["status"] == erasure.ERASED, outcome
    assert run.state == "success"
    assert names(db, GONE) == {}, "something written after the erasure names the erased user"
    (doc,) = db["memory_compression_runs"].find()
    assert [u["user_id"] for u in doc["users"]] == [STAYS] and doc["users_erased"] == 1, doc
    assert db["user_profiles"].count_documents({"user_id": STAYS, "memory_summary_version": {"$gte": 1}}) == 1
