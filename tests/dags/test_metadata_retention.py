"""What compressed users leave in Airflow's metadata DB, and that `airflow db clean` takes it away.

Runs memory_compression with ``dag.test()`` on the session's PostgreSQL metadata DB (SQLite when
PostgreSQL is missing, which fails under CI=true in tests/conftest.py), once an instance per user
and once in batches, counts the rows each run left per table, then runs the runbook's
``airflow db clean`` command in a subprocess and checks the runs' rows are gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.database import Database

from tests.dags.test_dag_run import dag, llm_pool, run_dag, world  # noqa: F401 - fixtures
from tests.population import seed_population

USERS = {f"u-meta-{i}": 60 for i in range(6)}
TABLES = ("dag_run", "task_instance", "xcom", "task_instance_history")
CLEAN_TABLES = "dag_run,task_instance,task_instance_history,xcom,log"
# Not --error-on-cleanup-failure: the pinned Airflow fails to clean its `deadline` table whenever dag_run is
# cleaned (a warning; we set no deadlines). The rows this test counts are checked below instead.


def rows_of(run_id: str) -> dict[str, int]:
    """Return how many rows of each table belong to one run of memory_compression."""
    return {table: rows for table, (rows, _) in footprint(run_id).items()}


def footprint(run_id: str) -> dict[str, tuple[int, int]]:
    """Return {table: (rows, bytes)} of one run of memory_compression (bytes: PostgreSQL's pg_column_size of each row)."""
    from airflow.utils.session import create_session
    from sqlalchemy import text

    with create_session() as session:
        found = {}
        for table in TABLES:
            rows, size = session.execute(
                text(
                    f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t "  # noqa: S608 - our table names
                    "WHERE dag_id = 'memory_compression' AND run_id = :run"
                ),
                {"run": run_id},
            ).one()
            found[table] = (int(rows), int(size))
        return found


def test_batches_leave_fewer_rows_and_db_clean_removes_a_runs_rows(dag: Any, world: dict[str, Any]) -> None:  # noqa: F811
    db: Database[dict[str, Any]] = world["db"]
    seed_population(db, USERS, canary="c", broken="nobody", fail_marker="never")
    one_each = run_dag(dag, {"users_per_task": 1})
    assert one_each.state == "success"
    seed_population(db, {u: 60 for u in USERS}, canary="c", broken="nobody", fail_marker="never")
    batched = run_dag(dag, {"users_per_task": 3, "full_scan": True})  # backdated events: only a full scan sees them
    assert batched.state == "success"

    per_user, per_batch = rows_of(one_each.run_id), rows_of(batched.run_id)
    for k, run in ((1, one_each), (3, batched)):  # the figures docs/operations/runbook.md quotes (pytest -s)
        print(f"metadata footprint, {len(USERS)} users, users_per_task={k}: {footprint(run.run_id)}")
    # The tasks that run once (scan, report, and batch mode's prepare/submit/wait, which pass through
    # online) + one compress_user instance per user, or per 3 users; an XCom a mapped instance.
    once = len([t for t in dag.task_ids if t != "compress_user"])
    assert per_user["task_instance"] == once + len(USERS), per_user
    assert per_batch["task_instance"] == once + len(USERS) // 3, per_batch
    assert per_batch["xcom"] < per_user["xcom"], (per_user, per_batch)

    cutoff = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    cleaned = subprocess.run(
        [
            sys.executable, "-m", "airflow", "db", "clean", "--clean-before-timestamp", cutoff,
            "--dag-ids", "memory_compression", "--tables", CLEAN_TABLES, "--skip-archive", "--yes",
        ],
        env=os.environ.copy(), capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert cleaned.returncode == 0, cleaned.stdout[-3000:] + cleaned.stderr[-3000:]
    left = {run: rows_of(run) for run in (one_each.run_id, batched.run_id)}
    assert all(n == 0 for counts in left.values() for n in counts.values()), left


@pytest.fixture(autouse=True)
def _postgres_metadata() -> None:
    if not os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"):
        pytest.skip("the metadata DB is SQLite here (PostgreSQL is not installed)")
