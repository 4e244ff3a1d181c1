"""memory_compression_catchup run in-process with ``dag.test()`` against real MongoDB, Redis and StatsD.

The catch-up DAG has the daily DAG's shape; what differs is who its scan finds, that an idle run
stores no run document, and that the doorbell's record is drained by its report.
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.freshness import fresh
from butler_memory.freshness.doorbell import Doorbell
from tests.dags.test_dag_run import (
    FAIL_MARKER,
    REPO,
    event_counts,
    llm_pool,
    seed_users,
    task_instances,
    world,
)
from tests.population import BROKEN

__all__ = ["llm_pool", "world"]  # fixtures used by this module's tests

CATCHUP_ID = "memory_compression_catchup"
DAILY_ID = "memory_compression"


@pytest.fixture
def dags(llm_pool: None) -> dict[str, Any]:
    """Return both DAGs freshly parsed from dags/ (fresh per test, as in test_dag_run)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {CATCHUP_ID: bag.dags[CATCHUP_ID], DAILY_ID: bag.dags[DAILY_ID]}


def _runs(db: Database[dict[str, Any]], collection: str = "memory_compression_runs") -> list[dict[str, Any]]:
    return list(db[collection].find({}, {"_id": 0}).sort("started_at", 1))


def _statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {u["user_id"]: u["status"] for u in doc["users"]}


def test_idle_catchup_run_stores_no_run_document(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db, statsd = world["db"], world["statsd"]
    seed_users(db, {"u-small": 5})
    # The first run has no watermark: a full scan; nobody is over the threshold.
    run = dags[CATCHUP_ID].test(run_conf={})
    assert run.state == "success", {k: ti.state for k, ti in task_instances(run).items()}
    assert _runs(db) == _runs(db, "memory_compression_catchup_runs") == []
    state = db["memory_compression_state"].find_one({"_id": fresh.STATE_DOC})
    assert state is not None and state["idle_runs"] == 1 and state["scanned_through"]
    lines = statsd.wait_for(lambda got: any("catchup_idle_runs_total:1|c" in line for line in got))
    assert not any(line.startswith("personalized_memory_worker_runs_total") for line in lines), lines
    assert not any("last_success_timestamp" in line for line in lines), "an idle catch-up run posed as a daily run"


def test_daily_catchup_and_an_inline_holder_compress_a_user_once(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db, locks = world["db"], world["redis"]
    seed_users(db, {"u-held": 70, "u-free": 60})
    key = Settings().lock_key("u-held")
    locks.set(key, "the-bot's-inline-compression", px=600_000)
    Doorbell(locks).ring("u-held")

    daily = dags[DAILY_ID].test(run_conf={})
    catchup = dags[CATCHUP_ID].test(run_conf={})
    assert daily.state == catchup.state == "success"

    [daily_doc] = _runs(db)
    [catchup_doc] = _runs(db, "memory_compression_catchup_runs")
    assert (daily_doc["kind"], catchup_doc["kind"]) == ("daily", "catchup")
    assert _statuses(daily_doc) == {"u-held": "skipped_locked", "u-free": "compressed"}
    assert _statuses(catchup_doc) == {"u-held": "skipped_locked"}, "the catch-up run must say it skipped"
    assert catchup_doc["users_skipped_locked"] == 1
    assert event_counts(db) == {"u-held": 70, "u-free": 20}
    assert locks.get(key) == b"the-bot's-inline-compression"
    assert locks.zcard("butler:memory:doorbell") == 0, "the catch-up run's report drains the doorbell record"
    # The daily run's first scan is its full one; it owes the locked user a run (issue 20.3).
    daily_state = db["memory_compression_state"].find_one({"_id": fresh.DAILY_STATE_DOC})
    assert daily_state is not None and daily_state[fresh.FULL_FIELD] == daily_state["scanned_through"]
    assert locks.zrange("butler:memory:daily:owed", 0, -1) == [b"u-held"]

    # The holder lets go (it wrote nothing here); the next run compresses the user, once.
    locks.delete(key)
    again = dags[DAILY_ID].test(run_conf={})
    assert again.state == "success"
    assert _statuses(_runs(db)[-1]) == {"u-held": "compressed"}
    assert locks.zcard("butler:memory:daily:owed") == 0, "the daily report drops the user it compressed"
    assert (daily_doc["full_scan"], _runs(db)[-1]["full_scan"]) == (True, False), "first full, then incremental"
    versions = {p["user_id"]: p.get("memory_summary_version") for p in db["user_profiles"].find()}
    assert versions == {"u-held": 1, "u-free": 1}, versions


def test_a_user_failing_for_good_is_backed_off_by_catchup_runs_not_by_the_daily_run(
    dags: dict[str, Any], world: dict[str, Any]
) -> None:
    """Issue 26, item 6: a deterministic failure spent an LLM call on every catch-up run (every 5 minutes)."""
    db, llm, locks, statsd = world["db"], world["llm"], world["redis"], world["statsd"]
    llm.fail_when_contains(FAIL_MARKER, 400)  # LLMPermanentError: the same every time
    seed_users(db, {BROKEN: 65, "u-ok": 60})

    first = dags[CATCHUP_ID].test(run_conf={})
    assert first.state == "failed"
    assert locks.hget(f"butler:memory:backoff:{BROKEN}", "failures") == b"1"
    assert locks.hget(f"butler:memory:backoff:{BROKEN}", "error_type") == b"LLMPermanentError"
    assert locks.exists("butler:memory:backoff:u-ok") == 0

    seed_users(db, {"u-new": 60})
    bell = Doorbell(locks)
    bell.ring(BROKEN)
    bell.ring("u-new")
    calls = llm.request_count
    statsd.clear()
    second = dags[CATCHUP_ID].test(run_conf={})
    assert second.state == "success", "a backed-off user is not a failure of this run"
    assert llm.request_count == calls + 1, "only u-new's call: none for the backed-off user"
    doc = _runs(db, "memory_compression_catchup_runs")[-1]
    assert _statuses(doc) == {"u-new": "compressed"}
    assert doc["users_skipped_backoff"] == 1
    statsd.wait_for(lambda got: any("users_skipped_backoff_total:1|c" in line for line in got))
    assert set(bell_record(locks)) == {BROKEN}, "its ring is kept for the run after its back-off"

    daily = dags[DAILY_ID].test(run_conf={})
    assert daily.state == "failed", "the daily run still tries it"
    assert _statuses(_runs(db)[-1])[BROKEN] == "failed"
    assert locks.hget(f"butler:memory:backoff:{BROKEN}", "failures") == b"2"

    llm.clear_rules()
    again = dags[DAILY_ID].test(run_conf={"user_ids": [BROKEN]})
    assert again.state == "success" and _statuses(_runs(db)[-1]) == {BROKEN: "compressed"}
    assert locks.exists(f"butler:memory:backoff:{BROKEN}") == 0, "a compression clears the back-off"


def bell_record(locks: Any) -> list[str]:
    return [m.decode() for m in locks.zrange("butler:memory:doorbell", 0, -1)]
