"""Per-user compression locks in Redis, shared with the Butler's inline compression.

Built on redis-py's ``Lock`` (a token per acquire, ``SET NX PX``, release and extend by scripts
that compare the token first), so releasing can never drop another holder's lock. The key pattern
is a setting: the bot's inline path and this job must use the same one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock

from butler_memory.core.errors import LockLostError, LockUnavailableError, StaleOwnLockError
from butler_memory.core.settings import Settings

log = logging.getLogger(__name__)


HOLDER_PREFIX = "butler-memory:"
HOLDER_END = "#"
"""Our lock values: ``butler-memory:<holder>#<random token>`` (the bot's own values are left alone)."""


class UserLock:
    """One held lock on one user's memory."""

    def __init__(self, lock: Lock, user_id: str, ttl_seconds: int) -> None:
        self._lock = lock
        self.user_id = user_id
        self._ttl = ttl_seconds

    def extend(self) -> None:
        """Reset the lock's TTL to the full TTL; raise LockLostError when it is no longer ours."""
        try:
            self._lock.extend(self._ttl, replace_ttl=True)
        except LockError:
            raise LockLostError(
                f"user {self.user_id!r}: compression lock expired or was taken by another holder",
                user_id=self.user_id,
            ) from None
        except RedisError as exc:
            raise LockUnavailableError(
                f"user {self.user_id!r}: Redis unreachable while extending the lock ({type(exc).__name__})",
                user_id=self.user_id,
            ) from None

    @contextmanager
    def kept_alive(self) -> Iterator[None]:
        """Extend the lock every third of its TTL while the block runs (one LLM call).

        The ``openai`` client retries ``max_retries`` times and honours a server's ``Retry-After``
        of up to two minutes, so one call can take ``timeout x (max_retries + 1)`` plus those waits:
        longer than any sensible TTL. While this process lives the lock stays ours; a killed process
        stops extending it and it expires one TTL later. A failed extension is only logged here:
        the extension right before the commit raises LockLostError.
        """
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self._ttl / 3):
                try:
                    self._lock.extend(self._ttl, replace_ttl=True)
                except (LockError, RedisError) as exc:
                    log.warning("user %s: lock extension failed while waiting (%s)", self.user_id, type(exc).__name__)
                    return

        keeper = threading.Thread(target=beat, name=f"lock-keeper-{self.user_id}", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    def release(self) -> None:
        """Release the lock if it is still ours; never raises."""
        try:
            self._lock.release()
        except LockNotOwnedError:
            log.warning("user %s: lock had already expired or changed hands at release", self.user_id)
        except (LockError, RedisError) as exc:
            log.warning("user %s: lock release failed (%s); it expires by its TTL", self.user_id, type(exc).__name__)


class UserLocks:
    """Acquire per-user locks on one Redis connection."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    @property
    def client(self) -> redis.Redis:
        """The Redis client the locks live on (an erasure also removes the user's other keys there)."""
        return self._client

    def close(self) -> None:
        """Close the Redis connection pool."""
        self._client.close()

    def ping(self) -> None:
        """Fail closed: raise LockUnavailableError when Redis does not answer."""
        try:
            self._client.ping()
        except RedisError as exc:
            raise LockUnavailableError(
                f"Redis for compression locks is unreachable ({type(exc).__name__}); "
                "no user is compressed without a lock"
            ) from None

    def acquire(self, user_id: str, *, holder: str | None = None) -> UserLock | None:
        """Take the user's lock without waiting; None when another holder has it.

        With ``holder`` (e.g. ``dag|run|task|map_index``) the lock's value names it: a lock found
        held by the same holder was left by an earlier attempt of this very task (killed by OOM or
        ``execution_timeout`` before it could release), so it is waited out, at most one TTL, and
        then taken. Still held after that, the earlier attempt is alive and extending it:
        StaleOwnLockError (retryable), never a quiet ``skipped_locked``.
        """
        lock = self._try(user_id, holder)
        if lock is not None or holder is None:
            return lock
        deadline = time.monotonic() + self._settings.lock_ttl_seconds + 1
        while self._holder(user_id) == holder:
            if time.monotonic() > deadline:
                raise StaleOwnLockError(
                    f"user {user_id!r}: an earlier attempt of this task still holds the lock after one TTL "
                    f"({self._settings.lock_ttl_seconds} s); retry later",
                    user_id=user_id,
                )
            time.sleep(0.2)
        log.info("user %s: waited out the lock an earlier attempt of this task left", user_id)
        return self._try(user_id, holder)

    def _try(self, user_id: str, holder: str | None) -> UserLock | None:
        lock = Lock(
            self._client,
            self._settings.lock_key(user_id),
            timeout=self._settings.lock_ttl_seconds,
            blocking=False,
            thread_local=False,
        )
        token = None if holder is None else f"{HOLDER_PREFIX}{holder}{HOLDER_END}{uuid.uuid4().hex}"
        try:
            acquired = lock.acquire(blocking=False, token=token)
        except RedisError as exc:
            raise LockUnavailableError(
                f"user {user_id!r}: Redis unreachable, not compressing without a lock ({type(exc).__name__})",
                user_id=user_id,
            ) from None
        if not acquired:
            return None
        return UserLock(lock, user_id, self._settings.lock_ttl_seconds)

    def _holder(self, user_id: str) -> str | None:
        """Return the holder named in the user's lock, None when free or not one of ours."""
        try:
            raw = cast("bytes | str | None", self._client.get(self._settings.lock_key(user_id)))
        except RedisError as exc:
            raise LockUnavailableError(
                f"user {user_id!r}: Redis unreachable while reading the lock ({type(exc).__name__})", user_id=user_id
            ) from None
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not value or not value.startswith(HOLDER_PREFIX) or HOLDER_END not in value:
            return None
        return value[len(HOLDER_PREFIX) :].rsplit(HOLDER_END, 1)[0]

    def holder_ttl(self, user_id: str) -> float | None:
        """Return the seconds left on the user's lock, or None when nobody holds it."""
        # redis-py 5 types sync and async replies alike (ResponseT); this client is synchronous.
        ttl_ms = cast("int | None", self._client.pttl(self._settings.lock_key(user_id)))
        return None if ttl_ms is None or ttl_ms < 0 else ttl_ms / 1000.0
