"""What every DAG task body shares: how it fails (for good, or for a retry) and how it reads back the
rows its mapped instances pushed.

Airflow is imported only inside :func:`fail`, when a task body runs (the DAG files' parse stays cheap).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from butler_memory.core.errors import CompressionError
from butler_memory.core.settings import SettingsError

FAILURE_XCOM_KEY = "failure"
"""The XCom key under which a per-user task pushes its failure row before failing."""


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
