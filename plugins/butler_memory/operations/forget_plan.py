"""What a forget of some events will do, decided before anything is written: the request (event
ids or a time range, validated), the events it names, the versions that saw them (*tainted*), the
version a rebuild starts from, the archived events it re-folds and what cannot be kept.

Reads only; ``forget.py`` records the plan as its intent and carries it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from butler_memory.core.errors import ForgetInputError
from butler_memory.operations.audit import DONE, AuditLog, event_ref, subject_ref
from butler_memory.storage.archive import archived_versions
from butler_memory.storage.events import ONE_MS
from butler_memory.storage.history import BASELINE, HistoryEntry, lineage_of
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

MAX_EVENT_IDS = 10_000
"""Most event ids one request may name (they ride in the profile's intent)."""
MAX_VERSION = 2**62
"""Above any version a summary reaches: ``versions(through=MAX_VERSION)`` is every entry."""


@dataclass(frozen=True)
class Request:
    """What to forget: event ids, or a time range ``[since, until)`` (UTC, whole milliseconds)."""

    event_ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    @property
    def mode(self) -> str:
        """Return "event_ids" or "range"."""
        return "event_ids" if self.event_ids else "range"

    def to_doc(self) -> dict[str, Any]:
        """Return the stored form (in the intent and the audit record: ids are refs there)."""
        return {"event_ids": list(self.event_ids), "since": self.since, "until": self.until}


def parse_time(value: str | datetime, name: str) -> datetime:
    """Parse an ISO 8601 time (a naive one is UTC) into UTC, rounded up to the millisecond (see
    ``up_to_millisecond``); a ForgetInputError names the bad value."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ForgetInputError(f"{name} {value!r} is not an ISO 8601 time (e.g. 2026-03-01T12:00:00Z)") from None
    else:
        raise ForgetInputError(f"{name} must be an ISO 8601 time, got {type(value).__name__}")
    try:
        return up_to_millisecond(parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC))
    except OverflowError:  # "0001-01-01T00:00:00+01:00" is in year 0 in UTC
        raise ForgetInputError(f"{name} {str(value)!r} is outside the years 1 to 9999 in UTC") from None


def up_to_millisecond(moment: datetime) -> datetime:
    """Return ``moment`` rounded up to the next whole millisecond (unchanged when it is one).

    MongoDB stores dates to the millisecond, so a request's bounds are stored (in the intent and the
    audit record) truncated, and a retry compared with them would not be the same request. Rounding
    up is the one rounding that keeps ``[since, until)`` naming exactly the same events: a stored
    time ``t`` (whole milliseconds) is ``>= since`` if and only if it is ``>= since`` rounded up, and
    ``< until`` if and only if it is ``< until`` rounded up. Rounding ``since`` down would also forget
    the events of its millisecond that precede it. Raises OverflowError past year 9999.
    """
    spare = moment.microsecond % 1000
    return moment if not spare else moment + timedelta(microseconds=1000 - spare)


def build_request(
    event_ids: Sequence[str] | None, since: str | datetime | None, until: str | datetime | None
) -> Request:
    """Validate what was asked: event ids, or both ends of a non-empty time range (not both kinds)."""
    ids = list(event_ids or [])
    if ids and (since is not None or until is not None):
        raise ForgetInputError("give event ids or a time range (since/until), not both")
    if ids:
        bad = [i for i in ids if not isinstance(i, str) or not i.strip()]
        if bad:
            raise ForgetInputError(f"event ids must be non-empty strings, got {bad[0]!r}")
        if len(ids) > MAX_EVENT_IDS:
            raise ForgetInputError(f"at most {MAX_EVENT_IDS} event ids in one request, got {len(ids)}")
        return Request(event_ids=tuple(dict.fromkeys(ids)))
    if since is None or until is None:
        raise ForgetInputError("a time range needs both since and until (ISO 8601), or give event ids")
    start, end = parse_time(since, "since"), parse_time(until, "until")
    if start > end:
        raise ForgetInputError(
            f"the time range is inverted: since {start.isoformat()} is after until {end.isoformat()}"
        )
    if start == end:
        raise ForgetInputError(f"the time range is empty: since and until are both {start.isoformat()}")
    return Request(since=start, until=end)


@dataclass
class Plan:
    """What a forget will do for one user (ids, versions and counts; no content)."""

    ids: list[Any]
    """``_id``s of the events to remove (in user_memory and/or the archive)."""
    in_events: int
    in_archive: int
    already: list[str]
    """Requested event ids an earlier forget of this user already removed."""
    expected_version: int
    first_tainted: int | None
    """The first version that saw a forgotten event (None: none did; no rebuild)."""
    base_version: int
    refold_ids: list[Any]
    lost: dict[str, Any]
    dead: list[int]
    """History versions outside the current summary's lineage (undone by a rollback, or written by a
    killed run the profile never reached) that folded a forgotten event: dropped, never rebuilt."""

    def facts(self) -> dict[str, Any]:
        """Return what a result and the intent say of the plan (ids, counts, versions)."""
        return {
            "ids": self.ids,
            "in_events": self.in_events,
            "in_archive": self.in_archive,
            "already": self.already,
            "expected_version": self.expected_version,
            "first_tainted": self.first_tainted,
            "base_version": self.base_version,
            "lost": self.lost,
            "refold_count": len(self.refold_ids),
            "dead_versions": self.dead,
        }

    def to_intent(self, intent_id: str, request: Request, now: datetime, run_id: str) -> dict[str, Any]:
        """Return the profile's ``memory_forget`` intent."""
        return {"id": intent_id, "run_id": run_id, "started_at": now, "request": request.to_doc(), **self.facts()}


def check_known(store: MemoryStore, user_id: str, profile: Profile) -> None:
    if profile.version or profile.summary or store.events.find_one({"user_id": user_id}, {"_id": 1}):
        return
    if store.archive_coll.find_one({"user_id": user_id}, {"_id": 1}) or store.profiles.find_one({"user_id": user_id}):
        return
    raise ForgetInputError(f"user {user_id!r}: unknown here (no events, profile or archive)")


def same_request(stored: dict[str, Any], request: Request) -> bool:
    def utc(value: datetime | None) -> datetime | None:
        return None if value is None else (value.replace(tzinfo=UTC) if value.tzinfo is None else value)

    return (
        list(stored.get("event_ids") or []) == list(request.event_ids)
        and utc(stored.get("since")) == request.since
        and utc(stored.get("until")) == request.until
    )


# -- planning ------------------------------------------------------------------------------------


def plan_forget(
    store: MemoryStore, user_id: str, profile: Profile, request: Request, secret: bytes | None, audit: AuditLog
) -> Plan:
    """Resolve the events and the versions that saw them; refuse another user's or unknown events."""
    if request.event_ids:
        query: dict[str, Any] = {"event_id": {"$in": list(request.event_ids)}}
    else:
        query = {"user_id": user_id, "created_at": {"$gte": request.since, "$lt": request.until}}
    fields = {"_id": 1, "user_id": 1, "event_id": 1, "created_at": 1, "summary_version": 1, "summary_versions": 1}
    raw = list(store.events.find(query, fields))
    archived = list(store.archive_coll.find(query, fields))
    quarantined = list(store.quarantine.find(query, fields))  # in no summary: only removed
    foreign = sorted({str(d.get("event_id")) for d in raw + archived + quarantined if d.get("user_id") != user_id})
    if foreign:
        raise ForgetInputError(
            f"user {user_id!r}: event(s) {', '.join(foreign[:10])} belong to another user; nothing was changed"
        )
    already: list[str] = []
    if request.event_ids:
        found = {d.get("event_id") for d in raw + archived + quarantined}
        missing = [i for i in request.event_ids if i not in found]
        done_refs = _forgotten_refs(audit, secret, user_id) if missing else set()
        already = [i for i in missing if secret is not None and event_ref(secret, user_id, i) in done_refs]
        unknown = [i for i in missing if i not in already]
        if unknown:
            raise ForgetInputError(
                f"user {user_id!r}: event(s) {', '.join(unknown[:10])} not found in user_memory or the archive "
                "(an archived event expires after archive_retention_days: forget its time range instead); "
                "nothing was changed"
            )
    in_memory = {d["_id"] for d in raw}
    # Every version that ever folded one of them: an event edited during its compression is folded twice.
    versions = [v for d in archived for v in archived_versions(d)]
    current = profile.version
    every = store.history.versions(user_id, through=MAX_VERSION, text=False)  # above current: a killed run's
    dead_entries = _off_lineage(every, current)
    history = [e for e in every if e.version <= current]
    if request.since is not None and request.until is not None:
        live = [e for e in history if e.version not in dead_entries]
        versions += _versions_touching(store, user_id, live, request.since, request.until)
        spans = [(request.since, request.until)]
    else:
        times = [_as_utc(d["created_at"]) for d in raw + archived if isinstance(d.get("created_at"), datetime)]
        spans = [(t, t + ONE_MS) for t in times]
    dead = sorted(v for v, e in dead_entries.items() if v in versions or any(_overlaps(e, *s) for s in spans))
    folded = [v for v in versions if 0 < v <= current and v not in dead_entries]
    first_tainted = min(folded) if folded else None
    ids = [d["_id"] for d in raw] + [d["_id"] for d in archived if d["_id"] not in in_memory]
    ids += [d["_id"] for d in quarantined if d["_id"] not in set(ids)]
    base, refold, lost = 0, list[Any](), dict[str, Any]()
    if first_tainted is not None:
        base, refold, lost = _rebuild_plan(store, user_id, current, first_tainted, set(ids), history)
    if not ids and first_tainted is None and not dead and request.mode == "range":
        if not _range_done(audit, secret, user_id, request):
            raise ForgetInputError(
                f"user {user_id!r}: no events between {request.since.isoformat() if request.since else ''} and "
                f"{request.until.isoformat() if request.until else ''}, and no summary version covers that time; "
                "nothing was changed"
            )
    return Plan(
        ids=ids,
        in_events=len(raw),
        in_archive=len(archived),
        already=already,
        expected_version=current,
        first_tainted=first_tainted,
        base_version=base,
        refold_ids=refold,
        lost=lost,
        dead=dead,
    )


def _off_lineage(every: list[HistoryEntry], current: int) -> dict[int, HistoryEntry]:
    """Return the history entries the current summary does not descend from, by version: above the
    profile's version (a killed run's, never reached), and between the lineage's oldest known base
    and the current version but not in the lineage (undone by a rollback). Below that base the
    history is gone (retention) and nothing is known: those entries count as ancestors."""
    lineage = lineage_of(every, current)
    chain = {e.version for e in lineage}
    floor = lineage[-1].base_version if lineage else current
    return {e.version: e for e in every if e.version > current or (floor < e.version and e.version not in chain)}


def _overlaps(entry: HistoryEntry, since: datetime, until: datetime) -> bool:
    """Whether the events a version folded (its ``covers``) reach into ``[since, until)``."""
    covers = entry.covers
    if covers is None:
        return False
    return _as_utc(covers.first.created_at) < until and _as_utc(covers.last.created_at) >= since


def _versions_touching(
    store: MemoryStore, user_id: str, history: list[HistoryEntry], since: datetime, until: datetime
) -> list[int]:
    """Return versions that may hold facts from ``[since, until)`` although the archive no longer
    shows it: a version whose events span the range and are not all archived any more (retention),
    and a baseline (a summary from before the history) that reaches into the range."""
    found = []
    for entry in history:
        covers = entry.covers
        if covers is None:
            reaches = entry.through is None or _as_utc(entry.through.created_at) >= since
            if entry.kind == BASELINE and entry.version > 0 and reaches:
                found.append(entry.version)
            continue
        if _as_utc(covers.first.created_at) >= until or _as_utc(covers.last.created_at) < since:
            continue
        if store.archived_counts(user_id, [entry.version]).get(entry.version, 0) < covers.count:
            found.append(entry.version)
    return found


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _rebuild_plan(
    store: MemoryStore,
    user_id: str,
    current: int,
    first_tainted: int,
    forgotten: set[Any],
    history: list[HistoryEntry],
) -> tuple[int, list[Any], dict[str, Any]]:
    """Return (base version, ``_id``s to re-fold, what cannot be kept) for a rebuild below ``first_tainted``."""
    kept = [e.version for e in lineage_of(history, current) if e.version < first_tainted]
    base = max(kept) if kept else 0
    if base and store.history.version(user_id, base) is None:
        base = 0
    return base, refold_ids(store, user_id, base, current, forgotten), losses(store, user_id, base, current, history)


def losses(store: MemoryStore, user_id: str, base: int, current: int, history: list[HistoryEntry]) -> dict[str, Any]:
    """Return what a rebuild on ``base`` cannot re-fold: events of versions after it no longer
    archived, versions no longer (or never) in the history; empty when nothing is lost. Versions off
    the lineage (undone by a rollback: their events are back in user_memory) are not the summary's."""
    off = _off_lineage(history, current)
    by_version = {e.version: e for e in history if base < e.version <= current and e.version not in off}
    missing = [v for v in range(base + 1, current + 1) if v not in by_version and v not in off]
    unrecorded = [e.version for e in by_version.values() if e.covers is None and e.kind == "baseline"]
    expected = sum(e.covers.count for e in by_version.values() if e.covers is not None)
    archived = sum(store.archived_counts(user_id, list(by_version)).values())
    lost: dict[str, Any] = {}
    if expected > archived:
        lost["events_not_in_archive"] = expected - archived
    if missing:
        lost["versions_without_history"] = ranges(missing)
    if unrecorded:
        lost["versions_from_before_history"] = unrecorded
    if lost:
        lost["versions"] = [base + 1, current]
    return lost


def ranges(numbers: list[int]) -> list[list[int]]:
    """Return sorted numbers as [first, last] runs: [1, 2, 3, 7] -> [[1, 3], [7, 7]]."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return runs


def _forgotten_refs(audit: AuditLog, secret: bytes | None, user_id: str) -> set[str]:
    if secret is None:
        return set()
    docs = audit.coll.find(
        {"subject": subject_ref(secret, user_id), "kind": "events", "state": DONE}, {"event_refs": 1}
    )
    return {ref for doc in docs for ref in doc.get("event_refs") or []}


def _range_done(audit: AuditLog, secret: bytes | None, user_id: str, request: Request) -> bool:
    if secret is None:
        return False
    docs = audit.coll.find({"subject": subject_ref(secret, user_id), "kind": "events", "state": DONE}, {"range": 1})
    for doc in docs:
        rng = doc.get("range") or {}
        since, until = rng.get("since"), rng.get("until")
        if since and until and request.since and request.until:
            if _as_utc(since) <= request.since and _as_utc(until) >= request.until:
                return True
    return False


def refold_ids(store: MemoryStore, user_id: str, base: int, current: int, forgotten: set[Any]) -> list[Any]:
    """Return the ``_id``s a rebuild on ``base`` re-folds, oldest first: the archived events of versions
    after it, minus the forgotten ones and minus any back in user_memory (a rollback put them there:
    they are not in the summary)."""
    ids = [i for i in store.archived_ids(user_id, range(base + 1, current + 1)) if i not in forgotten]
    back = {doc["_id"] for doc in store.find_by_ids(user_id, ids)} if ids else set()
    return [i for i in ids if i not in back]
