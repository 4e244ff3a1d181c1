"""End to end through real Airflow services, driven only by the REST API the UI uses.

An Airflow scheduler (LocalExecutor), DAG processor and API server run as separate processes, each in
a process group of its own, on a PostgreSQL metadata database of their own (on the session's server;
not the suite's unit-test config),
with the connections pointing at this test's MongoDB database, Redis, StatsD sink and fake LLM.
The first test does what an operator does in the UI: unpause, trigger with params, find the failed
user's mapped instance by its label, fix the cause, clear that instance with downstream, and watch
the run turn green. The second does the CLI way of the README and runbook: a run triggered with a
logical date, then `airflow tasks clear` (run as a subprocess with the services' environment)
selecting the failed users of the runs in a logical-date range.

Airflow starts once per module (a cold start costs 10-30 s); every test gets the module's MongoDB
database emptied, a flushed Redis and a reset fake LLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
import redis
from pymongo.database import Database

from butler_memory.core.settings import Settings
from tests.population import BELOW, BIG, BIGGER, BROKEN, LOCKED, POPULATION, seed_population
from tools.demo import prepare_airflow
from tools.fake_openai import FakeOpenAI
from tools.services import PostgresService, free_port
from tools.standalone import PASSWORDS_FILE, AirflowProcess, airflow_processes, server_env, stop_all, wait_healthy

pytestmark = pytest.mark.e2e

DAG_ID = "memory_compression"
ADMIN_PASSWORD = "e2e-admin-password"
CANARY = "CANARY-e2e-7d41-private-note"
FAIL_MARKER = "FAIL-MARKER-e2e-93ab"
FINISHED = {"success", "failed"}
# One run of this DAG takes 15-30 s on 2 cores (a task process parses the DAG and imports Airflow).
RUN_TIMEOUT = 120.0
DAG_PARSE_TIMEOUT = 90.0
AIRFLOW_EXTRA_ENV = {
    "BUTLER_MEMORY_ERASURE_SECRET": "e2e-erasure-secret-4b7d1c9e",
    "BUTLER_MEMORY_BATCH_POLL_SECONDS": "1",  # the batch test's triggerer polls every second, not every minute
}
"""The erasure DAG refuses to run without a secret keying its audit references."""


@dataclass
class Airflow:
    """A running Airflow: its base URL, an authenticated REST client and its processes."""

    base_url: str
    api: httpx.Client
    processes: list[AirflowProcess]
    env: dict[str, str]
    """The environment of the services, for `airflow` CLI commands against the same DB and connections."""


def _dump_logs(processes: list[AirflowProcess]) -> None:
    """Print the end of every service log (pytest shows it only when the test failed)."""
    for process in processes:
        print(f"\n----- airflow {process.name}: {process.log_path} (last lines) -----\n{process.log_tail(5000)}")


@pytest.fixture(scope="module")
def e2e_db(mongo_client: pymongo.MongoClient[dict[str, Any]]) -> Iterator[Database[dict[str, Any]]]:
    """Return the MongoDB database the module's Airflow points at, dropped after the module."""
    db = mongo_client[f"t_e2e_rest_api_{uuid.uuid4().hex[:8]}"]
    yield db
    mongo_client.drop_database(db.name)


@pytest.fixture
def mongo_db(e2e_db: Database[dict[str, Any]]) -> Database[dict[str, Any]]:
    """Override the per-test database: the module's one (the running services use it), emptied first."""
    for name in e2e_db.list_collection_names():
        e2e_db[name].delete_many({})  # keeps the indexes the engine created
    return e2e_db


@pytest.fixture(scope="module")
def airflow(
    tmp_path_factory: pytest.TempPathFactory,
    connection_env: Callable[..., dict[str, str]],
    e2e_db: Database[dict[str, Any]],
    request: pytest.FixtureRequest,
    postgres: PostgresService,
) -> Iterator[Airflow]:
    """Start API server, scheduler and DAG processor on a fresh PostgreSQL database once for the module;
    stop every process group after."""
    tmp_path = tmp_path_factory.mktemp("e2e-airflow")
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    env = server_env(home, port=port, connections=connection_env(db=e2e_db.name))
    env.update(getattr(request.module, "AIRFLOW_EXTRA_ENV", {}))  # a module using this fixture may add settings
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = postgres.create_database(f"e2e_{uuid.uuid4().hex[:8]}")
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
        yield Airflow(base_url, api, processes, env)
    finally:
        if api is not None:
            api.close()
        else:  # startup failed: no test will print the logs
            _dump_logs(processes)
        stop_all(processes)


@pytest.fixture(autouse=True)
def _service_logs(airflow: Airflow) -> Iterator[None]:
    """After each test, print the end of every service log (pytest shows it only when the test failed)."""
    yield
    _dump_logs(airflow.processes)


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


def finished_run(api: httpx.Client, run_id: str, timeout: float = RUN_TIMEOUT, dag_id: str = DAG_ID) -> dict[str, Any]:
    """Wait until the DAG run reaches success or failed and return it."""

    def probe() -> dict[str, Any] | None:
        run = _ok(api.get(f"/dags/{dag_id}/dagRuns/{run_id}"))
        return run if run["state"] in FINISHED else None

    return dict(wait_for(f"{dag_id} run {run_id} to finish", probe, timeout))


def task_instances(api: httpx.Client, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Return the run's task instances (mapped ones included) by (task_id, map_index)."""
    body = _ok(api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100}))
    return {(ti["task_id"], ti["map_index"]): ti for ti in body["task_instances"]}


def assert_green_after_rerun_of(
    api: httpx.Client, run_id: str, broken_index: int, tries_before: dict[tuple[str, int], int], when: str
) -> None:
    """Wait for the run; assert it is green and only the cleared user's instance and report ran again."""
    run = finished_run(api, run_id)
    tis = task_instances(api, run_id)
    states = {f"{t}[{ti['rendered_map_index'] or i}]": (ti["state"], ti["try_number"]) for (t, i), ti in tis.items()}
    assert run["state"] == "success", f"{when}: {states}"
    for key, ti in tis.items():
        rerun = key in {("compress_user", broken_index), ("report", -1)}
        expected = tries_before[key] + 1 if rerun else tries_before[key]
        assert ti["try_number"] == expected, f"{key}: try {ti['try_number']}, expected {expected}; {states}"


def seed_users(db: Database[dict[str, Any]], population: dict[str, int] = POPULATION) -> None:
    """Insert the population (user id: events); the broken user's content makes the fake LLM answer 400."""
    seed_population(db, population, canary=CANARY, broken=BROKEN, fail_marker=FAIL_MARKER)


def event_counts(db: Database[dict[str, Any]]) -> dict[str, int]:
    """Return the number of raw events per user."""
    rows = db["user_memory"].aggregate([{"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
    return {row["_id"]: row["n"] for row in rows}


@pytest.mark.timeout(420)
def test_failed_user_is_cleared_with_downstream_and_the_run_ends_green(
    airflow: Airflow,
    mongo_db: Database[dict[str, Any]],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
) -> None:
    """The per-user shape (``users_per_task`` 1): the operator finds the failed user's own instance by its label."""
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

    # full_scan: the events are backdated (2026-01-01), before the daily scan's watermark that the empty
    # scheduled run above set; only the reconciliation sees such late writes. users_per_task 1: an
    # instance per user, labelled with the user id.
    conf = {"threshold": 50, "limit": 10, "full_scan": True, "users_per_task": 1}
    triggered = _ok(api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}), 200)
    run_id = triggered["dag_run_id"]
    assert triggered["conf"] == conf
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
    assert_green_after_rerun_of(api, run_id, broken_index, tries_before, "after clearing the failed user")
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


CLI_LOGICAL_DATE = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
"""A manual run's logical date (as `airflow dags trigger -l`); after the DAG's start_date, not a midnight
of a scheduled run, so the -s/-e range below selects this run only."""
CLI_RANGE = ("2026-06-15", "2026-06-16")
DOCUMENTED_REGEX = "^compress_user$"
"""What the README and runbook used to pass to -t: in Airflow 3.3 it selects nothing (see below)."""


def airflow_cli(airflow: Airflow, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``airflow <args>`` from the venv with the services' environment; fail with its output on error."""
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    proc = subprocess.run(cmd, env=airflow.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`airflow {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def dag_ready_and_idle(api: httpx.Client) -> None:
    """Wait for the DAG to be parsed; unpause it (the first test may not have run); wait for no active run."""
    dag = wait_for(
        f"the DAG processor to parse {DAG_ID}",
        lambda: (r := api.get(f"/dags/{DAG_ID}")).status_code == 200 and r.json(),
        DAG_PARSE_TIMEOUT,
    )
    if dag["is_paused"]:  # unpausing starts the latest scheduled run at once: an empty scan, let it finish
        _ok(api.patch(f"/dags/{DAG_ID}", json={"is_paused": False}))
        wait_for(
            "the scheduled run created by unpausing",
            lambda: _ok(api.get(f"/dags/{DAG_ID}/dagRuns"))["total_entries"] > 0,
            60,
        )
    wait_for(
        "no queued or running DAG run",
        lambda: _ok(api.get(f"/dags/{DAG_ID}/dagRuns", params={"state": ["queued", "running"]}))["total_entries"] == 0,
        RUN_TIMEOUT,
    )


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("redis_client")  # a flushed Redis: no lock or backoff left by an earlier test
def test_cli_clear_of_failed_users_in_a_logical_date_range_ends_the_run_green(
    airflow: Airflow, mongo_db: Database[dict[str, Any]], llm: FakeOpenAI
) -> None:
    """The CLI recipe of the README and runbook, on a run triggered with a logical date, at the default
    ``users_per_task``: the three users share one instance; clearing it compresses only the failed one again."""
    api, db = airflow.api, mongo_db
    dag_ready_and_idle(api)
    seed_users(db, {BIG: 60, BIGGER: 75, BROKEN: 65})
    llm.fail_when_contains(FAIL_MARKER, 400)

    # `airflow dags trigger memory_compression -l 2026-06-15T12:00:00+00:00 --conf ...`, through REST.
    # full_scan: the events are backdated, before the watermark of the scheduled run unpausing started.
    body = {"logical_date": CLI_LOGICAL_DATE.isoformat(), "conf": {"threshold": 50, "full_scan": True}}
    triggered = _ok(api.post(f"/dags/{DAG_ID}/dagRuns", json=body), 200)
    run_id = triggered["dag_run_id"]
    assert datetime.fromisoformat(triggered["logical_date"]) == CLI_LOGICAL_DATE, triggered
    run = finished_run(api, run_id)
    tis = task_instances(api, run_id)
    states = {f"{t}[{ti['rendered_map_index'] or i}]": (ti["state"], ti["try_number"]) for (t, i), ti in tis.items()}
    assert run["state"] == "failed", f"a failed user must fail the run: {states}"
    by_label = {ti["rendered_map_index"]: ti for (t, _), ti in tis.items() if t == "compress_user"}
    # One instance, largest backlog first (BIGGER 75, BROKEN 65, BIG 60), labelled by its first user and count.
    assert {label: ti["state"] for label, ti in by_label.items()} == {f"{BIGGER} +2": "failed"}, states
    assert tis[("report", -1)]["state"] == "failed", states
    assert event_counts(db) == {BIG: 20, BIGGER: 20, BROKEN: 65}, "the instance tried each of its users"
    broken_index = by_label[f"{BIGGER} +2"]["map_index"]
    tries_before = {key: ti["try_number"] for key, ti in tis.items()}
    requests_before = llm.request_count
    llm.clear_rules()
    start, end = CLI_RANGE

    # The form the docs used to give: -t is matched as a substring of the task id in Airflow 3.3
    # (SerializedDAG.partial_subset), not as a regex, so the anchors match no task and the command
    # clears nothing, silently, with exit code 0.
    airflow_cli(
        airflow,
        *("tasks", "clear", DAG_ID, "-t", DOCUMENTED_REGEX, "-s", start, "-e", end),
        *("--only-failed", "--downstream", "-y"),
    )
    assert _ok(api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))["state"] == "failed"
    unchanged = {key: (ti["state"], ti["try_number"]) for key, ti in task_instances(api, run_id).items()}
    assert unchanged == {key: (ti["state"], ti["try_number"]) for key, ti in tis.items()}, unchanged

    # The documented command: the failed compress_user instances of the runs in the range, and report.
    airflow_cli(
        airflow,
        *("tasks", "clear", DAG_ID, "-t", "compress_user", "-s", start, "-e", end),
        *("--only-failed", "--downstream", "-y"),
    )
    assert_green_after_rerun_of(api, run_id, broken_index, tries_before, "after the CLI clear")
    assert llm.request_count == requests_before + 1, "the cleared instance compressed only its failed user again"
    assert event_counts(db) == {BIG: 20, BIGGER: 20, BROKEN: 20}
    profile = db["user_profiles"].find_one({"user_id": BROKEN})
    assert profile is not None and profile.get("memory_summary"), profile
    doc = db["memory_compression_runs"].find_one({"run_id": run_id})
    assert doc is not None and (doc["users_compressed"], doc["users_failed"]) == (3, 0), doc


@pytest.mark.timeout(420)
def test_an_erasure_triggered_through_the_api_leaves_no_id_in_the_metadata_db(
    airflow: Airflow, mongo_db: Database[dict[str, Any]]
) -> None:
    """The scheduler's own session (not dag.test()'s) runs the scrub; the trigger's event-log row is scrubbed too."""
    from sqlalchemy import create_engine

    from tests.dags.test_erasure_dag import rows_naming

    api, gone, kept = airflow.api, "u-e2e-erased-51c0", "u-e2e-kept-51c0"
    for dag_id in (DAG_ID, "memory_erasure"):
        wait_for(f"{dag_id} parsed", lambda d=dag_id: api.get(f"/dags/{d}").status_code == 200, DAG_PARSE_TIMEOUT)
        _ok(api.patch(f"/dags/{dag_id}", json={"is_paused": False}))
    wait_for(  # unpausing the daily DAG schedules a run at once: let it finish before seeding
        "no queued or running compression run",
        lambda: _ok(api.get(f"/dags/{DAG_ID}/dagRuns", params={"state": ["queued", "running"]}))["total_entries"] == 0,
        RUN_TIMEOUT,
    )
    seed_users(mongo_db, {gone: 60, kept: 60})
    run = _ok(api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"user_ids": [gone, kept]}}))
    assert finished_run(api, run["dag_run_id"])["state"] == "success"
    engine = create_engine(airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        named = rows_naming(engine, gone)
        assert {"dag_run", "task_instance", "xcom", "log"} <= set(named), named

        conf = {"user_id": gone, "dry_run": False, "include_events": True}
        erasure = _ok(api.post("/dags/memory_erasure/dagRuns", json={"logical_date": None, "conf": conf}))
        done = finished_run(api, erasure["dag_run_id"], dag_id="memory_erasure")
        assert done["state"] == "success", done
        for _ in range(30):  # the scheduler scrubs in the loop that marks the run finished
            if not (left := rows_naming(engine, gone)):
                break
            time.sleep(1)
        assert left == {}, f"rows still naming the erased user: {left}"
        assert rows_naming(engine, kept), "a user nobody erased keeps their rows"
    finally:
        engine.dispose()
    assert _ok(api.get(f"/dags/memory_erasure/dagRuns/{erasure['dag_run_id']}"))["conf"]["user_id"] == "[erased]"
    logs = Path(airflow.env["AIRFLOW_HOME"]) / "logs"
    erasure_logs = [p for p in logs.rglob("*") if p.is_file() and "dag_id=memory_erasure" in str(p)]
    assert erasure_logs, f"no task log of the erasure run under {logs}"
    assert not [p for p in erasure_logs if gone in p.read_text(errors="replace")], (
        "the erasure's task log names the user"
    )


LINE_FAILS = "u-line-fails"


@pytest.mark.timeout(600)
def test_a_batch_run_waits_in_the_triggerer_and_a_failed_user_is_rerun_online(
    airflow: Airflow, mongo_db: Database[dict[str, Any]], llm: FakeOpenAI
) -> None:
    """llm_mode batch through the scheduler and the triggerer: the wait is deferred (the triggerer's
    async client polls the batch), each user's reply is committed; a user whose batch line failed
    fails the run, and clearing its instance with downstream compresses it online: the run ends green."""
    api, db = airflow.api, mongo_db
    dag_ready_and_idle(api)
    seed_population(db, {BIG: 60, BIGGER: 75, LINE_FAILS: 55}, canary=CANARY, broken="", fail_marker="")
    llm.set_batch(delay=3.0)  # still in progress at the first polls: the wait really defers
    llm.batch_line_fault(f"of {LINE_FAILS}:", "error")
    # users_per_task 1: the failed user's own instance is cleared (its label is the user id).
    conf = {"llm_mode": "batch", "full_scan": True, "user_ids": [BIG, BIGGER, LINE_FAILS], "users_per_task": 1}
    run_id = _ok(api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}))["dag_run_id"]

    run = finished_run(api, run_id, timeout=RUN_TIMEOUT * 3)
    tis = task_instances(api, run_id)
    states = {f"{t}[{ti['rendered_map_index'] or i}]": (ti["state"], ti["try_number"]) for (t, i), ti in tis.items()}
    assert run["state"] == "failed", states
    assert tis[("wait_for_batches", -1)]["state"] == "success", states
    polls = [r for r in llm.requests if r["path"].startswith("/v1/batches/") and r["json"] is None]
    agents = {r["headers"].get("user-agent", "").split("/")[0] for r in polls}
    assert "AsyncOpenAI" in agents, f"the triggerer's async client never polled the batch: {agents}"
    assert len(llm.batches) == 1 and llm.chat_requests == [], "every summary must come from the one batch"
    assert event_counts(db) == {BIG: 20, BIGGER: 20, LINE_FAILS: 55}
    assert llm.files == [], "input, output and error files must be deleted from the provider"
    mapped = {ti["rendered_map_index"]: ti for (t, _), ti in tis.items() if t == "compress_user"}
    assert mapped[LINE_FAILS]["state"] == "failed" and mapped[BIG]["state"] == "success", states

    body = {
        "dry_run": False,
        "only_failed": False,
        "task_ids": [["compress_user", mapped[LINE_FAILS]["map_index"]]],
        "include_downstream": True,
        "dag_run_id": run_id,
    }
    _ok(api.post(f"/dags/{DAG_ID}/clearTaskInstances", json=body))
    rerun = finished_run(api, run_id, timeout=RUN_TIMEOUT * 2)
    assert rerun["state"] == "success", task_instances(api, run_id)
    assert len(llm.chat_requests) == 1 and len(llm.batches) == 1, "the failed user is compressed online, no new batch"
    assert event_counts(db) == {BIG: 20, BIGGER: 20, LINE_FAILS: 20}
    doc = db["memory_compression_runs"].find_one({"run_id": run_id}) or {}
    assert (doc["users_compressed"], doc["users_failed"]) == (3, 0), {k: v for k, v in doc.items() if k != "users"}
