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
from butler_memory.core.settings import SettingsError
from butler_memory.operations import audit, erasure, forget
from butler_memory.orchestration import airflow_scrub
from butler_memory.orchestration.connections import build_engine, erasure_secret
from butler_memory.orchestration.dag_tasks import _fail, resolve_settings

log = logging.getLogger(__name__)


def run(params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """Forget the user (or their events) the params name; bad input fails at once, a busy lock retries."""
    user_id = params["user_id"]
    event_ids = list(params.get("event_ids") or [])
    since, until = params.get("since") or None, params.get("until") or None
    by_events = bool(event_ids) or since is not None or until is not None
    dry_run = bool(params.get("dry_run"))
    if by_events and params.get("include_events"):
        raise _fail("include_events is for forgetting the whole user; event_ids/since/until forget events")
    try:
        settings = resolve_settings({})
        secret = erasure_secret(settings, required=not dry_run)
    except SettingsError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    try:
        with build_engine(settings) as engine:
            if by_events:
                result = forget.forget_events(
                    user_id,
                    engine=engine,
                    secret=secret,
                    event_ids=event_ids,
                    since=since,
                    until=until,
                    dry_run=dry_run,
                    requested_by=f"dag:{run_id}",
                    run_id=run_id,
                )
            else:
                result = erasure.forget_user(
                    user_id,
                    settings=settings,
                    store=engine.store,
                    locks=engine.locks,
                    secret=secret,
                    metrics=engine.metrics,
                    events=bool(params.get("include_events")),
                    dry_run=dry_run,
                    requested_by=f"dag:{run_id}",
                )
    except CompressionError as exc:
        patterns = [erasure.id_pattern(value) for value in (user_id, *event_ids)]
        message = airflow_scrub.redact(f"{type(exc).__name__}: {exc}", patterns)
        if exc.retryable:
            raise RuntimeError(f"{message} (will retry)") from None
        raise _fail(message) from None
    log.info("erasure\n%s", audit.to_text(result))
    return {name: value for name, value in result.to_dict().items() if name != "subject"}
