"""compress_user(): fold a user's older events into their rolling summary, crash-safely.

No Airflow imports here: the DAG, the CLI and the tests all call the same function.

Invariants (see docs/architecture.md):
1. Nothing happens without the user's Redis lock; a lock held by anyone else skips the user.
2. The events to fold are an explicit list of ``_id``s taken once, under the lock: all but the
   newest ``keep_last_n``. Events that arrive later are never in it, whatever their timestamps.
3. Each chunk's summary, watermark, new version and the chunk's ``_id`` list ("pending fold") are
   written in one ``update_one`` guarded by the old version. Only then are those events archived
   and deleted, by ``_id``; then the pending fold is cleared.
4. A pending fold found at start was summarised by an interrupted run: it is finished (archive,
   delete, clear) and never summarised again. So a kill between any two steps, followed by a
   re-run, ends as one clean run would, with each event summarised exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypedDict

from butler_memory import guards
from butler_memory import metrics as m
from butler_memory.budget import Spent, TokenBudget
from butler_memory.errors import CompressionError, ErasurePendingError, GuardRejected, InvalidEventError, LLMError
from butler_memory.history import BASELINE, FOLD, Covers, HistoryEntry, Key, prompt_version
from butler_memory.injection import withheld
from butler_memory.locks import UserLock, UserLocks
from butler_memory.metrics import Metrics, NullMetrics
from butler_memory.prompt import SYSTEM_PROMPT, build_messages, event_line, known_language
from butler_memory.settings import Settings
from butler_memory.store import (
    Backlog,
    EventKey,
    MemoryStore,
    Profile,
    event_digest,
    id_key,
    sanitized_errors,
    undecodable_field,
)
from butler_memory.summarizer import EventText, Summarizer, Summary, SummaryRequest
from butler_memory.validation import validate_summary

if TYPE_CHECKING:
    from butler_memory.refold import RefoldResult
    from butler_memory.rollback import RollbackResult

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]
"""Called with a step name at every step boundary (tests kill the process there)."""

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
"""The day's LLM token budget was spent before this user was started (butler_memory.budget)."""
FAILED = "failed"


def _no_checkpoint(step: str) -> None:
    return None


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
    fold_capped: bool = False
    """The run folded ``max_fold_events`` and left older-than-kept events for the next run."""
    events_left: int = 0
    """Events over ``keep_last_n`` the cap left for the next run (0 when not capped)."""
    language_unknown: bool = False
    """The profile's language is not a known code: summarised in ``summary_language`` instead."""
    """Events moved to the quarantine collection: they cannot be folded (see ``quarantine_event``)."""
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


@dataclass(frozen=True)
class Engine:
    """The parts one compression needs, built once per task (see ``connections.build_engine``)."""

    settings: Settings
    store: MemoryStore
    locks: UserLocks
    summarizer: Summarizer
    metrics: Metrics = field(default_factory=NullMetrics)
    budget: TokenBudget | None = None
    """The daily token budget, when one is set."""

    def close(self) -> None:
        """Close every client the parts hold (MongoDB, Redis, LLM, StatsD)."""
        for part in (self.store, self.locks, self.summarizer, self.metrics):
            part.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def scan(
        self, *, limit: int | None = None, user_ids: Sequence[str] | None = None, dry_run: bool = False
    ) -> list[Backlog]:
        """Return users over the threshold, largest backlog first (a dry run creates no indexes)."""
        if not dry_run:  # a preview writes nothing: it must run with read-only credentials
            self.store.ensure_indexes()
        backlog = self.store.scan(self.settings.threshold, limit or self.settings.scan_limit, user_ids)
        self.metrics.gauge(m.BACKLOG_USERS, len(backlog))
        return backlog

    def compress(
        self,
        user_id: str,
        *,
        run_id: str = "manual",
        dry_run: bool = False,
        checkpoint: Checkpoint = _no_checkpoint,
        holder: str | None = None,
    ) -> UserResult:
        """Compress one user (see ``compress_user``)."""
        return compress_user(
            user_id,
            settings=self.settings,
            store=self.store,
            locks=self.locks,
            summarizer=self.summarizer,
            metrics=self.metrics,
            run_id=run_id,
            dry_run=dry_run,
            checkpoint=checkpoint,
            budget=self.budget,
            holder=holder,
        )

    def rollback(
        self,
        user_id: str,
        run_id: str,
        *,
        rollback_id: str,
        cascade: bool = False,
        allow_missing: bool = False,
        dry_run: bool = False,
        checkpoint: Checkpoint = _no_checkpoint,
    ) -> RollbackResult:
        """Undo one run for one user (see ``rollback.rollback_user``)."""
        from butler_memory.rollback import rollback_user

        return rollback_user(
            user_id,
            run_id,
            store=self.store,
            locks=self.locks,
            rollback_id=rollback_id,
            cascade=cascade,
            allow_missing=allow_missing,
            dry_run=dry_run,
            checkpoint=checkpoint,
            clock=utcnow,
        )

    def refold(
        self, user_id: str, *, run_id: str, dry_run: bool = False, checkpoint: Checkpoint = _no_checkpoint
    ) -> RefoldResult:
        """Rebuild one user's summary from the archive (see ``refold.refold_user``)."""
        from butler_memory.refold import refold_user

        return refold_user(
            user_id,
            settings=self.settings,
            store=self.store,
            locks=self.locks,
            summarizer=self.summarizer,
            metrics=self.metrics,
            run_id=run_id,
            dry_run=dry_run,
            checkpoint=checkpoint,
            clock=utcnow,
        )


def compress_user(
    user_id: str,
    *,
    settings: Settings,
    store: MemoryStore,
    locks: UserLocks,
    summarizer: Summarizer,
    metrics: Metrics | None = None,
    run_id: str = "manual",
    dry_run: bool = False,
    checkpoint: Checkpoint = _no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
    budget: TokenBudget | None = None,
    holder: str | None = None,
) -> UserResult:
    """Fold all but the newest ``keep_last_n`` events of one user into their summary.

    ``holder`` names who takes the lock (the DAG: dag, run, task and map index): a lock left by an
    earlier, killed attempt of the same holder is waited out instead of read as someone else's.

    Raises a ``CompressionError`` subclass when the user could not be compressed; its
    ``retryable`` says whether a later attempt can succeed unchanged. Nothing is ever deleted
    before a summary covering it is stored. With a token ``budget`` spent, the user is not started
    (``skipped_budget``); once started, a user is finished whatever the budget.
    """
    metrics = metrics or NullMetrics()
    started = time.monotonic()
    if not isinstance(user_id, str) or not user_id:
        raise CompressionError(f"user_id must be a non-empty string, got {user_id!r}")
    if budget is not None and not dry_run and budget.exhausted():
        log.info(
            "user %s: today's LLM token budget (%d) is spent, leaving the user for tomorrow", user_id, budget.limit
        )
        metrics.incr(m.USERS_SKIPPED_BUDGET_TOTAL)
        return UserResult(user_id, SKIPPED_BUDGET, seconds=time.monotonic() - started)
    lock = locks.acquire(user_id, holder=holder)
    if lock is None:
        log.info("user %s: lock held by another compression, skipping", user_id)
        metrics.incr(m.USERS_SKIPPED_LOCKED_TOTAL)
        return UserResult(user_id, SKIPPED_LOCKED, seconds=time.monotonic() - started)
    spent = Spent(budget)
    try:
        checkpoint("locked")
        with sanitized_errors(user_id, "compression"):
            result = _compress_locked(
                user_id, lock, settings, store, summarizer, metrics, run_id, dry_run, checkpoint, clock, spent
            )
    except CompressionError as exc:  # the failed user's result reports every token its attempt spent
        exc.prompt_tokens, exc.completion_tokens = spent.prompt_tokens, spent.completion_tokens
        raise
    finally:
        lock.release()
    result.seconds = round(time.monotonic() - started, 3)
    metrics.timing(m.USER_DURATION_SECONDS, result.seconds)
    return result


def _compress_locked(
    user_id: str,
    lock: UserLock,
    settings: Settings,
    store: MemoryStore,
    summarizer: Summarizer,
    metrics: Metrics,
    run_id: str,
    dry_run: bool,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
    spent: Spent,
) -> UserResult:
    profile = store.load_profile(user_id, create=not dry_run)
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
    keys = _fold_list(user_id, profile, store, settings, result.events_before, dry_run, misdated)
    if not dry_run:
        for event_id in misdated:
            quarantine(event_id, InvalidEventError(user_id, event_id, "created_at", "is missing or not a date"))
    if keys is None:
        log.info("user %s: %d events, not over threshold %d", user_id, result.events_before, settings.threshold)
        metrics.incr(m.USERS_SKIPPED_BELOW_THRESHOLD_TOTAL)
        result.status = SKIPPED_BELOW_THRESHOLD
        result.events_after = result.events_before
        return result
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
    chunks = _chunks(user_id, keys, store, settings, summarizer, language, lambda: summary, quarantine)
    for chunk in chunks:
        lock.extend()
        events = [_event_text(user_id, ev) for ev in chunk]
        with lock.kept_alive():  # retries and Retry-After waits can outlast the TTL: extend meanwhile
            text, outcomes = propose_summary(
                user_id,
                summary,
                events,
                language,
                settings=settings,
                summarizer=summarizer,
                metrics=metrics,
                worst=result.guards,
                spent=spent,  # counts every token, a refused reply's too
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
        if version == profile.version:
            record_baseline(store, profile, clock)
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
            )
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
        )
        summary = text
        result.chunks += 1
        result.events_folded += len(chunk)
        metrics.incr(m.EVENTS_FOLDED_TOTAL, len(chunk))
        checkpoint("committed")

        archived = store.archive(chunk, run_id=run_id, version=version, now=now)
        metrics.incr(m.EVENTS_ARCHIVED_TOTAL, archived)
        checkpoint("archived")
        deleted = store.delete_unchanged(user_id, chunk)  # an event edited meanwhile stays
        if deleted < len(chunk):
            log.info("user %s: %d event(s) changed during compression; kept", user_id, len(chunk) - deleted)
        result.events_deleted += deleted
        metrics.incr(m.EVENTS_DELETED_TOTAL, deleted)
        checkpoint("deleted")
        store.clear_pending(user_id, version)
        checkpoint("cleared")
    if target is not None:  # the fold list's last events were quarantined: nothing of it is left to fold
        store.clear_fold_target(user_id, version)

    result.summary_version = version
    result.summary_chars = len(summary)
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


def _note_cap(result: UserResult, keys: list[EventKey], settings: Settings, misdated: int) -> None:
    """Record in ``result`` whether ``max_fold_events`` cut the fold list, and how many events it left."""
    if len(keys) < settings.max_fold_events:
        return
    left = result.events_before - misdated - settings.keep_last_n - len(keys)
    if left > 0:
        result.fold_capped, result.events_left = True, left


def _summary_language(profile: Profile, settings: Settings, result: UserResult) -> str:
    """Return the known language code to summarise in: the profile's, else ``summary_language``."""
    user_id = profile.user_id
    language = profile.language or settings.summary_language
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


class SummarizerIdentity(TypedDict):
    """What the history records of the summariser that wrote a version."""

    summarizer: str
    model: str | None
    prompt_version: str | None


def summarizer_identity(summarizer: Summarizer) -> SummarizerIdentity:
    """Return what the history records of the summariser: its name, model and prompt version."""
    model = getattr(getattr(summarizer, "config", None), "model", None)
    uses_prompt = summarizer.name == "openai"
    return SummarizerIdentity(
        summarizer=summarizer.name,
        model=model if isinstance(model, str) else None,
        prompt_version=prompt_version(SYSTEM_PROMPT) if uses_prompt else None,
    )


def record_baseline(store: MemoryStore, profile: Profile, clock: Callable[[], datetime]) -> None:
    """Record the profile's current version in the history when it has none (it was committed before
    history existed, or by the Butler), so that it can be rolled back to."""
    if (profile.version == 0 and not profile.summary) or store.history.exists(profile.user_id, profile.version):
        return
    through = None if profile.through is None else Key(profile.through.created_at, profile.through.id)
    store.history.write_version(
        HistoryEntry(
            profile.user_id,
            profile.version,
            profile.summary,
            BASELINE,
            None,
            profile.version,  # what it built on is unknown: the lineage stops here
            clock(),  # retention counts from when it was recorded
            through=through,
            compressed_at=profile.compressed_at,
        )
    )


def _fold_list(
    user_id: str,
    profile: Profile,
    store: MemoryStore,
    settings: Settings,
    count: int,
    dry_run: bool,
    misdated: list[Any],
) -> list[EventKey] | None:
    """Return the keys to fold: all but the newest ``keep_last_n``; None when the user is not due.
    Events without a date ``created_at`` are left out and their ``_id``s put in ``misdated``.

    Under the threshold, a fold target left by a run killed between chunks still selects the rest
    of that run's fold list, so the re-run ends where the clean run would have.
    """
    target = profile.fold_target
    if count <= settings.threshold and target is None:
        return None
    keys = store.fold_keys(user_id, settings.keep_last_n, limit=settings.max_fold_events, misdated=misdated)
    if count > settings.threshold:
        return keys
    assert target is not None
    keys = _through(keys, target)
    if keys:
        log.info("user %s: finishing an interrupted run's fold list", user_id)
        return keys
    if not dry_run:
        store.clear_fold_target(user_id, profile.version)
    return None


def finish_interrupted(
    profile: Profile,
    store: MemoryStore,
    lock: UserLock,
    *,
    run_id: str,
    clock: Callable[[], datetime],
    metrics: Metrics | None = None,
    checkpoint: Checkpoint = _no_checkpoint,
) -> tuple[Profile, int]:
    """Finish what an interrupted run left in the profile: a rollback's intent, then a pending fold.

    Return the profile as it is afterwards and how many events the pending fold deleted.
    """
    if profile.rollback is not None:
        from butler_memory.rollback import finish_rollback  # rollback builds on this module

        # An interrupted rollback put events back in user_memory that the summary still covers: finish it first.
        finish_rollback(store, profile, lock, _no_checkpoint, clock)
        profile = store.load_profile(profile.user_id, create=False)
    deleted = 0
    if profile.pending is not None:
        deleted = finish_pending(profile, store, run_id=run_id, clock=clock, metrics=metrics, checkpoint=checkpoint)
        profile = store.load_profile(profile.user_id, create=False)
    return profile, deleted


def _through(keys: list[EventKey], target: EventKey) -> list[EventKey]:
    """Return the keys up to and including ``target``, in the server's order.

    ``_id``s are compared by their BSON form, never by Python's ordering: compound or mixed-type
    ids (a document, an ObjectId beside a string) are valid MongoDB ids. A target no longer present
    (the Butler deleted that event) ends the list at its timestamp.
    """
    wanted = id_key(target.id)
    for index, key in enumerate(keys):
        if key.created_at == target.created_at and id_key(key.id) == wanted:
            return keys[: index + 1]
    return [key for key in keys if key.created_at <= target.created_at]


def finish_pending(
    profile: Profile,
    store: MemoryStore,
    *,
    run_id: str,
    clock: Callable[[], datetime],
    metrics: Metrics | None = None,
    checkpoint: Checkpoint = _no_checkpoint,
) -> int:
    """Archive and delete the events an interrupted run already summarised; never re-summarise them."""
    metrics = metrics or NullMetrics()
    user_id = profile.user_id
    pending = profile.pending
    assert pending is not None
    log.info(
        "user %s: finishing an interrupted fold of %d events (v%d)",
        user_id,
        len(pending.ids),
        pending.version,
    )
    remaining = store.find_by_ids(user_id, pending.ids)
    if pending.digests is not None:
        # Only events still as they were summarised: one the Butler edited since is a newer version
        # the stored summary does not hold; it stays for a later fold.
        summarised = {id_key(i): d for i, d in zip(pending.ids, pending.digests, strict=True)}
        unchanged = [ev for ev in remaining if summarised.get(id_key(ev["_id"])) == event_digest(ev)]
        if len(unchanged) < len(remaining):
            log.info("user %s: %d event(s) changed since summarised; kept", user_id, len(remaining) - len(unchanged))
        remaining = unchanged
    archived = store.archive(remaining, run_id=run_id, version=pending.version, now=clock())
    metrics.incr(m.EVENTS_ARCHIVED_TOTAL, archived)
    checkpoint("pending_archived")
    deleted = store.delete_unchanged(user_id, remaining)
    metrics.incr(m.EVENTS_DELETED_TOTAL, deleted)
    checkpoint("pending_deleted")
    store.clear_pending(user_id, pending.version)
    return deleted


def _chunks(
    user_id: str,
    keys: list[EventKey],
    store: MemoryStore,
    settings: Settings,
    summarizer: Summarizer,
    language: str,
    summary: Callable[[], str],
    on_invalid: Callable[[Any, InvalidEventError], None],
) -> Iterator[list[dict[str, Any]]]:
    """Yield the fold list's events in chunks that fit one prompt, streaming from MongoDB.

    Only events whose ``_id`` is in the fold list are yielded; anything else in the key range
    (an event that arrived during compression with an old timestamp) is left alone. An event that
    cannot be folded goes to ``on_invalid`` (its ``_id`` and why) instead of into a chunk.
    """
    if not keys:
        return
    events = _fold_events(user_id, keys, store, settings.max_events_per_chunk)
    yield from pack_chunks(user_id, events, settings, summarizer, language, summary, on_invalid)


def _fold_events(user_id: str, keys: list[EventKey], store: MemoryStore, group: int) -> Iterator[dict[str, Any]]:
    """Yield the fold list's events in order, one short query by ``_id`` per ``group`` keys (no cursor
    stays open across LLM calls); only the list's events, whatever else shares their timestamps."""
    for start in range(0, len(keys), group):
        yield from store.read_fold(user_id, keys[start : start + group])


def pack_chunks(
    user_id: str,
    events: Iterable[dict[str, Any]],
    settings: Settings,
    summarizer: Summarizer,
    language: str,
    summary: Callable[[], str],
    on_invalid: Callable[[Any, InvalidEventError], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Cut ``events`` (in order) into chunks that each fit one prompt with the summary they fold into.

    Tokens are counted by the summariser (the model's tokenizer, or an upper bound); a chunk's
    budget is ``prompt_budget_tokens``, capped by the model's context less the reply, less the
    instructions and the summary the chunk folds into (``summary()``, read as each chunk starts).
    An event that cannot be folded (malformed, over ``max_event_chars``, not valid UTF-8, or too
    long for the model's context even alone) raises InvalidEventError naming it, or, with
    ``on_invalid``, is handed to it (``_id`` and the error) and left out.
    """
    reply = 2 * settings.summary_max_tokens
    limit = None if summarizer.context_tokens is None else summarizer.context_tokens - reply
    ceiling = settings.prompt_budget_tokens if limit is None else min(settings.prompt_budget_tokens, limit)

    def budget() -> int:
        frame = build_messages(SummaryRequest(user_id, summary(), [], language, settings.summary_max_tokens, 0))
        return ceiling - sum(summarizer.count_tokens(message["content"]) for message in frame)

    chunk: list[dict[str, Any]] = []
    chunk_tokens = 0
    room = budget()
    for ev in events:
        try:
            _checked_content(user_id, ev, settings)
            tokens = summarizer.count_tokens(event_line(_event_text(user_id, ev))) + 1  # and its newline
            if chunk and (chunk_tokens + tokens > room or len(chunk) >= settings.max_events_per_chunk):
                yield chunk
                chunk, chunk_tokens, room = [], 0, budget()
            if not chunk and limit is not None and tokens > room:
                raise InvalidEventError(
                    user_id,
                    ev["_id"],
                    "content",
                    f"is {tokens} tokens: with the instructions and the summary it exceeds the model's context "
                    f"({summarizer.context_tokens} tokens less {reply} for the reply)",
                )
        except InvalidEventError as exc:
            if on_invalid is None:
                raise
            on_invalid(ev["_id"], exc)
            continue
        chunk.append(ev)
        chunk_tokens += tokens
    if chunk:
        yield chunk


def _checked_content(user_id: str, ev: dict[str, Any], settings: Settings) -> str:
    undecodable = undecodable_field(ev)
    if undecodable is not None:
        raise InvalidEventError(user_id, ev["_id"], undecodable, "is not valid UTF-8")
    content = ev.get("content")
    if content is None:
        raise InvalidEventError(user_id, ev["_id"], "content", "is missing")
    if not isinstance(content, str):
        raise InvalidEventError(user_id, ev["_id"], "content", f"is a {type(content).__name__}, not a string")
    if len(content) > settings.max_event_chars:
        raise InvalidEventError(
            user_id,
            ev["_id"],
            "content",
            f"is {len(content)} characters, over max_event_chars={settings.max_event_chars}",
        )
    return content


def quarantine_event(
    user_id: str,
    event_id: Any,
    exc: InvalidEventError,
    store: MemoryStore,
    lock: UserLock,
    metrics: Metrics,
    *,
    run_id: str,
    now: datetime,
    checkpoint: Checkpoint = _no_checkpoint,
) -> int:
    """Move one event that cannot be folded to the quarantine collection; return 1 if it moved, else 0.

    Copy first, then delete by explicit ``_id`` only if unchanged (as the archive): a kill between
    the two leaves it in both places, and the re-run finds it again and finishes the move. It is in
    no summary, so nothing is counted twice; the record says which field and why, never the content.
    """
    lock.extend()  # the lock must still be ours right before a write
    raw = store.quarantine_copy(user_id, event_id, field=exc.field, problem=exc.problem, run_id=run_id, now=now)
    checkpoint("quarantined")
    moved = 0 if raw is None else store.quarantine_remove(user_id, raw)
    checkpoint("quarantine_removed")
    if moved:
        log.warning("user %s: event %s moved to %s: %s", user_id, event_id, store.quarantine.name, exc)
        metrics.incr(m.EVENTS_QUARANTINED_TOTAL, moved)
    return moved


def _event_text(user_id: str, ev: dict[str, Any]) -> EventText:
    role = ev.get("role")
    if not isinstance(role, str):
        raise InvalidEventError(user_id, ev["_id"], "role", "is missing or not a string")
    return EventText(role=role, content=ev["content"], created_at=ev["created_at"])


def propose_summary(
    user_id: str,
    previous: str,
    events: Sequence[EventText],
    language: str,
    *,
    settings: Settings,
    summarizer: Summarizer,
    metrics: Metrics,
    worst: dict[str, str],
    spent: Spent | None = None,
    on_reply: Callable[[Summary], object] | None = None,
) -> tuple[str, dict[str, str]]:
    """Fold one chunk into ``previous`` through the real prompt, then check the reply: the summariser
    proposes, validation and the guards accept it (return its cleaned text and the guards' outcomes)
    or raise. ``spent`` counts the call's tokens (see ``_summarize``); ``on_reply`` sees
    every reply before anything can refuse it. Compression and ``qualify`` both call this: one
    summarising path.
    """
    request = SummaryRequest(
        user_id=user_id,
        previous_summary=previous,
        events=events,
        language=language,
        max_tokens=settings.summary_max_tokens,
        max_chars=settings.summary_max_chars,
    )
    produced = _summarize(summarizer, request, metrics, spent)
    if on_reply is not None:
        on_reply(produced)
    text = validate_summary(produced.text, user_id=user_id, max_chars=settings.summary_max_chars)
    outcomes = guard_summary(user_id, request, text, settings, metrics, worst)
    return text, outcomes


def guard_summary(
    user_id: str, request: SummaryRequest, text: str, settings: Settings, metrics: Metrics, worst: dict[str, str]
) -> dict[str, str]:
    """Check a proposed summary before it is committed; return ``{guard: outcome}``, or raise
    GuardRejected when a guard rejects it. ``worst`` (a result's ``guards``) keeps each guard's
    worst outcome over the chunks."""
    verdict = guards.check_summary(
        previous=request.previous_summary,
        events=[ev.content for ev in request.events],
        summary=text,
        language=request.language,
        settings=settings,
    )
    for check in verdict:
        if check.outcome != guards.OFF:
            metrics.incr(m.guard_metric(check.guard, "checks"))
        if check.outcome in (guards.REDACT, guards.WARN, guards.REJECT):
            metrics.incr(m.guard_metric(check.guard, check.outcome))
        if check.outcome == guards.WARN:
            log.warning(
                "user %s: %s guard would reject the summary (warn mode): %s", user_id, check.guard, check.detail
            )
    guards.merge(worst, verdict)
    guards.enforce(user_id, verdict)
    return guards.outcomes(verdict)


def _summarize(
    summarizer: Summarizer, request: SummaryRequest, metrics: Metrics, spent: Spent | None = None
) -> Summary:
    """Make one LLM call; count its tokens (metrics, ``spent`` and its budget), a refused reply's too."""
    metrics.incr(m.LLM_REQUESTS_TOTAL)
    # The summariser never reads an instruction-like sentence, so it cannot carry one into memory.
    request = withheld(request)
    try:
        produced = summarizer.summarize(request)
    except LLMError as exc:
        metrics.incr(m.LLM_ERRORS_TOTAL)
        if exc.prompt_tokens or exc.completion_tokens:
            _count(metrics, spent, exc.prompt_tokens, exc.completion_tokens)
        raise
    metrics.timing(m.LLM_LATENCY_SECONDS, produced.seconds)
    _count(metrics, spent, produced.prompt_tokens, produced.completion_tokens)
    return produced


def _count(metrics: Metrics, spent: Spent | None, prompt_tokens: int, completion_tokens: int) -> None:
    metrics.incr(m.LLM_PROMPT_TOKENS_TOTAL, prompt_tokens)
    metrics.incr(m.LLM_COMPLETION_TOKENS_TOTAL, completion_tokens)
    if spent is not None:
        spent.add(prompt_tokens, completion_tokens)


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
