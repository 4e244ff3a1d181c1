"""The params table: each CLI option is its DAG's param by name, and both refuse the same whole numbers."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from butler_memory.cli import build_parser
from butler_memory.orchestration import params

COMMANDS = {
    "compress": params.COMPRESS,
    "forget": params.ERASURE,
    "rollback": params.ROLLBACK,
    "refold": params.REFOLD,
    "qualify": params.QUALIFY,
}
CLI_ONLY = {"command", "json", "verbose", "run_id"}
"""Options of the CLI that are no param (compress's --run-id names the CLI's own run)."""


def _command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_cli_option_is_a_param_of_the_dag(command: str) -> None:
    names = {o.name for o in COMMANDS[command]}
    dests = {a.dest for a in _command_parser(command)._actions if a.dest != "help"}
    assert dests - CLI_ONLY <= names, f"{command}: options that are no param: {dests - names}"
    assert {o.name for o in COMMANDS[command] if o.help} <= dests


def _required(command: str) -> list[str]:
    """Return the arguments a command needs before any other."""
    return {"forget": ["--user", "u"], "rollback": ["--run", "r"], "refold": ["--user", "u"]}.get(command, [])


WHOLE = [
    (command, option)
    for command, options in COMMANDS.items()
    for option in options
    if option.help and "integer" in option.schema["type"]
]


@pytest.mark.parametrize(("command", "option"), WHOLE, ids=[f"{c}-{o.name}" for c, o in WHOLE])
def test_the_cli_and_the_form_refuse_the_same_whole_numbers(command: str, option: params.Option) -> None:
    flag = "--" + option.name.replace("_", "-")
    low = option.schema["minimum"]
    form = params.form(COMMANDS[command])

    def form_accepts(value: Any) -> bool:
        values = ParamsDict(dict(form.items()))
        required = [o for o in COMMANDS[command] if o.default is params.REQUIRED]
        values.update({o.name: ["u"] if o.schema["type"] == "array" else "x" for o in required})
        try:
            values.update({option.name: value})  # a ParamsDict validates what is set, and again as a whole
            values.validate()
        except ParamValidationError:
            return False
        return True

    assert form_accepts(low) and form_accepts(None)
    assert not form_accepts(low - 1)
    parsed = build_parser().parse_args([command, *_required(command), flag, str(low)])
    assert getattr(parsed, option.name) == low
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([command, *_required(command), flag, str(low - 1)])
    assert refused.value.code == 2


@pytest.mark.parametrize(("command", "option"), WHOLE, ids=[f"{c}-{o.name}" for c, o in WHOLE])
def test_the_cli_and_the_form_refuse_a_whole_number_beyond_what_mongodb_stores(
    command: str, option: params.Option
) -> None:
    """Every whole-number param has a maximum within BSON's int64, on the form and the CLI (second review)."""
    flag = "--" + option.name.replace("_", "-")
    high = option.schema["maximum"]
    assert high <= 2**63 - 1
    values = ParamsDict(dict(params.form(COMMANDS[command]).items()))
    with pytest.raises(ParamValidationError):
        values.update({option.name: high + 1})
    assert getattr(build_parser().parse_args([command, *_required(command), flag, str(high)]), option.name) == high
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([command, *_required(command), flag, str(high + 1)])
    assert refused.value.code == 2


def test_values_are_the_params_by_name() -> None:
    args = build_parser().parse_args(["compress", "--limit", "5", "--user", "a", "--user", "b"])
    assert params.values(args, params.COMPRESS) == {
        "dry_run": False,
        "limit": 5,
        "user_ids": ["a", "b"],
        "threshold": None,
        "keep_last_n": None,
    }
    assert params.values(build_parser().parse_args(["compress"]), params.COMPRESS)["user_ids"] == []


def _task_bodies() -> list[tuple[str, Any, tuple[params.Option, ...]]]:
    """Every task body of a DAG with params, as a call taking the params, and the options its DAG declares."""
    from butler_memory.orchestration import dag_tasks, erasure_tasks, qualify_tasks, rollback_tasks

    ti, run = object(), "manual__typo"
    return [
        ("scan daily", lambda p: dag_tasks.scan(p, ti, kind="daily"), params.DAILY_COMPRESS),
        ("scan catchup", lambda p: dag_tasks.scan(p, ti, kind="catchup"), params.COMPRESS),
        ("compress_user", lambda p: dag_tasks.compress(["u"], p, ti, run, kind="catchup"), params.COMPRESS),
        ("prepare_batch", lambda p: dag_tasks.batch_prepare(p, ti, run), params.DAILY_COMPRESS),
        ("submit_batch", lambda p: dag_tasks.batch_submit(p, ti, run), params.DAILY_COMPRESS),
        ("wait_for_batches", lambda p: dag_tasks.batch_wait(p, ti), params.DAILY_COMPRESS),
        ("wait_for_batches event", lambda p: dag_tasks.batch_collect(p, ti, run, {}), params.DAILY_COMPRESS),
        ("forget", lambda p: erasure_tasks.run(p, run), params.ERASURE),
        ("rollback plan", lambda p: rollback_tasks.plan(p, ti, run), params.ROLLBACK),
        ("rollback_user", lambda p: rollback_tasks.rollback("u", p, ti, run), params.ROLLBACK),
        ("rollback report", lambda p: rollback_tasks.report(p, ti), params.ROLLBACK),
        ("refold users", rollback_tasks.refold_users, params.REFOLD),
        ("refold_user", lambda p: rollback_tasks.refold("u", p, ti, run), params.REFOLD),
        ("qualify", qualify_tasks.run, params.QUALIFY),
    ]


BODIES = _task_bodies()


@pytest.mark.parametrize(("name", "body", "options"), BODIES, ids=[name for name, _, _ in BODIES])
def test_every_task_body_fails_for_good_on_a_param_its_dag_does_not_declare(
    name: str, body: Any, options: tuple[params.Option, ...]
) -> None:
    """A misspelt conf key fails the task at once naming the key, not its value, before any service is used (third review)."""
    from airflow.sdk.exceptions import AirflowFailException

    given = {o.name: o.default for o in options if o.default is not params.REQUIRED}
    given["user_id_s"] = ["a-user-id-9f3e"]
    with pytest.raises(AirflowFailException, match=r"unknown param\(s\) 'user_id_s'") as failed:
        body(given)  # a stand-in task instance and no services: the check comes before anything else
    assert "a-user-id-9f3e" not in str(failed.value)


def test_the_check_of_param_names_lets_every_declared_param_through() -> None:
    """Only undeclared keys are named, sorted, each cut to a readable length (third review)."""
    from airflow.sdk.exceptions import AirflowFailException

    from butler_memory.orchestration.task_outcome import params_checked

    declared = {o.name: o.default for o in params.ROLLBACK}
    assert params.undeclared(declared, params.ROLLBACK) == []
    params_checked(declared, params.ROLLBACK)
    assert params.undeclared({**declared, "zz": 1, "user_id": "u"}, params.ROLLBACK) == ["user_id", "zz"]
    with pytest.raises(AirflowFailException) as failed:
        params_checked({"x" * 500: 1}, params.ROLLBACK)
    assert "x" * 51 not in str(failed.value) and "run_id, user_ids, dry_run" in str(failed.value)


@pytest.mark.parametrize("kind", ["daily", "catchup"])
def test_a_given_id_the_job_cannot_take_fails_the_scan_naming_it(kind: str) -> None:
    """``user_ids: ["a b"]`` fails the run at once, before any setting or service is read; it was left
    out with a warning, and the run went green having compressed nobody (third review)."""
    from airflow.sdk.exceptions import AirflowFailException

    from butler_memory.orchestration import dag_tasks

    given = {o.name: o.default for o in dag_tasks.options(kind) if o.default is not params.REQUIRED}
    with pytest.raises(AirflowFailException, match=r"user id 'a b' is not a user id"):
        dag_tasks.scan({**given, "user_ids": ["ok-1", "a b"]}, object(), kind=kind)
