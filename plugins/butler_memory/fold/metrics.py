"""StatsD metrics for the compression job: names, a client, and a no-op when unconfigured.

Metric names keep the Butler runbook's existing names. Only ids, counts, sizes and durations are
ever emitted; never conversation content. A failing StatsD sink never fails a compression: UDP
sends are fire-and-forget and every send is guarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from butler_memory.safety.guards import GUARDS, INJECTION, REDACT

log = logging.getLogger(__name__)

PREFIX = "personalized_memory_worker"

# Run level (emitted once per run by the report).
RUNS_TOTAL = f"{PREFIX}_runs_total"
"""Counter: finished runs (report task executions)."""
ERRORS_TOTAL = f"{PREFIX}_errors_total"
"""Counter: users whose compression failed."""
USERS_PROCESSED_TOTAL = f"{PREFIX}_users_processed_total"
"""Counter: users compressed successfully."""
DURATION_SECONDS = f"{PREFIX}_duration_seconds"
"""Timer (ms on the wire): wall time of a run, from scan to report."""
RUN_USERS_FAILED = f"{PREFIX}_run_users_failed"
"""Gauge: users failed in the last finished run."""
BACKLOG_USERS = f"{PREFIX}_backlog_users"
"""Gauge: users over the threshold found by the last scan."""
BACKLOG_LEFT_USERS = f"{PREFIX}_backlog_left_users"
"""Gauge: users over the threshold the last scan left for the next run (past scan_limit)."""
CATCHUP_IDLE_RUNS_TOTAL = f"{PREFIX}_catchup_idle_runs_total"
"""Counter: catch-up runs that found nobody due (they store no run document)."""
CATCHUP_LAST_RUN_TIMESTAMP = f"{PREFIX}_catchup_last_run_timestamp_seconds"
"""Gauge: unix time the last catch-up run (idle or not) finished its report."""
RUN_STARTED_TIMESTAMP = f"{PREFIX}_run_started_timestamp_seconds"
"""Gauge: unix time the current/last run's scan started."""
RUN_FINISHED_TIMESTAMP = f"{PREFIX}_run_finished_timestamp_seconds"
"""Gauge: unix time the last run's report finished."""
LAST_SUCCESS_TIMESTAMP = f"{PREFIX}_last_success_timestamp_seconds"
"""Gauge: unix time of the last run in which no user failed."""

# Per user (emitted by compress_user).
USERS_SKIPPED_LOCKED_TOTAL = f"{PREFIX}_users_skipped_locked_total"
USERS_SKIPPED_BELOW_THRESHOLD_TOTAL = f"{PREFIX}_users_skipped_below_threshold_total"
USERS_FOLD_CAPPED_TOTAL = f"{PREFIX}_users_fold_capped_total"
"""Counter: users whose compression folded max_fold_events and left the rest for the next run."""
USERS_SKIPPED_BUDGET_TOTAL = f"{PREFIX}_users_skipped_budget_total"
"""Counter: users not started because the day's LLM token budget was spent."""
USERS_SKIPPED_STALE_TOTAL = f"{PREFIX}_users_skipped_stale_total"
"""Counter, batch mode: users whose summary or frozen events changed while the batch ran (reply dropped)."""
USERS_SKIPPED_BACKOFF_TOTAL = f"{PREFIX}_users_skipped_backoff_total"
"""Counter: users a catch-up scan left out, backed off after failing (emitted by the scan)."""
EVENTS_FOLDED_TOTAL = f"{PREFIX}_events_folded_total"
EVENTS_ARCHIVED_TOTAL = f"{PREFIX}_events_archived_total"
EVENTS_DELETED_TOTAL = f"{PREFIX}_events_deleted_total"
EVENTS_QUARANTINED_TOTAL = f"{PREFIX}_events_quarantined_total"
"""Counter: events moved to the quarantine collection because they cannot be folded."""
USER_DURATION_SECONDS = f"{PREFIX}_user_duration_seconds"
"""Timer: wall time of one user's compression."""
FRESHNESS_LAG_SECONDS = f"{PREFIX}_freshness_lag_seconds"
"""Timer: from the event that took a user over the threshold to the commit that compressed them."""
LLM_REQUESTS_TOTAL = f"{PREFIX}_llm_requests_total"
LLM_ERRORS_TOTAL = f"{PREFIX}_llm_errors_total"
LLM_PROMPT_TOKENS_TOTAL = f"{PREFIX}_llm_prompt_tokens_total"
LLM_COMPLETION_TOKENS_TOTAL = f"{PREFIX}_llm_completion_tokens_total"
LLM_LATENCY_SECONDS = f"{PREFIX}_llm_latency_seconds"
"""Timer: latency of one LLM call."""

# Guards (emitted by compress_user for each proposed summary; guards.py). Per guard: every check,
# and the failed ones by mode; passes are checks - warn - reject (- redact). A guard set to "off"
# sends nothing. The injection guard also counts the checks whose input had sentences withheld.
GUARD_COUNTERS = ("checks", "warn", "reject")


def guard_metric(guard: str, counter: str) -> str:
    """Return a guard's counter, e.g. ``personalized_memory_worker_guard_facts_reject_total``."""
    return f"{PREFIX}_guard_{guard}_{counter}_total"


GUARD_METRICS = {
    **{guard_metric(g, c): "counter" for g in GUARDS for c in GUARD_COUNTERS},
    guard_metric(INJECTION, REDACT): "counter",
}

# Operations on users' memory other than compression (emitted once per user by the shared entry the
# CLI and the DAG tasks both call: Engine.rollback / Engine.refold / Engine.forget, which runs
# forget.forget_events or erasure.forget_user). Dry runs send nothing.
ROLLBACK, REFOLD, FORGET, ERASURE = "rollback", "refold", "forget", "erasure"
OPERATIONS = (ROLLBACK, REFOLD, FORGET, ERASURE)
OPERATION_METRICS = {
    "users": "counter",
    "failures": "counter",
    "users_changed": "counter",
    "events": "counter",
    "duration": "timer",
}
"""Per operation: users it finished with (any outcome), users it failed on (an exception), users
whose memory it changed, events it restored / re-folded / forgot / erased, and its wall time."""


def operation_metric(operation: str, what: str) -> str:
    """Return an operation's metric, e.g. ``personalized_memory_worker_rollback_failures_total``."""
    suffix = "seconds" if OPERATION_METRICS[what] == "timer" else "total"
    return f"{PREFIX}_{operation}_{what}_{suffix}"


class Outcome(Protocol):
    """A per-user operation's result, as ``observed`` reads and times it."""

    status: str
    seconds: float


OutcomeT = TypeVar("OutcomeT", bound=Outcome)


def observed(
    metrics: Metrics,
    operation: str,
    run: Callable[[], OutcomeT],
    *,
    changed: str,
    events: Callable[[OutcomeT], int],
    dry_run: bool = False,
    input_errors: tuple[type[Exception], ...] = (),
) -> OutcomeT:
    """Run one operation on one user, set its result's ``seconds`` and emit its metrics: its failure
    when ``run`` raises, else the user, whether its status is ``changed`` and then its ``events``.

    ``input_errors`` (bad input, refused having changed nothing) are the caller's mistake: not counted.
    """
    started = time.monotonic()
    try:
        result = run()
    except input_errors:
        raise
    except Exception:
        if not dry_run:
            metrics.incr(operation_metric(operation, "failures"))
        raise
    result.seconds = round(time.monotonic() - started, 3)
    if not dry_run:
        touched = result.status == changed
        metrics.incr(operation_metric(operation, "users"))
        metrics.incr(operation_metric(operation, "users_changed"), int(touched))
        metrics.incr(operation_metric(operation, "events"), events(result) if touched else 0)
        metrics.timing(operation_metric(operation, "duration"), time.monotonic() - started)
    return result


ALL_METRICS: Mapping[str, str] = {
    RUNS_TOTAL: "counter",
    ERRORS_TOTAL: "counter",
    USERS_PROCESSED_TOTAL: "counter",
    DURATION_SECONDS: "timer",
    RUN_USERS_FAILED: "gauge",
    BACKLOG_USERS: "gauge",
    BACKLOG_LEFT_USERS: "gauge",
    CATCHUP_IDLE_RUNS_TOTAL: "counter",
    CATCHUP_LAST_RUN_TIMESTAMP: "gauge",
    RUN_STARTED_TIMESTAMP: "gauge",
    RUN_FINISHED_TIMESTAMP: "gauge",
    LAST_SUCCESS_TIMESTAMP: "gauge",
    USERS_SKIPPED_LOCKED_TOTAL: "counter",
    USERS_SKIPPED_BELOW_THRESHOLD_TOTAL: "counter",
    USERS_FOLD_CAPPED_TOTAL: "counter",
    USERS_SKIPPED_BUDGET_TOTAL: "counter",
    USERS_SKIPPED_STALE_TOTAL: "counter",
    USERS_SKIPPED_BACKOFF_TOTAL: "counter",
    EVENTS_FOLDED_TOTAL: "counter",
    EVENTS_ARCHIVED_TOTAL: "counter",
    EVENTS_DELETED_TOTAL: "counter",
    EVENTS_QUARANTINED_TOTAL: "counter",
    USER_DURATION_SECONDS: "timer",
    FRESHNESS_LAG_SECONDS: "timer",
    LLM_REQUESTS_TOTAL: "counter",
    LLM_ERRORS_TOTAL: "counter",
    LLM_PROMPT_TOKENS_TOTAL: "counter",
    LLM_COMPLETION_TOKENS_TOTAL: "counter",
    LLM_LATENCY_SECONDS: "timer",
    **GUARD_METRICS,
    **{operation_metric(op, what): kind for op in OPERATIONS for what, kind in OPERATION_METRICS.items()},
}
"""Every metric this package emits, with its StatsD type. Docs and alert rules are checked against it."""


class Metrics(Protocol):
    """What the engine needs from a metrics sink."""

    def incr(self, name: str, count: int = 1) -> None: ...

    def gauge(self, name: str, value: float) -> None: ...

    def timing(self, name: str, seconds: float) -> None: ...

    def close(self) -> None: ...


class NullMetrics:
    """Drop every metric; used when StatsD is not configured."""

    def incr(self, name: str, count: int = 1) -> None:
        return None

    def gauge(self, name: str, value: float) -> None:
        return None

    def timing(self, name: str, seconds: float) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class StatsdConfig:
    """Where to send metrics."""

    host: str
    port: int = 8125
    prefix: str | None = None


class StatsdMetrics:
    """Send metrics over UDP with the `statsd` package; never raises."""

    def __init__(self, config: StatsdConfig) -> None:
        import statsd

        self._client = statsd.StatsClient(config.host, config.port, prefix=config.prefix or None)

    def _safe(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except OSError as exc:  # an unreachable sink must never fail a compression
            log.warning("statsd send failed: %s", type(exc).__name__)

    def close(self) -> None:
        """Close the UDP socket."""
        self._client.close()

    def incr(self, name: str, count: int = 1) -> None:
        if count:
            self._safe(self._client.incr, _checked(name), count)

    def gauge(self, name: str, value: float) -> None:
        self._safe(self._client.gauge, _checked(name), value)

    def timing(self, name: str, seconds: float) -> None:
        self._safe(self._client.timing, _checked(name), seconds * 1000.0)


def _checked(name: str) -> str:
    if name not in ALL_METRICS:
        raise ValueError(f"unknown metric name {name!r}; add it to butler_memory.fold.metrics.ALL_METRICS")
    return name
