"""Run keys: every run is named ``dag_id/run_id`` where the engine records it (summary history,
archive records, rebuild intents), so two DAGs' runs with the same Airflow run id never merge.

Airflow names runs per DAG (``scheduled__<time>``, ``manual__<time>``): the daily and catch-up DAGs,
re-fold, rollback and erasure can all produce the same run id when their schedules or triggers
share a moment. Documents written before run keys hold the bare run id and stay readable: a
bare name resolves to them, or to the one DAG whose run it is. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from butler_memory.core.errors import RollbackRefusedError

SEPARATOR = "/"
"""Airflow refuses ``/`` in run ids, so the first one always ends the DAG id."""


def run_key(dag_id: str, run_id: str) -> str:
    """Return the key of one DAG's run: ``memory_compression/scheduled__2026-03-01T00:00:00+00:00``."""
    return f"{dag_id}{SEPARATOR}{run_id}"


def split_run_key(key: str) -> tuple[str | None, str]:
    """Return ``(dag_id, run_id)`` of a run key; ``(None, key)`` for a bare (older, or CLI) run name."""
    dag_id, sep, run_id = key.partition(SEPARATOR)
    return (dag_id, run_id) if sep and dag_id and run_id else (None, key)


def matching(name: str) -> str:
    """Return the regular expression of the run names ``name`` may mean: its run id, bare (older
    documents) or as any DAG's run."""
    _, run_id = split_run_key(name)
    return f"^(?:[^{SEPARATOR}]+{re.escape(SEPARATOR)})?{re.escape(run_id)}$"


def resolve_run(name: str, recorded: Callable[[str], Sequence[str]]) -> str:
    """Return the run key (or old bare run id) the history records for ``name``.

    ``recorded(pattern)`` returns the recorded run names matching ``matching(name)``. A name
    recorded as given wins; a bare run id of exactly one DAG resolves to that DAG's key. Raises
    RollbackRefusedError, naming what was found, for an unknown run, a bare id several DAGs ran,
    or a key of a DAG that has no such run (another DAG's run of the same id).
    """
    found = sorted(set(recorded(matching(name))))
    if name in found:
        return name
    dag_id, run_id = split_run_key(name)
    if run_id in found:  # written before run keys: the bare run id, whichever DAG ran it
        return run_id
    others = [key for key in found if split_run_key(key)[1] == run_id]
    if dag_id is None and len(others) == 1:
        return others[0]
    if dag_id is None and others:
        dags = ", ".join(str(split_run_key(key)[0]) for key in others)
        raise RollbackRefusedError(
            f"run {name!r} names runs of several DAGs ({dags}): pass DAG_ID/RUN_ID, e.g. {others[0]!r}"
        )
    if others:
        dags = ", ".join(str(split_run_key(key)[0]) or "?" for key in others)
        raise RollbackRefusedError(
            f"run {name!r}: DAG {dag_id!r} has no run {run_id!r} in the summary history; that run id is one of "
            f"{dags} ({', '.join(repr(key) for key in others)})"
        )
    raise RollbackRefusedError(f"run {name!r} is not in the summary history (unknown, or no version is kept)")
