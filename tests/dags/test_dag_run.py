"""memory_compression run in-process with ``dag.test()`` against real MongoDB, Redis, StatsD and a fake LLM.

``dag.test()`` runs every task in this process, one after another, through the Task SDK's in-process
supervisor and execution API, on the session's SQLite metadata DB. It does not go through an
executor, so pools are not enforced (the ``llm_api`` pool is created anyway, as in production), and
a task that fails with retries left sits in ``up_for_retry`` until its retry delay passes: these
tests only use permanent failures; retries after a transient failure are covered by the e2e test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.settings import Settings
from tests.population import BELOW, BIG, BIGGER, BROKEN, LOCKED, POPULATION, seed_population
from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns, StatsdSink

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "memory_compression"
CANARY = "CANARY-b7e1d2-secret-diary-entry"
"""Planted in every event's content: it must never reach an XCom."""
FAIL_MARKER = "FAIL-MARKER-4c9e"
"""Planted in one user's content: the fake LLM answers 400 to any prompt containing it."""


@pytest.fixture(scope="module")
def llm_pool(airflow_db: Any) -> Iterator[None]:
    """Create the llm_api pool in the session's metadata DB, as a deployment does, and drop it after.

    ``dag.test()`` runs tasks without an executor and never checks pool slots; the pool is there so
    the run looks like production (a scheduler never queues a task whose pool is missing).
    """
    from airflow.models.pool import Pool

    Pool.create_or_update_pool("llm_api", 8, "LLM calls of memory_compression", include_deferred=False)
    yield
    Pool.delete_pool("llm_api")  # the session DB is shared: leave it as we found it


@pytest.fixture
def dag(llm_pool: None) -> Any:
    """Return the memory_compression DAG freshly parsed from dags/.

    Fresh per test: in one process, the Task SDK's ``process_params`` writes each run's conf into the
    DAG's own ``Param`` objects, so a second ``dag.test()`` on the same object would inherit the
    first run's conf (say ``dry_run: true``) for every key it does not set itself.
    """
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def seed_users(db: Database[dict[str, Any]], population: dict[str, int]) -> None:
    """Insert events for each user, each carrying the canary; the broken user's carry the fail marker."""
    seed_population(db, population, canary=CANARY, broken=BROKEN, fail_marker=FAIL_MARKER)


def event_counts(db: Database[dict[str, Any]]) -> dict[str, int]:
    """Return the number of raw events per user."""
    return {
        row["_id"]: row["n"] for row in db["user_memory"].aggregate([{"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
    }


def run_dag(dag: Any, conf: dict[str, Any] | None = None) -> Any:
    """Run the DAG once with dag.test() and return the finished DagRun."""
    return dag.test(run_conf=conf or {})


def task_instances(run: Any) -> dict[tuple[str, int], Any]:
    """Return the run's task instances by (task_id, map_index)."""
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = run.get_task_instances(session=session)
        for ti in tis:
            session.expunge(ti)
    return {(ti.task_id, ti.map_index): ti for ti in tis}


def xcom_values(run: Any) -> list[tuple[str, int, str, str]]:
    """Return every XCom row of the run as (task_id, map_index, key, JSON text of the value)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(XComModel.task_id, XComModel.map_index, XComModel.key, XComModel.value).where(
                XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id
            )
        ).all()
    return [(t, i, k, json.dumps(v, ensure_ascii=False)) for t, i, k, v in rows]


@pytest.fixture
def world(
    airflow_conns: AirflowConns,
    mongo_db: Database[dict[str, Any]],
    redis_client: redis.Redis,
    statsd: StatsdSink,
    llm: FakeOpenAI,
) -> Iterator[dict[str, Any]]:
    """Yield the test's services, with connections pointing at them."""
    yield {"db": mongo_db, "redis": redis_client, "statsd": statsd, "llm": llm, "conns": airflow_conns}


def compress_outcomes(run: Any) -> dict[str, tuple[str, str | None]]:
    """Return {user id: (state of its compress_user instance, status in its result or failure XCom)}.

    An instance's XComs are lists of per-user rows (a batch of ``users_per_task`` users).
    """
    rows = sorted(xcom_values(run), key=lambda row: row[2] == "return_value")  # a result beats a failure
    by_user: dict[str, tuple[int, str | None]] = {}
    for t, i, _k, v in rows:
        if t == "compress_user":
            value = json.loads(v)
            for row in value if isinstance(value, list) else [value]:
                by_user[row["user_id"]] = (i, row.get("status"))
    states = {ti.map_index: ti.state for (task_id, _), ti in task_instances(run).items() if task_id == "compress_user"}
    return {user_id: (states[i], status) for user_id, (i, status) in by_user.items()}


def map_labels(run: Any) -> dict[int, str]:
    """Return {map index: rendered label} of the run's compress_user instances."""
    return {i: ti.rendered_map_index for (t, i), ti in task_instances(run).items() if t == "compress_user" and i >= 0}


def snapshot(db: Database[dict[str, Any]]) -> dict[str, Any]:
    """Return everything a run could write: events per user, profiles, archive, history and run documents."""
    return {
        "events": event_counts(db),
        "profiles": list(db["user_profiles"].find({}, {"_id": 0})),
        "archive": db["user_memory_archive"].count_documents({}),
        "history": db["user_memory_summaries"].count_documents({}),
        "runs": list(db["memory_compression_runs"].find({}, {"_id": 0})),
    }


def test_mixed_population_compresses_skips_and_fails_each_user_for_its_own_reason(
    dag: Any, world: dict[str, Any]
) -> None:
    db, llm, statsd, locks = world["db"], world["llm"], world["statsd"], world["redis"]
    seed_users(db, POPULATION)
    lock_key = Settings().lock_key(LOCKED)
    locks.set(lock_key, "the-bot's-inline-compression", px=600_000)
    llm.fail_when_contains(FAIL_MARKER, 400)

    run = run_dag(dag, {"users_per_task": 1})  # the design card's shape: an instance per user

    tis = task_instances(run)
    states = {key: ti.state for key, ti in tis.items()}
    assert run.state == "failed", f"{DAG_ID}: a failed user must fail the run; task states {states}"
    assert tis[("scan", -1)].state == "success"
    assert tis[("report", -1)].state == "failed", f"{DAG_ID}: report must fail on a failed user: {states}"
    assert compress_outcomes(run) == {
        BIG: ("success", "compressed"),
        BIGGER: ("success", "compressed"),
        LOCKED: ("success", "skipped_locked"),
        BROKEN: ("failed", "failed"),
    }, f"{DAG_ID}: per-user outcomes; task states {states}"
    assert sorted(map_labels(run).values()) == sorted([BIG, BIGGER, LOCKED, BROKEN]), (
        "one instance per user, labelled by id"
    )

    assert event_counts(db) == {BELOW: 30, BIG: 20, BIGGER: 20, LOCKED: 55, BROKEN: 65}
    assert db["user_memory_archive"].count_documents({}) == (60 - 20) + (75 - 20)
    summaries = {p["user_id"]: p.get("memory_summary") for p in db["user_profiles"].find()}
    assert set(summaries) >= {BIG, BIGGER}
    assert summaries[BIG] and summaries[BIGGER], summaries
    assert not summaries.get(LOCKED) and not summaries.get(BROKEN) and BELOW not in summaries
    assert locks.get(lock_key) == b"the-bot's-inline-compression", "another holder's lock was touched"
    assert locks.keys("butler:memory:lock:*") == [lock_key.encode()], "a compression lock was left behind"

    runs = list(db["memory_compression_runs"].find())
    assert len(runs) == 1, runs
    doc = runs[0]
    assert doc["run_id"] == run.run_id
    assert (doc["users_found"], doc["users_compressed"], doc["users_skipped_locked"], doc["users_failed"]) == (
        4,
        2,
        1,
        1,
    ), {k: v for k, v in doc.items() if k != "users"}
    assert doc["failed_user_ids"] == [BROKEN]
    assert doc["events_folded"] == doc["events_deleted"] == (60 - 20) + (75 - 20)
    broken_row = next(u for u in doc["users"] if u["user_id"] == BROKEN)
    assert broken_row["error_type"] == "LLMPermanentError", broken_row

    lines = statsd.wait_for(
        lambda got: (
            any(line.startswith("personalized_memory_worker_runs_total:1|c") for line in got)
            and any(line.startswith("personalized_memory_worker_errors_total:1|c") for line in got)
        )
    )
    assert "personalized_memory_worker_users_processed_total:2|c" in lines, lines
    assert "personalized_memory_worker_run_users_failed:1|g" in lines, lines

    xcoms = xcom_values(run)
    assert {(t, k) for t, _, k, _ in xcoms} >= {("scan", "return_value"), ("compress_user", "return_value")}
    leaked = [(t, i, k) for t, i, k, v in xcoms if CANARY in v or FAIL_MARKER in v or "Turn " in v]
    assert not leaked, f"event content reached XCom in {leaked}"
    assert not any(CANARY in json.dumps(row, default=str, ensure_ascii=False) for row in runs), (
        "event content reached the run document"
    )


def test_users_per_task_batches_users_and_keeps_one_row_per_user(dag: Any, world: dict[str, Any]) -> None:
    db, llm = world["db"], world["llm"]
    seed_users(db, POPULATION)
    llm.fail_when_contains(FAIL_MARKER, 400)

    run = run_dag(dag, {"users_per_task": 3})  # largest backlog first: [BIGGER, BROKEN, BIG], [LOCKED]

    states = {key: ti.state for key, ti in task_instances(run).items()}
    assert run.state == "failed", f"a failed user in a batch must fail the run: {states}"
    assert sorted(map_labels(run).values()) == [f"{BIGGER} +2", LOCKED], (
        "the label names the batch: first user and count"
    )
    outcomes = compress_outcomes(run)
    assert {u: status for u, (_, status) in outcomes.items()} == {
        BIG: "compressed",
        BIGGER: "compressed",
        LOCKED: "compressed",
        BROKEN: "failed",
    }, outcomes
    assert event_counts(db) == {BELOW: 30, BIG: 20, BIGGER: 20, LOCKED: 20, BROKEN: 65}, (
        "one failed user stopped its batch"
    )
    doc = db["memory_compression_runs"].find_one({"run_id": run.run_id})
    assert doc is not None
    assert (doc["users_found"], doc["users_compressed"], doc["users_failed"]) == (4, 3, 1), doc
    assert {u["user_id"]: u["map_index"] for u in doc["users"]} == {BIGGER: 0, BROKEN: 0, BIG: 0, LOCKED: 1}, doc[
        "users"
    ]
    stored = {d["user_id"]: d["row"]["status"] for d in db["memory_compression_run_users"].find({"run_id": run.run_id})}
    assert stored == {BIG: "compressed", BIGGER: "compressed", LOCKED: "compressed", BROKEN: "failed"}


def test_dry_run_writes_nothing(dag: Any, world: dict[str, Any]) -> None:
    db, llm, statsd = world["db"], world["llm"], world["statsd"]
    seed_users(db, POPULATION)
    before = snapshot(db)

    run = run_dag(dag, {"dry_run": True})

    assert run.state == "success", {k: ti.state for k, ti in task_instances(run).items()}
    assert compress_outcomes(run) == {u: ("success", "dry_run") for u in (BIG, BIGGER, LOCKED, BROKEN)}
    assert snapshot(db) == before, "a dry run changed the database"
    assert llm.request_count == 0, "a dry run called the LLM"
    assert world["redis"].keys("*") == [], "a dry run left keys in Redis"
    assert not any("_runs_total" in line for line in statsd.lines), statsd.lines


def test_empty_scan_is_a_clean_green_run(dag: Any, world: dict[str, Any]) -> None:
    db, llm = world["db"], world["llm"]
    seed_users(db, {BELOW: 30, "u-at-threshold": 50})

    run = run_dag(dag)

    states = {key: ti.state for key, ti in task_instances(run).items()}
    assert run.state == "success", states
    assert states[("report", -1)] == "success", states
    assert compress_outcomes(run) == {}, "no user is over the threshold, yet compress_user ran"
    assert states[("compress_user", -1)] == "skipped", "an empty expansion is skipped"
    assert event_counts(db) == {BELOW: 30, "u-at-threshold": 50}
    assert llm.request_count == 0
    doc = db["memory_compression_runs"].find_one({"run_id": run.run_id})
    assert doc is not None and (doc["users_found"], doc["users_failed"]) == (0, 0), doc


def test_user_ids_param_limits_the_run_to_those_users(dag: Any, world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {BELOW: 30, BIG: 60, BIGGER: 75})

    run = run_dag(dag, {"user_ids": [BIG]})

    assert run.state == "success", {k: ti.state for k, ti in task_instances(run).items()}
    assert compress_outcomes(run) == {BIG: ("success", "compressed")}
    assert event_counts(db) == {BELOW: 30, BIG: 20, BIGGER: 75}
    doc = db["memory_compression_runs"].find_one({"run_id": run.run_id})
    assert doc is not None and (doc["users_found"], doc["users_compressed"]) == (1, 1), doc


def test_transient_llm_failure_is_retried_and_the_run_ends_green(dag: Any, world: dict[str, Any]) -> None:
    """A 503 that outlasts the openai client's own retries fails the try; Airflow's retry then succeeds.

    The DAG's 30 s retry delay is set to 0 on this test's own DAG object: ``dag.test()`` honours retry
    delays by polling the run once a second, so the real delay would only slow the test down.
    """
    db, llm = world["db"], world["llm"]
    seed_users(db, {BIG: 60})
    compress = dag.get_task("compress_user")
    compress.partial_kwargs["retry_delay"] = timedelta(0)
    compress.partial_kwargs["retry_exponential_backoff"] = 0
    for _ in range(3):  # the first call and both of the openai client's own retries
        llm.push_status(503)

    run = run_dag(dag)

    tis = task_instances(run)
    assert run.state == "success", {k: (ti.state, ti.try_number) for k, ti in tis.items()}
    assert tis[("compress_user", 0)].try_number == 2, "the transient failure should cost exactly one retry"
    assert compress_outcomes(run) == {BIG: ("success", "compressed")}
    assert llm.request_count == 4
    assert event_counts(db) == {BIG: 20}
    doc = db["memory_compression_runs"].find_one({"run_id": run.run_id})
    assert doc is not None and (doc["users_compressed"], doc["users_failed"]) == (1, 0), doc


def test_a_user_id_too_long_to_erase_is_left_out_and_the_longest_one_is_labelled_whole(
    dag: Any, world: dict[str, Any]
) -> None:
    """An id over 200 characters is no user id (the forget CLI and the erasure DAG could not erase it): the
    run leaves it out, green. The longest user id, 200 characters, fits Airflow's 250-character label
    column (PostgreSQL refuses a longer value) whole."""
    db = world["db"]
    too_long, longest = "u-" + "x" * 298, "u-" + "y" * 198
    seed_users(db, {too_long: 60, longest: 60})

    run = run_dag(dag)

    assert run.state == "success", {k: ti.state for k, ti in task_instances(run).items()}
    assert compress_outcomes(run) == {longest: ("success", "compressed")}
    assert list(map_labels(run).values()) == [longest]
    assert event_counts(db) == {too_long: 60, longest: 20}
