"""Every DAG file imports cleanly and follows the project's rules; memory_compression's params refuse bad input.

DAGs are loaded the way the DAG processor loads them, with ``DagBag`` over ``dags/``. Airflow 3 keeps
its example DAGs in a bundle of their own, so a ``DagBag`` over a folder never includes them (the
``include_examples`` argument of Airflow 2 is gone); the suite also sets ``LOAD_EXAMPLES=False``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import DAG
from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from butler_memory.core.settings import MAX_USERS_PER_TASK, Settings
from butler_memory.orchestration import params
from butler_memory.orchestration.task_outcome import params_checked
from tests.population import COMPRESSION_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
DAG_ID = "memory_compression"
# A DAG file is parsed every few seconds by the DAG processor; anything slower than this is doing work.
PARSE_BUDGET_SECONDS = 5.0


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    """Parse dags/ once, as the DAG processor would."""
    return DagBag(dag_folder=str(DAGS_DIR))


def _dags_of(bag: DagBag, path: Path) -> list[DAG]:
    return [dag for dag in bag.dags.values() if Path(dag.fileloc).resolve() == path.resolve()]


def test_there_are_dag_files() -> None:
    assert DAG_FILES, f"no DAG files found in {DAGS_DIR}"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_without_errors(dagbag: DagBag, path: Path) -> None:
    errors = {file: err for file, err in dagbag.import_errors.items() if Path(file).name == path.name}
    assert not errors, f"{path.relative_to(REPO)} failed to import:\n" + "\n".join(errors.values())
    assert _dags_of(dagbag, path), f"{path.relative_to(REPO)} defines no DAG"


def _all_dags() -> list[tuple[str, DAG]]:
    bag = DagBag(dag_folder=str(DAGS_DIR))
    return [(f"{dag.dag_id} ({Path(dag.fileloc).name})", dag) for dag in bag.dags.values()]


ALL_DAGS = _all_dags()


@pytest.mark.parametrize(("label", "dag"), ALL_DAGS, ids=[label for label, _ in ALL_DAGS])
def test_dag_follows_the_project_rules(label: str, dag: DAG) -> None:
    problems = []
    if not dag.tags:
        problems.append("has no tags")
    if not dag.doc_md or not dag.doc_md.strip():
        problems.append("has no doc_md")
    if dag.max_active_runs != 1:
        problems.append(f"max_active_runs is {dag.max_active_runs}, not 1")
    if dag.catchup:
        problems.append("catchup is on")
    for task in dag.tasks:
        if not task.owner or task.owner == "airflow":
            problems.append(f"task {task.task_id} has no owner of its own (owner {task.owner!r})")
    default_retries = (dag.default_args or {}).get("retries", 0)
    if default_retries < 2:
        problems.append(f"default_args retries is {default_retries}, want >= 2")
    assert not problems, f"DAG {label}: " + "; ".join(problems)


TASK_PARAMS = {
    "memory_compression": params.DAILY_COMPRESS,
    "memory_compression_catchup": params.COMPRESS,
    "memory_erasure": params.ERASURE,
    "memory_rollback": params.ROLLBACK,
    "memory_refold": params.REFOLD,
    "memory_qualify": params.QUALIFY,
}
"""The options each DAG's task bodies check the run's param names against (``task_outcome.params_checked``)."""


@pytest.mark.parametrize(("label", "dag"), ALL_DAGS, ids=[label for label, _ in ALL_DAGS])
def test_each_dag_declares_the_params_its_task_bodies_accept(label: str, dag: DAG) -> None:
    """A run with only declared params passes the task bodies' check of the names, and a new DAG is listed (third review)."""
    assert dag.dag_id in TASK_PARAMS, f"DAG {label}: no options its task bodies check the params against"
    assert list(dag.params) == [o.name for o in TASK_PARAMS[dag.dag_id]]
    required = {
        o.name: ["u-1"] if o.schema["type"] == "array" else "u-1"
        for o in TASK_PARAMS[dag.dag_id]
        if o.default is params.REQUIRED
    }
    params_checked(_validated(dag, required), TASK_PARAMS[dag.dag_id])


@pytest.fixture(scope="module")
def dag(dagbag: DagBag) -> DAG:
    """Return the memory_compression DAG."""
    assert DAG_ID in dagbag.dags, f"{DAG_ID} not found in {DAGS_DIR}; import errors: {dagbag.import_errors}"
    return dagbag.dags[DAG_ID]


def test_memory_compression_is_scan_batch_steps_map_report(dag: DAG) -> None:
    batch_steps = ("prepare_batch", "submit_batch", "wait_for_batches")
    assert set(dag.task_ids) == {"scan", *batch_steps, "compress_user", "report"}, (
        f"{DAG_ID}: unexpected tasks {dag.task_ids}"
    )
    scan, compress, report = (dag.get_task(t) for t in ("scan", "compress_user", "report"))
    assert compress.upstream_task_ids == {"scan", "wait_for_batches"}, (
        f"{DAG_ID}: compress_user must be fed by scan, after the batch steps"
    )
    prepare, submit, wait = (dag.get_task(t) for t in batch_steps)
    assert (prepare.upstream_task_ids, submit.upstream_task_ids, wait.upstream_task_ids) == (
        {"scan"},
        {"prepare_batch"},
        {"submit_batch"},
    ), f"{DAG_ID}: the batch steps run scan -> prepare -> submit -> wait"
    assert report.upstream_task_ids == {"compress_user"}, f"{DAG_ID}: report must follow compress_user"
    assert isinstance(compress, MappedOperator), f"{DAG_ID}: compress_user must be expanded per user (.expand)"
    assert compress.pool == "llm_api", f"{DAG_ID}: compress_user pool is {compress.pool!r}"
    assert compress.map_index_template, f"{DAG_ID}: compress_user has no map_index_template"
    assert "users_label" in compress.map_index_template, f"{DAG_ID}: map index should render the batch label"
    assert report.trigger_rule == "all_done", f"{DAG_ID}: report trigger_rule is {report.trigger_rule}"
    for task in (scan, compress, report):
        assert task.execution_timeout is not None, f"{DAG_ID}.{task.task_id} has no execution_timeout"
    assert compress.retries >= 2, f"{DAG_ID}: compress_user retries {compress.retries}"
    assert compress.retry_exponential_backoff, f"{DAG_ID}: compress_user should back off exponentially"
    assert isinstance(compress.retry_delay, timedelta)


def _validated(dag: DAG, conf: dict[str, Any]) -> dict[str, Any]:
    """Validate a run conf the way the API server does for a trigger (DAG params merged with conf)."""
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    return serialized.params.deep_merge(conf).validate()


def _validated_sdk(dag: DAG, conf: dict[str, Any]) -> dict[str, Any]:
    """Validate a run conf with the Task SDK's ParamsDict (what the task sees)."""
    params = ParamsDict(dict(dag.params.items()))
    params.update(conf)
    return params.validate()


def test_the_form_names_the_default_users_per_task_the_setting_has(dag: DAG) -> None:
    """Empty means the setting: the form says which (50, docs/benchmarks.md §12), so docs and code cannot drift."""
    assert Settings().users_per_task == 200
    description = dag.params.get_param("users_per_task").description or ""
    assert f"the configured setting ({Settings().users_per_task})" in description, description


def test_default_params_validate(dag: DAG) -> None:
    defaults = dag.params.validate()
    assert defaults == COMPRESSION_DEFAULTS
    assert _validated(dag, {}) == defaults


@pytest.mark.parametrize(
    "conf",
    [
        {"dry_run": True},
        {"limit": 1},
        {"limit": "max"},
        {"limit": 100_000, "users_per_task": 100},
        {"user_ids": ["user-00001", "user-00002"]},
        {"threshold": 80, "keep_last_n": 10},
        COMPRESSION_DEFAULTS,
    ],
    ids=["dry_run", "limit-1", "limit-max", "limit-100k-batched", "user_ids", "threshold-keep", "all-defaults"],
)
def test_good_params_pass(dag: DAG, conf: dict[str, Any]) -> None:
    from airflow.configuration import conf as airflow_conf

    if conf.get("limit") == "max":
        conf = {"limit": airflow_conf.getint("core", "max_map_length")}
    for validate in (_validated, _validated_sdk):
        resolved = validate(dag, conf)
        for name, value in conf.items():
            assert resolved[name] == value, f"{DAG_ID}: param {name}={value!r} resolved to {resolved[name]!r}"


@pytest.mark.parametrize(
    ("conf", "param", "reason"),
    [
        pytest.param({"limit": 0}, "limit", "0 is less than the minimum of 1", id="limit-0"),
        pytest.param({"limit": "over-max"}, "limit", "is greater than the maximum of", id="limit-over-max"),
        pytest.param({"limit": "ten"}, "limit", "'ten' is not of type", id="limit-string"),
        pytest.param({"user_ids": "abc"}, "user_ids", "'abc' is not of type 'array'", id="user_ids-string"),
        pytest.param({"user_ids": ["u1", "u1"]}, "user_ids", "non-unique elements", id="user_ids-duplicates"),
        pytest.param({"user_ids": [""]}, "user_ids", "should be non-empty", id="user_ids-empty-id"),
        pytest.param({"user_ids": [7]}, "user_ids", "7 is not of type 'string'", id="user_ids-number"),
        pytest.param({"threshold": -1}, "threshold", "-1 is less than the minimum of 1", id="threshold-negative"),
        pytest.param({"threshold": 0}, "threshold", "0 is less than the minimum of 1", id="threshold-zero"),
        pytest.param({"keep_last_n": 0}, "keep_last_n", "0 is less than the minimum of 1", id="keep_last_n-zero"),
        pytest.param({"dry_run": "yes"}, "dry_run", "'yes' is not of type 'boolean'", id="dry_run-string"),
        pytest.param({"users_per_task": 0}, "users_per_task", "0 is less than the minimum of 1", id="users_per_task-0"),
        pytest.param(
            {"users_per_task": MAX_USERS_PER_TASK + 1},
            "users_per_task",
            f"{MAX_USERS_PER_TASK + 1} is greater than the maximum of {MAX_USERS_PER_TASK}",
            id="users_per_task-over-max",
        ),
    ],
)
def test_bad_params_are_refused_with_a_readable_message(
    dag: DAG, conf: dict[str, Any], param: str, reason: str
) -> None:
    from airflow.configuration import conf as airflow_conf

    if conf.get("limit") == "over-max":  # the run maximum: max_map_length batches of the most users a task takes
        conf = {"limit": airflow_conf.getint("core", "max_map_length") * MAX_USERS_PER_TASK + 1}
    for validate in (_validated, _validated_sdk):
        with pytest.raises(ParamValidationError) as caught:
            validate(dag, conf)
        headline = str(caught.value).splitlines()[0]
        assert headline.startswith(f"Invalid input for param {param}: "), (
            f"{DAG_ID} ({validate.__name__}): refusal of {conf} does not name the param: {headline}"
        )
        assert reason in headline, f"{DAG_ID} ({validate.__name__}): refusal of {conf} does not say why: {headline}"


PARSE_PROBE = textwrap.dedent(
    """
    import json, sys, time
    events = []
    def hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "sqlite3.connect"):
            events.append(f"{event} {args!r}"[:200])
    from airflow.dag_processing.dagbag import DagBag  # import Airflow before auditing: only parsing counts
    sys.addaudithook(hook)
    started = time.monotonic()
    bag = DagBag(dag_folder=sys.argv[1])
    seconds = time.monotonic() - started
    print(json.dumps({
        "seconds": seconds,
        "dags": sorted(bag.dags),
        "import_errors": bag.import_errors,
        "events": events,
    }))
    """
)


def test_parsing_touches_no_network_and_no_database(tmp_path: Path) -> None:
    """Parse dags/ in a fresh interpreter with no connections and nowhere to connect to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "OPENAI_", "STATSD_"))}
    env.update(
        {
            # A metadata DB that cannot be opened: any query at parse time fails loudly.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'missing' / 'airflow.db'}",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "BUTLER_MEMORY_MONGO_CONN_ID": "unreachable_mongo",
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(DAGS_DIR)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"parsing {DAGS_DIR} crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["import_errors"], f"import errors without services: {result['import_errors']}"
    assert DAG_ID in result["dags"], f"{DAG_ID} not parsed from {DAGS_DIR}: {result['dags']}"
    assert not result["events"], f"parsing {DAGS_DIR} opened connections: {result['events']}"
    assert result["seconds"] < PARSE_BUDGET_SECONDS, f"parsing {DAGS_DIR} took {result['seconds']:.1f}s"


ADMIN_DAGS = ("memory_erasure", "memory_rollback", "memory_refold")
"""The DAGs that erase or rewrite a user's memory: only the admin role may trigger them."""
ADMIN_GRANT = {"DAGs": {"can_read", "can_edit"}, "DAG Runs": {"can_read", "can_create"}}


@pytest.mark.parametrize("dag_id", ADMIN_DAGS)
def test_dags_that_rewrite_memory_grant_access_to_the_admin_role_only(dagbag: DagBag, dag_id: str) -> None:
    access = dagbag.dags[dag_id].access_control
    assert access == {"MemoryAdmin": ADMIN_GRANT}, f"{dag_id}: access_control is {access!r}"


def test_the_admin_role_is_configurable_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUTLER_MEMORY_ADMIN_ROLE", "ButlerPrivacyOfficer")
    renamed = DagBag(dag_folder=str(DAGS_DIR))
    monkeypatch.setenv("BUTLER_MEMORY_ADMIN_ROLE", "")
    off = DagBag(dag_folder=str(DAGS_DIR))
    for dag_id in ADMIN_DAGS:
        assert renamed.dags[dag_id].access_control == {"ButlerPrivacyOfficer": ADMIN_GRANT}, dag_id
        assert off.dags[dag_id].access_control is None, dag_id
    assert renamed.dags[DAG_ID].access_control is None, "memory_compression is for every operator"


def test_the_refold_form_takes_at_most_max_map_length_users(dagbag: DagBag) -> None:
    """refold_user is mapped once per user: the form refuses more user_ids than Airflow maps (third review)."""
    from airflow.configuration import conf

    refold = dagbag.dags["memory_refold"]
    most = conf.getint("core", "max_map_length")
    assert len(_validated(refold, {"user_ids": [f"u-{i}" for i in range(most)]})["user_ids"]) == most
    with pytest.raises(ParamValidationError, match="user_ids"):
        _validated(refold, {"user_ids": [f"u-{i}" for i in range(most + 1)]})
