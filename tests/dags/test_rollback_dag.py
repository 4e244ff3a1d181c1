"""memory_rollback and memory_refold run in-process with ``dag.test()`` against real MongoDB and Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cli.test_rollback_cli import state
from tests.dags.task_stub import TaskInstanceStub
from tests.dags.test_dag_run import CANARY, REPO, llm_pool, seed_users, task_instances, world, xcom_values

__all__ = ["llm_pool", "world"]  # fixtures used by this module's tests

Doc = dict[str, Any]


@pytest.fixture
def dags(llm_pool: None) -> dict[str, Any]:
    """Return the compression and rollback DAGs freshly parsed from dags/."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return {
        "compress": bag.dags["memory_compression"],
        "rollback": bag.dags["memory_rollback"],
        "refold": bag.dags["memory_refold"],
    }


def test_rollback_dag_dry_run_then_drill(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-a": 60, "u-b": 70})
    first = dags["compress"].test(run_conf={})
    assert first.state == "success"
    more = {"u-a": 45, "u-b": 45}
    seed_users(db, more)  # new _ids (ObjectIds), timestamps among the archived ones
    before = state(db)
    second = dags["compress"].test(run_conf={"full_scan": True})  # backdated events: only a full scan sees them
    assert second.state == "success"
    after_run = state(db)
    assert after_run != before

    dry = dags["rollback"].test(run_conf={"run_id": second.run_id})
    assert dry.state == "success", {k: ti.state for k, ti in task_instances(dry).items()}
    assert state(db) == after_run, "a dry run (the default) wrote something"

    real = dags["rollback"].test(run_conf={"run_id": second.run_id, "dry_run": False})
    assert real.state == "success", {k: ti.state for k, ti in task_instances(real).items()}
    assert state(db) == before, "user_memory, archive and profiles differ from the snapshot"
    results = [row for row in xcom_values(real) if row[0] == "rollback_user" and row[2] == "return_value"]
    assert len(results) == 2 and all('"rolled_back"' in row[3] for row in results), results
    assert not any(CANARY in row[3] for row in xcom_values(real) + xcom_values(dry)), "content in XCom"


def test_rollback_dag_refuses_a_run_a_later_one_built_on(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-a": 60})
    first = dags["compress"].test(run_conf={})
    seed_users(db, {"u-a": 45})  # backdated events: only a full scan sees them
    assert dags["compress"].test(run_conf={"full_scan": True}).state == "success"
    held = state(db)

    refused = dags["rollback"].test(run_conf={"run_id": first.run_id, "dry_run": False})
    assert refused.state == "failed"
    assert state(db) == held, "a refused rollback changed something"
    cascade = dags["rollback"].test(run_conf={"run_id": first.run_id, "dry_run": False, "cascade": True})
    assert cascade.state == "success"
    assert db["user_memory"].count_documents({"user_id": "u-a"}) == 105


def test_a_run_rollback_that_some_users_refuse_applies_to_none_unless_partial(
    dags: dict[str, Any], world: dict[str, Any]
) -> None:
    # Issue 23.1: one decision for the run, said up front by the plan, as the CLI decides it.
    db = world["db"]
    seed_users(db, {"u-a": 60, "u-b": 60})
    first = dags["compress"].test(run_conf={})
    seed_users(db, {"u-a": 45})  # backdated events: only a full scan sees them
    assert dags["compress"].test(run_conf={"user_ids": ["u-a"], "full_scan": True}).state == "success"
    held = state(db)

    def outcome(run: Any) -> tuple[list[Any], dict[str, str]]:
        rows = xcom_values(run)
        dry_pass = [json.loads(row[3]) for row in rows if row[:3] == ("plan", -1, "refused_run")]
        done = [json.loads(row[3]) for row in rows if row[0] == "rollback_user" and row[2] == "return_value"]
        return dry_pass, {r["user_id"]: r["status"] for r in done}

    for dry_run in (True, False):
        none = dags["rollback"].test(run_conf={"run_id": first.run_id, "dry_run": dry_run})
        assert none.state == "failed", dry_run
        dry_pass, done = outcome(none)
        assert [{r["user_id"]: r["status"] for r in rows} for rows in dry_pass] == [
            {"u-a": "refused", "u-b": "dry_run"}
        ]
        assert done == {}, f"the plan refused the run, yet users were rolled back: {done}"
        assert state(db) == held, "a run rollback that one user refuses changed another"

    partial = dags["rollback"].test(run_conf={"run_id": first.run_id, "dry_run": False, "partial": True})
    assert partial.state == "failed", "a refused user still fails the run"
    assert outcome(partial) == ([], {"u-b": "rolled_back"})
    assert db["user_profiles"].find_one({"user_id": "u-b"})["memory_summary"] == ""


def test_refold_dag_dry_run_then_a_new_version(dags: dict[str, Any], world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-a": 60})
    assert dags["compress"].test(run_conf={}).state == "success"
    before = state(db)

    dry = dags["refold"].test(run_conf={"user_ids": ["u-a"]})
    assert dry.state == "success", {k: ti.state for k, ti in task_instances(dry).items()}
    assert state(db) == before, "a dry run (the default) wrote something"

    real = dags["refold"].test(run_conf={"user_ids": ["u-a"], "dry_run": False})
    assert real.state == "success", {k: ti.state for k, ti in task_instances(real).items()}
    after = state(db)
    assert after["events"] == before["events"] and after["archive"] == before["archive"]
    newest = db["user_memory_summaries"].find_one({"user_id": "u-a"}, sort=[("version", -1)])
    assert newest is not None and (newest["kind"], newest["run_id"], newest["refolded_from"]) == (
        "refold",
        f"memory_refold/{real.run_id}",  # runs are keyed by DAG in the history
        0,
    )
    assert not any(CANARY in row[3] for row in xcom_values(real)), "content in XCom"


def test_a_rollback_of_more_users_than_max_map_length_fails_at_plan_naming_the_limit_and_the_cli(
    airflow_conns: Any, mongo_db: Any, llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compression run batches users_per_task users per instance, rollback_user takes one: more users than
    max_map_length fail the plan at once, before any is dry-run, naming the limit and the CLI (third review)."""
    from airflow.sdk.exceptions import AirflowFailException

    from butler_memory.operations.engine import Engine
    from butler_memory.orchestration import dag_tasks, rollback_tasks

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "2")
    seed_users(mongo_db, {"u-1": 60, "u-2": 61, "u-3": 62})
    xcoms: dict[tuple[str, str], list[Any]] = {}
    params = {"threshold": 50, "keep_last_n": 20, "users_per_task": 3, "limit": 3}
    batches = dag_tasks.scan(params, TaskInstanceStub(xcoms, "scan", "memory_compression"), kind="daily")
    assert len(batches) == 1, "the premise: the compression run maps one instance, within max_map_length"
    rows = dag_tasks.compress(
        batches[0], params, TaskInstanceStub(xcoms, "compress_user", "memory_compression"), "manual__big"
    )
    assert [r["status"] for r in rows] == ["compressed"] * 3
    before = state(mongo_db)
    dry_runs: list[str] = []
    rollback = Engine.rollback
    monkeypatch.setattr(
        Engine, "rollback", lambda self, user_id, *a, **k: dry_runs.append(user_id) or rollback(self, user_id, *a, **k)
    )

    ti = TaskInstanceStub(xcoms, "plan", "memory_rollback")
    conf = {"run_id": "memory_compression/manual__big", "dry_run": False, "user_ids": []}
    with pytest.raises(
        AirflowFailException,
        match=r"3 users to roll back in run memory_compression/manual__big, more than the 2 rollback_user",
    ) as failed:
        rollback_tasks.plan(conf, ti, "manual__undo")
    assert "python -m butler_memory rollback --run memory_compression/manual__big" in str(failed.value)
    assert dry_runs == [], "the plan dry-ran users before refusing a list Airflow cannot map"
    assert state(mongo_db) == before
    only_two = rollback_tasks.plan({**conf, "user_ids": ["u-1", "u-2"]}, ti, "manual__undo")
    assert only_two == ["u-1", "u-2"], "the workaround the message names: at most max_map_length user_ids"
