"""The doorbell through real Airflow: scheduler, DAG processor, API server and the triggerer.

The catch-up DAG's cron is set to once a year here, so the only thing that can start a catch-up run
is the doorbell's asset watcher. Nobody triggers a run: the Butler's side rings (plain redis-py, as
``butler_memory.freshness.doorbell`` documents), and the test waits for the user's events to be folded.
The second test rings while the scheduler and the triggerer are down; once they are back, the
watcher sees the waiting record and the user is compressed.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from pymongo.database import Database

from butler_memory.freshness.doorbell import Doorbell
from tests.e2e.test_rest_api import (
    DAG_PARSE_TIMEOUT,
    RUN_TIMEOUT,
    Airflow,
    _ok,
    _service_logs,
    airflow,
    e2e_db,
    mongo_db,
    seed_users,
    wait_for,
)
from tools.standalone import wait_healthy

__all__ = ["_service_logs", "airflow", "e2e_db", "mongo_db"]  # fixtures shared with test_rest_api

pytestmark = pytest.mark.e2e

CATCHUP_ID = "memory_compression_catchup"
AIRFLOW_EXTRA_ENV = {"BUTLER_MEMORY_CATCHUP_SCHEDULE": "0 0 31 12 *"}
"""Read by test_rest_api's ``airflow`` fixture: the catch-up cron fires once a year, not during this test."""
CHATTY, QUIET = "u-chatty", "u-quiet"


def _dag(api: httpx.Client) -> dict[str, Any] | None:
    response = api.get(f"/dags/{CATCHUP_ID}")
    return dict(response.json()) if response.status_code == 200 else None


def _catchup_ready(api: httpx.Client) -> None:
    """Wait for the catch-up DAG to be parsed, unpause it, and wait until no run of it is active
    (should unpausing start one, it scans an empty database)."""
    dag = wait_for(f"{CATCHUP_ID} to be parsed", lambda: _dag(api), DAG_PARSE_TIMEOUT)
    if dag["is_paused"]:
        assert _ok(api.patch(f"/dags/{CATCHUP_ID}", json={"is_paused": False}))["is_paused"] is False
    wait_for(
        f"no active {CATCHUP_ID} run",
        lambda: all(r["state"] in ("success", "failed") for r in _catchup_runs(api)),
        RUN_TIMEOUT,
    )


def _catchup_runs(api: httpx.Client) -> list[dict[str, Any]]:
    return list(_ok(api.get(f"/dags/{CATCHUP_ID}/dagRuns", params={"order_by": "-start_date"}))["dag_runs"])


def _compressed_by_a_woken_run(api: httpx.Client, db: Database[dict[str, Any]], user_id: str) -> dict[str, Any]:
    """Wait until the user is down to keep_last_n events; return the catch-up run document that did it."""

    def probe() -> dict[str, Any] | None:
        if db["user_memory"].count_documents({"user_id": user_id}) != 20:
            return None
        return db["memory_compression_catchup_runs"].find_one({"users.user_id": user_id})

    doc = dict(wait_for(f"{user_id} to be compressed by a catch-up run", probe, RUN_TIMEOUT + DAG_PARSE_TIMEOUT))
    runs = {r["dag_run_id"]: r for r in _catchup_runs(api)}
    assert runs[doc["run_id"]]["run_type"] == "asset_triggered", runs[doc["run_id"]]
    return doc


def test_a_ring_gets_a_user_compressed_without_a_trigger(
    airflow: Airflow, mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    seed_users(mongo_db, {CHATTY: 70, QUIET: 30})
    _catchup_ready(airflow.api)
    bell = Doorbell(redis_client)
    # Costs nothing and breaks nothing: a malformed id, a count at the threshold.
    assert not bell.ring("not a user id") and not bell.ring(QUIET, events=30)
    assert bell.ring(CHATTY, events=70)

    doc = _compressed_by_a_woken_run(airflow.api, mongo_db, CHATTY)

    assert [(u["user_id"], u["status"]) for u in doc["users"]] == [(CHATTY, "compressed")]
    assert mongo_db["user_memory"].count_documents({"user_id": QUIET}) == 30
    wait_for("the doorbell record to be drained", lambda: redis_client.zcard("butler:memory:doorbell") == 0, 60)


def test_a_ring_while_airflow_is_down_is_answered_once_it_is_back(
    airflow: Airflow, mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    _catchup_ready(airflow.api)
    seed_users(mongo_db, {CHATTY: 65})
    down = [p for p in airflow.processes if p.name in ("scheduler", "triggerer")]
    for process in down:
        process.stop()
    try:
        assert Doorbell(redis_client).ring(CHATTY)  # nobody listens: only the record remains
        assert mongo_db["user_memory"].count_documents({"user_id": CHATTY}) == 65
    finally:
        for process in down:
            process.start()
    wait_healthy(airflow.base_url, airflow.processes)

    doc = _compressed_by_a_woken_run(airflow.api, mongo_db, CHATTY)
    assert [(u["user_id"], u["status"]) for u in doc["users"]] == [(CHATTY, "compressed")]
