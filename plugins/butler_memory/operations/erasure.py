"""Forget a user everywhere this package keeps their data, and leave a content-free audit record.

No Airflow imports here: the CLI, the ``memory_erasure`` DAG and the Butler's own deletion flow
(:func:`forget_user`) all call the same code.

What a user erasure removes (docs/erasure.md):

* their events in ``user_memory`` (only when asked: the Butler may delete those itself),
* their archived events, every version of their summary in the history collection,
* the summary and every bookkeeping field of ours in their profile (the profile document itself
  only when nothing of the Butler's is left in it),
* their rows and ids in the run documents,
* their Redis keys (lock, failure back-off and any other per-user key in :data:`USER_KEY_PATTERNS`).

Invariants:

1. Everything happens under the user's compression lock. A compression holding it makes the
   erasure wait (``erasure_lock_wait_seconds``), never interleave; at the bound it fails, retryable.
2. The intent is recorded first, in the audit collection (the profile is among the things removed):
   ``{kind: "user", subject: <keyed reference>, state: "started", removed: <counts found>}``. Then a
   marker in the profile makes every compression refuse the user until the erasure is done.
3. Every step deletes by ``user_id`` and is safe to repeat, so a kill at any step followed by a
   re-run (which finds the started intent and resumes it) ends as one clean erasure: one audit
   record, state ``done``, the counts found when it started, and a re-count showing nothing left.

The audit record names the user by a keyed reference, never their id (``audit.py``).
"""

from __future__ import annotations

import logging
import operator
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import redis
from pymongo.collection import Collection
from pymongo.database import Database

from butler_memory.core.errors import ForgetInputError
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import utcnow
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.operations.audit import (
    ALREADY_ERASED,
    DRY_RUN,
    STARTED,
    AuditLog,
    ErasureResult,
    audit_key,
    counts_text,
    observed_removal,
    subject_ref,
)
from butler_memory.operations.intent import locked
from butler_memory.storage.doorbell_keys import rang_key
from butler_memory.storage.locks import UserLock, UserLocks
from butler_memory.storage.mongo import sanitized_errors
from butler_memory.storage.profiles import ERASING_FIELD, OUR_PROFILE_FIELDS
from butler_memory.storage.run_docs import RUN_USERS_FIELD
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

USER_STEPS = ("locked", "intent", "marked", "events", "archive", "history", "runs", "redis", "profile", "done")

# Statuses of an erasure's result.
ERASED = "erased"
ERASED_EVENTS = ("events", "archive", "quarantine")
"""The places of ``ErasureResult.removed`` that count events (the erasure metrics' events)."""

USER_KEY_SETTINGS = ("lock_key_pattern", "backoff_key_pattern")
"""Every setting naming a per-user Redis key (a pattern with ``{user_id}``): the lock and the failure
back-off hash, named here, not registered by their writers (the back-off is in ``freshness``, a layer
above); a test checks that every ``*_key_pattern`` setting with ``{user_id}`` is listed."""

USER_KEY_PATTERNS: list[Callable[[Settings], str]] = [operator.attrgetter(name) for name in USER_KEY_SETTINGS]
"""Per-user Redis key patterns (each with ``{user_id}``) a user erasure deletes: those of
:data:`USER_KEY_SETTINGS`, and any a module keeping a per-user key that is not a setting appends."""

SHARED_REDIS_MEMBERS: list[Callable[[Settings], str]] = [
    lambda s: s.doorbell_key,
    lambda s: rang_key(s.doorbell_key),
    lambda s: s.daily_owed_key,
]
"""Shared Redis keys (sets, sorted sets, hashes, lists) whose members or fields may be user ids; a
user erasure removes the user's id from each: the doorbell's record and the daily scan's owed record
(sorted sets of user ids), the doorbell's last ring numbers (a hash, field = user id), and whatever
another module registers here."""


# -- Redis --------------------------------------------------------------------------------------


def redis_user_keys(settings: Settings, user_id: str) -> list[str]:
    """Return the per-user Redis keys a user erasure deletes (see USER_KEY_PATTERNS)."""
    return sorted({pattern(settings).format(user_id=user_id) for pattern in USER_KEY_PATTERNS})


def _redis_traces(client: Any, settings: Settings, user_id: str, lock_key: str) -> tuple[list[str], list[str]]:
    """Return (per-user keys that exist, other than the lock we hold; shared keys holding the id)."""
    keys = [k for k in redis_user_keys(settings, user_id) if k != lock_key and client.exists(k)]
    shared = []
    for make_key in SHARED_REDIS_MEMBERS:
        key = make_key(settings)
        kind = _type(client, key)
        present = (
            (kind == "set" and client.sismember(key, user_id))
            or (kind == "zset" and client.zscore(key, user_id) is not None)
            or (kind == "hash" and client.hexists(key, user_id))
            or (kind == "list" and client.lpos(key, user_id) is not None)
        )
        if present:
            shared.append(key)
    return keys, shared


def _type(client: Any, key: str) -> str:
    kind = client.type(key)
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _erase_redis(client: Any, settings: Settings, user_id: str, lock_key: str) -> int:
    keys, shared = _redis_traces(client, settings, user_id, lock_key)
    if keys:
        client.delete(*keys)
    for key in shared:
        kind = _type(client, key)
        if kind == "set":
            client.srem(key, user_id)
        elif kind == "zset":
            client.zrem(key, user_id)
        elif kind == "hash":
            client.hdel(key, user_id)
        elif kind == "list":
            client.lrem(key, 0, user_id)
    return len(keys) + len(shared)


# -- run documents ------------------------------------------------------------------------------

_GONE = object()


def scrub(value: Any, user_id: str, pattern: re.Pattern[str]) -> Any:
    """Return ``value`` without the user: rows whose ``user_id`` is theirs, list items and dict keys
    equal to their id are dropped, and their id inside a longer string (a whole id there, see
    :func:`id_pattern`) is replaced by ``[erased]``.
    Returns the value itself (the same object) when nothing in it names the user."""
    if isinstance(value, Mapping):
        if value.get("user_id") == user_id:
            return _GONE
        out: dict[Any, Any] = {}
        changed = False
        for key, item in value.items():
            if key == user_id:
                changed = True
                continue
            new = scrub(item, user_id, pattern)
            if new is _GONE:
                changed = True
                continue
            changed = changed or new is not item
            out[key] = new
        return out if changed else value
    if isinstance(value, list):
        items = [scrub(item, user_id, pattern) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return [item for item in items if item is not _GONE]
    if isinstance(value, str):
        if value == user_id:
            return _GONE
        if user_id in value:
            return pattern.sub("[erased]", value)
    return value


ID_DELIMITERS = "\"'`()[]{}<>,;\\«»“”‘’"
"""Characters that end an id inside free text (labels, error messages, JSON text): whitespace,
control characters and these quotes, brackets and separators, which no id scheme uses. Every other
character may be part of an id (``alice@example.com``, ``alice+work``, ``tg:alice``, ``auth0|x``,
``u1.5``): ids are printable, without whitespace (``valid_user_id``)."""

_ID_CHAR = rf"[^\s\x00-\x1f\x7f{re.escape(ID_DELIMITERS)}]"


def id_pattern(user_id: str) -> re.Pattern[str]:
    """Return a pattern matching the id as a whole id: the whole string, or inside a longer one
    between :data:`ID_DELIMITERS` (or its ends)."""
    # Whole ids only: erasing "u1" must not touch "u10", nor "alice" another user's "alice@example.com".
    return re.compile(rf"(?<!{_ID_CHAR}){re.escape(user_id)}(?!{_ID_CHAR})")


def _job_collections(store: MemoryStore) -> list[Collection[dict[str, Any]]]:
    """Return the collections of the job's own documents: runs, catch-up runs, state."""
    settings = store.settings
    names = dict.fromkeys([settings.runs_collection, settings.catchup_runs_collection, settings.state_collection])
    return [store.db[name] for name in names]


def _runs_naming(store: MemoryStore, user_id: str) -> list[tuple[Collection[dict[str, Any]], Any, dict[str, Any]]]:
    """Return (collection, _id, scrubbed document) of every run or state document that names the user.

    Run documents list the users they name in ``user_ids`` (indexed): only those are read, plus any
    written before that field existed (until their retention drops them), so an erasure's cost does
    not grow with the run history. The few state documents are all read. Every document read is
    scrubbed whole, so a field added later by another feature is covered without being known here.
    """
    pattern = id_pattern(user_id)
    settings = store.settings
    runs = {settings.runs_collection, settings.catchup_runs_collection}
    found = []
    for coll in _job_collections(store):
        queries: list[dict[str, Any]] = [{}]
        if coll.name in runs - {settings.state_collection}:
            queries = [{RUN_USERS_FIELD: user_id}, {RUN_USERS_FIELD: None}]  # None: written before the field
        for query in queries:
            for doc in coll.find(query):
                new = scrub(doc, user_id, pattern)
                if new is not doc and new is not _GONE:
                    found.append((coll, doc["_id"], new))
    return found


# -- forget_user --------------------------------------------------------------------------------


def _history(store: MemoryStore) -> Collection[dict[str, Any]]:
    return store.history.coll


def _count(store: MemoryStore, redis_client: Any, user_id: str) -> dict[str, int]:
    """Count what a user erasure removes, per place (the user's lock, held by the erasure, aside)."""
    profile = store.profiles.find_one({"user_id": user_id}) or {}
    keys, shared = _redis_traces(redis_client, store.settings, user_id, store.settings.lock_key(user_id))
    return {
        "events": store.events.count_documents({"user_id": user_id}),
        "archive": store.archive_coll.count_documents({"user_id": user_id}),
        "quarantine": store.quarantine.count_documents({"user_id": user_id}),
        "history": _history(store).count_documents({"user_id": user_id}),
        "run_documents": len(_runs_naming(store, user_id))
        + store.run_users.count_documents({"user_id": user_id})
        + store.db[store.settings.batch_collection].count_documents({"user_id": user_id}),
        "profile_fields": sum(1 for name in _our_fields(store.settings) if name in profile),
        "redis_keys": len(keys) + len(shared),
    }


def _our_fields(settings: Settings) -> list[str]:
    return [settings.summary_field, *OUR_PROFILE_FIELDS]


def forget_user(
    user_id: str,
    *,
    settings: Settings,
    store: MemoryStore,
    locks: UserLocks,
    secret: bytes | None,
    events: bool = False,
    dry_run: bool = False,
    requested_by: str = "api",
    checkpoint: Checkpoint = no_checkpoint,
    clock: Callable[[], datetime] = utcnow,
    sleep: Callable[[float], None] | None = None,
    metrics: m.Metrics | None = None,
) -> ErasureResult:
    """Erase one user everywhere this package keeps their data; return what was removed (counts only).

    ``events=True`` also deletes their events in ``user_memory`` (leave it False when the Butler
    deletes those itself, before or after this call). ``dry_run`` counts and changes nothing.
    Raises ForgetInputError for a bad or unknown user id (nothing changed), LockBusyError when a
    compression kept the lock past ``erasure_lock_wait_seconds`` (retryable, nothing changed).
    """

    def erase() -> ErasureResult:
        with sanitized_errors(user_id, "erasure"):
            return _forget_user(
                user_id, settings, store, locks, secret, events, dry_run, requested_by, checkpoint, clock, sleep
            )

    metrics = metrics or m.NullMetrics()
    return observed_removal(metrics, m.ERASURE, user_id, erase, changed=ERASED, dry_run=dry_run, places=ERASED_EVENTS)


def _forget_user(
    user_id: str,
    settings: Settings,
    store: MemoryStore,
    locks: UserLocks,
    secret: bytes | None,
    events: bool,
    dry_run: bool,
    requested_by: str,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
    sleep: Callable[[float], None] | None,
) -> ErasureResult:
    audit = AuditLog(store)
    subject = None if secret is None else subject_ref(secret, user_id)
    if dry_run:
        counts = _count(store, locks.client, user_id)
        if not events:
            counts["events"] = 0
        pending = audit.started(subject, "user") if subject else None
        if not any(counts.values()) and pending is None:
            if subject and audit.last_done(subject, "user"):
                return ErasureResult(ALREADY_ERASED, "user", subject=subject, notes=["already erased"])
            raise ForgetInputError(f"user {user_id!r}: unknown here (no events, profile, archive or history)")
        return ErasureResult(DRY_RUN, "user", subject=subject, removed=counts)
    if secret is None:
        raise SettingsError("an erasure needs the secret of its audit references (see erasure_secret)")
    assert subject is not None

    wait = settings.erasure_lock_wait_seconds
    with locked(locks, user_id, "erasure", checkpoint=checkpoint, wait_seconds=wait, sleep=sleep) as lock:
        return _forget_user_locked(
            user_id, subject, lock, settings, store, locks, audit, events, requested_by, checkpoint, clock
        )


def _forget_user_locked(
    user_id: str,
    subject: str,
    lock: UserLock,
    settings: Settings,
    store: MemoryStore,
    locks: UserLocks,
    audit: AuditLog,
    events: bool,
    requested_by: str,
    checkpoint: Checkpoint,
    clock: Callable[[], datetime],
) -> ErasureResult:
    lock_key = settings.lock_key(user_id)
    intent = audit.started(subject, "user")
    if intent is None:
        counts = _count(store, locks.client, user_id)
        if not events:
            counts["events"] = 0
        if not any(counts.values()):
            done = audit.last_done(subject, "user")
            if done is not None:
                log.info("erasure %s: this user was already erased", done["_id"])
                return ErasureResult(ALREADY_ERASED, "user", erasure_id=done["_id"], subject=subject)
            raise ForgetInputError(f"user {user_id!r}: unknown here (no events, profile, archive or history)")
        intent = {
            "_id": uuid.uuid4().hex,
            "kind": "user",
            "subject": subject,
            "state": STARTED,
            "requested_at": clock(),
            "requested_by": requested_by,
            "options": {"events": events},
            "removed": counts,
            "steps_done": [],
        }
        audit.ensure_indexes()
        audit.start(intent)
        log.info("erasure %s: intent recorded (%s)", intent["_id"], counts_text(counts))
    else:
        log.info("erasure %s: resuming an unfinished erasure", intent["_id"])
        if events and not intent["options"].get("events"):
            # A re-run asking for more than the interrupted one: the audit record says so.
            counts = {**intent["removed"], "events": store.events.count_documents({"user_id": user_id})}
            audit.coll.update_one({"_id": intent["_id"]}, {"$set": {"options.events": True, "removed": counts}})
            intent["options"]["events"], intent["removed"] = True, counts
    erasure_id: str = intent["_id"]
    events = bool(intent["options"].get("events"))
    checkpoint("intent")

    # From here on every compression refuses this user (see compression.py), until the profile step.
    # Upserted: a compression would otherwise create the profile and go ahead. Removed at the profile step.
    store.profiles.update_one({"user_id": user_id}, {"$set": {ERASING_FIELD: erasure_id}}, upsert=True)
    checkpoint("marked")

    lock.extend()
    if events:
        store.events.delete_many({"user_id": user_id})
    checkpoint("events")
    store.archive_coll.delete_many({"user_id": user_id})
    store.quarantine.delete_many({"user_id": user_id})  # events a compression could not fold
    checkpoint("archive")
    _history(store).delete_many({"user_id": user_id})
    checkpoint("history")
    lock.extend()
    for coll, doc_id, scrubbed in _runs_naming(store, user_id):
        coll.replace_one({"_id": doc_id}, scrubbed)
    store.run_users.delete_many({"user_id": user_id})  # per-user outcomes of runs (batched tasks)
    store.db[settings.batch_collection].delete_many({"user_id": user_id})  # batch mode's folds and replies
    checkpoint("runs")
    _erase_redis(locks.client, settings, user_id, lock_key)
    checkpoint("redis")
    _erase_profile(store, user_id)
    checkpoint("profile")

    left = {name: n for name, n in _count(store, locks.client, user_id).items() if n}
    notes = []
    if left.get("events") and not events:
        notes.append(
            f"{left['events']} event(s) are still in {settings.events_collection} (not asked to delete them): "
            "delete them, or the next compression folds them into a new summary"
        )
    audit.finish(erasure_id, {"finished_at": clock(), "left": left, "steps_done": list(USER_STEPS[1:-1])})
    checkpoint("done")
    log.info("erasure %s: done (%s)", erasure_id, counts_text(intent["removed"]))
    return ErasureResult(
        ERASED, "user", erasure_id=erasure_id, subject=subject, removed=dict(intent["removed"]), left=left, notes=notes
    )


def _erase_profile(store: MemoryStore, user_id: str) -> None:
    """Remove our fields from the profile; remove the document when nothing of the Butler's is left."""
    fields = [*_our_fields(store.settings), ERASING_FIELD]
    store.profiles.update_many({"user_id": user_id}, {"$unset": dict.fromkeys(fields, "")})
    for doc in store.profiles.find({"user_id": user_id}):
        if set(doc) <= {"_id", "user_id"}:  # a profile our compression created: all of it was ours
            store.profiles.delete_one({"_id": doc["_id"], "user_id": user_id})


def erase_user(
    user_id: str,
    *,
    db: Database[Any],
    redis_client: redis.Redis,
    secret: str | bytes,
    events: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Erase a user: the call for the Butler's own deletion flow (pymongo and redis-py, no Airflow).

    ``db`` is the Butler's database, ``redis_client`` the Redis of the compression locks, ``secret``
    the key of the audit references (the same one the CLI and the DAG use). Returns the result as a
    dict (counts, the audit record's id; no content). Safe to call again after a failure or a crash.
    """
    settings = settings or Settings.from_env()
    key = audit_key(secret)
    store = MemoryStore(db, settings)
    locks = UserLocks(redis_client, settings)
    result = forget_user(
        user_id, settings=settings, store=store, locks=locks, secret=key, events=events, requested_by="butler"
    )
    return result.to_dict()
