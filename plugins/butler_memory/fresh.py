"""Who is due now: the catch-up scan, and what a run leaves for the next one (no Airflow imports).

The daily run's scan is a full ``$group`` over ``user_memory``. The catch-up scan instead counts only

* users with an event created since its last scan minus ``catchup_margin_seconds`` (a late write:
  an event stored with an older ``created_at`` than the moment it was written), found on the
  ``(created_at, user_id)`` index, and
* users the doorbell recorded (``butler_memory.doorbell``), oldest ring first,

with one ``count_documents`` each on the ``(user_id, created_at, _id)`` index. Its MongoDB work grows
with the new events, not with the collection. The watermark (the scan's start time) is kept in the
``state_collection`` document ``"catchup"`` and only moves on when the run's report has run, so a
run that died before its report is scanned again from the same point. Users over the threshold
beyond ``scan_limit`` are written back into the doorbell's record, so the next run takes them even
when they write nothing more.

The first catch-up scan ever (no watermark yet) is a full scan, like the daily one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from butler_memory.backoff import FailureBackoff
from butler_memory.doorbell import DoorbellRecord
from butler_memory.settings import Settings
from butler_memory.store import Backlog, MemoryStore

log = logging.getLogger(__name__)

STATE_DOC = "catchup"
DAILY = "daily"
CATCHUP = "catchup"
KINDS = (DAILY, CATCHUP)


@dataclass(frozen=True)
class ScanResult:
    """The users a run takes, how many over the threshold it leaves, and what to settle afterwards."""

    backlog: list[Backlog]
    left: int = 0
    """Users over the threshold the run does not take (past ``scan_limit``)."""
    left_ids: list[str] = field(default_factory=list)
    """Those users, when the scan knows them (the catch-up scan does; the daily one only counts)."""
    scanned_at: datetime | None = None
    """The catch-up scan's start: the watermark the report stores."""
    rung: list[str] = field(default_factory=list)
    """Doorbell records this scan read (the report drops them)."""
    candidates: int = 0
    """Users the catch-up scan counted."""
    backed_off: list[str] = field(default_factory=list)
    """Users over the threshold the catch-up scan skipped: backed off after failing (butler_memory.backoff)."""

    def xcom(self) -> dict[str, Any]:
        """Return what the report needs, JSON-safe (ids and counts only)."""
        return {
            "left": self.left,
            "left_ids": self.left_ids,
            "scanned_at": self.scanned_at.isoformat() if self.scanned_at else None,
            "rung": self.rung,
            "candidates": self.candidates,
            "backed_off": self.backed_off,
        }


def daily_scan(store: MemoryStore, settings: Settings, limit: int, user_ids: list[str] | None) -> ScanResult:
    """The full scan; when it hits ``limit``, one more ``$group`` counts who is left."""
    backlog = store.scan(settings.threshold, limit, user_ids)
    left = 0
    if len(backlog) >= limit and user_ids is None:
        left = max(store.count_over_threshold(settings.threshold) - len(backlog), 0)
    return ScanResult(backlog=backlog, left=left)


def catchup_scan(
    store: MemoryStore,
    doorbell: DoorbellRecord,
    settings: Settings,
    limit: int,
    *,
    now: datetime | None = None,
    backoff: FailureBackoff | None = None,
) -> ScanResult:
    """Count only the users with new events or a doorbell record, leave out the backed-off ones; see the
    module docstring."""
    now = now or datetime.now(UTC)
    state = store.load_state(STATE_DOC)
    watermark = state.get("scanned_through")
    rung = doorbell.oldest(settings.doorbell_drain_max)
    if not isinstance(watermark, datetime):
        log.info("catch-up scan: no watermark yet, scanning every user once")
        backlog = store.scan(settings.threshold, settings.doorbell_drain_max + limit, None)
        candidates = len(backlog)
        backlog = _merge(
            backlog, store.backlog_of([u for u in rung if u not in {b.user_id for b in backlog}], settings.threshold)
        )
    else:
        if watermark.tzinfo is None:
            watermark = watermark.replace(tzinfo=UTC)
        since = watermark - timedelta(seconds=settings.catchup_margin_seconds)
        ids = list(dict.fromkeys([*rung, *store.users_with_events_since(since)]))
        candidates = len(ids)
        backlog = store.backlog_of(ids, settings.threshold)
    held = backoff.backed_off([b.user_id for b in backlog]) if backoff is not None else set()
    backlog = [b for b in backlog if b.user_id not in held]
    taken, rest = backlog[:limit], backlog[limit:]
    return ScanResult(
        backlog=taken,
        left=len(rest),
        left_ids=[b.user_id for b in rest[: settings.doorbell_drain_max]],
        scanned_at=now,
        rung=list(rung),
        candidates=candidates,
        backed_off=sorted(held)[: settings.doorbell_drain_max],
    )


def _merge(a: list[Backlog], b: list[Backlog]) -> list[Backlog]:
    return sorted([*a, *b], key=lambda x: (-x.events, x.user_id))


def settle_catchup(
    store: MemoryStore, doorbell: DoorbellRecord, scan: dict[str, Any], *, idle: bool, finished_at: datetime
) -> None:
    """After a catch-up run's report: move the watermark on, drop the handled doorbell records, record
    the users left over (they wake the next run at once) and the backed-off ones (recorded without a
    wake-up: the first run after their back-off takes them), count an idle run."""
    scanned_at = scan.get("scanned_at")
    fields: dict[str, Any] = {"last_run_at": finished_at}
    if scanned_at:
        fields["scanned_through"] = datetime.fromisoformat(scanned_at)
    if idle:
        fields["last_idle_at"] = finished_at
    store.save_state(STATE_DOC, set_fields=fields, inc={"idle_runs": 1} if idle else {"runs": 1})
    left = list(scan.get("left_ids") or [])
    held = list(scan.get("backed_off") or [])
    kept = set(left) | set(held)
    handled = [u for u in scan.get("rung") or [] if u not in kept]
    doorbell.settle(handled, left, quiet=held)
