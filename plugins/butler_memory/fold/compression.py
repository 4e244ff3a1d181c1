"""compress_user(): fold a user's older events into their rolling summary, crash-safely.

No Airflow imports here: the DAG, the CLI and the tests all call the same function.

Invariants (see docs/architecture.md):
1. Nothing happens without the user's Redis lock; a lock held by anyone else skips the user.
2. The events to fold are an explicit list of ``_id``s taken once, under the lock: all but the
   newest ``keep_last_n``. Events that arrive later are never in it, whatever their timestamps.
3. Each chunk's summary, watermark, new version and the chunk's ``_id`` list ("pending fold") are
   written in one ``update_one`` guarded by the old version. Only then are those events archived
   and deleted, by ``_id``, each right after the lock is extended and the pending fold found still
   this run's (``fence_pending``); then the pending fold is cleared.
4. A pending fold found at start was summarised by an interrupted run: it is finished (archive,
   delete, clear) and never summarised again. So a kill between any two steps, followed by a
   re-run, ends as one clean run would, with each event summarised exactly once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from butler_memory.core.errors import CompressionError, ErasurePendingError, GuardRejected, InvalidEventError
from butler_memory.core.ids import check_user_id
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.chunks import chunks, event_text, fold_list, quarantine_event
from butler_memory.fold.metrics import Metrics
from butler_memory.fold.rebuild import (
    Checkpoint,
    Parts,
    fence_pending,
    finish_interrupted,
    no_checkpoint,
    propose_summary,
    record_baseline,
    summarizer_identity,
)
from butler_memory.llm.budget import Spent
from butler_memory.llm.prompt import known_language
from butler_memory.storage.events import EventKey
from butler_memory.storage.history import FOLD, Covers, HistoryEntry, Key
from butler_memory.storage.locks import UserLock
from butler_memory.storage.mongo import event_digest, id_key, sanitized_errors
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STEPS = (
    "locked",
    "pending_archived",
    "pending_deleted",
    "selected",
    "quarantined",
    "quarantine_removed",
    "summarized",
    "recorded",
    "committed",
    "archived",
    "deleted",
    "cleared",
)

# Statuses of a user's result.
COMPRESSED = "compressed"
DRY_RUN = "dry_run"
SKIPPED_LOCKED = "skipped_locked"
SKIPPED_BELOW_THRESHOLD = "skipped_below_threshold"
SKIPPED_BUDGET = "skipped_budget"
"""The day's LLM token budget was spent before this user was started (butler_memory.llm.budget)."""
SKIPPED_STALE = "skipped_stale"
"""Batch mode: the user's summary or frozen events changed between prepare and commit; the batch's
reply was dropped, nothing was deleted, the next run folds the user again (butler_memory.operations.batch)."""
FAILED = "failed"


@dataclass(frozen=True)
class FrozenFold:
    """A fold frozen at a batch run's prepare: the events (``_id`` and digest) and the version it
    builds on, and the hash of the prompt sent. Committed only if all are unchanged (optimistic)."""

    version: int
    ids: list[Any]
    digests: list[str]
    prompt_hash: str


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass
class UserResult:
    """What happened to one user: ids, counts and sizes only, never content."""

    user_id: str
    status: str
    events_before: int = 0
    events_folded: int = 0
    events_deleted: int = 0
    events_after: int = 0
    events_quarantined: int = 0
    """Events moved to the quarantine collection: they cannot be folded (see ``quarantine_event``)."""
    fold_capped: bool = False
    """The run folded ``max_fold_events`` and left older-than-kept events for the next run."""
    events_left: int = 0
    """Events over ``keep_last_n`` the cap left for the next run (0 when not capped)."""
    language_unknown: bool = False
    """The profile's language is not a known code: summarised in ``summary_language`` instead."""
    chunks: int = 0
    summary_chars: int = 0
    summary_version: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    freshness_seconds: float | None = None
    """From the event that took the user over the threshold to the commit that folded it."""
    seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None
    guards: dict[str, str] = field(default_factory=dict)
    """``{guard: outcome}``, the worst over the user's chunks ("pass", "warn", "reject", "off")."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (fit for XCom)."""
        return asdict(self)


def compress_user(
    parts: Parts,
    user_id: str,
    *,
    run_id: str = "manual",
    dry_run: bool = False,
    checkpoint: Checkpoint = no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
    holder: str | None = None,
    frozen: FrozenFold | None = None,
) -> UserResult:
    """Fold all but the newest ``keep_last_n`` events of one user into their summary.

    With ``frozen`` (a batch run's commit), fold exactly the frozen events instead, and only when
    the summary version and every one of those events are as they were frozen; else the result is
    ``skipped_stale`` and nothing is written.

    ``holder`` names who takes the lock (the DAG: dag, run, task and map index): a lock left by an
    earlier, killed attempt of the same holder is waited out instead of read as someone else's.

    Raises a ``CompressionError`` subclass when the user could not be compressed; its
    ``retryable`` says whether a later attempt can succeed unchanged. Nothing is ever deleted
    before a summary covering it is stored. With the parts' token ``budget`` spent, the user is not
    started (``skipped_budget``); once started, a user is finished whatever the budget.
    ``Engine.compress`` is this function on the engine's parts. An id that is not a user id
    (``core.ids.valid_user_id``) raises InvalidUserIdError before the lock: a user the job cannot
    erase by its id gets no summary (the scans, the DAG and the CLI check theirs before: a backstop).
    """
    metrics, budget = parts.metrics, parts.budget
    started = time.monotonic()
    check_user_id(user_id)
    if budget is not None and not dry_run and budget.exhausted():
        log.info(
            "user %s: today's LLM token budget (%d) is spent, leaving the user for tomorrow", user_id, budget.limit
        )
        metrics.incr(m.USERS_SKIPPED_BUDGET_TOTAL)
        return UserResult(user_id, SKIPPED_BUDGET, seconds=time.monotonic() - started)
    lock = parts.locks.acquire(user_id, holder=holder)
    if lock is None:
        log.info("user %s: lock held by another compression, skipping", user_id)
        metrics.incr(m.USERS_SKIPPED_LOCKED_TOTAL)
        return UserResult(user_id, SKIPPED_LOCKED, seconds=time.monotonic() - started)
    spent = Spent(budget)
    try:
        checkpoint("locked")
        with sanitized_errors(user_id, "compression"):
            result = _compress_locked(parts, user_id, lock, run_id, dry_run, checkpoint, clock, spent, frozen)
    except CompressionError as exc:  # the failed user's result reports every token its attempt spent
        exc.prompt_tokens, exc.completion_tokens = spent.prompt_tokens, spent.completion_tokens
        raise
    finally:
        lock.release()
    result.seconds = round(time.monotonic() - started, 3)
    metrics.timing(m.USER_DURATION_SECONDS, result.seconds)
    return result


def _compress_locked(
    parts: Parts,
    user_id: str,
    lock: UserLock,
    run_id: str,
    dry_run: bool,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
    spent: Spent,
    frozen: FrozenFold | None = None,
) -> UserResult:
    settings, store, summarizer, metrics = parts.settings, parts.store, parts.summarizer, parts.metrics
    # The lease fences this run's commits (LEASE_FIELD): whoever takes the user after us replaces it.
    lease = None if dry_run else uuid.uuid4().hex
    profile = store.load_profile(user_id, create=not dry_run, lease=lease)
    if profile.erasing:
        # Forgetting wins: folding more into a summary an erasure is about to rebuild or remove would
        # either undo the erasure or be lost by it.
        raise ErasurePendingError(
            f"user {user_id!r}: an erasure of this user (or of some of their events) is unfinished; "
            "re-run it (python -m butler_memory forget --user ...) and compress afterwards",
            user_id=user_id,
        )
    result = UserResult(user_id, COMPRESSED, summary_version=profile.version, summary_chars=len(profile.summary))
    if not dry_run:
        profile, deleted = finish_interrupted(
            profile, store, lock, run_id=run_id, clock=clock, metrics=metrics, checkpoint=checkpoint
        )
        result.events_deleted += deleted

    def quarantine(event_id: Any, exc: InvalidEventError) -> None:
        result.events_quarantined += quarantine_event(
            user_id, event_id, exc, store, lock, metrics, run_id=run_id, now=clock(), checkpoint=checkpoint
        )

    result.events_before = store.count_events(user_id)
    misdated: list[Any] = []
    keys = (  # a batch run's commit folds exactly the frozen events, or nothing
        fold_list(user_id, profile, store, settings, result.events_before, dry_run, misdated)
        if frozen is None
        else _frozen_keys(profile, store, frozen, run_id, metrics, result)
    )
    if not dry_run:
        for event_id in misdated:
            quarantine(event_id, InvalidEventError(user_id, event_id, "created_at", "is missing or not a date"))
    if keys is None:
        return _not_folded(result, store, settings, metrics, frozen is not None)
    _note_cap(result, keys, settings, len(misdated))
    checkpoint("selected")
    if dry_run:
        # Events of an unfinished fold are already summarised: a real run deletes them, never folds them.
        pending = {id_key(i) for i in profile.pending.ids} if profile.pending is not None else set()
        result.status = DRY_RUN
        result.events_folded = sum(1 for key in keys if id_key(key.id) not in pending)
        result.events_after = result.events_before - len(keys)
        return result

    # Read before anything is deleted: the event that took the user over the threshold (freshness).
    crossed_at = (
        store.nth_event_time(user_id, settings.threshold) if result.events_before > settings.threshold else None
    )
    log.info("user %s: folding %d of %d events", user_id, len(keys), result.events_before)
    language = _summary_language(profile, settings, result)
    summary, version = profile.summary, profile.version
    target: EventKey | None = None
    # Late binding on purpose: each chunk's budget is taken with the summary it folds into.
    stream = chunks(user_id, keys, store, settings, summarizer, language, lambda: summary, quarantine)
    for chunk in stream:
        events = [event_text(user_id, ev) for ev in chunk]
        # spent counts every token, a refused reply's too
        text, outcomes = propose_summary(
            parts, user_id, summary, events, language, worst=result.guards, spent=spent, lock=lock
        )
        result.prompt_tokens, result.completion_tokens = spent.prompt_tokens, spent.completion_tokens
        checkpoint("summarized")

        lock.extend()  # the lock must still be ours right before the write
        ids = [ev["_id"] for ev in chunk]
        last = EventKey(chunk[-1]["created_at"], chunk[-1]["_id"])
        # Until the last chunk, the commit records where this fold ends, so a re-run after a kill finishes it.
        target = None if last.id == keys[-1].id else keys[-1]
        now = clock()
        # History first: an entry the profile never reaches (a kill before the commit) is overwritten by the re-run.
        assert lease is not None  # a dry run returned before the first chunk
        ours = partial(store.still_at, user_id, version, lease=lease)
        if version == profile.version:
            record_baseline(store, profile, clock, ours)
        store.history.write_version(
            HistoryEntry(
                user_id,
                version + 1,
                text,
                FOLD,
                run_id,
                version,
                now,
                through=Key(last.created_at, last.id),
                covers=Covers(Key(chunk[0]["created_at"], chunk[0]["_id"]), Key(last.created_at, last.id), len(chunk)),
                guards=outcomes,
                **summarizer_identity(summarizer),
            ),
            ours,
        )
        checkpoint("recorded")
        version = store.commit_summary(
            user_id,
            expected_version=version,
            summary=text,
            through=last,
            ids=ids,
            run_id=run_id,
            now=now,
            target=target,
            digests=[event_digest(ev) for ev in chunk],
            lease=lease,
        )
        summary = text
        result.chunks += 1
        result.events_folded += len(chunk)
        metrics.incr(m.EVENTS_FOLDED_TOTAL, len(chunk))
        checkpoint("committed")

        # Each write after the commit is fenced: a run stalled past the lock's TTL stops before it.
        fence_pending(store, lock, user_id, version)
        archived = store.archive(chunk, run_id=run_id, version=version, now=now)
        metrics.incr(m.EVENTS_ARCHIVED_TOTAL, archived)
        checkpoint("archived")
        fence_pending(store, lock, user_id, version)
        deleted = store.delete_unchanged(user_id, chunk)  # an event edited meanwhile stays
        if deleted < len(chunk):
            log.info("user %s: %d event(s) changed during compression; kept", user_id, len(chunk) - deleted)
        result.events_deleted += deleted
        metrics.incr(m.EVENTS_DELETED_TOTAL, deleted)
        checkpoint("deleted")
        store.clear_pending(user_id, version)  # matched on the fold's version: harmless when late
        checkpoint("cleared")
    # The fold list's last events were quarantined (or, resuming a killed run's list, all of them):
    # nothing of it is left to fold.
    if target is not None or (not result.chunks and profile.fold_target is not None):
        store.clear_fold_target(user_id, version)

    result.summary_version, result.summary_chars = version, len(summary)
    if crossed_at is not None and result.chunks:
        result.freshness_seconds = round(max((now - crossed_at).total_seconds(), 0.0), 3)
        metrics.timing(m.FRESHNESS_LAG_SECONDS, result.freshness_seconds)
    result.events_after = store.count_events(user_id)
    if result.fold_capped:
        metrics.incr(m.USERS_FOLD_CAPPED_TOTAL)
        log.info(
            "user %s: max_fold_events (%d) reached; %d event(s) left for the next run",
            user_id,
            settings.max_fold_events,
            result.events_left,
        )
    log.info(
        "user %s: folded %d events in %d chunk(s), deleted %d, %d left, summary v%d %d chars",
        user_id,
        result.events_folded,
        result.chunks,
        result.events_deleted,
        result.events_after,
        version,
        result.summary_chars,
    )
    return result


def _not_folded(
    result: UserResult, store: MemoryStore, settings: Settings, metrics: Metrics, frozen: bool
) -> UserResult:
    """Finish the result of a user with nothing to fold: under the threshold, or (``frozen``) a
    batch commit found stale or already done (``_frozen_keys`` set its status)."""
    if frozen:
        result.events_after = store.count_events(result.user_id)
        return result
    log.info("user %s: %d events, not over threshold %d", result.user_id, result.events_before, settings.threshold)
    metrics.incr(m.USERS_SKIPPED_BELOW_THRESHOLD_TOTAL)
    result.status = SKIPPED_BELOW_THRESHOLD
    result.events_after = result.events_before
    return result


def _frozen_keys(
    profile: Profile, store: MemoryStore, frozen: FrozenFold, run_id: str, metrics: Metrics, result: UserResult
) -> list[EventKey] | None:
    """Return the keys of a frozen fold's events, in its order, when the profile is still at its
    version and every event is still there unchanged; else None, with ``result``'s status set.

    A profile one version on, by this run, was committed by an earlier attempt of this commit (the
    re-run after a kill finished its archive and delete above): compressed, not stale.
    """
    user_id = profile.user_id
    if profile.version != frozen.version or profile.fold_target is not None:
        mine = store.history.version(user_id, frozen.version + 1)
        if profile.version == frozen.version + 1 and mine is not None and mine.run_id == run_id:
            log.info("user %s: the batch reply was committed by an earlier attempt of this run", user_id)
            result.status, result.summary_version, result.chunks = COMPRESSED, profile.version, 1
            result.events_folded = len(frozen.ids)
            return None
        reason = f"summary v{frozen.version} -> v{profile.version}"
    else:
        by_id = {id_key(ev["_id"]): ev for ev in store.find_by_ids(user_id, frozen.ids)}
        keys: list[EventKey] = []
        for event_id, digest in zip(frozen.ids, frozen.digests, strict=True):
            ev = by_id.get(id_key(event_id))
            if ev is None or event_digest(ev) != digest or not isinstance(ev.get("created_at"), datetime):
                break
            keys.append(EventKey(ev["created_at"], ev["_id"]))
        else:
            return keys
        reason = f"{len(frozen.ids) - len(keys)} or more frozen event(s) changed or gone"
    log.info("user %s: stale since the batch was prepared (%s); reply dropped, nothing deleted", user_id, reason)
    metrics.incr(m.USERS_SKIPPED_STALE_TOTAL)
    result.status = SKIPPED_STALE
    return None


def _note_cap(result: UserResult, keys: list[EventKey], settings: Settings, misdated: int) -> None:
    """Record in ``result`` whether ``max_fold_events`` cut the fold list, and how many events it left."""
    if len(keys) < settings.max_fold_events:
        return
    left = result.events_before - misdated - settings.keep_last_n - len(keys)
    if left > 0:
        result.fold_capped, result.events_left = True, left


def _summary_language(profile: Profile, settings: Settings, result: UserResult) -> str:
    """Return the known language code to summarise in: the profile's, else ``summary_language``."""
    user_id, language = profile.user_id, profile.language or settings.summary_language
    if known_language(language) is None:  # only the configured default can be unknown here
        raise CompressionError(
            f"user {user_id!r}: summary_language is not a known ISO 639-1 language code; fix the setting",
            user_id=user_id,
        )
    if profile.language_unknown:
        result.language_unknown = True
        log.warning(
            "user %s: profile field %r is not a known ISO 639-1 language code; summarising in %r",
            user_id,
            settings.language_field,
            settings.summary_language,
        )
    return language


def failed_result(user_id: str, exc: BaseException, seconds: float = 0.0) -> UserResult:
    """Describe a failure without content: the error type and its (content-free) message."""
    message = str(exc) if isinstance(exc, CompressionError) else f"unexpected {type(exc).__name__}"
    return UserResult(
        user_id,
        FAILED,
        error=message,
        error_type=type(exc).__name__,
        seconds=round(seconds, 3),
        prompt_tokens=exc.prompt_tokens if isinstance(exc, CompressionError) else 0,
        completion_tokens=exc.completion_tokens if isinstance(exc, CompressionError) else 0,
        guards=dict(exc.guards) if isinstance(exc, GuardRejected) else {},
    )
