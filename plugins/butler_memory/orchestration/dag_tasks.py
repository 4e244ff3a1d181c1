"""Bodies of the memory_compression DAG's tasks: Airflow context in, engine calls, small XComs out.

The DAG file only wires these together. XCom carries user ids, counts and statuses, never content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from butler_memory.core.errors import CompressionError, InvalidUserIdError
from butler_memory.core.ids import check_user_id
from butler_memory.core.runs import run_key
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import COMPRESSED, FAILED, SKIPPED_BELOW_THRESHOLD, failed_result, utcnow
from butler_memory.fold.report import build_report, emit_run_metrics, to_markdown
from butler_memory.freshness import fresh
from butler_memory.freshness.backoff import FailureBackoff
from butler_memory.freshness.doorbell import DoorbellRecord
from butler_memory.operations import batch
from butler_memory.operations.audit import AuditLog, save_run_naming_no_erased
from butler_memory.orchestration.connections import (
    build_engine,
    erasure_secret,
    mongo_store,
    resolve_settings,
    statsd_metrics,
    user_locks,
)
from butler_memory.orchestration.params import COMPRESS, DAILY_COMPRESS, Option
from butler_memory.orchestration.task_outcome import (
    FAILURE_XCOM_KEY,
    fail,
    max_map_length,
    params_checked,
    settings_checked,
    xcom_rows,
)

log = logging.getLogger(__name__)


def doorbell_record(settings: Settings, client: Any) -> DoorbellRecord:
    """The doorbell's record on the lock Redis."""
    return DoorbellRecord(client, key=settings.doorbell_key, channel=settings.doorbell_channel)


def owed_record(settings: Settings, client: Any) -> DoorbellRecord:
    """The daily scan's record of the users it owes a run, on the lock Redis (never rung: no channel)."""
    return DoorbellRecord(client, key=settings.daily_owed_key, channel="")


MAP_LABEL_MAX = 250
"""Airflow stores a mapped instance's label in a 250-character column."""


def batches(user_ids: Sequence[str], users_per_task: int) -> list[list[str]]:
    """Split the scan's users, in order, into the lists the mapped compress_user instances take."""
    return [list(user_ids[i : i + users_per_task]) for i in range(0, len(user_ids), users_per_task)]


def batch_label(user_ids: Sequence[str]) -> str:
    """Return a mapped instance's label: the user id, or the first user id and how many more."""
    label = user_ids[0] if len(user_ids) == 1 else f"{user_ids[0]} +{len(user_ids) - 1}"
    return label if len(label) <= MAP_LABEL_MAX else label[: MAP_LABEL_MAX - 1] + "…"


def run_maximum(users_per_task: int, max_map_length: int) -> int:
    """Most users one run takes: Airflow maps at most ``max_map_length`` instances of a task."""
    return users_per_task * max_map_length


def options(kind: str) -> tuple[Option, ...]:
    """Return the params a compression DAG of ``kind`` declares: the daily one's, or the catch-up's."""
    return DAILY_COMPRESS if kind == fresh.DAILY else COMPRESS


def given_users(params: Mapping[str, Any]) -> list[str] | None:
    """Return the ``user_ids`` param (None: not given); an id the job cannot compress, nor then erase,
    fails the run naming it, before anything is read: it is not left out unsaid."""
    try:
        return [check_user_id(user_id) for user_id in params["user_ids"]] if params.get("user_ids") else None
    except InvalidUserIdError as exc:
        raise fail(str(exc)) from None


def scan(params: Mapping[str, Any], ti: Any, kind: str = fresh.DAILY) -> list[list[str]]:
    """Return the users to compress, largest backlog first, in batches of users_per_task; fail closed when Redis is down.

    ``kind`` "daily" counts the users who wrote since its last scan or that it owes a run, and every
    user on its full reconciliation days (or ``full_scan``); "catchup" counts only users with new
    events or a doorbell record (``butler_memory.freshness.fresh``). Given ``user_ids``, both scan just those.
    """
    params_checked(params, options(kind))
    given_users(params)
    with settings_checked():
        settings = resolve_settings(params)
    most = run_maximum(settings.users_per_task, max_map_length())
    if settings.scan_limit > most:
        raise fail(
            f"limit {settings.scan_limit} is above this run's maximum of {most} users "
            f"(max_map_length {max_map_length()} x users_per_task {settings.users_per_task}): "
            "raise users_per_task or lower limit"
        )
    user_ids = given_users(params)
    dry_run = bool(params.get("dry_run"))
    with build_engine(settings) as engine:
        if not dry_run:
            if kind == fresh.DAILY:
                # Only real runs: a dry run's report emits no finish time, so a start would look stuck.
                engine.metrics.gauge(m.RUN_STARTED_TIMESTAMP, datetime.now(UTC).timestamp())
            engine.locks.ping()  # no lock service, no compression: fail the run before mapping anything
            engine.store.ensure_indexes()
            if batch_mode(settings, params, kind):
                _check_batch_endpoint(engine)
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
            result = fresh.daily_scan(
                engine.store,
                settings,
                settings.scan_limit,
                user_ids,
                owed=owed_record(settings, engine.locks.client),
                doorbell=doorbell_record(settings, engine.locks.client),
                full=bool(params.get("full_scan")),
                persist=not dry_run,
            )
        if not dry_run:
            engine.metrics.gauge(m.BACKLOG_USERS, result.over)
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
        else (
            "; full reconciliation" + ("" if result.reconciled else " (more users than it records: next one full too)")
            if result.full
            else f"; counted {result.candidates} user(s) who wrote since the last daily scan or are owed a run"
        )
        if result.settle
        else "",
    )
    ti.xcom_push(key="backlog", value={b.user_id: b.events for b in backlog})
    ti.xcom_push(key="scan", value={"kind": kind, "users_per_task": settings.users_per_task, **result.xcom()})
    return batches([b.user_id for b in backlog], settings.users_per_task)


def compress(
    user_ids: Sequence[str], params: Mapping[str, Any], ti: Any, run_id: str, kind: str = fresh.DAILY
) -> list[dict[str, Any]]:
    """Compress a batch of users one after another; fail the task after trying all when any failed.

    In batch mode (``llm_mode`` "batch", the daily DAG) each user's batch reply is committed
    (``batch.commit_user``); a user that failed in an earlier attempt is compressed online.

    Each user's outcome is stored as it ends (not in a dry run), so a retry or a clear of this
    instance skips the users an earlier attempt finished and re-runs only those that failed or
    never ended. A transient failure of any user raises for a retry; permanent ones fail at once
    and back the user off (``butler_memory.freshness.backoff``); a compression or a user under the threshold clears it.
    """
    params_checked(params, options(kind))
    with settings_checked():
        settings = resolve_settings(params)
    dry_run = bool(params.get("dry_run"))
    batched = batch_mode(settings, params, kind)
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, CompressionError]] = []
    # The holder names this task instance: a retry after a kill waits out the lock its killed
    # attempt left instead of reporting skipped_locked (a green run that folded nothing).
    holder = f"{ti.dag_id}|{run_id}|{ti.task_id}|{ti.map_index}"
    try:
        with build_engine(settings) as engine:
            backoff = FailureBackoff(engine.locks.client, settings)
            audit, secret, attempt_started = AuditLog(engine.store), erasure_secret(settings, required=False), utcnow()
            done = {} if dry_run else engine.store.user_outcomes(ti.dag_id, run_id, user_ids)
            for user_id in user_ids:
                earlier = done.get(user_id)
                if earlier is not None and earlier.get("status") != FAILED:
                    log.info(
                        "user %s: %s in an earlier attempt of this run; not compressed again",
                        user_id,
                        earlier["status"],
                    )
                    rows.append(earlier)
                    continue
                again = earlier is not None  # it failed: clear-and-rerun compresses it online
                mode = None if not batched else ("online" if again else "batch")
                row, error = _compress_one(engine, user_id, run_key(ti.dag_id, run_id), dry_run, holder, mode)
                if error is not None:
                    failures.append((user_id, error))
                    if not error.retryable and not dry_run:  # the same failure again next time: do not retry soon
                        backoff.record_failure(user_id, type(error).__name__)
                elif row["status"] in (COMPRESSED, SKIPPED_BELOW_THRESHOLD):
                    backoff.clear(user_id)
                if not dry_run:
                    engine.store.save_user_outcome(ti.dag_id, run_id, row, now=utcnow())
                    if secret is not None and audit.erased_since(secret, [user_id], attempt_started):
                        # Erased while (or since) it was compressed: erasure wins, no row names the user.
                        engine.store.run_users.delete_one({"dag_id": ti.dag_id, "run_id": run_id, "user_id": user_id})
                        failures = [(u, e) for u, e in failures if u != user_id]
                        continue
                rows.append(row)
    except CompressionError as exc:  # the store itself failed (say, MongoDB down): nothing more to try
        failures.append((user_ids[0], exc))
    if failures:
        ti.xcom_push(key=FAILURE_XCOM_KEY, value=rows)  # every row of the failed attempt, for a dry run's report
        user_id, first = failures[0]
        what = f"{len(failures)} of {len(user_ids)} user(s) failed, first {user_id!r}: {type(first).__name__}: {first}"
        if any(exc.retryable for _, exc in failures):
            raise RuntimeError(f"{what} (will retry the failed users)")
        raise fail(what)
    return rows


def _compress_one(
    engine: Any, user_id: str, run_id: str, dry_run: bool, holder: str, mode: str | None = None
) -> tuple[dict[str, Any], CompressionError | None]:
    """Compress one user of a batch: its result row, and its error when it failed (logged, never raised).

    ``mode`` "batch" commits the user's batch reply, "online" compresses it online in a batch run."""
    started = utcnow()
    try:
        if mode is None:
            result = engine.compress(user_id, run_id=run_id, dry_run=dry_run, holder=holder)
        else:
            result = batch.commit_user(engine, user_id, run_key=run_id, holder=holder, online=mode == "online")
    except CompressionError as exc:
        seconds = (utcnow() - started).total_seconds()
        log.warning("user %s: failed: %s: %s", user_id, type(exc).__name__, exc)
        return failed_result(user_id, exc, seconds).to_dict(), exc
    log.info(
        "user %s: %s; events %d -> %d, folded %d, deleted %d",
        user_id,
        result.status,
        result.events_before,
        result.events_after,
        result.events_folded,
        result.events_deleted,
    )
    return result.to_dict(), None


def batch_mode(settings: Settings, params: Mapping[str, Any], kind: str) -> bool:
    """Say whether this run goes through the Batch API: ``llm_mode`` "batch", the daily DAG, not a dry run."""
    return settings.llm_mode == "batch" and kind == fresh.DAILY and not params.get("dry_run")


def _check_batch_endpoint(engine: Any) -> None:
    """Fail the scan, naming llm_mode, when batch mode cannot work with the LLM server; nothing uploaded."""
    with settings_checked():
        with batch.batch_client(batch.openai_of(engine)) as client:
            batch.check_endpoint(client, engine.settings)


def _scanned_users(ti: Any) -> list[str]:
    scanned: Sequence[Sequence[str]] = ti.xcom_pull(task_ids="scan", key="return_value") or []
    return [user_id for users in scanned for user_id in users]


def batch_prepare(params: Mapping[str, Any], ti: Any, run_id: str) -> dict[str, Any]:
    """Freeze the scanned users' folds for the batch (``batch.prepare``); nothing in online mode."""
    params_checked(params, DAILY_COMPRESS)
    settings = resolve_settings(params)
    if not batch_mode(settings, params, fresh.DAILY):
        return {"llm_mode": "online"}
    with build_engine(settings) as engine:
        with settings_checked():
            prepared = batch.prepare(engine, run_key(ti.dag_id, run_id), _scanned_users(ti))
    return {"llm_mode": "batch", **prepared.to_dict()}


def batch_submit(params: Mapping[str, Any], ti: Any, run_id: str) -> list[str]:
    """Submit the frozen folds as batches (``batch.submit``); return the batch ids ([] in online mode)."""
    params_checked(params, DAILY_COMPRESS)
    settings = resolve_settings(params)
    if not batch_mode(settings, params, fresh.DAILY):
        return []
    with build_engine(settings) as engine:
        with settings_checked():
            with batch.batch_client(batch.openai_of(engine)) as client:
                return batch.submit(engine, run_key(ti.dag_id, run_id), client)


def batch_wait(params: Mapping[str, Any], ti: Any) -> tuple[list[str], dict[str, Any]]:
    """Return what the wait's trigger needs: the submitted batch ids and the settings it reads."""
    params_checked(params, DAILY_COMPRESS)
    settings = resolve_settings(params)
    ids = ti.xcom_pull(task_ids="submit_batch", key="return_value") or []
    return list(ids), {**settings.as_dict(), "poll_seconds": settings.batch_poll_seconds}


def batch_collect(params: Mapping[str, Any], ti: Any, run_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """Read the ended batches' replies into MongoDB and delete the provider's files (``batch.collect``)."""
    params_checked(params, DAILY_COMPRESS)
    settings = resolve_settings(params)
    if event.get("error"):
        raise RuntimeError(f"waiting for the batches failed: {event['error']} (will retry)")
    with build_engine(settings) as engine:
        with batch.batch_client(batch.openai_of(engine)) as client:
            states = batch.collect(engine, run_key(ti.dag_id, run_id), client)
    return {"llm_mode": "batch", "batches": states}


def _llm_mode_fields(settings: Settings, params: Mapping[str, Any], ti: Any, kind: str) -> dict[str, Any]:
    """Return the daily run document's ``llm_mode`` and, in batch mode, its ``batch`` counts (users
    frozen, users left online, the batches' end states); nothing for a catch-up run."""
    if kind != fresh.DAILY:
        return {}
    if not batch_mode(settings, params, fresh.DAILY):
        return {"llm_mode": "online"}
    prepared = ti.xcom_pull(task_ids="prepare_batch", key="return_value") or {}
    collected = ti.xcom_pull(task_ids="wait_for_batches", key="return_value") or {}
    return {
        "llm_mode": "batch",
        "batch": {
            "users_batched": int(prepared.get("batched") or 0),
            "users_online": int(prepared.get("online") or 0),
            "batches": dict(collected.get("batches") or {}),
        },
    }


def _settle_daily(
    settings: Settings, store: Any, scan_info: dict[str, Any], results: Sequence[Mapping[str, Any]], finished: datetime
) -> None:
    """Settle the daily scan (``fresh.settle_daily``) on the lock Redis."""
    locks = user_locks(settings)
    try:
        fresh.settle_daily(store, owed_record(settings, locks.client), scan_info, results, finished_at=finished)
    finally:
        locks.close()


def report(params: Mapping[str, Any], ti: Any, run_id: str, run_started: datetime | None) -> dict[str, Any]:
    """Store the run document, emit run metrics, log Markdown; fail when any user failed."""
    scan_info: dict[str, Any] = ti.xcom_pull(task_ids="scan", key="scan") or {}
    kind = scan_info.get("kind", fresh.DAILY)
    params_checked(params, options(kind))
    scanned_batches: Sequence[Sequence[str]] | None = ti.xcom_pull(task_ids="scan", key="return_value")
    if scanned_batches is None:
        raise fail("scan did not produce a user list (it failed or was skipped); nothing was compressed")
    scanned = [user_id for batch in scanned_batches for user_id in batch]
    map_index = {user_id: i for i, batch in enumerate(scanned_batches) for user_id in batch}
    backlog = ti.xcom_pull(task_ids="scan", key="backlog") or {}
    results = xcom_rows(ti.xcom_pull(task_ids="compress_user", key="return_value"))
    failures = {f["user_id"]: f for f in xcom_rows(ti.xcom_pull(task_ids="compress_user", key=FAILURE_XCOM_KEY))}
    done = {r["user_id"] for r in results}
    results += [f for uid, f in failures.items() if uid not in done]
    settings = resolve_settings(params)
    if not params.get("dry_run") and scanned:
        # The stored outcomes merge every attempt of every instance: the last attempt of each user wins.
        with mongo_store(settings) as store:
            stored = store.user_outcomes(ti.dag_id, run_id)
        results = [*stored.values(), *(r for r in results if r["user_id"] not in stored)]
    results = [{**r, "map_index": map_index.get(r["user_id"], -1)} for r in results]
    finished = utcnow()
    started = run_started or finished

    def document(erased: set[str]) -> dict[str, Any]:
        doc = build_report(
            run_id=run_id,
            scanned=[u for u in scanned if u not in erased],
            results=[r for r in results if r["user_id"] not in erased],
            started_at=started,
            finished_at=finished,
            dry_run=bool(params.get("dry_run")),
            backlog={u: n for u, n in backlog.items() if u not in erased},
            kind=kind,
            backlog_left=int(scan_info.get("left") or 0),
            backed_off=len(scan_info.get("backed_off") or []),
            full_scan=bool(scan_info.get("full")),
        )
        doc["run_key"] = run_key(ti.dag_id, run_id)  # how the summary history and the archive name this run
        doc.update(_llm_mode_fields(settings, params, ti, kind))
        return doc

    doc = document(set())
    idle = kind == fresh.CATCHUP and not scanned
    if not doc["dry_run"]:
        with mongo_store(settings) as store:
            erased: set[str] = set()
            if not idle:  # an idle catch-up run leaves no run document, only a counter in the state
                secret = erasure_secret(settings, required=False)
                doc, erased = save_run_naming_no_erased(store, secret, document, scanned, started)
            if erased:
                store.run_users.delete_many({"dag_id": ti.dag_id, "run_id": run_id, "user_id": {"$in": sorted(erased)}})
            if kind == fresh.DAILY and scan_info.get("settle"):
                _settle_daily(settings, store, scan_info, results, finished)
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
        raise fail(
            f"{doc['users_failed']} of {doc['users_found']} user(s) failed: {', '.join(doc['failed_user_ids'][:20])}"
            + (" ..." if doc["users_failed"] > 20 else "")
            + ". Clear their compress_user instances with downstream to re-run them."
        )
    return {k: v for k, v in doc.items() if k not in ("users", "started_at", "finished_at")}
