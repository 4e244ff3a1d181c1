"""Two DAGs' runs with the same Airflow run id stay apart: the summary history and the archive name
runs ``dag_id/run_id``, and a rollback says which run it means (issue 23, item 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.dags.test_dag_run import REPO, llm_pool, seed_users, task_instances, world

__all__ = ["llm_pool", "world"]  # fixtures used by this module's tests

DAILY, CATCHUP, ROLLBACK = "memory_compression", "memory_compression_catchup", "memory_rollback"
SAME_MOMENT = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def dags(llm_pool: None) -> dict[str, Any]:
    """Return the DAGs freshly parsed from dags/ (a DAG object keeps the last run's params)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {dag_id: bag.dags[dag_id] for dag_id in (DAILY, CATCHUP, ROLLBACK)}


def runs_in(db: Any, collection: str, user_id: str) -> set[str]:
    return {str(d.get("run_id")) for d in db[collection].find({"user_id": user_id}, {"run_id": 1})}


def test_the_daily_and_catchup_runs_of_one_moment_stay_apart(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-daily": 60, "u-catchup": 65})

    daily = dags[DAILY].test(run_after=SAME_MOMENT, logical_date=SAME_MOMENT, run_conf={"user_ids": ["u-daily"]})
    catchup = dags[CATCHUP].test(run_after=SAME_MOMENT, logical_date=SAME_MOMENT, run_conf={"user_ids": ["u-catchup"]})

    assert daily.state == catchup.state == "success"
    assert daily.run_id == catchup.run_id, "the premise: Airflow names both runs alike"
    rid = daily.run_id
    assert runs_in(db, "user_memory_summaries", "u-daily") == {f"{DAILY}/{rid}"}
    assert runs_in(db, "user_memory_summaries", "u-catchup") == {f"{CATCHUP}/{rid}"}
    assert runs_in(db, "user_memory_archive", "u-daily") == {f"{DAILY}/{rid}"}
    assert runs_in(db, "user_memory_archive", "u-catchup") == {f"{CATCHUP}/{rid}"}
    (doc,) = db["memory_compression_runs"].find()
    assert (doc["run_id"], doc["run_key"]) == (rid, f"{DAILY}/{rid}"), "the run document names both"

    # A bare run id two DAGs ran is refused as one decision, before anything is touched.
    ambiguous = dags[ROLLBACK].test(run_conf={"run_id": rid, "dry_run": False})
    assert ambiguous.state == "failed"
    assert {k[0]: ti.state for k, ti in task_instances(ambiguous).items()}["plan"] == "failed"
    assert db["user_memory"].count_documents({}) == 20 + 20

    # The daily run, named by its key, is undone for its own user only.
    undone = dags[ROLLBACK].test(run_conf={"run_id": f"{DAILY}/{rid}", "dry_run": False})
    assert undone.state == "success", {k: ti.state for k, ti in task_instances(undone).items()}
    assert db["user_memory"].count_documents({"user_id": "u-daily"}) == 60
    assert db["user_memory"].count_documents({"user_id": "u-catchup"}) == 20, "the catch-up run was undone too"
    newest = db["user_memory_summaries"].find_one({"user_id": "u-daily"}, sort=[("version", -1)])
    assert newest is not None and newest["run_id"] == f"{ROLLBACK}/{undone.run_id}"
