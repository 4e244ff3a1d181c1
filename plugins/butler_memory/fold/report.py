"""Fold per-user results into one run report: a dict for MongoDB/XCom and a Markdown table."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from butler_memory.core.units import duration
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import (
    COMPRESSED,
    DRY_RUN,
    FAILED,
    SKIPPED_BELOW_THRESHOLD,
    SKIPPED_BUDGET,
    SKIPPED_LOCKED,
    SKIPPED_STALE,
)
from butler_memory.fold.metrics import Metrics

MAX_USER_ROWS = 5000
"""Most per-user rows a run document embeds (failed users first): a 100k-user run would pass
MongoDB's 16 MB document limit. Its ``user_ids`` and ``failed_user_ids`` name only the users of the
rows kept (160,000 ids alone pass the limit); the counts are whole. Every user's row is in the
run-users collection (settings)."""
NO_RESULT = "no_result"
"""Error type of a user the scan listed but no compression result came back for."""


def build_report(
    *,
    run_id: str,
    scanned: Sequence[str],
    results: Sequence[Mapping[str, Any] | None],
    started_at: datetime,
    finished_at: datetime,
    dry_run: bool = False,
    backlog: Mapping[str, int] | None = None,
    kind: str = "daily",
    backlog_left: int = 0,
    backed_off: int = 0,
    full_scan: bool = False,
) -> dict[str, Any]:
    """Return the run document: counts by status, totals, failed user ids, per-user rows.

    ``results`` holds one entry per scanned user in the same order, ``None`` (or a missing entry)
    where the task produced no result: those users are counted as failed. ``backed_off`` counts the
    users the catch-up scan left out after earlier failures (``butler_memory.freshness.backoff``): not scanned.
    ``full_scan`` says the daily scan was the full reconciliation (``butler_memory.freshness.fresh``).
    """
    users: list[dict[str, Any]] = []
    by_id = {r["user_id"]: r for r in results if r}
    for user_id in scanned:
        row = by_id.get(user_id)
        if row is None:
            row = {
                "user_id": user_id,
                "status": FAILED,
                "error_type": NO_RESULT,
                "error": "no result recorded",
            }
        users.append(dict(row))
    statuses = Counter(u["status"] for u in users)
    failed = sum(1 for u in users if u["status"] == FAILED)
    kept = users if len(users) <= MAX_USER_ROWS else _rows_kept(users)
    failed_kept = sorted(u["user_id"] for u in kept if u["status"] == FAILED)
    total = {
        key: sum(int(u.get(key) or 0) for u in users)
        for key in ("events_folded", "events_deleted", "events_quarantined", "prompt_tokens", "completion_tokens")
    }
    return {
        "run_id": run_id,
        "kind": kind,
        "dry_run": dry_run,
        "started_at": started_at,
        "finished_at": finished_at,
        "seconds": round((finished_at - started_at).total_seconds(), 3),
        "users_found": len(scanned),
        "users_compressed": statuses.get(COMPRESSED, 0),
        "users_dry_run": statuses.get(DRY_RUN, 0),
        "users_skipped_locked": statuses.get(SKIPPED_LOCKED, 0),
        "users_skipped_below_threshold": statuses.get(SKIPPED_BELOW_THRESHOLD, 0),
        "users_skipped_budget": statuses.get(SKIPPED_BUDGET, 0),
        "users_skipped_stale": statuses.get(SKIPPED_STALE, 0),
        "users_skipped_backoff": backed_off,
        "users_failed": failed,
        "failed_user_ids": failed_kept,
        "failed_user_ids_truncated": len(failed_kept) < failed,
        "user_ids": sorted({u["user_id"] for u in kept}),  # every id the document names (erasure's index)
        "backlog_events": sum((backlog or {}).values()),
        "backlog_left": backlog_left,
        "full_scan": full_scan,
        "users_fold_capped": sum(1 for u in users if u.get("fold_capped")),
        "events_left": sum(int(u.get("events_left") or 0) for u in users),
        **total,
        "user_seconds_max": max((float(u.get("seconds") or 0) for u in users), default=0.0),
        **freshness(users),
        "users_truncated": len(kept) < len(users),
        "users": kept,
    }


def _rows_kept(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows a large run's document keeps: every failed user, then the others in scan order."""
    failed = [u for u in users if u["status"] == FAILED]
    return (failed + [u for u in users if u["status"] != FAILED])[:MAX_USER_ROWS]


def freshness(users: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Return the run's freshness figures: p50, p95 and max lag (seconds) of the users it compressed."""
    lags = sorted(float(u["freshness_seconds"]) for u in users if u.get("freshness_seconds") is not None)
    if not lags:
        return {"freshness_seconds_p50": None, "freshness_seconds_p95": None, "freshness_seconds_max": None}

    def rank(q: float) -> float:  # nearest rank: a figure some user actually had
        return lags[min(len(lags) - 1, max(0, math.ceil(q * len(lags)) - 1))]

    return {"freshness_seconds_p50": rank(0.5), "freshness_seconds_p95": rank(0.95), "freshness_seconds_max": lags[-1]}


def emit_run_metrics(report: Mapping[str, Any], metrics: Metrics) -> None:
    """Send the run-level metrics (per-user ones were sent by each compression).

    A catch-up run leaves the run timestamps to the daily run (whose staleness the alerts watch) and
    sets its own; an idle one (nobody due) only counts itself.
    """
    finished = report["finished_at"].timestamp()
    if report.get("kind") == "catchup":
        metrics.gauge(m.CATCHUP_LAST_RUN_TIMESTAMP, finished)
        if not report["users_found"]:
            metrics.incr(m.CATCHUP_IDLE_RUNS_TOTAL)
            return
    metrics.incr(m.RUNS_TOTAL)
    metrics.incr(m.USERS_PROCESSED_TOTAL, report["users_compressed"])
    metrics.incr(m.ERRORS_TOTAL, report["users_failed"])
    metrics.gauge(m.RUN_USERS_FAILED, report["users_failed"])
    metrics.timing(m.DURATION_SECONDS, report["seconds"])
    if report.get("kind") == "catchup":
        return
    metrics.gauge(m.RUN_FINISHED_TIMESTAMP, finished)
    if report["users_failed"] == 0:
        metrics.gauge(m.LAST_SUCCESS_TIMESTAMP, finished)


def to_markdown(report: Mapping[str, Any], *, max_rows: int = 50) -> str:
    """Render the report as Markdown: totals, then one row per user (failed users first)."""
    lines = [
        f"## Memory compression run `{report['run_id']}`"
        + (" (catch-up)" if report.get("kind") == "catchup" else "")
        + (" (full scan)" if report.get("full_scan") else "")
        + (" (dry run)" if report["dry_run"] else ""),
        "",
        "| users found | compressed | dry run | skipped (locked) | skipped (below threshold) | skipped (budget) | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report['users_found']} | {report['users_compressed']} | {report['users_dry_run']} | "
        f"{report['users_skipped_locked']} | {report['users_skipped_below_threshold']} | "
        f"{report.get('users_skipped_budget', 0)} | {report['users_failed']} |",
        "",
        f"Events folded: **{report['events_folded']}**, deleted: **{report['events_deleted']}**, "
        f"quarantined: **{report.get('events_quarantined', 0)}**; "
        f"LLM tokens: {report['prompt_tokens']} prompt + {report['completion_tokens']} completion; "
        f"{duration(report['seconds'])}."
        + (
            f" Freshness (over the threshold -> compressed): p95 {duration(report['freshness_seconds_p95'])}, "
            f"max {duration(report['freshness_seconds_max'])}."
            if report.get("freshness_seconds_max") is not None
            else ""
        )
        + (
            f" **{report['backlog_left']}** user(s) over the threshold left for the next run."
            if report.get("backlog_left")
            else ""
        ),
    ]
    if report.get("users_fold_capped"):
        lines += [
            "",
            f"**{report['users_fold_capped']}** user(s) reached `max_fold_events`: "
            f"**{report.get('events_left', 0)}** event(s) left for their next runs.",
        ]
    if report.get("users_skipped_budget"):
        lines += [
            "",
            f"The day's LLM token budget was spent: **{report['users_skipped_budget']}** user(s) not started "
            "(nothing touched); they wait for tomorrow's runs.",
        ]
    if report.get("users_skipped_backoff"):
        lines += [
            "",
            f"**{report['users_skipped_backoff']}** user(s) over the threshold skipped: backed off after failing "
            "(the daily run still tries them; see the runbook, 'A user is backed off').",
        ]
    if report["failed_user_ids"]:
        lines += ["", "Failed users: " + ", ".join(f"`{u}`" for u in report["failed_user_ids"])]
        if report.get("failed_user_ids_truncated"):
            lines[-1] += (
                f" … {report['users_failed'] - len(report['failed_user_ids'])} more (in the run-users collection)"
            )
    rows = sorted(report["users"], key=lambda u: (u["status"] != FAILED, u["user_id"]))
    if rows:
        lines += [
            "",
            "| user | status | before | folded | deleted | after | summary chars | duration | error |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for u in rows[:max_rows]:
            lines.append(
                f"| `{u['user_id']}` | {u['status']} | {u.get('events_before', '')} | {u.get('events_folded', '')} | "
                f"{u.get('events_deleted', '')} | {u.get('events_after', '')} | {u.get('summary_chars', '')} | "
                f"{'' if u.get('seconds') is None else duration(u['seconds'])} | "
                f"{(u.get('error') or '').replace('|', '/')} |"
            )
        if len(rows) > max_rows:
            lines.append(f"| … {len(rows) - max_rows} more users | | | | | | | | |")
    return "\n".join(lines) + "\n"
