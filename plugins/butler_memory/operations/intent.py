"""The frame every per-user operation runs in (rollback, re-fold, forget, erasure): the user's lock,
taken at once or waited for, held for the operation's length, and MongoDB errors turned into
``StoreError``s that quote no document; then the profile as the operation may build on it (no
erasure unfinished, what an interrupted run left finished).

Each operation is then only what differs: its plan, its intent, its new version (``fold.rebuild``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar

from butler_memory.core.errors import LockBusyError, RollbackRefusedError
from butler_memory.fold.compression import SKIPPED_LOCKED
from butler_memory.fold.metrics import Metrics
from butler_memory.fold.rebuild import Checkpoint, finish_interrupted, finish_rollback
from butler_memory.storage.locks import UserLock, UserLocks
from butler_memory.storage.mongo import sanitized_errors
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

# Besides its own statuses (rolled_back, refolded, not_changed) every operation's result shares a
# compression's dry_run, skipped_locked and failed (fold.compression), and this one:
REFUSED = "refused"
LOCK_HELD = "the user's lock is held; try again"
"""The message of a ``skipped_locked`` result."""


@dataclass
class VersionResult:
    """What an operation did (or would do) to one user's summary version: ids, versions and counts, never
    content. Rollback's and re-fold's results add their own fields (keyword-only)."""

    user_id: str
    status: str
    from_version: int = 0
    to_version: int = 0
    """The new version (the current one for a dry run or no change)."""
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (fit for XCom)."""
        return asdict(self)


def acquire_waiting(
    locks: UserLocks,
    user_id: str,
    wait_seconds: float,
    *,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> UserLock:
    """Take the user's lock, waiting up to ``wait_seconds`` for its holder; raise LockBusyError then."""
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    deadline = clock() + wait_seconds
    delay = 0.05
    while True:
        lock = locks.acquire(user_id)
        if lock is not None:
            return lock
        if clock() >= deadline:
            raise LockBusyError(
                f"user {user_id!r}: the compression lock stayed held for {wait_seconds:g} s; nothing was "
                "changed, run it again (a compression in progress holds it for its length)",
                user_id=user_id,
            )
        log.info("user %s: lock held (a compression is running), waiting", user_id)
        sleep(delay)
        delay = min(delay * 2, 1.0)


@contextmanager
def locked(
    locks: UserLocks,
    user_id: str,
    step: str,
    *,
    checkpoint: Checkpoint,
    wait_seconds: float = 0.0,
    sleep: Callable[[float], None] | None = None,
) -> Iterator[UserLock]:
    """Hold the user's lock (``acquire_waiting``: LockBusyError when it stays held) around the body,
    whose pymongo errors become ``sanitized_errors(user_id, step)``; checkpoint "locked" once taken."""
    lock = acquire_waiting(locks, user_id, wait_seconds, sleep=sleep)
    try:
        checkpoint("locked")
        with sanitized_errors(user_id, step):
            yield lock
    finally:
        lock.release()


ResultT = TypeVar("ResultT", bound=VersionResult)


def under_lock(
    locks: UserLocks,
    user_id: str,
    step: str,
    checkpoint: Checkpoint,
    body: Callable[[UserLock], ResultT],
    outcome: Callable[..., ResultT],
) -> ResultT:
    """Run ``body`` under the user's lock (``locked``); a held lock or a refusal is a result of its own,
    ``outcome(status, message=...)``: skipped_locked (taken by someone else) or refused (RollbackRefusedError)."""
    try:
        with locked(locks, user_id, step, checkpoint=checkpoint) as lock:
            return body(lock)
    except LockBusyError:
        log.info("user %s: lock held by another compression, %s skipped", user_id, step)
        return outcome(SKIPPED_LOCKED, message=LOCK_HELD)
    except RollbackRefusedError as exc:
        return outcome(REFUSED, message=str(exc))


def settled_profile(
    store: MemoryStore,
    lock: UserLock,
    user_id: str,
    *,
    dry_run: bool,
    run_id: str,
    clock: Callable[[], datetime],
    metrics: Metrics | None = None,
    own_rollback: Checkpoint | None = None,
) -> Profile:
    """Return the user's profile to build a new version on: refused (RollbackRefusedError) while an
    erasure of the user or of some of their events is unfinished; unless a dry run, with what an
    interrupted run left (a rollback's intent, a pending fold) finished first (``finish_interrupted``;
    a rollback finishing its own intent passes its checkpoint as ``own_rollback``)."""
    profile = store.load_profile(user_id, create=False)
    if profile.erasing:
        raise RollbackRefusedError(
            f"user {user_id!r}: an erasure of this user (or of some of their events) is unfinished; finish it "
            "first (python -m butler_memory forget --user ...); nothing was changed",
            user_id=user_id,
        )
    if not dry_run:
        if profile.rollback is not None and own_rollback is not None:
            finish_rollback(store, profile, lock, own_rollback, clock)
            profile = store.load_profile(user_id, create=False)
        profile, _ = finish_interrupted(profile, store, lock, run_id=run_id, clock=clock, metrics=metrics)
    return profile
