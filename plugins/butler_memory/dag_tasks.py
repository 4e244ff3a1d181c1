"""Bodies of the memory_compression DAG's tasks: Airflow context in, engine calls, small XComs out.

The DAG file only wires these together. XCom carries user ids, counts and statuses, never content.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from butler_memory import metrics as m
from butler_memory.compression import failed_result, utcnow
from butler_memory.connections import build_engine, mongo_store, statsd_metrics
from butler_memory.errors import CompressionError
from butler_memory.report import build_report, emit_run_metrics, to_markdown
from butler_memory.settings import Settings, SettingsError

log = logging.getLogger(__name__)

VARIABLE_NAME = "butler_memory"
"""Airflow Variable holding a JSON object of settings (optional)."""
PARAM_SETTINGS = ("threshold", "keep_last_n")
"""Params that override settings of the same name when not null."""
FAILURE_XCOM_KEY = "failure"


def resolve_settings(params: Mapping[str, Any]) -> Settings:
    """Merge defaults, BUTLER_MEMORY_* env, the ``butler_memory`` Variable and the run's params."""
    from airflow.sdk import Variable

    settings = Settings.from_env(os.environ)
    raw = Variable.get(VARIABLE_NAME, default=None)
    if raw:
        settings = Settings.from_json(raw, base=settings, source=f"Airflow Variable {VARIABLE_NAME!r}")
    overrides = {name: params[name] for name in PARAM_SETTINGS if params.get(name) is not None}
    if params.get("limit") is not None:
        overrides["scan_limit"] = params["limit"]
    return settings.replace(**overrides) if overrides else settings


def _fail(message: str) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def scan(params: Mapping[str, Any], ti: Any) -> list[str]:
    """Return the ids of users to compress, largest backlog first; fail closed when Redis is down."""
    try:
        settings = resolve_settings(params)
    except SettingsError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    user_ids = params.get("user_ids") or None
    with build_engine(settings) as engine:
        if not params.get("dry_run"):
            # Only real runs: a dry run's report emits no finish time, so a start would look stuck.
            engine.metrics.gauge(m.RUN_STARTED_TIMESTAMP, datetime.now(UTC).timestamp())
            engine.locks.ping()  # no lock service, no compression: fail the run before mapping anything
        backlog = engine.scan(limit=settings.scan_limit, user_ids=user_ids, dry_run=bool(params.get("dry_run")))
    log.info(
        "scan: %d user(s) over %d events (limit %d%s)",
        len(backlog),
        settings.threshold,
        settings.scan_limit,
        f", restricted to {len(user_ids)} given id(s)" if user_ids else "",
    )
    ti.xcom_push(key="backlog", value={b.user_id: b.events for b in backlog})
    return [b.user_id for b in backlog]


def compress(user_id: str, params: Mapping[str, Any], ti: Any, run_id: str) -> dict[str, Any]:
    """Compress one user; transient errors raise for a retry, permanent ones fail the task at once."""
    started = utcnow()
    try:
        settings = resolve_settings(params)
    except SettingsError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    try:
        with build_engine(settings) as engine:
            result = engine.compress(user_id, run_id=run_id, dry_run=bool(params.get("dry_run")))
    except CompressionError as exc:
        seconds = (utcnow() - started).total_seconds()
        ti.xcom_push(key=FAILURE_XCOM_KEY, value=failed_result(user_id, exc, seconds).to_dict())
        if exc.retryable:
            raise RuntimeError(f"{type(exc).__name__}: {exc} (will retry)") from None
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    log.info(
        "user %s: %s; events %d -> %d, folded %d, deleted %d",
        user_id,
        result.status,
        result.events_before,
        result.events_after,
        result.events_folded,
        result.events_deleted,
    )
    return result.to_dict()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    return [v for v in value if v is not None]


def report(params: Mapping[str, Any], ti: Any, run_id: str, run_started: datetime | None) -> dict[str, Any]:
    """Store the run document, emit run metrics, log Markdown; fail when any user failed."""
    scanned: Sequence[str] | None = ti.xcom_pull(task_ids="scan", key="return_value")
    if scanned is None:
        raise _fail("scan did not produce a user list (it failed or was skipped); nothing was compressed")
    backlog = ti.xcom_pull(task_ids="scan", key="backlog") or {}
    results = _as_list(ti.xcom_pull(task_ids="compress_user", key="return_value"))
    failures = {f["user_id"]: f for f in _as_list(ti.xcom_pull(task_ids="compress_user", key=FAILURE_XCOM_KEY))}
    done = {r["user_id"] for r in results}
    results += [f for uid, f in failures.items() if uid not in done]
    settings = resolve_settings(params)
    finished = utcnow()
    started = run_started or finished
    doc = build_report(
        run_id=run_id,
        scanned=list(scanned),
        results=results,
        started_at=started,
        finished_at=finished,
        dry_run=bool(params.get("dry_run")),
        backlog=backlog,
    )
    if not doc["dry_run"]:
        with mongo_store(settings) as store:
            store.save_run(doc)
        run_metrics = statsd_metrics(settings)
        try:
            emit_run_metrics(doc, run_metrics)
        finally:
            run_metrics.close()
    log.info("run report\n%s", to_markdown(doc))
    if doc["users_failed"]:
        raise _fail(
            f"{doc['users_failed']} of {doc['users_found']} user(s) failed: {', '.join(doc['failed_user_ids'][:20])}"
            + (" ..." if doc["users_failed"] > 20 else "")
            + ". Clear their compress_user instances with downstream to re-run them."
        )
    return {k: v for k, v in doc.items() if k not in ("users", "started_at", "finished_at")}
