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
