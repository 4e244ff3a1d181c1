"""Roll back a run: a user's summary returns to the version before the run, its events to user_memory.

Undo is a fold too: the result is a *new* version (kind "rollback") carrying the text and
bookkeeping of the version before the run; version numbers only go up and the history is never
rewritten. Per user, under the user's lock:

1. ``plan``: the versions to undo are the run's versions in the current version's lineage and every
   version built on them. Versions of other runs among them: refused with a message naming those
   runs, unless ``cascade`` (then they are undone too, in the same new version). Events those
   versions folded that are no longer archived (retention): refused unless ``allow_missing``.
2. ``intent``: the plan is written into the profile (``memory_rollback``), guarded by the current
   version; from here on a re-run of the rollback, or any compression of the user, finishes it.
3. ``restored``: the archived events of the undone versions go back into user_memory, as they
   were (upsert by ``_id``, without the archive's ``run_id``/``summary_version``/``archived_at``).
4. ``recorded``: the new version goes into the summary history (upsert).
5. ``committed``: the profile gets the restored text, watermark and time as the new version, in
   one ``update_one`` guarded by the old version and the intent.
6. ``unarchived``: the restored events leave the archive (each batch is upserted into user_memory
   again first, so a kill never leaves an event in neither).
7. ``cleared``: the intent is removed.

A kill between any two steps followed by a re-run ends as one clean rollback would. A dry run
writes nothing and returns the plan. Results carry ids, versions and counts, never content.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from butler_memory.core.errors import RollbackRefusedError
from butler_memory.core.units import markdown_table, version_step
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import DRY_RUN, utcnow
from butler_memory.fold.rebuild import Checkpoint, Parts, finish_rollback, no_checkpoint
from butler_memory.operations.intent import REFUSED, VersionResult, settled_profile, under_lock
from butler_memory.storage.history import BASELINE, ROLLBACK, HistoryEntry
from butler_memory.storage.locks import UserLock
from butler_memory.storage.profiles import ROLLBACK_FIELD, Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STEPS = ("locked", "intent", "restored", "recorded", "committed", "unarchived", "cleared")

ROLLED_BACK = "rolled_back"
NOT_CHANGED = "not_changed"
"""The run wrote no version of this user that is still in effect (never changed, or already rolled back)."""


@dataclass(kw_only=True)
class RollbackResult(VersionResult):
    """What a rollback did (or would do) to one user: ids, versions and counts, never content."""

    run_id: str
    restored_version: int | None = None
    """The version whose text and bookkeeping the new version carries."""
    undoes: list[int] = field(default_factory=list)
    undone_runs: list[str] = field(default_factory=list)
    events_restored: int = 0
    events_missing: int = 0


@dataclass(frozen=True)
class Plan:
    """The versions one rollback undoes and what it restores."""

    current_version: int
    restore: HistoryEntry
    undoes: list[int]
    undone_runs: list[str]
    events_archived: int
    """The archived events the rollback puts back (each once, however many undone versions folded it)."""
    events_missing: int
    """Events the undone versions folded that the archive no longer holds."""


def plan_rollback(
    store: MemoryStore, profile: Profile, run_id: str, *, cascade: bool = False, allow_missing: bool = False
) -> Plan | str:
    """Return the plan to undo ``run_id`` for one user, or a message why there is nothing to undo.

    Raises ``RollbackRefusedError`` when it cannot be done as asked (a later run built on it without
    ``cascade``, the version before it no longer kept, events no longer archived).
    """
    user_id = profile.user_id
    chain = store.history.lineage(user_id, through=profile.version)
    if not chain or chain[0].version != profile.version:
        if not store.history.users_of_run(run_id) or user_id not in store.history.users_of_run(run_id):
            return f"run {run_id} wrote no summary version of user {user_id}"
        raise RollbackRefusedError(
            f"user {user_id!r}: the history has no entry for the current version {profile.version} "
            "(written before history existed or dropped by retention); nothing was changed",
            user_id=user_id,
        )
    positions = [i for i, e in enumerate(chain) if e.run_id == run_id and e.kind != BASELINE]
    if not positions:
        wrote = user_id in store.history.users_of_run(run_id)
        return (
            f"run {run_id}'s versions of user {user_id} are no longer in effect (already rolled back)"
            if wrote
            else f"run {run_id} wrote no summary version of user {user_id}"
        )
    oldest = chain[positions[-1]]
    if oldest.kind == ROLLBACK:
        raise RollbackRefusedError(
            f"user {user_id!r}: run {run_id} is a rollback; roll back the run it undid with a new run "
            "instead (a compression folds the restored events again)",
            user_id=user_id,
        )
    undone = chain[: positions[-1] + 1]
    # A rollback that restored one of these versions (undoing a later run) built nothing on them: it
    # folded no event, so undoing it too is no cascade (undo, then undo again, needs no flag).
    in_undone = {e.version for e in undone}
    built_on = [e for e in undone if not (e.kind == ROLLBACK and e.base_version in in_undone)]
    later = [run for run in _newest_first(built_on) if run != run_id]
    if later and not cascade:
        named = ", ".join(
            f"{run} (v{', v'.join(str(e.version) for e in undone if _run_of(e) == run)})" for run in later
        )
        raise RollbackRefusedError(
            f"user {user_id!r}: later run(s) built on run {run_id}: {named}; roll those back first or "
            "pass --cascade (cascade=true) to roll them back too; nothing was changed",
            user_id=user_id,
        )
    restore = store.history.version(user_id, oldest.base_version)
    if restore is None:
        raise RollbackRefusedError(
            f"user {user_id!r}: version {oldest.base_version}, the one before run {run_id}, is no longer "
            "kept (history_retention_days); nothing was changed",
            user_id=user_id,
        )
    versions = [e.version for e in undone]
    counts = store.archived_counts(user_id, versions)
    expected = sum(e.covers.count for e in undone if e.covers is not None)
    # Per version: an event two of them folded (edited during the first) is one record counted for both.
    missing = sum(max(e.covers.count - counts.get(e.version, 0), 0) for e in undone if e.covers is not None)
    archived = len(store.archived_ids(user_id, versions))
    plan = Plan(profile.version, restore, versions, _newest_first(built_on), archived, missing)
    if plan.events_missing and not allow_missing:
        raise RollbackRefusedError(
            f"user {user_id!r}: {plan.events_missing} of the {expected} events run {run_id} (and the runs "
            "built on it) folded are no longer in the archive (archive_retention_days, or the archive is "
            "off); nothing was changed. Pass --allow-missing-events to roll the summary back anyway "
            "(those events stay lost)",
            user_id=user_id,
        )
    return plan


def _run_of(entry: HistoryEntry) -> str:
    return entry.run_id or f"v{entry.version}"


def _newest_first(undone: Sequence[HistoryEntry]) -> list[str]:
    """Return the runs that wrote these versions (a lineage, newest first), newest first."""
    runs: list[str] = []
    for entry in undone:
        if _run_of(entry) not in runs:
            runs.append(_run_of(entry))
    return runs


def users_of_run(store: MemoryStore, run_id: str, user_ids: Sequence[str] | None = None) -> list[str]:
    """Return the users to roll back: those the run wrote versions for, or the given ones."""
    if user_ids:
        return list(dict.fromkeys(user_ids))
    return store.history.users_of_run(run_id)


@dataclass(frozen=True)
class RunDecision:
    """A run's rollback decided as one (issue 23.1): all its users or none, unless ``partial``.

    ``results`` is the dry pass over every user (``partial``: the rollback itself, decided per user).
    """

    results: list[RollbackResult]
    partial: bool = False

    @property
    def refused(self) -> list[RollbackResult]:
        """The users that would be (or were) refused."""
        return [r for r in self.results if r.status == REFUSED]

    @property
    def applies(self) -> bool:
        """Whether the rollback goes ahead: no user is refused, or ``partial`` rolls back the others."""
        return self.partial or not self.refused

    def refusal(self, how_partial: str) -> str:
        """Say why the rollback applies to none of the users ('' when it applies); ``how_partial`` names the flag."""
        if self.applies:
            return ""
        return (
            f"{len(self.refused)} of {len(self.results)} user(s) would be refused (see the table): the rollback "
            f"applies to none of them; fix that, or {how_partial} to roll back the others"
        )


def rollback_user(
    parts: Parts,
    user_id: str,
    run_id: str,
    *,
    rollback_id: str,
    cascade: bool = False,
    allow_missing: bool = False,
    dry_run: bool = False,
    checkpoint: Checkpoint = no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
) -> RollbackResult:
    """Undo ``run_id`` for one user (see the module docstring); ``rollback_id`` names this rollback.
    Emits the rollback metrics; ``Engine.rollback`` is this function on the engine's parts."""

    def rollback(lock: UserLock) -> RollbackResult:
        return _rollback_locked(
            user_id, run_id, parts.store, lock, rollback_id, cascade, allow_missing, dry_run, checkpoint, clock
        )

    outcome = partial(RollbackResult, user_id, run_id=run_id)
    attempt = partial(under_lock, parts.locks, user_id, "rollback", checkpoint, rollback, outcome)
    return m.observed(
        parts.metrics, m.ROLLBACK, attempt, changed=ROLLED_BACK, events=lambda r: r.events_restored, dry_run=dry_run
    )


def _rollback_locked(
    user_id: str,
    run_id: str,
    store: MemoryStore,
    lock: UserLock,
    rollback_id: str,
    cascade: bool,
    allow_missing: bool,
    dry_run: bool,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
) -> RollbackResult:
    # An interrupted rollback's intent is finished with this run's checkpoints.
    profile = settled_profile(
        store, lock, user_id, dry_run=dry_run, run_id=rollback_id, clock=clock, own_rollback=checkpoint
    )
    plan = plan_rollback(store, profile, run_id, cascade=cascade, allow_missing=allow_missing)
    if isinstance(plan, str):
        return RollbackResult(user_id, NOT_CHANGED, profile.version, profile.version, run_id=run_id, message=plan)
    result = RollbackResult(
        user_id,
        DRY_RUN if dry_run else ROLLED_BACK,
        run_id=run_id,
        from_version=profile.version,
        to_version=profile.version if dry_run else profile.version + 1,
        restored_version=plan.restore.version,
        undoes=plan.undoes,
        undone_runs=plan.undone_runs,
        events_restored=plan.events_archived,
        events_missing=plan.events_missing,
    )
    if dry_run:
        result.message = (
            f"would restore v{plan.restore.version} as v{profile.version + 1}, undoing "
            f"v{', v'.join(map(str, plan.undoes))} and returning {plan.events_archived} event(s) to user_memory"
        )
        return result
    intent = {
        "version": profile.version + 1,
        "expected_version": profile.version,
        "restore_version": plan.restore.version,
        "undoes": plan.undoes,
        "undone_runs": plan.undone_runs,
        "rollback_id": rollback_id,
        "target_run": run_id,
    }
    store.begin_intent(user_id, ROLLBACK_FIELD, intent, expected_version=profile.version, during="the rollback")
    checkpoint("intent")
    log.info(
        "user %s: rolling back run %s: v%d -> v%d (restores v%d), %d event(s) back to user_memory",
        user_id,
        run_id,
        profile.version,
        profile.version + 1,
        plan.restore.version,
        plan.events_archived,
    )
    finish_rollback(store, store.load_profile(user_id, create=False), lock, checkpoint, clock)
    result.message = f"restored v{plan.restore.version} as v{profile.version + 1}"
    return result


def rollback_markdown(run_id: str, results: Sequence[Any], *, dry_run: bool, refusal: str = "") -> str:
    """Return a rollback's results as Markdown: the run's decision (``refusal``), one row per user, no content."""
    lines = [
        f"# Rollback of run {run_id}{' (dry run: nothing written)' if dry_run else ''}",
        "",
        f"{len(results)} user(s).",
        "",
    ]
    if refusal:
        lines[2:2] = [f"**Rolled back: none.** {refusal}.", ""]
    if results:
        headers = ["user", "status", "version", "restores", "undoes", "runs undone", "events back", "events missing"]
        lines += markdown_table([*headers, "note"], map(_row, results))
    return "\n".join(lines) + "\n"


def _row(r: RollbackResult) -> list[object]:
    restores = "" if r.restored_version is None else f"v{r.restored_version}"
    undone = [", ".join(f"v{v}" for v in r.undoes), ", ".join(r.undone_runs)]
    cells = [r.user_id, r.status, version_step(r.from_version, r.to_version), restores, *undone]
    return [*cells, r.events_restored, r.events_missing, r.message]
