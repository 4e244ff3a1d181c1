"""What every operation that writes a summary shares: the one chunk step, and finishing what an
interrupted operation left in the profile.

Compression, re-fold, forget and rollback are built on this module and it imports none of them,
so the engine has no import circle (docs/architecture.md, "Layers"):

* :func:`propose_summary`, the one chunk step of every fold: with the user's lock, extend it and
  keep it alive meanwhile; summarise one chunk through the real prompt, count every token on the
  metrics, the user's ``Spent`` tally and through it the day's budget, a refused reply's too;
  validate; guards. A compression, a re-fold and a forget's rebuild all fold through it, so all of
  them spend ``daily_token_budget``.
* :func:`finish_interrupted`: a rollback's intent (:func:`finish_rollback`), then a pending fold
  (``_finish_pending``), left by a killed run are finished under the lock before anything else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Protocol, TypedDict

from butler_memory.core.errors import CompressionError, ConcurrentUpdateError, InvalidProfileError, LLMError
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.metrics import Metrics, NullMetrics
from butler_memory.llm.budget import Spent, TokenBudget
from butler_memory.llm.prompt import SYSTEM_PROMPT
from butler_memory.llm.summarizer import EventText, Summarizer, Summary, SummaryRequest
from butler_memory.safety import guards
from butler_memory.safety.injection import withheld
from butler_memory.safety.validation import validate_summary
from butler_memory.storage.history import BASELINE, ROLLBACK, HistoryEntry, Key, prompt_version
from butler_memory.storage.locks import UserLock, UserLocks
from butler_memory.storage.mongo import event_digest, id_key
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

Checkpoint = Callable[[str], None]
"""Called with a step name at every step boundary (tests kill the process there)."""


def no_checkpoint(step: str) -> None:
    """The checkpoint of a run nobody kills."""
    return None


class FoldParts(Protocol):
    """What folding a chunk runs with: the settings, the summariser and the metrics."""

    @property
    def settings(self) -> Settings: ...
    @property
    def summarizer(self) -> Summarizer: ...
    @property
    def metrics(self) -> Metrics: ...


class Parts(FoldParts, Protocol):
    """What an operation on one user runs with; ``operations.engine.Engine`` is the one built per task."""

    @property
    def store(self) -> MemoryStore: ...
    @property
    def locks(self) -> UserLocks: ...
    @property
    def budget(self) -> TokenBudget | None: ...


@dataclass(frozen=True)
class Folding:
    """The fold's parts without a store or locks (``qualify``'s: it writes nothing)."""

    settings: Settings
    summarizer: Summarizer
    metrics: Metrics = field(default_factory=NullMetrics)


# -- the one chunk step ----------------------------------------------------------------------------


def propose_summary(
    parts: FoldParts,
    user_id: str,
    previous: str,
    events: Sequence[EventText],
    language: str,
    *,
    worst: dict[str, str],
    spent: Spent | None = None,
    on_reply: Callable[[Summary], object] | None = None,
    lock: UserLock | None = None,
) -> tuple[str, dict[str, str]]:
    """Fold one chunk into ``previous`` through the real prompt, then check the reply: the summariser
    proposes, validation and the guards accept it (return its cleaned text and the guards' outcomes)
    or raise. ``spent`` counts the call's tokens (see ``_summarize``), a refused reply's too; ``on_reply``
    sees every reply before anything can refuse it. With the user's ``lock`` (every fold that writes:
    compression, re-fold, a forget's rebuild) the lock is extended first and kept alive meanwhile.
    Those and ``qualify`` all call this: one summarising path.
    """
    settings, metrics = parts.settings, parts.metrics
    request = SummaryRequest(
        user_id=user_id,
        previous_summary=previous,
        events=events,
        language=language,
        max_tokens=settings.summary_max_tokens,
        max_chars=settings.summary_max_chars,
    )
    if lock is not None:
        lock.extend()
    # Retries and Retry-After waits can outlast the lock's TTL: it is extended meanwhile.
    with nullcontext() if lock is None else lock.kept_alive():
        produced = _summarize(parts.summarizer, request, metrics, spent)
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


# -- finishing what an interrupted run left ----------------------------------------------------


def finish_interrupted(
    profile: Profile,
    store: MemoryStore,
    lock: UserLock,
    *,
    run_id: str,
    clock: Callable[[], datetime],
    metrics: Metrics | None = None,
    checkpoint: Checkpoint = no_checkpoint,
) -> tuple[Profile, int]:
    """Finish what an interrupted run left in the profile: a rollback's intent, then a pending fold.

    Return the profile as it is afterwards and how many events the pending fold deleted.
    """
    if profile.rollback is not None:
        # An interrupted rollback put events back in user_memory that the summary still covers: finish it first.
        finish_rollback(store, profile, lock, no_checkpoint, clock)
        profile = store.load_profile(profile.user_id, create=False)
    deleted = 0
    if profile.pending is not None:
        deleted = _finish_pending(profile, store, lock, run_id, clock, metrics or NullMetrics(), checkpoint)
        profile = store.load_profile(profile.user_id, create=False)
    return profile, deleted


def _finish_pending(
    profile: Profile,
    store: MemoryStore,
    lock: UserLock,
    run_id: str,
    clock: Callable[[], datetime],
    metrics: Metrics,
    checkpoint: Checkpoint,
) -> int:
    """Archive and delete the events an interrupted run already summarised; never re-summarise them.

    The archive and the delete are each fenced (``fence_pending``), as the run that committed the fold fences them.
    """
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
    fence_pending(store, lock, user_id, pending.version)
    archived = store.archive(remaining, run_id=run_id, version=pending.version, now=clock())
    metrics.incr(m.EVENTS_ARCHIVED_TOTAL, archived)
    checkpoint("pending_archived")
    fence_pending(store, lock, user_id, pending.version)
    deleted = store.delete_unchanged(user_id, remaining)
    metrics.incr(m.EVENTS_DELETED_TOTAL, deleted)
    checkpoint("pending_deleted")
    store.clear_pending(user_id, pending.version)  # matched on the fold's version: harmless when late
    return deleted


def fence_pending(store: MemoryStore, lock: UserLock, user_id: str, version: int) -> None:
    """Stop right before an archive or delete of the fold of ``version`` unless it is still ours to finish.

    The lock is extended (LockLostError when it expired and another holder may have taken the user)
    and the fold must still be the profile's pending fold, with no erasure or forget begun
    (ConcurrentUpdateError otherwise). A run stalled past the lock's TTL after its commit would else
    archive and delete what another run did meanwhile: a rollback of that very run finishes the fold,
    puts its events back in user_memory and commits, and the stale run deleted them again (the summary
    in effect covers none of them). A stopped run writes nothing more; a pending fold still there is
    finished by the next run.
    """
    fence(
        lock,
        lambda: store.fold_pending(user_id, version),
        f"user {user_id!r}: the fold of v{version} was finished by another run (its lock had expired), "
        "or an erasure began; this run stopped before writing more, a re-run starts from the new state",
        user_id,
    )


def fence(lock: UserLock, still_ours: Callable[[], bool], refusal: str, user_id: str) -> None:
    """Right before a write: extend the lock (LockLostError when it expired and another holder may have
    taken the user), then stop with ConcurrentUpdateError(``refusal``) unless ``still_ours()`` (the
    profile still holds this operation's pending fold or intent). What a run read before a takeover
    is never written after it."""
    lock.extend()
    if not still_ours():
        raise ConcurrentUpdateError(refusal, user_id=user_id)


def finish_rollback(
    store: MemoryStore, profile: Profile, lock: UserLock, checkpoint: Checkpoint, clock: Callable[[], datetime]
) -> int:
    """Carry a recorded rollback intent through to the end (also after a kill); return the new version.

    Every batch of events put back is fenced: right before it is written the lock is extended
    (LockLostError when it expired and another holder may have taken the user) and the intent must
    still be in the profile (ConcurrentUpdateError when another run finished it, or an erasure
    removed it). A batch read before a takeover is never written after it.
    """
    intent = profile.rollback
    assert intent is not None
    user_id = profile.user_id
    new_version, expected = int(intent["version"]), int(intent["expected_version"])
    undoes = [int(v) for v in intent["undoes"]]

    def fenced() -> None:
        fence(
            lock,
            lambda: store.rollback_pending(user_id, new_version, str(intent["rollback_id"])),
            f"user {user_id!r}: the rollback to v{new_version} was finished or removed by another run "
            "(its lock had expired); this run stopped before writing more, a re-run reports the state",
            user_id,
        )

    if profile.version == expected:
        restore = store.history.version(user_id, int(intent["restore_version"]))
        if restore is None:
            raise CompressionError(
                f"user {user_id!r}: the rollback to v{intent['restore_version']} cannot finish: that version "
                "is no longer in the history; its events are back in user_memory, the summary is unchanged",
                user_id=user_id,
            )
        # the restored version's time, recorded on the new entry too: a later rollback to this
        # version must restore it, not the time of this rollback
        compressed_at = store.history.committed_at(restore)
        store.restore(user_id, undoes, unarchive=False, fence=fenced)
        checkpoint("restored")
        store.history.write_version(
            HistoryEntry(
                user_id,
                new_version,
                restore.text,
                ROLLBACK,
                str(intent["rollback_id"]),
                restore.version,
                clock(),
                through=restore.through,
                summarizer=restore.summarizer,
                model=restore.model,
                prompt_version=restore.prompt_version,
                guards=restore.guards,
                undoes=undoes,
                undone_runs=list(intent["undone_runs"]),
                compressed_at=compressed_at,
            ),
            partial(store.rollback_pending, user_id, new_version, str(intent["rollback_id"])),
        )
        checkpoint("recorded")
        lock.extend()  # the commit itself is guarded by the version and the intent
        store.commit_rollback(
            user_id,
            expected_version=expected,
            new_version=new_version,
            summary=restore.text,
            through=None if restore.through is None else restore.through.to_doc(),
            compressed_at=compressed_at,
        )
        checkpoint("committed")
    elif profile.version != new_version:
        raise InvalidProfileError(
            user_id, "memory_rollback", f"is for v{expected} -> v{new_version} but the profile is at v{profile.version}"
        )
    else:
        log.info("user %s: finishing an interrupted rollback (v%d)", user_id, new_version)
    store.restore(user_id, undoes, unarchive=True, fence=fenced)
    checkpoint("unarchived")
    store.clear_rollback(user_id, new_version)
    checkpoint("cleared")
    return new_version


def record_baseline(
    store: MemoryStore, profile: Profile, clock: Callable[[], datetime], still_ours: Callable[[], bool]
) -> None:
    """Record the profile's current version in the history when it has none (it was committed before
    history existed, or by the Butler), so that it can be rolled back to.

    An entry with another text is not this version: a run killed between writing it and its commit
    left it, then the Butler committed its own text under that number. It is overwritten, or a
    rollback to this version would restore text no profile held.
    """
    if (profile.version == 0 and not profile.summary) or store.history.holds(
        profile.user_id, profile.version, profile.summary
    ):
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
        ),
        still_ours,
    )
