"""memory_qualify run in-process with ``dag.test()`` against the fake OpenAI server (a good and a bad
model) and with the offline summariser; its params refuse bad thresholds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.dags.test_dag_run import REPO, llm_pool, task_instances, world, xcom_values

__all__ = ["llm_pool", "world"]  # fixtures used by this module's tests

PLANTED = ("Ольга", "Татнефти", "Schwabing", "Valencia", "Toronto")


@pytest.fixture
def dag(llm_pool: None) -> Any:
    """Return memory_qualify freshly parsed from dags/ (a DAG object keeps the last run's params)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["memory_qualify"]


def qualify_xcom(run: Any) -> dict[str, Any]:
    (row,) = [row for row in xcom_values(run) if row[0] == "qualify" and row[2] == "return_value"]
    return dict(json.loads(row[3]))


def test_a_good_model_qualifies_and_nothing_is_written(dag: Any, world: dict[str, Any]) -> None:
    world["llm"].set_responder("faithful")

    run = dag.test(run_conf={})

    assert run.state == "success", {k: ti.state for k, ti in task_instances(run).items()}
    report = qualify_xcom(run)
    assert report["verdict"] == "pass" and report["facts_kept"] == report["facts"] > 0, report
    assert world["db"].list_collection_names() == [], "qualify wrote to the Butler's database"
    assert world["redis"].keys("*") == []
    assert not any(word in row[3] for row in xcom_values(run) for word in PLANTED), "content in XCom"


def test_a_model_cut_off_at_max_tokens_fails_the_run(dag: Any, world: dict[str, Any]) -> None:
    world["llm"].set_responder("faithful")
    world["llm"].set_finish_reason("length")

    run = dag.test(run_conf={"max_failed_users": 1})

    assert run.state == "failed"
    (ti,) = task_instances(run).values()
    assert ti.state == "failed" and ti.try_number == 1, "a failed verdict must not be retried"
    assert not [row for row in xcom_values(run) if row[2] == "return_value"]


def test_the_offline_summariser_qualifies(dag: Any, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUTLER_MEMORY_SUMMARIZER", "offline")

    run = dag.test(run_conf={"min_fact_retention": 1.0})

    assert run.state == "success"
    report = qualify_xcom(run)
    assert report["summarizer"] == "offline" and report["thresholds"]["min_fact_retention"] == 1.0, report
    assert world["llm"].request_count == 0


@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"min_fact_retention": 1.5}, "min_fact_retention"),
        ({"max_failed_users": -1}, "max_failed_users"),
        ({"max_latency_seconds": 0}, "max_latency_seconds"),
        ({"max_false_alarms": "none"}, "max_false_alarms"),
    ],
)
def test_bad_thresholds_are_refused(dag: Any, conf: dict[str, Any], param: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))  # as the API server sees it
    assert serialized.params.deep_merge({}).validate()["min_fact_retention"] is None, "empty = the built-in default"
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}"):
        serialized.params.deep_merge(conf).validate()
