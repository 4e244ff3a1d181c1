"""Body of the memory_erasure DAG's task: params in, one erasure, a content-free result out.

XCom carries the audit record's id, the keyed reference, counts and version numbers; never content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from butler_memory import erasure, forget
from butler_memory.connections import build_engine, erasure_secret
from butler_memory.dag_tasks import _fail, resolve_settings
from butler_memory.errors import CompressionError
from butler_memory.settings import SettingsError

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
                    events=bool(params.get("include_events")),
                    dry_run=dry_run,
                    requested_by=f"dag:{run_id}",
                )
    except CompressionError as exc:
        if exc.retryable:
            raise RuntimeError(f"{type(exc).__name__}: {exc} (will retry)") from None
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    log.info("erasure\n%s", erasure.to_text(result))
    return result.to_dict()
