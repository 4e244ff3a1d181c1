"""Body of the memory_erasure DAG's task: params in, one erasure, a content-free result out.

XCom carries the audit record's id, counts and version numbers: never content, never the keyed
reference (beside the run, it would tie the audit record to the run's conf), and no error text or
log line names the user or event ids (docs/erasure.md: what an erasure leaves in Airflow).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from butler_memory.core.errors import CompressionError
from butler_memory.operations import audit, erasure
from butler_memory.operations.engine import Engine
from butler_memory.orchestration import airflow_scrub
from butler_memory.orchestration.connections import build_engine, erasure_secret, resolve_settings
from butler_memory.orchestration.params import ERASURE
from butler_memory.orchestration.task_outcome import params_checked, raised, settings_checked

log = logging.getLogger(__name__)


def forget(
    params: Mapping[str, Any], *, engine: Engine, secret: bytes | None, requested_by: str, run_id: str | None = None
) -> audit.ErasureResult:
    """Forget the user, or their events, the params name (the DAG's task and ``python -m butler_memory forget``).

    ``Engine.forget`` chooses the operation; it raises ``ForgetInputError`` for params that contradict each other.
    """
    return engine.forget(
        params["user_id"],
        secret=secret,
        event_ids=list(params.get("event_ids") or []),
        since=params.get("since") or None,
        until=params.get("until") or None,
        include_events=bool(params.get("include_events")),
        dry_run=bool(params.get("dry_run")),
        requested_by=requested_by,
        run_id=run_id,
    )


def run(params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """Forget the user (or their events) the params name; bad input fails at once, a busy lock retries.

    A misspelt param fails first: ignored, ``event_id`` for ``event_ids`` would erase the whole user.
    """
    params_checked(params, ERASURE)
    with settings_checked():
        settings = resolve_settings({})
        secret = erasure_secret(settings, required=not params.get("dry_run"))
    try:
        with build_engine(settings) as engine:
            result = forget(params, engine=engine, secret=secret, requested_by=f"dag:{run_id}", run_id=run_id)
    except CompressionError as exc:
        patterns = [erasure.id_pattern(value) for value in (params["user_id"], *(params.get("event_ids") or []))]
        raise raised(exc, airflow_scrub.redact(f"{type(exc).__name__}: {exc}", patterns)) from None
    log.info("erasure\n%s", audit.to_text(result))
    return {name: value for name, value in result.to_dict().items() if name != "subject"}
