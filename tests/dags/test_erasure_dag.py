"""memory_erasure run in-process with ``dag.test()`` against real MongoDB and Redis: dry run, a whole
user, some events, bad input; and its params refuse malformed values at trigger time."""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.sdk.exceptions import ParamValidationError
from pymongo.database import Database

from tests.dags.test_dag_integrity import _validated, _validated_sdk
from tests.dags.test_dag_run import CANARY, REPO, llm_pool, seed_users, task_instances, world, xcom_values

__all__ = ["llm_pool", "world"]  # fixtures used by this module's tests

Doc = dict[str, Any]
SECRET = "dag-test-erasure-secret-77b1"


class FreshDags:
    """Each access parses dags/ again: in one process, a run's conf is written into the DAG's own
    Param objects, so a second ``dag.test()`` on the same object would inherit it (see test_dag_run)."""

    def __getitem__(self, key: str) -> Any:
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(REPO / "dags"))
        assert not bag.import_errors, bag.import_errors
        return bag.dags[{"compress": "memory_compression", "erase": "memory_erasure"}[key]]


@pytest.fixture
def dags(llm_pool: None, monkeypatch: pytest.MonkeyPatch) -> FreshDags:
    """Return the compression and erasure DAGs, freshly parsed at each use, with the erasure secret set."""
    monkeypatch.setenv("BUTLER_MEMORY_ERASURE_SECRET", SECRET)
    return FreshDags()


def everything(db: Database[Doc]) -> Doc:
    """Return every document of every collection."""
    return {name: list(db[name].find()) for name in sorted(db.list_collection_names())}


def mentions(db: Database[Doc], needle: str) -> list[str]:
    """Return the collections holding a document whose JSON contains ``needle``."""
    return sorted(
        {
            name
            for name in db.list_collection_names()
            for doc in db[name].find()
            if needle in json.dumps(doc, default=str)
        }
    )


def result_of(run: Any) -> Doc:
    """Return the forget task's result XCom."""
    (row,) = [row for row in xcom_values(run) if row[0] == "forget" and row[2] == "return_value"]
    return json.loads(row[3])


def test_erasure_dag_dry_run_then_a_whole_user_then_some_events(dags: FreshDags, world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-gone": 60, "u-events": 60, "u-stays": 60})
    assert dags["compress"].test(run_conf={}).state == "success"
    before = everything(db)

    dry = dags["erase"].test(run_conf={"user_id": "u-gone"})
    assert dry.state == "success", {k: ti.state for k, ti in task_instances(dry).items()}
    assert result_of(dry)["status"] == "dry_run" and result_of(dry)["removed"]["archive"] == 40
    assert everything(db) == before, "a dry run (the default) wrote something"

    real = dags["erase"].test(run_conf={"user_id": "u-gone", "dry_run": False, "include_events": True})
    assert real.state == "success", {k: ti.state for k, ti in task_instances(real).items()}
    assert result_of(real)["status"] == "erased"
    assert mentions(db, "u-gone") == [], "a document still names the erased user"
    assert db["user_memory"].count_documents({"user_id": "u-stays"}) == 20

    events = dags["erase"].test(run_conf={"user_id": "u-events", "event_ids": ["u-events-0005"], "dry_run": False})
    assert events.state == "success", {k: ti.state for k, ti in task_instances(events).items()}
    done = result_of(events)
    assert done["status"] == "forgotten" and done["summary_version"] == 2 and done["versions_dropped"] == [1], done
    assert db["user_memory_archive"].count_documents({"event_id": "u-events-0005"}) == 0
    assert db["user_memory_summaries"].count_documents({"user_id": "u-events", "version": 1}) == 0
    assert db["memory_erasures"].count_documents({"state": "done"}) == 2
    for run in (dry, real, events):
        assert not any(CANARY in row[3] for row in xcom_values(run)), "content in XCom"
        assert not any("u-gone" in row[3] for row in xcom_values(run) if row[0] == "forget"), "the id in a result"


@pytest.mark.parametrize(
    "conf",
    [
        {"user_id": "nobody", "dry_run": False},
        {"user_id": "u-events", "event_ids": ["u-stays-0003"], "dry_run": False},
        {"user_id": "u-events", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z", "dry_run": False},
        {"user_id": "u-events", "event_ids": ["u-events-0003"], "include_events": True, "dry_run": False},
    ],
    ids=["unknown-user", "another-users-event", "inverted-range", "events-and-include"],
)
def test_bad_input_fails_the_run_at_once_and_changes_nothing(conf: Doc, dags: FreshDags, world: dict[str, Any]) -> None:
    db = world["db"]
    seed_users(db, {"u-events": 60, "u-stays": 60})
    assert dags["compress"].test(run_conf={}).state == "success"
    before = everything(db)

    run = dags["erase"].test(run_conf=conf)

    tis = task_instances(run)
    assert run.state == "failed" and tis[("forget", -1)].state == "failed", {k: ti.state for k, ti in tis.items()}
    assert tis[("forget", -1)].try_number == 1, "bad input must fail at once, not retry"
    assert everything(db) == before


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u1", "since": "yesterday"}, "since"),
        ({"user_id": "u1", "until": "2026-13"}, "until"),
        ({"user_id": "u1", "event_ids": "e1"}, "event_ids"),
        ({"user_id": "u1", "dry_run": "no"}, "dry_run"),
    ],
    ids=["no-user", "empty-user", "since-not-iso", "until-not-iso", "event_ids-string", "dry_run-string"],
)
def test_bad_params_are_refused_at_trigger_time(dags: FreshDags, conf: Doc, param: str) -> None:
    for validate in (_validated, _validated_sdk):
        with pytest.raises(ParamValidationError) as caught:
            validate(dags["erase"], conf)
        assert str(caught.value).splitlines()[0].startswith(f"Invalid input for param {param}: "), caught.value
