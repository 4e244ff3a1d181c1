"""What every butler-memory DAG shares: default arguments, and who may run the ones that rewrite memory.

Imported by the DAG files at parse time, so it imports nothing but the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "butler-memory",
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}

ADMIN_ROLE_ENV = "BUTLER_MEMORY_ADMIN_ROLE"
DEFAULT_ADMIN_ROLE = "MemoryAdmin"
ADMIN_PERMISSIONS: dict[str, set[str]] = {
    "DAGs": {"can_read", "can_edit"},
    "DAG Runs": {"can_read", "can_create"},
}
"""What the role gets on each of these DAGs: see it, pause it, trigger it and read its runs."""


def admin_access_control() -> dict[str, dict[str, Collection[str]]] | None:
    """Return the ``access_control`` of the DAGs that erase or rewrite memory (erasure, rollback, re-fold).

    Read at each parse, so the DAG processor picks up a changed ``BUTLER_MEMORY_ADMIN_ROLE``; an
    empty value means no ``access_control`` (the auth manager's global DAG permissions alone decide).
    Only the FAB auth manager applies it, and it only grants: see docs/operations/runbook.md.
    """
    role = os.environ.get(ADMIN_ROLE_ENV, DEFAULT_ADMIN_ROLE).strip()
    if not role:
        return None
    return {role: {resource: set(actions) for resource, actions in ADMIN_PERMISSIONS.items()}}


START_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def manual_dag(
    dag_id: str, *, tags: list[str], doc_md: str | None, params: dict[str, Any], admin: bool
) -> dict[str, Any]:
    """Return the ``@dag`` arguments every manually triggered DAG shares but its ``schedule=None``, which the DAG
    file states (``admin``: only the admin role is granted it)."""
    return {
        "dag_id": dag_id,
        "start_date": START_DATE,
        "catchup": False,
        "max_active_runs": 1,
        "default_args": DEFAULT_ARGS,
        "access_control": admin_access_control() if admin else None,
        "tags": tags,
        "doc_md": doc_md,
        "params": params,
    }
