"""Forget some of a user's events (by Butler ``event_id``, or a time range) and rebuild the summary without them.

No Airflow imports: the CLI, the ``memory_erasure`` DAG and the Butler's deletion flow call
:func:`forget_events`.

The algorithm (docs/erasure.md, "Forgetting events"):

1. Under the user's lock (waiting for a compression, as a user erasure does). An unfinished fold of
   an interrupted compression is finished first, so every summarised event is in the archive.
2. Resolve the events: the user's events in ``user_memory`` and the archive with those event ids
   (or in ``[since, until)``). Every version from the first one that folded any of them (an
   archived event's ``summary_version``; for a time range also every version whose ``covers``
   overlaps it) up to the current one has seen their facts: those versions are *tainted*.
3. Record the intent in the profile (``memory_forget``: the events' ``_id``s, the tainted range, the
   base, the expected and new versions). From now on compressions refuse the user.
4. Delete the events from ``user_memory`` and the archive (by ``_id``).
5. Rebuild: start from the newest kept version in the current lineage below the tainted range (the
   empty summary, version 0, at worst) and re-fold the archived events after it, minus the
   forgotten ones and minus any that are back in ``user_memory``, with the summariser; validate it;
   write it to the history (kind ``forget``) and commit it through the guarded profile commit as a
   new version. Nothing the archive no longer holds can be re-folded: the result says which
   versions' facts, and how many events, could not be kept.
6. Drop every tainted history version (forgetting wins over remembering: the one case where
   history is deleted), write the content-free audit record, clear the intent.

Every step is safe to repeat and the intent says where the run was, so a kill at any step followed
by a re-run ends as one clean forget.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.core.errors import ConcurrentUpdateError, ErasurePendingError, ForgetInputError, InvalidProfileError
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold import metrics as m
from butler_memory.fold.rebuild import Checkpoint, finish_interrupted, no_checkpoint, summarizer_identity
from butler_memory.llm.budget import Spent
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.engine import Engine
from butler_memory.operations.erasure import (
    ALREADY_ERASED,
    DONE,
    DRY_RUN,
    MIN_SECRET_CHARS,
    AuditLog,
    ErasureResult,
    acquire_waiting,
    event_ref,
    subject_ref,
)
from butler_memory.operations.refold import Rebuilt, refold_archived
from butler_memory.storage.archive import archived_versions
from butler_memory.storage.history import BASELINE, FORGET, HistoryEntry, Key
from butler_memory.storage.locks import UserLock, UserLocks
from butler_memory.storage.mongo import sanitized_errors
from butler_memory.storage.profiles import ERASING_FIELD, FORGET_FIELD, THROUGH_FIELD, VERSION_FIELD, Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STEPS = ("locked", "planned", "deleted", "summarized", "recorded", "committed", "dropped", "audited", "cleared")

FORGOTTEN = "forgotten"
MAX_EVENT_IDS = 10_000
"""Most event ids one request may name (they ride in the profile's intent)."""


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Request:
    """What to forget: event ids, or a time range ``[since, until)``."""

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
    """Parse an ISO 8601 time (a naive one is UTC); a ForgetInputError names the bad value."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ForgetInputError(f"{name} {value!r} is not an ISO 8601 time (e.g. 2026-03-01T12:00:00Z)") from None
    else:
        raise ForgetInputError(f"{name} must be an ISO 8601 time, got {type(value).__name__}")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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

    @property
    def tainted(self) -> list[int]:
        """Return the versions to drop from the history."""
        if self.first_tainted is None:
            return []
        return list(range(self.first_tainted, self.expected_version + 1))

    def to_intent(self, intent_id: str, request: Request, now: datetime, run_id: str) -> dict[str, Any]:
        """Return the profile's ``memory_forget`` intent."""
        return {
            "id": intent_id,
            "run_id": run_id,
            "started_at": now,
            "request": request.to_doc(),
            "ids": self.ids,
            "in_events": self.in_events,
            "in_archive": self.in_archive,
            "already": self.already,
            "expected_version": self.expected_version,
            "first_tainted": self.first_tainted,
            "base_version": self.base_version,
            "lost": self.lost,
            "refold_count": len(self.refold_ids),
        }


def forget_events(
    user_id: str,
    *,
    engine: Engine,
    secret: bytes | None,
    event_ids: Sequence[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    dry_run: bool = False,
    requested_by: str = "api",
    run_id: str | None = None,
    checkpoint: Checkpoint = no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
    sleep: Callable[[float], None] | None = None,
) -> ErasureResult:
    """Forget some of a user's events everywhere and rebuild their summary without them.

    Give ``event_ids`` (the Butler's ``event_id``) or both ``since`` and ``until`` (ISO 8601 or
    datetimes; ``until`` excluded). Raises ForgetInputError on bad input (unknown user, another
    user's event, an unknown event, an empty or inverted range), having changed nothing.
    """
    started = time.monotonic()
    if not isinstance(user_id, str) or not user_id.strip():
        raise ForgetInputError(f"user id must be a non-empty string, got {user_id!r}")
    request = build_request(event_ids, since, until)
    with m.observe_operation(engine.metrics, m.FORGET, dry_run=dry_run, input_errors=(ForgetInputError,)) as touched:
        result = _forget(user_id, request, engine, secret, dry_run, requested_by, run_id, checkpoint, clock, sleep)
        touched.changed = result.status == FORGOTTEN
        touched.events = sum(result.removed.values()) if touched.changed else 0
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _forget(
    user_id: str,
    request: Request,
    engine: Engine,
    secret: bytes | None,
    dry_run: bool,
    requested_by: str,
    run_id: str | None,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
    sleep: Callable[[float], None] | None,
) -> ErasureResult:
    store, settings = engine.store, engine.settings
    audit = AuditLog(store)
    if dry_run:
        with sanitized_errors(user_id, "forget"):
            profile = store.load_profile(user_id, create=False)
            _check_known(store, user_id, profile)
            plan = _plan(store, user_id, profile, request, secret, audit)
        result = _result(DRY_RUN, plan, None, secret, user_id)
    else:
        if secret is None:
            raise SettingsError("a forget needs the secret of its audit references (see erasure.erasure_secret)")
        lock = acquire_waiting(engine.locks, user_id, settings.erasure_lock_wait_seconds, sleep=sleep)
        try:
            checkpoint("locked")
            with sanitized_errors(user_id, "forget"):
                result = _forget_locked(
                    user_id, request, engine, lock, audit, secret, requested_by, run_id, checkpoint, clock
                )
        finally:
            lock.release()
    return result


def _check_known(store: MemoryStore, user_id: str, profile: Profile) -> None:
    if profile.version or profile.summary or store.events.find_one({"user_id": user_id}, {"_id": 1}):
        return
    if store.archive_coll.find_one({"user_id": user_id}, {"_id": 1}) or store.profiles.find_one({"user_id": user_id}):
        return
    raise ForgetInputError(f"user {user_id!r}: unknown here (no events, profile or archive)")


def _forget_locked(
    user_id: str,
    request: Request,
    engine: Engine,
    lock: UserLock,
    audit: AuditLog,
    secret: bytes,
    requested_by: str,
    run_id: str | None,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
) -> ErasureResult:
    store = engine.store
    profile = store.load_profile(user_id, create=False)
    intent = _intent(store, user_id)
    if intent is not None:
        log.info("user %s: finishing an interrupted forget (%s)", user_id, intent["id"])
        finished = _finish(user_id, intent, engine, lock, audit, secret, requested_by, checkpoint, clock)
        if _same_request(intent["request"], request):
            return finished
        profile = store.load_profile(user_id, create=False)
    if store.profiles.find_one({"user_id": user_id, ERASING_FIELD: {"$ne": None}}, {"_id": 1}):
        raise ErasurePendingError(
            f"user {user_id!r}: an erasure of the whole user is unfinished; finish it first "
            "(python -m butler_memory forget --user ...); nothing was changed",
            user_id=user_id,
        )
    _check_known(store, user_id, profile)
    # An interrupted rollback or fold left events the summary covers in user_memory: finish it first,
    # so every summarised event is in the archive (and never re-summarised).
    profile, _ = finish_interrupted(profile, store, lock, run_id="forget", clock=clock, metrics=engine.metrics)
    plan = _plan(store, user_id, profile, request, secret, audit)
    if not plan.ids and plan.first_tainted is None:
        return _result(ALREADY_ERASED, plan, None, secret, user_id)
    intent_id = uuid.uuid4().hex
    intent = plan.to_intent(intent_id, request, clock(), run_id or f"forget__{intent_id[:12]}")
    store.load_profile(user_id, create=True)  # a user with events but no profile yet gets one for the intent
    res = store.profiles.update_one(
        {"user_id": user_id, FORGET_FIELD: None, VERSION_FIELD: profile.version or {"$in": [0, None]}},
        {"$set": {FORGET_FIELD: intent}},
    )
    if res.matched_count != 1:
        raise ConcurrentUpdateError(
            f"user {user_id!r}: profile changed while planning the forget; nothing was changed, run it again",
            user_id=user_id,
        )
    checkpoint("planned")
    return _finish(user_id, intent, engine, lock, audit, secret, requested_by, checkpoint, clock)


def _intent(store: MemoryStore, user_id: str) -> dict[str, Any] | None:
    doc = store.profiles.find_one({"user_id": user_id}, {FORGET_FIELD: 1}) or {}
    intent = doc.get(FORGET_FIELD)
    return intent if isinstance(intent, dict) else None


def _same_request(stored: dict[str, Any], request: Request) -> bool:
    def utc(value: datetime | None) -> datetime | None:
        return None if value is None else (value.replace(tzinfo=UTC) if value.tzinfo is None else value)

    return (
        list(stored.get("event_ids") or []) == list(request.event_ids)
        and utc(stored.get("since")) == request.since
        and utc(stored.get("until")) == request.until
    )


# -- planning ------------------------------------------------------------------------------------


def _plan(
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
    history = store.history.versions(user_id, through=current, text=False)
    if request.since is not None and request.until is not None:
        versions += _versions_touching(store, user_id, history, request.since, request.until)
    folded = [v for v in versions if 0 < v <= current]
    first_tainted = min(folded) if folded else None
    ids = [d["_id"] for d in raw] + [d["_id"] for d in archived if d["_id"] not in in_memory]
    ids += [d["_id"] for d in quarantined if d["_id"] not in set(ids)]
    base, refold, lost = 0, list[Any](), dict[str, Any]()
    if first_tainted is not None:
        base, refold, lost = _rebuild_plan(store, user_id, current, first_tainted, set(ids), history)
    if not ids and first_tainted is None and request.mode == "range":
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
    )


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
    lineage = store.history.lineage(user_id, through=current)
    kept = [e.version for e in lineage if e.version < first_tainted]
    base = max(kept) if kept else 0
    if base and store.history.version(user_id, base) is None:
        base = 0
    return base, refold_ids(store, user_id, base, current, forgotten), _losses(store, user_id, base, current, history)


def _losses(store: MemoryStore, user_id: str, base: int, current: int, history: list[HistoryEntry]) -> dict[str, Any]:
    """Return what a rebuild on ``base`` cannot re-fold: events of versions after it no longer
    archived, versions no longer (or never) in the history; empty when nothing is lost."""
    by_version = {e.version: e for e in history if base < e.version <= current}
    missing = [v for v in range(base + 1, current + 1) if v not in by_version]
    unrecorded = [e.version for e in by_version.values() if e.covers is None and e.kind == "baseline"]
    expected = sum(e.covers.count for e in by_version.values() if e.covers is not None)
    archived = sum(store.archived_counts(user_id, list(range(base + 1, current + 1))).values())
    lost: dict[str, Any] = {}
    if expected > archived:
        lost["events_not_in_archive"] = expected - archived
    if missing:
        lost["versions_without_history"] = _ranges(missing)
    if unrecorded:
        lost["versions_from_before_history"] = unrecorded
    if lost:
        lost["versions"] = [base + 1, current]
    return lost


def _ranges(numbers: list[int]) -> list[list[int]]:
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


# -- doing it ------------------------------------------------------------------------------------


def _finish(
    user_id: str,
    intent: dict[str, Any],
    engine: Engine,
    lock: UserLock,
    audit: AuditLog,
    secret: bytes,
    requested_by: str,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
) -> ErasureResult:
    """Carry out a recorded intent from wherever an earlier run stopped."""
    store = engine.store
    ids = list(intent["ids"])
    store.delete(user_id, ids)
    store.delete_archived(user_id, ids)
    store.delete_quarantined(user_id, ids)
    checkpoint("deleted")

    expected = int(intent["expected_version"])
    first_tainted = intent.get("first_tainted")
    new_version = None
    refolded = int(intent.get("refold_count") or 0)
    if first_tainted is not None:
        new_version = expected + 1
        profile = store.load_profile(user_id, create=False)
        if profile.version > expected and not _committed_by(store, profile, intent, new_version):
            # Someone folded on top of the summary that still holds the forgotten facts (the bot's inline
            # compression, after a killed forget's lock expired): those versions are tainted too.
            intent = _extend(store, user_id, intent, profile.version)
            expected, new_version = profile.version, profile.version + 1
        if profile.version < expected:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: summary version is {profile.version}, the forget expected {expected} or "
                f"more; nothing more was changed, see docs/erasure.md",
                user_id=user_id,
            )
        if profile.version == expected:
            through = profile.through
            if through is None:
                raise InvalidProfileError(user_id, THROUGH_FIELD, "is missing, yet a summary version folded events")
            rebuilt = _rebuild(user_id, intent, engine, lock)
            text, refolded = rebuilt.text, rebuilt.count
            checkpoint("summarized")
            now = clock()
            store.history.write_version(
                HistoryEntry(
                    user_id,
                    new_version,
                    text,
                    FORGET,
                    intent.get("run_id"),
                    int(intent["base_version"]),
                    now,
                    through=Key(through.created_at, through.id),
                    covers=rebuilt.covers,
                    guards=dict(rebuilt.guards),
                    refolded_from=int(intent["base_version"]),
                    **summarizer_identity(engine.summarizer),
                )
            )
            checkpoint("recorded")
            lock.extend()  # the lock must still be ours right before the write
            store.commit_summary(
                user_id,
                expected_version=expected,
                summary=text,
                through=through,
                ids=[],
                run_id=str(intent.get("run_id")),
                now=now,
                target=profile.fold_target,
            )
        store.clear_pending(user_id, new_version)
        # The re-folded events now belong to the new version (as a fold's events do to it), so "which
        # version saw event E" stays a lookup in the archive.
        relabel = refold_ids(store, user_id, int(intent["base_version"]), expected, set(ids))
        store.relabel_archived(user_id, relabel, base=int(intent["base_version"]), version=new_version)
        checkpoint("committed")
        tainted = list(range(int(first_tainted), expected + 1))
        store.history.coll.delete_many({"user_id": user_id, "version": {"$in": tainted}})
    checkpoint("dropped")

    request = intent["request"]
    record = {
        "kind": "events",
        "subject": subject_ref(secret, user_id),
        "state": DONE,
        "requested_at": intent["started_at"],
        "finished_at": clock(),
        "requested_by": requested_by,
        "event_refs": [event_ref(secret, user_id, i) for i in request.get("event_ids") or []],
        "range": None if not request.get("since") else {"since": request["since"], "until": request["until"]},
        "removed": {"events": intent["in_events"], "archive": intent["in_archive"]},
        "summary": {
            "rebuilt_from_version": intent["base_version"] if first_tainted is not None else None,
            "new_version": new_version,
            "versions_dropped": _ranges(list(range(int(first_tainted), expected + 1))) if first_tainted else [],
            "events_refolded": refolded,
        },
        "lost": intent.get("lost") or {},
    }
    audit.coll.update_one({"_id": intent["id"]}, {"$setOnInsert": record}, upsert=True)
    checkpoint("audited")
    store.profiles.update_one({"user_id": user_id, f"{FORGET_FIELD}.id": intent["id"]}, {"$set": {FORGET_FIELD: None}})
    checkpoint("cleared")
    log.info(
        "user %s: forgot %d event(s) (%d in user_memory, %d archived); summary %s",
        user_id,
        len(ids),
        intent["in_events"],
        intent["in_archive"],
        f"v{new_version} rebuilt from v{intent['base_version']}" if new_version else "unchanged",
    )
    result = ErasureResult(
        FORGOTTEN,
        "events",
        erasure_id=intent["id"],
        subject=subject_ref(secret, user_id),
        removed={"events": intent["in_events"], "archive": intent["in_archive"]},
        summary_version=new_version,
        rebuilt_from_version=intent["base_version"] if new_version else None,
        versions_dropped=list(range(int(first_tainted), expected + 1)) if first_tainted else [],
        events_refolded=refolded,
        lost=dict(intent.get("lost") or {}),
    )
    result.notes = _notes(result, intent.get("already") or [])
    return result


def _committed_by(store: MemoryStore, profile: Profile, intent: dict[str, Any], new_version: int) -> bool:
    """Return whether the profile's current version is this forget's own commit."""
    if profile.version != new_version:
        return False
    entry = store.history.version(profile.user_id, new_version)
    return (
        entry is not None
        and entry.kind == FORGET
        and entry.run_id == intent.get("run_id")
        and entry.text == profile.summary
    )


def _extend(store: MemoryStore, user_id: str, intent: dict[str, Any], current: int) -> dict[str, Any]:
    """Widen an intent to versions committed on top of it since it was recorded; return it updated."""
    base = int(intent["base_version"])
    history = store.history.versions(user_id, through=current, text=False)
    changes = {
        "expected_version": current,
        "lost": _losses(store, user_id, base, current, history),
        "refold_count": len(refold_ids(store, user_id, base, current, set(intent["ids"]))),
    }
    log.warning("user %s: versions up to v%d were committed during the forget; they are rebuilt too", user_id, current)
    store.profiles.update_one(
        {"user_id": user_id, f"{FORGET_FIELD}.id": intent["id"]},
        {"$set": {f"{FORGET_FIELD}.{name}": value for name, value in changes.items()}},
    )
    return {**intent, **changes}


def _rebuild(user_id: str, intent: dict[str, Any], engine: Engine, lock: UserLock) -> Rebuilt:
    """Re-fold the kept archived events after the base version (``refold.refold_archived``: the
    summariser, the validation and the guards, as a compression folds them, on the day's budget)."""
    store, settings = engine.store, engine.settings
    base, current = int(intent["base_version"]), int(intent["expected_version"])
    entry = store.history.version(user_id, base)
    profile = store.load_profile(user_id, create=False)
    return refold_archived(
        user_id,
        lock,
        entry.text if entry is not None else "",
        refold_ids(store, user_id, base, current, set(intent["ids"])),
        profile.language or settings.summary_language,
        settings=settings,
        store=store,
        summarizer=engine.summarizer,
        metrics=engine.metrics,
        spent=Spent(engine.budget),
    )


def refold_ids(store: MemoryStore, user_id: str, base: int, current: int, forgotten: set[Any]) -> list[Any]:
    """Return the ``_id``s a rebuild on ``base`` re-folds, oldest first: the archived events of versions
    after it, minus the forgotten ones and minus any back in user_memory (a rollback put them there:
    they are not in the summary)."""
    ids = [i for i in store.archived_ids(user_id, range(base + 1, current + 1)) if i not in forgotten]
    back = {doc["_id"] for doc in store.find_by_ids(user_id, ids)} if ids else set()
    return [i for i in ids if i not in back]


def _result(status: str, plan: Plan, intent_id: str | None, secret: bytes | None, user_id: str) -> ErasureResult:
    result = ErasureResult(
        status,
        "events",
        erasure_id=intent_id,
        subject=None if secret is None else subject_ref(secret, user_id),
        removed={"events": plan.in_events, "archive": plan.in_archive},
        summary_version=None if plan.first_tainted is None else plan.expected_version + 1,
        rebuilt_from_version=None if plan.first_tainted is None else plan.base_version,
        versions_dropped=plan.tainted,
        events_refolded=len(plan.refold_ids),
        lost=plan.lost,
    )
    result.notes = _notes(result, plan.already)
    return result


def _notes(result: ErasureResult, already: list[str]) -> list[str]:
    notes = []
    if already:
        notes.append(f"{len(already)} requested event(s) had already been forgotten by an earlier request")
    if result.summary_version is None:
        notes.append("no summary version had folded these events: the summary is unchanged")
    lost = result.lost
    if lost.get("events_not_in_archive"):
        first, last = lost["versions"]
        notes.append(
            f"{lost['events_not_in_archive']} event(s) folded in versions {first}..{last} are no longer in the "
            "archive (retention): what the summary had learned from them could not be kept"
        )
    if lost.get("versions_without_history"):
        notes.append(
            f"versions {lost['versions_without_history']} are no longer in the history: facts they held beyond "
            "the archived events could not be kept"
        )
    if lost.get("versions_from_before_history"):
        notes.append(
            f"versions {lost['versions_from_before_history']} were written before the history existed: what "
            "they held beyond the archived events could not be kept"
        )
    return notes


def erase_events(
    user_id: str,
    *,
    db: Database[Any],
    redis_client: redis.Redis,
    summarizer: Summarizer,
    secret: str | bytes,
    event_ids: Sequence[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Forget some of a user's events: the call for the Butler's own deletion flow (no Airflow).

    ``summarizer`` rebuilds the summary (e.g. ``OpenAISummarizer(LLMConfig(...))``, the same model
    the compression uses). Returns the result as a dict (counts, versions; no content).
    """
    settings = settings or Settings.from_env()
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_CHARS:
        raise SettingsError(f"the erasure secret must be at least {MIN_SECRET_CHARS} characters")
    engine = Engine(settings, MemoryStore(db, settings), UserLocks(redis_client, settings), summarizer)
    result = forget_events(
        user_id, engine=engine, secret=key, event_ids=event_ids, since=since, until=until, requested_by="butler"
    )
    return result.to_dict()
