"""Who is due now: the catch-up scan, and what a run leaves for the next one (no Airflow imports).

The daily run's scan is a full ``$group`` over ``user_memory``. The catch-up scan instead counts only

* users with an event created since its last scan minus ``catchup_margin_seconds`` (a late write:
  an event stored with an older ``created_at`` than the moment it was written), found on the
  ``(created_at, user_id)`` index, and
* users the doorbell recorded (``butler_memory.freshness.doorbell``), oldest ring first,

counted with one ``$group`` per page on the ``(user_id, created_at, _id)`` index. Its MongoDB work
grows with the new events, not with the collection, and is **bounded per run**: the new events are
read in pages of ``catchup_scan_page_events`` in ``(created_at, user_id)`` order, at most
``catchup_scan_max_events`` a run (after a long pause no ``distinct`` can pass 16 MB and no scan the
task's timeout). Each page's users over the threshold are put into the doorbell's record (without a
wake-up) and then the page's last key is stored as the cursor of the pass (``scan_pass`` in the
``state_collection`` document ``"catchup"``), so a scan killed between pages loses nobody and the
next one goes on from its last page. A run that stops short wakes the next one at once.

The watermark ``scanned_through`` (the start of the pass) moves on only when the pass reached the
newest event and the run's report has run. Users over the threshold beyond ``scan_limit`` stay in
(or are written back into) the doorbell's record, so the next run takes them even when they write
nothing more: all of them are recorded by the scan itself (quietly, before its report can move the
watermark past them), and the report wakes the next run. The report drops the doorbell records of
the users the run handled, except a user's who rang again after the scan read the record (a ring
during the run, say for imported older messages, which no watermark sees): that record stays, and
the next run takes the user.

The first catch-up scan ever (no watermark yet) is a full scan.

The daily scan (``daily_scan``) pages the same way, with its own state document (``"daily"``), its
own bound (``daily_scan_max_events``) and its own record of users it owes a compression (the Redis
sorted set ``daily_owed_key``): users with events since *its* watermark minus the margin, the users
it owes (found over the threshold by a pass killed mid-way, left past the limit, failed, locked,
capped or not finished by an earlier run: dropped only once the report saw them compressed or
under the threshold) and, read-only, the catch-up's doorbell record (a ring for a late write, or a
user the catch-up backed off, which the daily run still tries; the catch-up alone drops records).
Every ``daily_full_scan_every_days`` days (and the first daily scan, and on the ``full_scan``
Param) it is instead the full ``$group`` over every event, the reconciliation that catches what no
watermark can see: a late write older than the margin, a restored backup, a lost Redis record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from butler_memory.core.ids import valid_user_id
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD
from butler_memory.freshness.backoff import FailureBackoff
from butler_memory.freshness.doorbell import DoorbellRecord
from butler_memory.storage.events import ONE_MS, Backlog, WriterKey
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STATE_DOC = "catchup"
DAILY_STATE_DOC = "daily"
"""The daily scan's state: its watermark, its unfinished pass, when its last full reconciliation ran."""
FULL_FIELD = "last_full_at"
DAILY = "daily"
CATCHUP = "catchup"
KINDS = (DAILY, CATCHUP)
SCAN_FIELD = "scan_pass"
"""The state document's unfinished pass: {since, started_at, cursor} (the last page's last key)."""
FIRST_WINDOW = timedelta(hours=1)
"""A pass's first page reads the events of this long after its start, at most a page of them. Each
page then takes a window of about the length that held the last full page (wider after one that did
not fill), and the page that reaches ``now`` has no upper bound. A page's query so matches about a
page of events, however many were written since: MongoDB walks the index for the order and stops at
the page's end anyway, but a server that gathers and sorts every match first (the embedded
SecantusDB) read every event after the cursor at each page, so a pass cost pages x events
(docs/benchmarks.md §11)."""
SCAN_STEPS = ("page_recorded",)
"""Where a catch-up scan may be killed: after a page's users are recorded and its cursor stored."""


def _no_checkpoint(step: str) -> None:
    return None


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
    """Doorbell records this scan read that the report drops: not those left past the limit or backed off."""
    read_ring: int = 0
    """The doorbell's last ring number when this scan read its record: the report keeps the record of a
    handled user that rang after it (``DoorbellRecord.read``)."""
    candidates: int = 0
    """Users the catch-up scan counted."""
    backed_off: list[str] = field(default_factory=list)
    """Users over the threshold the catch-up scan skipped: backed off after failing (butler_memory.freshness.backoff)."""
    settle: bool = False
    """Whether the report settles this scan (None ``scanned_at``: its pass goes on)."""
    full: bool = False
    """The daily scan was a full reconciliation."""
    reconciled: bool = False
    """That full scan saw every user over the threshold (else the next daily scan is a full one again)."""
    cleared: list[str] = field(default_factory=list)
    """Users the daily scan owed that are under the threshold now (the report drops them from the record)."""

    @property
    def over(self) -> int:
        """Return the users over the threshold the scan found, taken and left together (backlog_users)."""
        return len(self.backlog) + self.left

    def xcom(self) -> dict[str, Any]:
        """Return what the report needs, JSON-safe (ids and counts only)."""
        return {
            "left": self.left,
            "left_ids": self.left_ids,
            "scanned_at": self.scanned_at.isoformat() if self.scanned_at else None,
            "rung": self.rung,
            "read_ring": self.read_ring,
            "candidates": self.candidates,
            "backed_off": self.backed_off,
            "taken": [b.user_id for b in self.backlog],
            "settle": self.settle,
            "full": self.full,
            "reconciled": self.reconciled,
            "cleared": self.cleared,
        }


def daily_scan(
    store: MemoryStore,
    settings: Settings,
    limit: int,
    user_ids: list[str] | None,
    *,
    owed: DoorbellRecord | None = None,
    doorbell: DoorbellRecord | None = None,
    full: bool = False,
    now: datetime | None = None,
    persist: bool = True,
    checkpoint: Callable[[str], None] = _no_checkpoint,
) -> ScanResult:
    """Return who the daily run takes: given ``user_ids`` (or no ``owed`` record), a full count of
    them (nothing stored); otherwise the incremental scan, or the full reconciliation when it is due
    or ``full``; see the module docstring. Every user over the threshold it finds is recorded as
    owed (not in a dry run: ``persist`` False writes nothing) before the run takes them."""
    if user_ids is not None or owed is None:
        backlog = store.scan(settings.threshold, limit, user_ids)
        left = 0
        if len(backlog) >= limit and user_ids is None:
            left = max(store.count_over_threshold(settings.threshold) - len(backlog), 0)
        return ScanResult(backlog=backlog, left=left)
    now = now or datetime.now(UTC)
    state = store.load_state(DAILY_STATE_DOC)
    watermark = state.get("scanned_through")
    owed_ids = list(owed.oldest(settings.doorbell_drain_max))
    rung = [u for u in (doorbell.oldest(settings.doorbell_drain_max) if doorbell else ()) if u not in set(owed_ids)]
    why = _full_scan_reason(full, watermark, state.get(FULL_FIELD), now, settings.daily_full_scan_every_days)
    reconciled = False
    scanned_at: datetime | None = now
    if why is None and isinstance(watermark, datetime):
        backlog, candidates, scanned_at = _scan_pages(
            store,
            owed,
            settings,
            [*owed_ids, *rung],
            _aware(watermark),
            state.get(SCAN_FIELD),
            now,
            persist,
            checkpoint,
            state_doc=DAILY_STATE_DOC,
            max_events=settings.daily_scan_max_events,
        )
        over = len(backlog)
    else:
        log.info("daily scan: full reconciliation (%s)", why)
        wanted = limit + settings.doorbell_drain_max  # what this run takes and what it can carry over
        backlog = store.scan(settings.threshold, wanted, None)
        reconciled = len(backlog) < wanted
        if not reconciled:  # more over the threshold than it can record: the next daily scan is full again
            over = store.count_over_threshold(settings.threshold)
            log.info("daily scan: %d user(s) over the threshold, more than %d; next scan is full too", over, wanted)
        else:
            over = len(backlog)
        candidates = over
    if persist:
        owed.settle([], [], quiet=[b.user_id for b in backlog])  # owed until the report sees them done
    found = {b.user_id for b in backlog}
    taken = backlog[:limit]
    return ScanResult(
        backlog=taken,
        left=max(over - len(taken), 0),
        scanned_at=scanned_at,
        candidates=candidates,
        settle=True,
        full=why is not None,
        reconciled=reconciled,
        cleared=[u for u in owed_ids if u not in found] if why is None or reconciled else [],
    )


def _full_scan_reason(forced: bool, watermark: Any, last_full: Any, now: datetime, every_days: int) -> str | None:
    """Why the daily scan must be the full ``$group`` today, or None for the incremental scan."""
    if forced:
        return "full_scan requested"
    if not isinstance(watermark, datetime) or not isinstance(last_full, datetime):
        return "first daily scan"
    days = (now.date() - _aware(last_full).date()).days
    return f"last one {days} day(s) ago, daily_full_scan_every_days {every_days}" if days >= every_days else None


def catchup_scan(
    store: MemoryStore,
    doorbell: DoorbellRecord,
    settings: Settings,
    limit: int,
    *,
    now: datetime | None = None,
    backoff: FailureBackoff | None = None,
    persist: bool = True,
    checkpoint: Callable[[str], None] = _no_checkpoint,
) -> ScanResult:
    """Count only the users with new events or a doorbell record, leave out the backed-off ones; see the
    module docstring. ``persist`` False (a dry run) writes nothing: no doorbell record, no scan cursor."""
    now = now or datetime.now(UTC)
    state = store.load_state(STATE_DOC)
    watermark = state.get("scanned_through")
    rung, read_ring = doorbell.read(settings.doorbell_drain_max)
    scanned_at: datetime | None = now
    if not isinstance(watermark, datetime):
        log.info("catch-up scan: no watermark yet, scanning every user once")
        backlog = store.scan(settings.threshold, settings.doorbell_drain_max + limit, None)
        candidates = len(backlog)
        backlog = _merge(
            backlog, store.backlog_of([u for u in rung if u not in {b.user_id for b in backlog}], settings.threshold)
        )
    else:
        progress = state.get(SCAN_FIELD)
        backlog, candidates, scanned_at = _scan_pages(
            store,
            doorbell,
            settings,
            list(rung),
            _aware(watermark),
            progress,
            now,
            persist,
            checkpoint,
            state_doc=STATE_DOC,
            max_events=settings.catchup_scan_max_events,
        )
    held = backoff.backed_off([b.user_id for b in backlog]) if backoff is not None else set()
    backlog = [b for b in backlog if b.user_id not in held]
    taken, rest = backlog[:limit], backlog[limit:]
    left = {b.user_id for b in rest}
    if persist and left:  # every one of them, before the watermark can pass them (XCom names a few)
        doorbell.settle([], [], quiet=sorted(left))
    return ScanResult(
        backlog=taken,
        left=len(rest),
        left_ids=[b.user_id for b in rest[: settings.doorbell_drain_max]],
        scanned_at=scanned_at,
        rung=[u for u in rung if u not in left and u not in held],
        read_ring=read_ring,
        candidates=candidates,
        backed_off=sorted(held)[: settings.doorbell_drain_max],
        settle=True,
    )


def _scan_pages(
    store: MemoryStore,
    record: DoorbellRecord,
    settings: Settings,
    rung: list[str],
    watermark: datetime,
    progress: Any,
    now: datetime,
    persist: bool,
    checkpoint: Callable[[str], None],
    *,
    state_doc: str,
    max_events: int,
) -> tuple[list[Backlog], int, datetime | None]:
    """Page through the users who wrote since the watermark, from where the last scan stopped (the
    pass stored in ``state_doc``), for at most ``max_events`` events; return who is over the threshold
    (with the ``rung`` users, counted first), how many users were counted, and the pass's start once
    the pass reached the newest event (None: it continues later).

    Each page's users over the threshold go into ``record`` (quietly) before the cursor is stored
    past them: a scan killed or timed out between pages loses nobody, and the next one goes on from
    its last stored page instead of starting over.
    """
    cursor: WriterKey | None = None
    if _valid_pass(progress):
        since, started_at = _aware(progress["since"]), _aware(progress["started_at"])
        raw = progress.get("cursor")
        cursor = None if raw is None else WriterKey(raw["created_at"], raw["user_id"])
        log.info("%s scan: resuming the pass begun at %s", state_doc, started_at.isoformat())
    else:
        since, started_at = watermark - timedelta(seconds=settings.catchup_margin_seconds), now
    found = {b.user_id: b for b in store.backlog_of(rung, settings.threshold)}
    counted = set(rung)
    read, done, window = 0, False, FIRST_WINDOW
    while not done and read < max_events:
        page = min(settings.catchup_scan_page_events, max_events - read)
        start = _aware(cursor.created_at) if cursor is not None else since
        until = _ms(start + window) if start + window < now else None
        keys, entries = store.writers_since(since, cursor, page, until)
        full = entries >= page
        read += page if full else entries
        done = not full and until is None
        fresh_ids = [k.user_id for k in keys if valid_user_id(k.user_id) and k.user_id not in counted]
        counted.update(fresh_ids)
        over = store.backlog_of(fresh_ids, settings.threshold)
        found.update((b.user_id, b) for b in over)
        if full:  # the next window: about what held this page
            cursor, window = keys[-1], max(_aware(keys[-1].created_at) - start, ONE_MS)
        elif until is not None:  # every event before `until` is read: go on from there, a wider window
            since, cursor = until, None
            window *= min(16, max(2, page // max(entries, 1)))
        # The pass's last page needs no record: a scan killed after it reads it again (the report moves
        # the watermark), so an idle run writes nothing; nor does a window with no event.
        if persist and not done and entries:
            record.settle([], [], quiet=[b.user_id for b in over])  # durable before the cursor passes them
            store.save_state(state_doc, set_fields={SCAN_FIELD: _pass_doc(since, started_at, cursor)})
            checkpoint("page_recorded")
    if not done:
        log.info("%s scan: stopped after %d events (its max_events); the next run goes on", state_doc, read)
    return _merge(list(found.values()), []), len(counted), started_at if done else None


def _ms(value: datetime) -> datetime:
    """``value`` down to the millisecond, the resolution of BSON dates."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _valid_pass(doc: Any) -> bool:
    if not (isinstance(doc, dict) and isinstance(doc.get("since"), datetime)):
        return False
    cursor = doc.get("cursor")
    return isinstance(doc.get("started_at"), datetime) and (
        cursor is None or (isinstance(cursor, dict) and isinstance(cursor.get("created_at"), datetime))
    )


def _pass_doc(since: datetime, started_at: datetime, cursor: WriterKey | None) -> dict[str, Any]:
    at = None if cursor is None else {"created_at": cursor.created_at, "user_id": cursor.user_id}
    return {"since": since, "started_at": started_at, "cursor": at}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _merge(a: list[Backlog], b: list[Backlog]) -> list[Backlog]:
    return sorted([*a, *b], key=lambda x: (-x.events, x.user_id))


def settle_catchup(
    store: MemoryStore, doorbell: DoorbellRecord, scan: dict[str, Any], *, idle: bool, finished_at: datetime
) -> None:
    """After a catch-up run's report: move the watermark on when the scan's pass is complete (else wake
    the next run, which continues it), drop the handled doorbell records (not those rung again after
    the scan read the record: a ring made during the run, for events the run may not have seen, is
    kept for the next run), record the users left over (they wake the next run at once) and the
    backed-off ones (recorded without a wake-up: the first run after their back-off takes them),
    count an idle run."""
    scanned_at = scan.get("scanned_at")
    fields: dict[str, Any] = {"last_run_at": finished_at}
    if scanned_at:
        fields["scanned_through"] = datetime.fromisoformat(scanned_at)
        fields[SCAN_FIELD] = None
    if idle:
        fields["last_idle_at"] = finished_at
    store.save_state(STATE_DOC, set_fields=fields, inc={"idle_runs": 1} if idle else {"runs": 1})
    left = list(scan.get("left_ids") or [])
    held = list(scan.get("backed_off") or [])
    kept = set(left) | set(held)
    handled = [u for u in dict.fromkeys([*(scan.get("rung") or []), *(scan.get("taken") or [])]) if u not in kept]
    read_ring = int(scan.get("read_ring") or 0)  # 0: keep every handled user with a numbered ring
    doorbell.settle(handled, left, quiet=held, wake=not scanned_at, read_ring=read_ring)


def settle_daily(
    store: MemoryStore,
    owed: DoorbellRecord,
    scan: dict[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    finished_at: datetime,
) -> None:
    """After a daily run's report: move the watermark on when the scan's pass is complete (and record
    a complete full reconciliation), drop from the owed record the users the run finished (compressed
    and not capped by ``max_fold_events``, or under the threshold) and those the scan found under the
    threshold; every other user it owes (failed, locked, over budget, capped, no result) stays."""
    done = [
        r["user_id"]
        for r in results
        if r.get("status") == SKIPPED_BELOW_THRESHOLD or (r.get("status") == COMPRESSED and not r.get("fold_capped"))
    ]
    scanned_at = scan.get("scanned_at")
    fields: dict[str, Any] = {"last_run_at": finished_at}
    if scanned_at:
        fields["scanned_through"] = datetime.fromisoformat(scanned_at)
        fields[SCAN_FIELD] = None
        if scan.get("reconciled"):
            fields[FULL_FIELD] = datetime.fromisoformat(scanned_at)
    store.save_state(DAILY_STATE_DOC, set_fields=fields, inc={"runs": 1})
    owed.settle(list(dict.fromkeys([*(scan.get("cleared") or []), *done])), [])
