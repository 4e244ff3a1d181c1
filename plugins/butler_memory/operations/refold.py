"""Re-fold a user's summary from the archive with today's summariser (after a model upgrade or a
prompt fix).

Under the user's lock, starting from the **oldest kept version whose covered events are all still
archived** (walking the current version's lineage down while every fold's events are in the
archive; often the empty summary at version 0), the archived events those versions folded are
summarised again, oldest first, chunk by chunk, on top of that version's text. Events still raw in
user_memory stay raw (a later compression folds them as usual). Every chunk goes through the same
validation and guards as a compression. The result is one **new** version (kind "refold",
``base_version`` = the version it replaces, ``refolded_from`` = the version it started from), written
to the history and then committed with a guarded update; the history is never rewritten.

Nothing moves but the summary: a kill before the commit leaves the profile as it was (the history
entry the profile never reached is overwritten by the re-run), a kill after it leaves the new version.
A dry run reads only and says where it would start and how many events it would fold.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from butler_memory.core.errors import RollbackRefusedError
from butler_memory.core.units import markdown_table, version_step
from butler_memory.fold import metrics as m
from butler_memory.fold.chunks import event_text, pack_chunks
from butler_memory.fold.compression import DRY_RUN, utcnow
from butler_memory.fold.rebuild import (
    Checkpoint,
    Parts,
    SummarizerIdentity,
    fence,
    no_checkpoint,
    propose_summary,
    summarizer_identity,
)
from butler_memory.llm.budget import Spent
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.intent import VersionResult, settled_profile, under_lock
from butler_memory.storage.history import REFOLD, Claim, Covers, HistoryEntry, Key
from butler_memory.storage.locks import UserLock
from butler_memory.storage.mongo import id_key
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STEPS = ("locked", "summarized", "recorded", "committed")

REFOLDED = "refolded"
NOT_CHANGED = "not_changed"
"""The current version is already this re-fold: from the same start, by the same summariser, model
and prompt (a re-run adds no identical version)."""


@dataclass(kw_only=True)
class RefoldResult(VersionResult):
    """What a re-fold did (or would do) to one user: ids, versions and counts, never content."""

    run_id: str
    """The re-fold's run, as its history entry names it: what ``rollback --run`` takes to undo it."""
    refolded_from: int | None = None
    events: int = 0
    chunks: int = 0
    summary_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guards: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RefoldPlan:
    """Where a re-fold starts and which versions' archived events it folds again."""

    start: HistoryEntry
    versions: list[int]
    """Fold versions whose archived events are folded again, newest first."""
    ids: list[Any]
    """The archived events folded again, oldest first (each once)."""

    @property
    def events(self) -> int:
        """Return how many archived events are folded again."""
        return len(self.ids)


def plan_refold(store: MemoryStore, profile: Profile) -> RefoldPlan:
    """Return the oldest kept version whose covered events are all archived, and what to fold on it.

    Raises ``RollbackRefusedError`` when there is none (the current version's own events are no
    longer all archived, or the history does not reach the current version).
    """
    user_id = profile.user_id
    chain = store.history.lineage(user_id, through=profile.version)
    if not chain or chain[0].version != profile.version:
        raise RollbackRefusedError(
            f"user {user_id!r}: the history has no entry for the current version {profile.version}; "
            "nothing to re-fold from",
            user_id=user_id,
        )
    counts = store.archived_counts(user_id, [e.version for e in chain if e.covers is not None])
    start: HistoryEntry | None = None
    versions: list[int] = []
    for i, entry in enumerate(chain):
        if entry.covers is not None:
            if counts.get(entry.version, 0) != entry.covers.count:
                break  # some of this version's events are no longer archived: start no lower than it
            versions.append(entry.version)
        # Everything from here up can be folded again: the version this one built on is a start.
        below = chain[i + 1] if i + 1 < len(chain) else None
        if below is None and entry.base_version < entry.version:
            below = store.history.version(user_id, entry.base_version)  # version 0: the empty summary
        if below is None:
            break  # the history ends here (retention, or a baseline of unknown origin)
        start = below
    if start is None or not versions:
        raise RollbackRefusedError(
            f"user {user_id!r}: no kept version whose covered events are all still archived "
            "(archive_retention_days, or the archive is off); nothing to re-fold",
            user_id=user_id,
        )
    full = store.history.version(user_id, start.version)  # the lineage carries no text
    assert full is not None
    ids = store.archived_ids(user_id, versions)
    # An event back in user_memory (a rollback of a later version put it there) is not in the summary's keeping.
    live = {id_key(doc["_id"]) for doc in store.find_by_ids(user_id, ids)}
    return RefoldPlan(full, versions, [i for i in ids if id_key(i) not in live])


def refold_user(
    parts: Parts,
    user_id: str,
    *,
    run_id: str,
    dry_run: bool = False,
    checkpoint: Checkpoint = no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
) -> RefoldResult:
    """Rebuild one user's summary from the archive (see the module docstring); its LLM tokens count
    on the parts' budget, the day's, as a compression's do (a re-fold is started whatever is left of it).
    Emits the re-fold metrics; ``Engine.refold`` is this function on the engine's parts."""

    outcome = partial(RefoldResult, user_id, run_id=run_id)

    def refold_locked(lock: UserLock) -> RefoldResult:
        store, summarizer = parts.store, parts.summarizer
        profile = settled_profile(
            store, lock, user_id, dry_run=dry_run, run_id=run_id, clock=clock, metrics=parts.metrics
        )
        plan = plan_refold(store, profile)
        current = store.history.version(user_id, profile.version)
        if (
            current is not None
            and current.kind == REFOLD
            and current.refolded_from == plan.start.version
            and summarizer_identity(summarizer) == _identity_of(current)
        ):
            return outcome(
                NOT_CHANGED,
                from_version=profile.version,
                to_version=profile.version,
                refolded_from=plan.start.version,
                message=f"v{profile.version} is already a re-fold from v{plan.start.version} by this summariser",
            )
        result = outcome(
            DRY_RUN if dry_run else REFOLDED,
            from_version=profile.version,
            to_version=profile.version if dry_run else profile.version + 1,
            refolded_from=plan.start.version,
            events=plan.events,
        )
        if dry_run:
            result.message = (
                f"would fold {plan.events} archived event(s) of v{', v'.join(map(str, sorted(plan.versions)))} "
                f"again on top of v{plan.start.version}, as v{profile.version + 1}"
            )
            return result

        # The re-fold's commits require its lease: stalled past its lock's TTL, it commits nothing over
        # a run that took the user meanwhile (which replaces the lease).
        lease = uuid.uuid4().hex
        store.take_lease(user_id, profile.version, lease)
        log.info(
            "user %s: re-folding %d archived event(s) from v%d (current v%d)",
            user_id,
            plan.events,
            plan.start.version,
            profile.version,
        )
        rebuilt = refold_archived(parts, lock, profile, plan.start.text, plan.ids)
        summary = rebuilt.text
        result.chunks, result.guards = rebuilt.chunks, rebuilt.guards
        result.prompt_tokens, result.completion_tokens = rebuilt.spent.prompt_tokens, rebuilt.spent.completion_tokens
        checkpoint("summarized")

        now = clock()
        # Based on the version it replaces: it covers what that version covered.
        entry = rebuilt.version(
            profile, REFOLD, run_id, profile.version, plan.start.version, summarizer, now, covers=False
        )
        commit = store.commit_refold
        commit_rebuilt(
            store,
            lock,
            entry,
            checkpoint,
            lambda: commit(user_id, expected_version=profile.version, summary=summary, now=now, lease=lease),
            partial(store.still_at, user_id, profile.version, lease=lease),
        )
        checkpoint("committed")
        result.summary_chars = len(summary)
        result.message = f"v{plan.start.version} + {plan.events} archived event(s) -> v{profile.version + 1}"
        return result

    attempt = partial(under_lock, parts.locks, user_id, "re-fold", checkpoint, refold_locked, outcome)
    return m.observed(parts.metrics, m.REFOLD, attempt, changed=REFOLDED, events=lambda r: r.events, dry_run=dry_run)


def refold_markdown(run_id: str, results: Sequence[RefoldResult], *, dry_run: bool) -> str:
    """Return a re-fold's results as Markdown: its run (the id ``rollback --run`` undoes it by), one
    row per user, no content."""
    headers = ["user", "status", "version", "from", "events", "chunks", "guards", "note"]
    lines = [
        f"# Re-fold run {run_id}{' (dry run: nothing written)' if dry_run else ''}",
        "",
        *markdown_table(headers, map(_row, results)),
    ]
    return "\n".join(lines) + "\n"


def _row(r: RefoldResult) -> list[object]:
    start = "" if r.refolded_from is None else f"v{r.refolded_from}"
    guards = ", ".join(f"{k}: {v}" for k, v in r.guards.items())
    return [
        r.user_id,
        r.status,
        version_step(r.from_version, r.to_version),
        start,
        r.events,
        r.chunks,
        guards,
        r.message,
    ]


def _identity_of(entry: HistoryEntry) -> SummarizerIdentity:
    return SummarizerIdentity(summarizer=entry.summarizer or "", model=entry.model, prompt_version=entry.prompt_version)


@dataclass
class Rebuilt:
    """A summary re-folded from the archive (not yet committed) and what it folded."""

    text: str
    spent: Spent
    count: int = 0
    chunks: int = 0
    first: Key | None = None
    last: Key | None = None
    guards: dict[str, str] = field(default_factory=dict)
    """``{guard: outcome}``, the worst over the chunks (as a compression records it)."""

    @property
    def covers(self) -> Covers | None:
        """Return what the new version folded in (None when it re-folded nothing)."""
        return None if self.first is None or self.last is None else Covers(self.first, self.last, self.count)

    def version(
        self,
        profile: Profile,
        kind: str,
        run_id: str | None,
        base_version: int,
        refolded_from: int,
        summarizer: Summarizer,
        now: datetime,
        *,
        covers: bool = True,
    ) -> HistoryEntry:
        """Return the history entry of this text as the version after ``profile``'s, at its watermark."""
        through = profile.through
        return HistoryEntry(
            profile.user_id,
            profile.version + 1,
            self.text,
            kind,
            run_id,
            base_version,
            now,
            through=None if through is None else Key(through.created_at, through.id),
            covers=self.covers if covers else None,
            guards=dict(self.guards),
            refolded_from=refolded_from,
            **summarizer_identity(summarizer),
        )


Commit = Callable[[], object]
"""The guarded profile commit of a rebuilt version (``store.commit_refold``, ``store.commit_summary``)."""


def commit_rebuilt(
    store: MemoryStore, lock: UserLock, entry: HistoryEntry, checkpoint: Checkpoint, commit: Commit, ours: Claim
) -> None:
    """Make a rebuilt version the profile's: its history entry first (checkpoint "recorded"), then
    ``commit``, the guarded profile commit, with the lock extended right before it. A kill between
    the two leaves an entry the profile never reached, which the re-run overwrites.

    The entry is fenced too (``fence``: the lock extended, the profile still at the version it builds
    on under this rebuild's claim, ``ours``: the re-fold's lease or the forget's intent), and the
    history replaces an entry only while that claim holds: a rebuild stalled past its lock's TTL in
    its LLM calls would otherwise overwrite the entry of the version a run that took the user
    meanwhile committed, and a later rollback of that run would restore this text, never committed.
    """
    user_id, expected = entry.user_id, entry.version - 1
    fence(lock, ours, f"user {user_id!r}: the profile moved on from v{expected} while this rebuild ran", user_id)
    store.history.write_version(entry, ours)
    checkpoint("recorded")
    lock.extend()  # the lock must still be ours right before the write
    commit()


def refold_archived(parts: Parts, lock: UserLock, profile: Profile, text: str, ids: Sequence[Any]) -> Rebuilt:
    """Fold the archived events ``ids`` (oldest first) onto ``text``, chunk by chunk in the profile's
    language, through the one chunk step (``rebuild.propose_summary``): a re-fold, and a forget's
    rebuild without the forgotten events.

    Each chunk's events are read by ``_id`` right before its LLM call (``store.iter_archived``): no
    cursor stays open across the calls. The tokens count on the rebuilt ``spent`` and the parts' daily budget.
    """
    user_id, settings = profile.user_id, parts.settings
    language = profile.language or settings.summary_language
    rebuilt = Rebuilt(text, Spent(parts.budget))
    archived = parts.store.iter_archived(user_id, ids, settings.max_events_per_chunk)
    # Late binding on purpose: each chunk's budget is taken with the summary it folds into.
    for chunk in pack_chunks(user_id, archived, settings, parts.summarizer, language, lambda: rebuilt.text):
        events = [event_text(user_id, ev) for ev in chunk]
        rebuilt.text, _ = propose_summary(
            parts, user_id, rebuilt.text, events, language, worst=rebuilt.guards, spent=rebuilt.spent, lock=lock
        )
        rebuilt.chunks += 1
        rebuilt.count += len(chunk)
        rebuilt.first = rebuilt.first or Key(chunk[0]["created_at"], chunk[0]["_id"])
        rebuilt.last = Key(chunk[-1]["created_at"], chunk[-1]["_id"])
    return rebuilt
