"""Per-user compression locks in Redis, shared with the Butler's inline compression.

Built on redis-py's ``Lock`` (a token per acquire, ``SET NX PX``, release and extend by scripts
that compare the token first), so releasing can never drop another holder's lock. The key pattern
is a setting: the bot's inline path and this job must use the same one.
"""

from __future__ import annotations

import logging
from typing import cast

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock

from butler_memory.errors import LockLostError, LockUnavailableError
from butler_memory.settings import Settings

log = logging.getLogger(__name__)


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

    def acquire(self, user_id: str) -> UserLock | None:
        """Take the user's lock without waiting; None when another holder has it."""
        lock = Lock(
            self._client,
            self._settings.lock_key(user_id),
            timeout=self._settings.lock_ttl_seconds,
            blocking=False,
            thread_local=False,
        )
        try:
            acquired = lock.acquire(blocking=False)
        except RedisError as exc:
            raise LockUnavailableError(
                f"user {user_id!r}: Redis unreachable, not compressing without a lock ({type(exc).__name__})",
                user_id=user_id,
            ) from None
        if not acquired:
            return None
        return UserLock(lock, user_id, self._settings.lock_ttl_seconds)

    def holder_ttl(self, user_id: str) -> float | None:
        """Return the seconds left on the user's lock, or None when nobody holds it."""
        # redis-py 5 types sync and async replies alike (ResponseT); this client is synchronous.
        ttl_ms = cast("int | None", self._client.pttl(self._settings.lock_key(user_id)))
        return None if ttl_ms is None or ttl_ms < 0 else ttl_ms / 1000.0
