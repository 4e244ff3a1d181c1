"""End to end through real Airflow services, driven only by the REST API the UI uses.

An Airflow scheduler (LocalExecutor), DAG processor and API server run as separate processes, each in
a process group of its own, on a SQLite metadata DB of their own (not the suite's unit-test config),
with the connections pointing at this test's MongoDB database, Redis, StatsD sink and fake LLM.
The test then does what an operator does in the UI: unpause, trigger with params, find the failed
user's mapped instance by its label, fix the cause, clear that instance with downstream, and watch
the run turn green.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pymongo.database import Database

from butler_memory.settings import Settings
from tools.demo import prepare_airflow
from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns, free_port
from tools.standalone import PASSWORDS_FILE, AirflowProcess, airflow_processes, server_env, stop_all, wait_healthy

pytestmark = pytest.mark.e2e

DAG_ID = "memory_compression"
ADMIN_PASSWORD = "e2e-admin-password"
CANARY = "CANARY-e2e-7d41-private-note"
FAIL_MARKER = "FAIL-MARKER-e2e-93ab"
BELOW, BIG, BIGGER, LOCKED, BROKEN = "u-below", "u-big", "u-bigger", "u-locked", "u-broken"
POPULATION = {BELOW: 30, BIG: 60, BIGGER: 75, LOCKED: 55, BROKEN: 65}
FINISHED = {"success", "failed"}
# One run of this DAG takes 15-30 s on 2 cores (a task process parses the DAG and imports Airflow).
RUN_TIMEOUT = 120.0
DAG_PARSE_TIMEOUT = 90.0


@dataclass
class Airflow:
    """A running Airflow: its base URL, an authenticated REST client and its processes."""

    base_url: str
    api: httpx.Client
    processes: list[AirflowProcess]


def _dump_logs(processes: list[AirflowProcess]) -> None:
    """Print the end of every service log (pytest shows it only when the test failed)."""
    for process in processes:
        print(f"\n----- airflow {process.name}: {process.log_path} (last lines) -----\n{process.log_tail(5000)}")


@pytest.fixture
def airflow(tmp_path: Path, airflow_conns: AirflowConns) -> Iterator[Airflow]:
    """Start API server, scheduler and DAG processor on a fresh SQLite DB; stop every process group after."""
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    env = server_env(home, port=port, connections=airflow_conns.env)
    # A known admin password: SimpleAuthManager only generates passwords for users missing from this file.
    (home / PASSWORDS_FILE).write_text(json.dumps({"admin": ADMIN_PASSWORD}) + "\n")
    prepare_airflow(home, env, pool_slots=8)  # `airflow db migrate` and `airflow pools set llm_api 8`
    processes = airflow_processes(env, tmp_path)  # the components `make airflow` runs
    base_url = f"http://127.0.0.1:{port}"
    api: httpx.Client | None = None
    try:
        for process in processes:
            process.start()
        wait_healthy(base_url, processes)
        token = httpx.post(f"{base_url}/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30)
        assert token.status_code == 201, f"POST /auth/token: {token.status_code} {token.text}"
        api = httpx.Client(
            base_url=f"{base_url}/api/v2",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            timeout=30,
        )
        yield Airflow(base_url, api, processes)
    finally:
        if api is not None:
            api.close()
        _dump_logs(processes)
        stop_all(processes)


def _ok(response: httpx.Response, *expected: int) -> Any:
    """Return the JSON body, or fail with the method, path, status and body."""
    assert response.status_code in (expected or (200,)), (
        f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:2000]}"
    )
    return response.json() if response.content else None


def wait_for(what: str, probe: Any, timeout: float, interval: float = 1.0) -> Any:
    """Call probe() until it returns something truthy; fail naming what was awaited and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value {last!r}")


def finished_run(api: httpx.Client, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Wait until the DAG run reaches success or failed and return it."""

    def probe() -> dict[str, Any] | None:
        run = _ok(api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))
        return run if run["state"] in FINISHED else None

    return dict(wait_for(f"DAG run {run_id} to finish", probe, timeout))


def task_instances(api: httpx.Client, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Return the run's task instances (mapped ones included) by (task_id, map_index)."""
    body = _ok(api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100}))
    return {(ti["task_id"], ti["map_index"]): ti for ti in body["task_instances"]}


def seed_users(db: Database[dict[str, Any]]) -> None:
    """Insert the mixed population; the broken user's content makes the fake LLM answer 400."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    docs = [
        {
            "event_id": f"{user_id}-{i:04d}",
            "user_id": user_id,
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"Turn {i} of {user_id}: {CANARY}" + (f" {FAIL_MARKER}" if user_id == BROKEN else ""),
            "created_at": start + timedelta(minutes=i),
            "tags": [],
        }
        for user_id, n in POPULATION.items()
        for i in range(n)
    ]
    db["user_memory"].insert_many(docs)


def event_counts(db: Database[dict[str, Any]]) -> dict[str, int]:
    """Return the number of raw events per user."""
    rows = db["user_memory"].aggregate([{"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
    return {row["_id"]: row["n"] for row in rows}


@pytest.mark.timeout(420)
def test_failed_user_is_cleared_with_downstream_and_the_run_ends_green(
    airflow: Airflow,
    airflow_conns: AirflowConns,
    mongo_db: Database[dict[str, Any]],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
) -> None:
    api, db = airflow.api, mongo_db

    # The DAG is parsed, paused at creation, and the pool the mapped task needs exists.
    dag = wait_for(
        f"the DAG processor to parse {DAG_ID}",
        lambda: (r := api.get(f"/dags/{DAG_ID}")).status_code == 200 and r.json(),
        DAG_PARSE_TIMEOUT,
    )
    assert dag["is_paused"] is True, dag
    assert _ok(api.get("/pools/llm_api"))["slots"] == 8

    # Unpausing a catchup=False daily DAG schedules the latest midnight at once: with no user over
    # the threshold yet, that run is an empty scan and must be green.
    assert _ok(api.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))["is_paused"] is False
    scheduled = wait_for(
        "the scheduled run created by unpausing",
        lambda: [r for r in _ok(api.get(f"/dags/{DAG_ID}/dagRuns"))["dag_runs"] if r["run_type"] == "scheduled"],
        60,
    )
    first = finished_run(api, scheduled[0]["dag_run_id"])
    assert first["state"] == "success", f"empty scheduled run: {first}"
    wait_for(  # e.g. a second scheduled run when the test straddles midnight UTC: seed only after it
        "no queued or running DAG run",
        lambda: _ok(api.get(f"/dags/{DAG_ID}/dagRuns", params={"state": ["queued", "running"]}))["total_entries"] == 0,
        RUN_TIMEOUT,
    )

    # The trigger form refuses a bad param with a message naming it, before any run exists.
    refused = api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"limit": 0}})
    assert refused.status_code == 400, refused.text
    assert "Invalid input for param limit" in refused.json()["detail"], refused.text

    # A mixed population: one user below the threshold, two over it, one locked by the bot, one the LLM rejects.
    seed_users(db)
    lock_key = Settings().lock_key(LOCKED)
    redis_client.set(lock_key, "the-bot's-inline-compression", px=600_000)
    llm.fail_when_contains(FAIL_MARKER, 400)

    triggered = _ok(
        api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"threshold": 50, "limit": 10}}),
        200,
    )
    run_id = triggered["dag_run_id"]
    assert triggered["conf"] == {"threshold": 50, "limit": 10}
    run = finished_run(api, run_id)
    tis = task_instances(api, run_id)
    states = {f"{t}[{ti['rendered_map_index'] or i}]": (ti["state"], ti["try_number"]) for (t, i), ti in tis.items()}
    assert run["state"] == "failed", f"a failed user must fail the run: {states}"
    assert tis[("report", -1)]["state"] == "failed", states

    mapped = {i: ti for (t, i), ti in tis.items() if t == "compress_user"}
    by_user = {ti["rendered_map_index"]: ti for ti in mapped.values()}
    assert set(by_user) == {BIG, BIGGER, LOCKED, BROKEN}, f"map indexes should be labelled by user id: {states}"
    failed = [ti for ti in mapped.values() if ti["state"] == "failed"]
    assert [ti["rendered_map_index"] for ti in failed] == [BROKEN], states
    broken_index = failed[0]["map_index"]
    tries_before = {key: ti["try_number"] for key, ti in tis.items()}
    assert event_counts(db) == {BELOW: 30, BIG: 20, BIGGER: 20, LOCKED: 55, BROKEN: 65}
    doc = db["memory_compression_runs"].find_one({"run_id": run_id})
    assert doc is not None and (doc["users_failed"], doc["failed_user_ids"]) == (1, [BROKEN]), doc
    requests_before = llm.request_count

    # Fix the cause, then clear just that instance with downstream, as in the UI.
    llm.clear_rules()
    body = {
        "dry_run": False,
        "only_failed": False,
        "task_ids": [["compress_user", broken_index]],
        "include_downstream": True,
        "dag_run_id": run_id,
    }
    cleared = _ok(api.post(f"/dags/{DAG_ID}/clearTaskInstances", json=body))
    assert sorted((ti["task_id"], ti["map_index"]) for ti in cleared["task_instances"]) == [
        ("compress_user", broken_index),
        ("report", -1),
    ], cleared
    run = finished_run(api, run_id)

    tis = task_instances(api, run_id)
    states = {f"{t}[{ti['rendered_map_index'] or i}]": (ti["state"], ti["try_number"]) for (t, i), ti in tis.items()}
    assert run["state"] == "success", f"after clearing the failed user: {states}"
    for key, ti in tis.items():
        rerun = key in {("compress_user", broken_index), ("report", -1)}
        expected = tries_before[key] + 1 if rerun else tries_before[key]
        assert ti["try_number"] == expected, f"{key}: try {ti['try_number']}, expected {expected}; {states}"
    assert llm.request_count == requests_before + 1, "only the cleared user should have called the LLM again"
    assert event_counts(db) == {BELOW: 30, BIG: 20, BIGGER: 20, LOCKED: 55, BROKEN: 20}
    profile = db["user_profiles"].find_one({"user_id": BROKEN})
    assert profile is not None and profile.get("memory_summary"), profile

    docs = list(db["memory_compression_runs"].find({"run_id": run_id}))
    assert len(docs) == 1, f"the re-run must update the run document, not add one: {len(docs)} documents"
    doc = docs[0]
    summary = (doc["users_found"], doc["users_compressed"], doc["users_skipped_locked"], doc["users_failed"])
    assert summary == (4, 3, 1, 0), {k: v for k, v in doc.items() if k != "users"}
    assert doc["failed_user_ids"] == []
    assert redis_client.get(lock_key) == b"the-bot's-inline-compression", "another holder's lock was touched"
