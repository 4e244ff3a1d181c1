"""One table of each operation's params: the DAG files build their trigger form from it, the CLI its options.

A param is declared once (name, JSON schema, form text, CLI help), so a new option is one line here
and the DAG, the UI trigger form and ``python -m butler_memory`` agree on its name, type and bounds.
The form validates the whole schema (Airflow checks it at trigger time); the CLI checks the same
types and a whole number's bounds as it parses (argparse: exit 2 naming the option), and both pass
the values, by the param's name, to the same engine checks (settings, thresholds, time ranges).

Imported by the DAG files at parse time: the standard library only (``Param`` is imported when a DAG
file asks for its form).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from butler_memory.core.ids import MAX_USER_ID_CHARS
from butler_memory.core.settings import MAX_INTEGER, MAX_USERS_PER_TASK

if TYPE_CHECKING:
    from airflow.sdk import Param

REQUIRED: Any = object()
"""The default of a param the form asks for (no default; the CLI option is required)."""
MAX_RUN_ID_CHARS = 250
"""Airflow's ``dag_run.run_id`` column width."""
ISO_TIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"
"""What the form accepts as a time (ISO 8601); the engine parses and checks it again."""


@dataclass(frozen=True)
class Option:
    """One param of an operation: its schema and form text, and its CLI option (``help`` None: the DAG's only)."""

    name: str
    default: Any
    schema: Mapping[str, Any]
    title: str
    description: str
    help: str | None = None
    flag: str | None = None
    metavar: str | None = None

    def param(self, **changes: Any) -> Param:
        """Return the Airflow ``Param`` of the trigger form (``changes``: schema keys or the description)."""
        from airflow.sdk import Param

        schema = {"title": self.title, "description": self.description, **self.schema, **changes}
        return Param(**schema) if self.default is REQUIRED else Param(self.default, **schema)

    def add_to(self, parser: argparse.ArgumentParser, default: Any = None) -> None:
        """Add the CLI option; ``default`` (shown in the help) replaces the param's empty value."""
        if self.help is None:
            return
        flag = self.flag or "--" + self.name.replace("_", "-")
        if self.schema["type"] == "boolean":
            parser.add_argument(flag, action="store_true", dest=self.name, help=self.help)
            return
        many = self.schema["type"] == "array"
        parser.add_argument(
            flag,
            action="append" if many else "store",
            dest=self.name,
            type=_checker(self.schema["items"] if many else self.schema),
            required=self.default is REQUIRED,
            default=default,
            metavar=self.metavar,
            help=self.help if default is None else f"{self.help} (default {default})",
        )


def _checker(schema: Mapping[str, Any]) -> Any:
    """Return the argparse ``type`` for one value of ``schema``: its type, and a whole number's or text's bounds."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]

    def check(text: str) -> Any:
        if "integer" in kinds:
            try:
                value: Any = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
            if "minimum" in schema and value < schema["minimum"]:
                raise argparse.ArgumentTypeError(f"must be at least {schema['minimum']}, got {value}")
            if "maximum" in schema and value > schema["maximum"]:
                raise argparse.ArgumentTypeError(f"must be at most {schema['maximum']}, got {value}")
            return value
        if "number" in kinds:  # a share or a duration: its range is the engine's check, on both paths
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", len(text)):
            raise argparse.ArgumentTypeError(
                f"must be {schema.get('minLength', 0)} to {schema['maxLength']} characters, got {len(text)}"
            )
        return text

    return check


def switch(name: str, default: bool, title: str, description: str, help: str | None = None) -> Option:
    """A yes/no param: a checkbox in the form, a flag that switches it on in the CLI."""
    return Option(name, default, {"type": "boolean"}, title, description, help)


def whole(
    name: str,
    title: str,
    description: str,
    help: str | None = None,
    *,
    minimum: int = 1,
    maximum: int = MAX_INTEGER,
    metavar: str | None = None,
    **bounds: int,
) -> Option:
    """A whole number the form may leave empty (the setting or the default then decides). At most
    ``MAX_INTEGER`` unless told less: a larger one cannot be stored in MongoDB, and would fail deep
    in the run (an OverflowError in a query) instead of as a usage error naming the param."""
    schema = {"type": ["null", "integer"], "minimum": minimum, "maximum": maximum, **bounds}
    return Option(name, None, schema, title, description, help, metavar=metavar)


def number(name: str, title: str, description: str, help: str, **bounds: float) -> Option:
    """A number the form may leave empty (the default then decides)."""
    return Option(name, None, {"type": ["null", "number"], **bounds}, title, description, help, metavar="N")


def choice(name: str, choices: Sequence[str], title: str, description: str, help: str | None = None) -> Option:
    """One of a few words the form may leave empty (the setting then decides)."""
    schema = {"type": ["null", "string"], "enum": [None, *choices]}
    return Option(name, None, schema, title, description, help, metavar="{" + ",".join(choices) + "}")


def ids(
    name: str,
    title: str,
    description: str,
    help: str,
    *,
    flag: str = "--user",
    metavar: str = "ID",
    required: bool = False,
) -> Option:
    """A list of distinct ids (one per line in the form, a repeatable option in the CLI)."""
    schema: dict[str, Any] = {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_USER_ID_CHARS},
        "uniqueItems": True,
    }
    if required:
        schema["minItems"] = 1
    return Option(name, REQUIRED if required else [], schema, title, description, help, flag, metavar)


def text(
    name: str, title: str, description: str, help: str, *, flag: str | None = None, metavar: str, **schema: Any
) -> Option:
    """A text param: required unless its schema allows null (then empty by default)."""
    optional = schema.get("type") == ["null", "string"]
    full = {"type": "string", **({} if optional else {"minLength": 1}), **schema}
    return Option(name, None if optional else REQUIRED, full, title, description, help, flag, metavar)


def form(options: Iterable[Option], **changes: Mapping[str, Any]) -> dict[str, Param]:
    """Return the DAG's ``params``: one ``Param`` per option (``changes``: a param's schema keys set by the DAG)."""
    return {o.name: o.param(**changes.get(o.name, {})) for o in options}


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option], **defaults: Any) -> None:
    """Add the CLI options of an operation's params (``defaults``: values shown and used when not given)."""
    for option in options:
        option.add_to(parser, defaults.get(option.name))


def values(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """Return the parsed CLI options as the DAG's params (by the param's name; an empty list for no ids)."""
    got = {o.name: getattr(args, o.name) for o in options if o.help is not None}
    return {name: [] if value is None and _list(options, name) else value for name, value in got.items()}


def undeclared(params: Mapping[str, Any], options: Iterable[Option]) -> list[str]:
    """Return the keys of a run's params that none of its DAG's ``options`` declares, sorted.

    Airflow merges every key of a trigger's conf into the params unchecked (``deep_merge`` keeps an
    unknown key as a new param; no schema covers the conf as a whole), so a misspelt key
    (``event_id`` for ``event_ids``) reaches the task beside the param it meant, which stays at its
    default: for an erasure, the whole user.
    """
    names = {o.name for o in options}
    return sorted(str(key) for key in params if key not in names)


def _list(options: Iterable[Option], name: str) -> bool:
    return any(o.name == name and o.schema["type"] == "array" for o in options)


USERS = "Only these users (one per line). Empty: every user over the threshold."
COMPRESS = (
    switch(
        "dry_run", False, "Dry run", "Scan and report only; write nothing.", "scan and print the plan; write nothing"
    ),
    whole(
        "limit",
        "Limit",
        "Most users in this run, largest backlog first. Empty: the scan_limit setting.",
        "most users to compress (largest backlog first)",
    ),
    whole(
        "users_per_task",
        "Users per task",
        f"Users one compress_user instance compresses, one after another (1 to {MAX_USERS_PER_TASK}; "
        "1 = an instance per user). Empty: the configured setting (200).",
        maximum=MAX_USERS_PER_TASK,
    ),
    ids("user_ids", "User ids", USERS, "only this user (repeatable)"),
    whole(
        "threshold",
        "Threshold",
        "Compress users with more than this many events. Empty: the configured setting (50).",
        "compress users with more events than this",
    ),
    whole(
        "keep_last_n",
        "Keep last N",
        "Newest events kept raw. Empty: the configured setting (20). Must not exceed threshold.",
        "newest events kept raw",
    ),
)
"""memory_compression_catchup, and ``compress`` (users_per_task is the DAG's only)."""
DAILY_COMPRESS = (
    *COMPRESS,
    choice(
        "llm_mode",
        ("online", "batch"),
        "LLM mode",
        "online: a chat call per user in compress_user. batch: one Batch API job for the run, "
        "waited for in the triggerer (about half the price, done within 24 h). Empty: the llm_mode setting.",
    ),
    switch(
        "full_scan",
        False,
        "Full scan",
        "Count every user's events (the periodic reconciliation, due every daily_full_scan_every_days) "
        "instead of only the users who wrote since the last daily scan. Use after restoring a backup.",
    ),
)
"""memory_compression (the daily DAG)."""

ERASURE = (
    text(
        "user_id",
        "User id",
        "The user to forget.",
        "the user id",
        flag="--user",
        metavar="ID",
        maxLength=MAX_USER_ID_CHARS,
    ),
    ids(
        "event_ids",
        "Event ids",
        "Only these events (the Butler's event_id, one per line). Empty (and no range): the whole user.",
        "a Butler event_id to forget (repeatable)",
        flag="--event",
        metavar="EVENT_ID",
    ),
    text(
        "since",
        "Since",
        "Forget the user's events from this time (ISO 8601, e.g. 2026-03-01T00:00:00Z).",
        "forget the user's events from this time (ISO 8601)",
        metavar="ISO",
        type=["null", "string"],
        pattern=ISO_TIME,
    ),
    text(
        "until",
        "Until",
        "... up to this time, excluded (ISO 8601). Both ends or neither.",
        "... up to this time, excluded (ISO 8601)",
        metavar="ISO",
        type=["null", "string"],
        pattern=ISO_TIME,
    ),
    switch(
        "include_events",
        False,
        "Include user_memory events",
        "Whole user: also delete their events in user_memory (leave off when the Butler deletes them).",
        "whole user: also delete their events in user_memory",
    ),
    switch(
        "dry_run",
        True,
        "Dry run",
        "List what would be removed; change nothing.",
        "list what would be removed; change nothing",
    ),
)
"""memory_erasure, and ``forget``."""

ROLLBACK = (
    text(
        "run_id",
        "Run id",
        "The run to undo: DAG_ID/RUN_ID (e.g. memory_compression/scheduled__2026-03-01T00:00:00+00:00), "
        "or the bare run id when only one DAG ran it.",
        "the run to undo",
        flag="--run",
        metavar="RUN_ID",
        maxLength=MAX_RUN_ID_CHARS,
    ),
    ids(
        "user_ids",
        "User ids",
        "Only these users (one per line). Empty: every user the run changed.",
        "only this user (repeatable)",
    ),
    switch(
        "dry_run", True, "Dry run", "List what would change; write nothing.", "print what would change; write nothing"
    ),
    switch(
        "cascade",
        False,
        "Cascade",
        "Also undo later runs that built on this one.",
        "also undo later runs that built on it",
    ),
    switch(
        "allow_missing_events",
        False,
        "Allow missing events",
        "Roll back even where some of the run's events are no longer archived (they stay lost).",
        "roll back even where some of the run's events are no longer archived (they stay lost)",
    ),
    switch(
        "partial",
        False,
        "Partial",
        "Roll back the users it can be applied to even when others are refused. Off: all users or none.",
        "apply to the users it can be applied to even when others are refused (default: all or none)",
    ),
)
"""memory_rollback, and ``rollback``."""

REFOLD = (
    ids("user_ids", "User ids", "The users to re-fold (one per line).", "the user (repeatable)", required=True),
    switch(
        "dry_run",
        True,
        "Dry run",
        "Say what would happen; write nothing.",
        "print where it would start and how many events; write nothing",
    ),
)
"""memory_refold, and ``refold``."""

QUALIFY = (
    number(
        "min_fact_retention",
        "Least fact retention",
        "Share of the planted facts the summaries must keep. Empty: the default (docs/qualify.md).",
        "least share (0-1) of the planted facts kept",
        minimum=0,
        maximum=1,
    ),
    number(
        "min_language_kept",
        "Least language kept",
        "Share of the users whose summary must be in their language. Empty: the default.",
        "least share (0-1) of the users summarised in their language",
        minimum=0,
        maximum=1,
    ),
    whole(
        "max_failed_users",
        "Most failed users",
        "Users a compression would fail (guard rejection, cut-off, truncated or invalid reply). Empty: the default.",
        "most users a compression would fail",
        minimum=0,
        metavar="N",
    ),
    whole(
        "max_false_alarms",
        "Most false alarms",
        "Guard alarms on replies that kept every fact and the language. Empty: the default.",
        "most guard alarms on good replies",
        minimum=0,
        metavar="N",
    ),
    number(
        "max_latency_seconds",
        "Most latency (p95, s)",
        "95th percentile of one LLM call's latency, in seconds. Empty: the default.",
        "most p95 latency of one LLM call, in seconds",
        exclusiveMinimum=0,
    ),
)
"""memory_qualify, and ``qualify``."""
