"""A daily LLM token budget shared by every run (daily, catch-up, CLI), counted in Redis.

Off by default (``daily_token_budget`` 0). When set, each LLM call's prompt + completion tokens
(a refused reply's too: cut off, truncated prompt, content filter; see ``Spent``) are added with one ``INCRBY`` on the day's key (``token_budget_key_pattern`` with the UTC date; it
expires after two days), so concurrent tasks count together and exactly. The budget is checked
**before a user is started**, never in the middle: a user whose compression began is finished (a
half-folded user would be no cheaper to finish tomorrow), so the day can overshoot by at most the
users already running when it was spent. Users not started get ``skipped_budget``: nothing
touched, not a failure, taken by the next day's runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from butler_memory.core.errors import LockUnavailableError
from butler_memory.core.settings import Settings

log = logging.getLogger(__name__)

KEY_TTL_SECONDS = 2 * 86400


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TokenBudget:
    """The day's token count on the lock Redis."""

    def __init__(self, client: Any, settings: Settings, clock: Callable[[], datetime] = _utcnow) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock

    @classmethod
    def when_set(cls, client: Any, settings: Settings) -> TokenBudget | None:
        """Return the budget on ``client`` when ``daily_token_budget`` sets one, else None."""
        return cls(client, settings) if settings.daily_token_budget > 0 else None

    @property
    def limit(self) -> int:
        """Tokens a day; 0 = no budget."""
        return self._settings.daily_token_budget

    def key(self) -> str:
        """Return today's (UTC) Redis key."""
        return self._settings.token_budget_key_pattern.format(day=self._clock().astimezone(UTC).date().isoformat())

    def spent(self) -> int:
        """Return the tokens counted today."""
        try:
            raw = self._client.get(self.key())
        except RedisError as exc:
            raise LockUnavailableError(
                f"Redis unreachable while reading the token budget ({type(exc).__name__})"
            ) from None
        return int(raw or 0)

    def exhausted(self) -> bool:
        """Whether today's budget is spent (always False without a budget)."""
        return self.limit > 0 and self.spent() >= self.limit

    def spend(self, tokens: int) -> int:
        """Count ``tokens`` against today; return the day's total (nothing is sent without a budget)."""
        if self.limit <= 0 or tokens <= 0:
            return 0
        key = self.key()
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.incrby(key, tokens)
            pipe.expire(key, KEY_TTL_SECONDS)
            total, _ = pipe.execute()
        except RedisError as exc:
            # Uncounted tokens would let the day overspend: fail this user (retryable) before its commit.
            raise LockUnavailableError(f"Redis unreachable while counting LLM tokens ({type(exc).__name__})") from None
        return int(total)


@dataclass
class Spent:
    """The LLM tokens one user's operation spent so far, every call counted (refused replies too),
    each also counted on the day's budget when there is one."""

    budget: TokenBudget | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one call's tokens (on the budget too; its Redis error fails the user, retryably)."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if self.budget is not None:
            self.budget.spend(prompt_tokens + completion_tokens)
