"""Back-off of users whose compression fails deterministically, kept on the lock Redis.

A user that fails with a non-retryable error (a guard rejection, a cut-off reply, an invalid summary,
a bad event...) fails the same way on the next try: the summariser runs at temperature 0. Without a
back-off the catch-up DAG would spend an LLM call on them every 5 minutes (~288 prompts a day per
stuck user, enough to drain ``daily_token_budget`` for everyone). After its ``n``-th such failure in a
row a user is skipped by the **catch-up** scan for ``backoff_base_seconds * 2**(n-1)``, at most
``backoff_max_seconds``. The daily run and a trigger naming the user (``user_ids``) still try them;
any successful compression of the user (or finding them under the threshold) clears the back-off.

One Redis hash per user (``backoff_key_pattern``): ``failures``, ``until`` (unix time) and
``error_type`` (a class name, no content). It expires ``backoff_max_seconds`` after its back-off ends,
so a user that stopped failing long ago starts again from the base delay. Clearing it by hand:
``DEL`` the key (docs/operations/runbook.md#a-user-is-backed-off).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from butler_memory.core.errors import LockUnavailableError
from butler_memory.core.settings import Settings

log = logging.getLogger(__name__)


class FailureBackoff:
    """Per-user back-off after deterministic failures (see the module docstring)."""

    def __init__(self, client: Any, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether failures back users off at all (``backoff_base_seconds`` 0 turns it off)."""
        return self._settings.backoff_base_seconds > 0

    def key(self, user_id: str) -> str:
        """Return the user's back-off hash key."""
        return self._settings.backoff_key_pattern.format(user_id=user_id)

    def delay(self, failures: int) -> int:
        """Return the back-off after the ``failures``-th failure in a row, in seconds."""
        base, cap = self._settings.backoff_base_seconds, self._settings.backoff_max_seconds
        return min(base * 2 ** min(max(failures - 1, 0), 32), cap)

    def record_failure(self, user_id: str, error_type: str) -> float:
        """Count one more failure of ``user_id`` and back it off; return the unix time it ends (0 when off
        or when Redis failed: a back-off only saves LLM calls, it never hides the failure itself)."""
        if not self.enabled:
            return 0.0
        key = self.key(user_id)
        try:
            failures = int(self._client.hincrby(key, "failures", 1))
            until = self._clock() + self.delay(failures)
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(key, mapping={"until": until, "error_type": error_type[:64]})
            pipe.expire(key, self.delay(failures) + self._settings.backoff_max_seconds)
            pipe.execute()
        except RedisError as exc:
            log.warning("user %s: back-off not recorded, Redis unreachable (%s)", user_id, type(exc).__name__)
            return 0.0
        return until

    def clear(self, user_id: str) -> None:
        """Forget the user's failures (it was compressed, or is no longer due); a Redis error is logged
        (the back-off then ends on its own)."""
        try:
            self._client.delete(self.key(user_id))
        except RedisError as exc:
            log.warning("user %s: back-off not cleared, Redis unreachable (%s)", user_id, type(exc).__name__)

    def backed_off(self, user_ids: Sequence[str]) -> set[str]:
        """Return those of ``user_ids`` whose back-off has not ended (one pipelined round trip per 1,000)."""
        if not self.enabled or not user_ids:
            return set()
        now = self._clock()
        found: set[str] = set()
        try:
            for start in range(0, len(user_ids), 1000):
                batch = list(user_ids[start : start + 1000])
                pipe = self._client.pipeline(transaction=False)
                for user_id in batch:
                    pipe.hget(self.key(user_id), "until")
                for user_id, until in zip(batch, pipe.execute(), strict=True):
                    if until is not None and float(until) > now:
                        found.add(user_id)
        except RedisError as exc:
            raise LockUnavailableError(f"Redis unreachable while reading back-offs ({type(exc).__name__})") from None
        return found
