"""Bodies of the memory_compression DAG's tasks: Airflow context in, engine calls, small XComs out.

The DAG file only wires these together. XCom carries user ids, counts and statuses, never content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from butler_memory import fresh
from butler_memory import metrics as m
from butler_memory.backoff import FailureBackoff
from butler_memory.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD, failed_result, utcnow
from butler_memory.connections import (
    VARIABLE_NAME,
    build_engine,
    mongo_store,
    resolve_settings,
    statsd_metrics,
    user_locks,
)
from butler_memory.doorbell import DoorbellRecord
from butler_memory.errors import CompressionError
from butler_memory.report import build_report, emit_run_metrics, to_markdown
from butler_memory.settings import Settings, SettingsError

log = logging.getLogger(__name__)

FAILURE_XCOM_KEY = "failure"
__all__ = ["VARIABLE_NAME", "compress", "report", "resolve_settings", "scan"]


def _fail(message: str) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def doorbell_record(settings: Settings, client: Any) -> DoorbellRecord:
    """The doorbell's record on the lock Redis."""
    return DoorbellRecord(client, key=settings.doorbell_key, channel=settings.doorbell_channel)


def scan(params: Mapping[str, Any], ti: Any, kind: str = fresh.DAILY) -> list[str]:
    """Return the ids of users to compress, largest backlog first; fail closed when Redis is down.

    ``kind`` "daily" is the full scan; "catchup" counts only users with new events or a doorbell
    record (``butler_memory.fresh``). Given ``user_ids``, both scan just those.
    """
    try:
        settings = resolve_settings(params)
    except SettingsError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    user_ids = params.get("user_ids") or None
    dry_run = bool(params.get("dry_run"))
    with build_engine(settings) as engine:
        if not dry_run:
            if kind == fresh.DAILY:
                # Only real runs: a dry run's report emits no finish time, so a start would look stuck.
                engine.metrics.gauge(m.RUN_STARTED_TIMESTAMP, datetime.now(UTC).timestamp())
            engine.locks.ping()  # no lock service, no compression: fail the run before mapping anything
            engine.store.ensure_indexes()
        if kind == fresh.CATCHUP and user_ids is None:
            result = fresh.catchup_scan(
                engine.store,
                doorbell_record(settings, engine.locks.client),
                settings,
                settings.scan_limit,
                backoff=FailureBackoff(engine.locks.client, settings),
                persist=not dry_run,
            )
        else:
            result = fresh.daily_scan(engine.store, settings, settings.scan_limit, user_ids)
        if not dry_run:
            engine.metrics.gauge(m.BACKLOG_USERS, len(result.backlog) + result.left)
            engine.metrics.gauge(m.BACKLOG_LEFT_USERS, result.left)
            if result.backed_off:
                engine.metrics.incr(m.USERS_SKIPPED_BACKOFF_TOTAL, len(result.backed_off))
    backlog = result.backlog
    log.info(
        "scan (%s): %d user(s) over %d events (limit %d%s), %d left for the next run%s",
        kind,
        len(backlog),
        settings.threshold,
        settings.scan_limit,
        f", restricted to {len(user_ids)} given id(s)" if user_ids else "",
        result.left,
        f"; counted {result.candidates} user(s) with new events or a doorbell record, "
        f"{len(result.backed_off)} backed off after failing"
        if kind == fresh.CATCHUP
        else "",
    )
    ti.xcom_push(key="backlog", value={b.user_id: b.events for b in backlog})
    ti.xcom_push(key="scan", value={"kind": kind, **result.xcom()})
    return [b.user_id for b in backlog]


def compress(user_id: str, params: Mapping[str, Any], ti: Any, run_id: str) -> dict[str, Any]:
    """Compress one user; transient errors raise for a retry, permanent ones fail the task at once and
    back the user off (``butler_memory.backoff``); a compression or a user under the threshold clears it."""
    started = utcnow()
    try:
        settings = resolve_settings(params)
    except SettingsError as exc:
        raise _fail(f"invalid settings: {exc}") from None
    try:
        with build_engine(settings) as engine:
            # The holder names this task instance: a retry after a kill waits out the lock its killed
            # attempt left instead of reporting skipped_locked (a green run that folded nothing).
            holder = f"{ti.dag_id}|{run_id}|{ti.task_id}|{ti.map_index}"
            dry_run = bool(params.get("dry_run"))
            backoff = FailureBackoff(engine.locks.client, settings)
            try:
                result = engine.compress(user_id, run_id=run_id, dry_run=dry_run, holder=holder)
            except CompressionError as exc:
                if not exc.retryable and not dry_run:  # the same failure again next time: do not retry soon
                    backoff.record_failure(user_id, type(exc).__name__)
                raise
            if result.status in (COMPRESSED, SKIPPED_BELOW_THRESHOLD):
                backoff.clear(user_id)
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
    scan_info: dict[str, Any] = ti.xcom_pull(task_ids="scan", key="scan") or {}
    kind = scan_info.get("kind", fresh.DAILY)
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
        kind=kind,
        backlog_left=int(scan_info.get("left") or 0),
        backed_off=len(scan_info.get("backed_off") or []),
    )
    idle = kind == fresh.CATCHUP and not scanned
    if not doc["dry_run"]:
        with mongo_store(settings) as store:
            if not idle:  # an idle catch-up run leaves no run document, only a counter in the state
                store.save_run(doc)
            if kind == fresh.CATCHUP and (scan_info.get("settle") or scan_info.get("scanned_at")):
                locks = user_locks(settings)
                try:
                    fresh.settle_catchup(
                        store, doorbell_record(settings, locks.client), scan_info, idle=idle, finished_at=finished
                    )
                finally:
                    locks.close()
        run_metrics = statsd_metrics(settings)
        try:
            emit_run_metrics(doc, run_metrics)
        finally:
            run_metrics.close()
    if idle:
        log.info("catch-up run %s: nobody due (%d user(s) counted)", run_id, int(scan_info.get("candidates") or 0))
        return {"run_id": run_id, "kind": kind, "idle": True, "users_found": 0}
    log.info("run report\n%s", to_markdown(doc))
    if doc["users_failed"]:
        raise _fail(
            f"{doc['users_failed']} of {doc['users_found']} user(s) failed: {', '.join(doc['failed_user_ids'][:20])}"
            + (" ..." if doc["users_failed"] > 20 else "")
            + ". Clear their compress_user instances with downstream to re-run them."
        )
    return {k: v for k, v in doc.items() if k not in ("users", "started_at", "finished_at")}
