"""Forget some of a user's events (by Butler ``event_id``, or a time range) and rebuild the summary without them.

No Airflow imports: the CLI and the ``memory_erasure`` DAG call :func:`forget_events` through
``Engine.forget``, the Butler's deletion flow through ``operations.engine.erase_events``.

The algorithm (docs/erasure.md, "Forgetting events"):

1. Under the user's lock (waiting for a compression, as a user erasure does). An unfinished fold of
   an interrupted compression is finished first, so every summarised event is in the archive.
2. Resolve the events: the user's events in ``user_memory`` and the archive with those event ids
   (or in ``[since, until)``). Every version from the first one that folded any of them (an
   archived event's ``summary_version``; for a time range also every version whose ``covers``
   overlaps it) up to the current one has seen their facts: those versions are *tainted*. Versions
   off the current lineage (undone by a rollback, or a killed run's entry above the profile's
   version) whose ``covers`` hold a forgotten event are *dead*: dropped in step 6, never rebuilt.
3. Record the intent in the profile (``memory_forget``: the events' ``_id``s, the tainted range, the
   base, the expected and new versions). From now on compressions refuse the user.
4. Delete the events from ``user_memory`` and the archive (by ``_id``).
5. Rebuild: start from the newest kept version in the current lineage below the tainted range (the
   empty summary, version 0, at worst) and re-fold the archived events after it, minus the
   forgotten ones and minus any that are back in ``user_memory``, with the summariser; validate it;
   write it to the history (kind ``forget``) and commit it through the guarded profile commit as a
   new version. Nothing the archive no longer holds can be re-folded: the result says which
   versions' facts, and how many events, could not be kept.
6. Drop every tainted and dead history version (forgetting wins over remembering: the one case where
   history is deleted), write the content-free audit record, clear the intent.

Every step is safe to repeat and the intent says where the run was, so a kill at any step followed
by a re-run ends as one clean forget.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from butler_memory.core.errors import ConcurrentUpdateError, ErasurePendingError, ForgetInputError, InvalidProfileError
from butler_memory.core.settings import SettingsError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import utcnow
from butler_memory.fold.rebuild import Checkpoint, Parts, finish_interrupted, no_checkpoint
from butler_memory.operations.audit import (
    ALREADY_ERASED,
    DONE,
    DRY_RUN,
    AuditLog,
    ErasureResult,
    event_ref,
    observed_removal,
    subject_ref,
)
from butler_memory.operations.erasure import forget_user
from butler_memory.operations.forget_plan import (
    Request,
    build_request,
    check_known,
    losses,
    plan_forget,
    ranges,
    refold_ids,
    same_request,
)
from butler_memory.operations.intent import locked
from butler_memory.operations.refold import Rebuilt, commit_rebuilt, refold_archived
from butler_memory.storage.batch_folds import BatchFolds
from butler_memory.storage.history import FORGET
from butler_memory.storage.locks import UserLock
from butler_memory.storage.mongo import sanitized_errors
from butler_memory.storage.profiles import ERASING_FIELD, FORGET_FIELD, THROUGH_FIELD, Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

STEPS = ("locked", "planned", "deleted", "summarized", "recorded", "committed", "dropped", "audited", "cleared")

FORGOTTEN = "forgotten"


def forget_events(
    user_id: str,
    event_ids: Sequence[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    *,
    engine: Parts,
    secret: bytes | None,
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

    def run() -> ErasureResult:
        request = build_request(event_ids, since, until)
        return _forget(user_id, request, engine, secret, dry_run, requested_by, run_id, checkpoint, clock, sleep)

    return observed_removal(engine.metrics, m.FORGET, user_id, run, changed=FORGOTTEN, dry_run=dry_run)


def forget_user_or_events(
    parts: Parts,
    user_id: str,
    *,
    secret: bytes | None,
    event_ids: Sequence[str] = (),
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    include_events: bool = False,
    dry_run: bool = False,
    requested_by: str = "api",
    run_id: str | None = None,
) -> ErasureResult:
    """Forget one user, or only some of their events: ``event_ids``, or ``[since, until)``.

    Without events or a range the whole user is erased (``erasure.forget_user``; ``include_events``
    also deletes their events in ``user_memory``); with them, those events are forgotten and the
    summary rebuilt without them (:func:`forget_events`). Raises ``ForgetInputError`` for input that
    contradicts itself, having changed nothing. ``Engine.forget`` is this function on the engine's
    parts: the erasure DAG and the CLI come through it (``engine.erase_events``, for events only, does not).
    """
    if event_ids or since is not None or until is not None:
        if include_events:
            raise ForgetInputError(
                "include_events is for forgetting the whole user; event_ids/since/until forget events"
            )
        return forget_events(
            user_id,
            event_ids,
            since,
            until,
            engine=parts,
            secret=secret,
            dry_run=dry_run,
            requested_by=requested_by,
            run_id=run_id,
        )
    erase = partial(forget_user, settings=parts.settings, store=parts.store, locks=parts.locks, metrics=parts.metrics)
    return erase(user_id, secret=secret, events=include_events, dry_run=dry_run, requested_by=requested_by)


def _forget(
    user_id: str,
    request: Request,
    engine: Parts,
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
            check_known(store, user_id, profile)
            plan = plan_forget(store, user_id, profile, request, secret, audit)
        result = _result(DRY_RUN, plan.facts(), user_id, secret)
    else:
        if secret is None:
            raise SettingsError("a forget needs the secret of its audit references (see audit.erasure_secret)")
        wait = settings.erasure_lock_wait_seconds
        with locked(engine.locks, user_id, "forget", checkpoint=checkpoint, wait_seconds=wait, sleep=sleep) as lock:
            result = _forget_locked(
                user_id, request, engine, lock, audit, secret, requested_by, run_id, checkpoint, clock
            )
    return result


def _forget_locked(
    user_id: str,
    request: Request,
    engine: Parts,
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
    intent = store.intent_of(user_id, FORGET_FIELD)
    if intent is not None:
        log.info("user %s: finishing an interrupted forget (%s)", user_id, intent["id"])
        finished = _finish(user_id, intent, engine, lock, audit, secret, requested_by, checkpoint, clock)
        if same_request(intent["request"], request):
            return finished
        profile = store.load_profile(user_id, create=False)
    _refuse_while_erasing(store, user_id, "; nothing was changed")
    check_known(store, user_id, profile)
    # An interrupted rollback or fold left events the summary covers in user_memory: finish it first,
    # so every summarised event is in the archive (and never re-summarised).
    profile, _ = finish_interrupted(profile, store, lock, run_id="forget", clock=clock, metrics=engine.metrics)
    plan = plan_forget(store, user_id, profile, request, secret, audit)
    if not plan.ids and plan.first_tainted is None and not plan.dead:
        return _result(ALREADY_ERASED, plan.facts(), user_id, secret)
    intent_id = uuid.uuid4().hex
    intent = plan.to_intent(intent_id, request, clock(), run_id or f"forget__{intent_id[:12]}")
    store.load_profile(user_id, create=True)  # a user with events but no profile yet gets one for the intent
    store.begin_intent(user_id, FORGET_FIELD, intent, expected_version=profile.version, during="the forget")
    checkpoint("planned")
    return _finish(user_id, intent, engine, lock, audit, secret, requested_by, checkpoint, clock)


def _refuse_while_erasing(store: MemoryStore, user_id: str, then: str) -> None:
    """Raise ErasurePendingError while an erasure of the whole user is unfinished (``then`` ends the message)."""
    if store.profiles.count_documents({"user_id": user_id, ERASING_FIELD: {"$ne": None}}, limit=1):
        raise ErasurePendingError(
            f"user {user_id!r}: an erasure of the whole user is unfinished; finish it first "
            f"(python -m butler_memory forget --user ...){then}",
            user_id=user_id,
        )


# -- doing it ------------------------------------------------------------------------------------


def _finish(
    user_id: str,
    intent: dict[str, Any],
    engine: Parts,
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
    BatchFolds(store).forget_user(user_id)
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
            # the rebuild's commit requires no erasure of the whole user (it wins): no LLM call for nothing
            _refuse_while_erasing(store, user_id, ", then this forget")
            rebuilt = _rebuild(user_id, intent, engine, lock)
            refolded = rebuilt.count
            checkpoint("summarized")
            now, base = clock(), int(intent["base_version"])
            entry = rebuilt.version(profile, FORGET, intent.get("run_id"), base, base, engine.summarizer, now)
            commit_rebuilt(
                store,
                lock,
                entry,
                checkpoint,
                lambda: store.commit_summary(
                    user_id,
                    expected_version=expected,
                    summary=rebuilt.text,
                    through=through,
                    ids=[],
                    run_id=str(intent.get("run_id")),
                    now=now,
                    target=profile.fold_target,
                    forget_id=intent["id"],
                ),
                partial(store.still_at, user_id, expected, forget_id=intent["id"]),
            )
        store.clear_pending(user_id, new_version)
        # The re-folded events now belong to the new version (as a fold's events do to it), so "which
        # version saw event E" stays a lookup in the archive.
        relabel = refold_ids(store, user_id, int(intent["base_version"]), expected, set(ids))
        store.relabel_archived(user_id, relabel, base=int(intent["base_version"]), version=new_version)
        checkpoint("committed")
    dropped = _dropped(intent)
    if dropped:
        store.history.coll.delete_many({"user_id": user_id, "version": {"$in": dropped}})
    checkpoint("dropped")

    result = _result(FORGOTTEN, {**intent, "refold_count": refolded}, user_id, secret, intent["id"])
    request = intent["request"]
    record = {
        "kind": "events",
        "subject": result.subject,
        "state": DONE,
        "requested_at": intent["started_at"],
        "finished_at": clock(),
        "requested_by": requested_by,
        "event_refs": [event_ref(secret, user_id, i) for i in request.get("event_ids") or []],
        "range": None if not request.get("since") else {"since": request["since"], "until": request["until"]},
        "removed": result.removed,
        "summary": {
            "rebuilt_from_version": result.rebuilt_from_version,
            "new_version": result.summary_version,
            "versions_dropped": ranges(result.versions_dropped),
            "events_refolded": result.events_refolded,
        },
        "lost": result.lost,
    }
    audit.coll.update_one({"_id": intent["id"]}, {"$setOnInsert": record}, upsert=True)
    checkpoint("audited")
    store.clear_forget(user_id, intent["id"])
    checkpoint("cleared")
    log.info(
        "user %s: forgot %d event(s) (%d in user_memory, %d archived); summary %s",
        user_id,
        len(ids),
        intent["in_events"],
        intent["in_archive"],
        f"v{new_version} rebuilt from v{intent['base_version']}" if new_version else "unchanged",
    )
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
        "lost": losses(store, user_id, base, current, history),
        "refold_count": len(refold_ids(store, user_id, base, current, set(intent["ids"]))),
    }
    log.warning("user %s: versions up to v%d were committed during the forget; they are rebuilt too", user_id, current)
    store.update_forget(user_id, intent["id"], changes)
    return {**intent, **changes}


def _rebuild(user_id: str, intent: dict[str, Any], engine: Parts, lock: UserLock) -> Rebuilt:
    """Re-fold the kept archived events after the base version (``refold.refold_archived``: the
    summariser, the validation and the guards, as a compression folds them, on the day's budget)."""
    store = engine.store
    base, current = int(intent["base_version"]), int(intent["expected_version"])
    entry = store.history.version(user_id, base)
    profile = store.load_profile(user_id, create=False)
    ids = refold_ids(store, user_id, base, current, set(intent["ids"]))
    return refold_archived(engine, lock, profile, entry.text if entry is not None else "", ids)


def _result(
    status: str, facts: dict[str, Any], user_id: str, secret: bytes | None, erasure_id: str | None = None
) -> ErasureResult:
    """Return the result of a forget from its plan's facts (``Plan.facts``, or the intent carried out)."""
    first, expected = facts["first_tainted"], int(facts["expected_version"])
    result = ErasureResult(
        status,
        "events",
        erasure_id=erasure_id,
        subject=None if secret is None else subject_ref(secret, user_id),
        removed={"events": facts["in_events"], "archive": facts["in_archive"]},
        summary_version=None if first is None else expected + 1,
        rebuilt_from_version=None if first is None else facts["base_version"],
        versions_dropped=_dropped(facts),
        events_refolded=int(facts.get("refold_count") or 0),
        lost=dict(facts.get("lost") or {}),
    )
    result.notes = _notes(result, facts.get("already") or [])
    return result


def _dropped(facts: Mapping[str, Any]) -> list[int]:
    """Return the history versions a forget drops: the tainted ones (the first up to the version it
    rebuilt on) and the dead ones, off the lineage (no summary descends from them: they only held the facts)."""
    first, expected = facts["first_tainted"], int(facts["expected_version"])
    tainted = range(int(first), expected + 1) if first is not None else range(0)
    return sorted({*tainted, *map(int, facts.get("dead_versions") or [])})


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
