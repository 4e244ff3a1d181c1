"""memory_erasure run in-process with ``dag.test()`` against real MongoDB and Redis: dry run, a whole
user, some events, bad input; and its params refuse malformed values at trigger time."""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.sdk.exceptions import ParamValidationError
from pymongo.database import Database

from tests.dags.task_stub import TaskInstanceStub
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


GONE, KEPT, SOME = "u-erased-7f3a", "u-kept-7f3a", "u-some-7f3a"


def metadata_rows_naming(needle: str) -> dict[str, int]:
    """Return {table: rows} for every table of the session's metadata DB with a row whose text contains ``needle``."""
    from airflow.utils.session import create_session

    with create_session() as session:
        return rows_naming(session.get_bind(), needle)


def rows_naming(bind: Any, needle: str) -> dict[str, int]:
    """Return {table: rows} for every table of the PostgreSQL database ``bind`` with a row whose text contains ``needle``."""
    from sqlalchemy import inspect, text

    if bind.dialect.name != "postgresql":
        pytest.skip("reads every row as text with PostgreSQL's row-to-text cast; the session DB is SQLite")
    found = {}
    with bind.connect() as session:
        for table in inspect(bind).get_table_names():
            query = f'SELECT count(*) FROM "{table}" AS t WHERE t::text LIKE :needle'  # noqa: S608  # names from the catalogue
            n = session.execute(text(query), {"needle": f"%{needle}%"}).scalar_one()
            if n:
                found[table] = n
    return found


def conf_of(run: Any) -> Doc:
    """Return the run's conf as the metadata DB holds it now."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return dict(session.scalar(select(DagRun.conf).where(DagRun.id == run.id)) or {})


def test_an_erasure_through_airflow_leaves_no_id_in_the_metadata_db_or_its_log(
    dags: FreshDags, world: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    seed_users(world["db"], {GONE: 60, KEPT: 60, SOME: 60})
    compressed = dags["compress"].test(run_conf={"user_ids": [GONE, KEPT, SOME], "users_per_task": 1})
    assert compressed.state == "success", {k: ti.state for k, ti in task_instances(compressed).items()}
    named = metadata_rows_naming(GONE)
    assert {"dag_run", "task_instance", "xcom", "rendered_task_instance_fields"} <= set(named), named
    capfd.readouterr()

    dry = dags["erase"].test(run_conf={"user_id": GONE})
    assert dry.state == "success" and result_of(dry)["status"] == "dry_run"
    assert conf_of(dry)["user_id"] == "[erased]", "a finished dry run still holds the id in its conf"
    assert metadata_rows_naming(GONE) == named, "a dry run erased nothing, so the compression's rows stay"

    real = dags["erase"].test(run_conf={"user_id": GONE, "dry_run": False, "include_events": True})
    assert real.state == "success", {k: ti.state for k, ti in task_instances(real).items()}
    assert result_of(real)["status"] == "erased" and "subject" not in result_of(real)
    assert metadata_rows_naming(GONE) == {}, "a row of Airflow's metadata DB still names the erased user"
    assert conf_of(real) == {"user_id": "[erased]", "dry_run": False, "include_events": True}
    labels = {ti.rendered_map_index for (task, _), ti in task_instances(compressed).items() if task == "compress_user"}
    assert labels == {"[erased]", KEPT, SOME}, "only the erased user's label changed"
    assert conf_of(compressed) == {"user_ids": ["[erased]", KEPT, SOME], "users_per_task": 1}

    some = dags["erase"].test(run_conf={"user_id": SOME, "event_ids": [f"{SOME}-0003"], "dry_run": False})
    assert some.state == "success" and result_of(some)["status"] == "forgotten", result_of(some)
    assert metadata_rows_naming(f"{SOME}-0003") == {}
    assert conf_of(some)["user_id"] == "[erased]" and conf_of(some)["event_ids"] == ["[erased]"]
    assert metadata_rows_naming(KEPT), "a user nobody erased keeps their rows"
    assert SOME in conf_of(compressed)["user_ids"], "forgetting events does not erase the user's id elsewhere"

    printed = capfd.readouterr()
    assert GONE not in printed.out + printed.err, "an erasure run's log names the user"
    assert f"{SOME}-0003" not in printed.out + printed.err, "an erasure run's log names the event"


def test_a_failed_erasure_leaves_no_id_in_its_conf_or_its_error(
    dags: FreshDags, world: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    seed_users(world["db"], {KEPT: 60})
    capfd.readouterr()
    run = dags["erase"].test(run_conf={"user_id": "u-nobody-7f3a", "dry_run": False})
    assert run.state == "failed"
    printed = capfd.readouterr()
    assert "ForgetInputError" in printed.out + printed.err, "the failure is logged"
    assert "u-nobody-7f3a" not in printed.out + printed.err, "the failure's log names the user"
    assert conf_of(run)["user_id"] == "[erased]"
    assert metadata_rows_naming("u-nobody-7f3a") == {}


def compress_in_process(params: Doc, run_id: str) -> None:
    """Run memory_compression's scan and compress_user bodies in-process (no Airflow run)."""
    from butler_memory.orchestration import dag_tasks

    xcoms: dict[tuple[str, str], list[Any]] = {}
    for users in dag_tasks.scan(params, TaskInstanceStub(xcoms, "scan", "memory_compression"), kind="daily"):
        dag_tasks.compress(users, params, TaskInstanceStub(xcoms, "compress_user", "memory_compression"), run_id)


def test_a_misspelt_param_fails_the_erasure_naming_it_instead_of_erasing_the_whole_user(
    airflow_conns: Any, mongo_db: Database[Doc], llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow lets an unknown conf key through; ``event_id`` for ``event_ids`` fails naming it, nothing erased (third review)."""
    from airflow.sdk.exceptions import AirflowFailException

    from butler_memory.orchestration import erasure_tasks

    monkeypatch.setenv("BUTLER_MEMORY_ERASURE_SECRET", SECRET)
    seed_users(mongo_db, {"u-keep": 60})
    compress_in_process({"threshold": 50, "keep_last_n": 20}, "manual__seed")
    before = everything(mongo_db)
    assert mongo_db["user_memory_archive"].count_documents({"user_id": "u-keep"}) == 40

    conf = {"user_id": "u-keep", "event_id": ["u-keep-0001"], "dry_run": False}
    resolved = _validated(FreshDags()["erase"], conf)  # what the API server accepts for the trigger
    assert resolved["event_id"] == ["u-keep-0001"] and resolved["event_ids"] == [], "the premise: let through"
    with pytest.raises(AirflowFailException, match=r"unknown param\(s\) 'event_id'") as failed:
        erasure_tasks.run(resolved, "memory_erasure/manual__typo")
    assert "u-keep" not in str(failed.value), "the failure names a value, not only the key"
    assert everything(mongo_db) == before, "a misspelt param changed something"
