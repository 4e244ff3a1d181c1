"""What every DAG task body shares: the check of its params' names, how it fails (for good, or for a
retry) and how it reads back the rows its mapped instances pushed.

Airflow is imported only inside :func:`fail` and :func:`max_map_length`, when a task body runs (the
DAG files' parse stays cheap).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from butler_memory.core.errors import CompressionError
from butler_memory.core.settings import SettingsError
from butler_memory.orchestration.params import Option, undeclared

FAILURE_XCOM_KEY = "failure"
"""The XCom key under which a per-user task pushes its failure row before failing."""
MAX_KEY_CHARS = 50
"""The most of an unknown param's name a failure quotes (the name is the operator's text, not an id)."""


def fail(message: str) -> Exception:
    """Return the exception that fails a task at once, without its retries (input no retry can mend)."""
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def raised(exc: CompressionError, message: str | None = None) -> Exception:
    """Return what a task raises for an engine error: a retry when it is transient, else a failure at once.

    ``message`` replaces the error's own text (e.g. one with the ids redacted).
    """
    text = message if message is not None else f"{type(exc).__name__}: {exc}"
    return RuntimeError(f"{text} (will retry)") if exc.retryable else fail(text)


def params_checked(params: Mapping[str, Any], options: Sequence[Option]) -> None:
    """Fail the task for good when the run's params hold keys its DAG does not declare, naming them.

    Every task body of a DAG with params calls this first, before it reads a setting or a service:
    Airflow lets any conf key through (``params.undeclared``), and a misspelt one would silently
    widen the run (a whole-user erasure, every user of a rollback or a compression). The failure
    names the keys only, never their values.
    """
    extra = undeclared(params, options)
    if extra:
        quoted = ", ".join(repr(k if len(k) <= MAX_KEY_CHARS else k[:MAX_KEY_CHARS] + "…") for k in extra)
        raise fail(
            f"unknown param(s) {quoted} in the run's conf (misspelt?); this DAG takes "
            f"{', '.join(o.name for o in options)}. Nothing was done: trigger it again with the right names"
        )


def max_map_length() -> int:
    """Return Airflow's ``max_map_length``: the most instances a mapped task may expand to."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length")


@contextmanager
def settings_checked() -> Iterator[None]:
    """Fail the task for good (no retry helps) when a setting inside is invalid, naming it."""
    try:
        yield
    except SettingsError as exc:
        raise fail(f"invalid settings: {exc}") from None


def xcom_rows(value: Any) -> list[Any]:
    """Flatten XCom values (one per mapped instance: a row, a list of rows, or None) into rows."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    rows: list[Any] = []
    for v in value:
        rows.extend(xcom_rows(v))
    return rows
