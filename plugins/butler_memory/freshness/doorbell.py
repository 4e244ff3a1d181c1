"""The doorbell: the Butler says "this user may be due" after appending an event.

Plain Python on redis-py (no Airflow import), a synchronous ``Doorbell`` and an asyncio
``AsyncDoorbell`` (``redis.asyncio``) with the same behaviour::

    from butler_memory.freshness.doorbell import AsyncDoorbell

    bell = AsyncDoorbell.from_url("redis://redis:6379/0")
    await bell.ring(user_id, events=n)  # after appending the user's event; n = their event count, if known

A ring does two things in one Redis script, so neither happens without the other:

1. **records** the user in a sorted set (``doorbell_key``, member = user id, score = unix time of the
   first ring since the record was last dropped: the record is drained oldest first). The record
   lives in Redis, not Airflow: it survives Airflow being down, and the next catch-up run
   (scheduled or woken) drains it. The ring is also numbered (a counter, ``<doorbell_key>:rings``)
   and the user's last ring number kept in a hash (``<doorbell_key>:rang``, field = user id): the
   catch-up scan reads the counter with the record, and its report drops a handled user's record
   only when the user did not ring after that read. A ring made while the run compressed the user
   (say the Butler imported older messages, which no watermark sees) so keeps its record for the
   next run instead of waiting for the daily reconciliation;
2. **wakes** the catch-up DAG by publishing on ``doorbell_channel``; the DAG's asset watcher
   (``butler_memory.freshness.doorbell_trigger``) turns that into an asset event at once.

The doorbell only shortens the wait: a lost wake-up (Airflow down, triggerer restarting) leaves
the record, and the catch-up cadence plus the daily run find the user anyway.

What a ring costs: a user id that is not a sensible id (not a string, empty, over 200 characters,
control characters or whitespace) is refused before Redis (``ring`` returns False). With
``events`` given and not over the threshold, nothing is sent at all. A user that turns out to be
under the threshold, or unknown, costs the catch-up scan one ``count_documents``. A Redis error is
logged (no content, no id) and returned as False: a doorbell never fails the Butler's request.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script
from redis.exceptions import RedisError

from butler_memory.core.ids import valid_user_id
from butler_memory.storage.doorbell_keys import rang_key, rings_key

log = logging.getLogger(__name__)

DEFAULT_KEY = "butler:memory:doorbell"
DEFAULT_CHANNEL = "butler:memory:doorbell:ring"
DEFAULT_THRESHOLD = 50
WAKE_MESSAGE = "ring"
"""What is published: a fixed word (no user id, no content)."""

# ZADD NX keeps the first ring's time (the oldest wait); the ring's number goes into the user's field
# of the rang hash (the report keeps a record rung after its scan read it); PUBLISH wakes the watcher.
RING_SCRIPT = """
local ring = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ring)
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""

# Drop the handled users' records (and their last ring numbers) unless they rang after ARGV[1], the
# ring number the scan read; a record kept so wakes the next run. Returns how many were kept.
SETTLE_SCRIPT = """
local kept = 0
for i = 4, #ARGV do
  local ring = redis.call('HGET', KEYS[2], ARGV[i])
  if ring and tonumber(ring) > tonumber(ARGV[1]) then
    kept = kept + 1
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
if kept > 0 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return kept
"""


ClientT = TypeVar("ClientT", redis.Redis, redis.asyncio.Redis)


class _Bell(Generic[ClientT]):
    """What both doorbells share: the client, the record's key, the wake channel and the threshold."""

    def __init__(
        self,
        client: ClientT,
        *,
        key: str = DEFAULT_KEY,
        channel: str = DEFAULT_CHANNEL,
        threshold: int | None = DEFAULT_THRESHOLD,
    ) -> None:
        self._client: ClientT = client
        self.key = key
        self.channel = channel
        self.threshold = threshold

    def _ring_args(self, user_id: object, events: int | None) -> list[str | float] | None:
        """Return the ring script's arguments, or None when the ring is refused or not worth sending."""
        if not valid_user_id(user_id):
            log.warning("doorbell: refused a malformed user id (type %s)", type(user_id).__name__)
            return None
        if events is not None and self.threshold is not None and events <= self.threshold:
            return None
        return [time.time(), user_id, self.channel, WAKE_MESSAGE]


def _unreachable(exc: RedisError) -> bool:
    log.warning("doorbell: Redis unreachable (%s); the catch-up cadence finds the user", type(exc).__name__)
    return False


class Doorbell(_Bell[redis.Redis]):
    """Ring for users from synchronous code (one Redis round trip a ring)."""

    @functools.cached_property
    def _script(self) -> Script:
        return self._client.register_script(RING_SCRIPT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Doorbell:
        """Connect to Redis at ``url`` (``redis://host:port/db``) with short timeouts."""
        return cls(redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0), **kwargs)

    def ring(self, user_id: str, *, events: int | None = None) -> bool:
        """Record that ``user_id`` may be due and wake the catch-up DAG; return whether it was recorded.

        ``events``: the user's event count when the caller knows it; at or under the threshold the
        ring is a no-op (returns False without touching Redis).
        """
        args = self._ring_args(user_id, events)
        if args is None:
            return False
        try:
            self._script(keys=[self.key, rang_key(self.key), rings_key(self.key)], args=args)
        except RedisError as exc:
            return _unreachable(exc)
        return True

    def pending(self) -> int:
        """Return how many users wait in the doorbell's record."""
        return int(self._client.zcard(self.key))  # type: ignore[arg-type]  # a sync client's reply

    def close(self) -> None:
        """Close the Redis connection pool."""
        self._client.close()


class AsyncDoorbell(_Bell[redis.asyncio.Redis]):
    """Ring for users from asyncio code (the Butler); same behaviour as ``Doorbell``."""

    @functools.cached_property
    def _script(self) -> AsyncScript:
        return self._client.register_script(RING_SCRIPT)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> AsyncDoorbell:
        """Connect to Redis at ``url`` (``redis://host:port/db``) with short timeouts."""
        return cls(redis.asyncio.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0), **kwargs)

    async def ring(self, user_id: str, *, events: int | None = None) -> bool:
        """Record that ``user_id`` may be due and wake the catch-up DAG; return whether it was recorded."""
        args = self._ring_args(user_id, events)
        if args is None:
            return False
        try:
            await self._script(keys=[self.key, rang_key(self.key), rings_key(self.key)], args=args)
        except RedisError as exc:
            return _unreachable(exc)
        return True

    async def pending(self) -> int:
        """Return how many users wait in the doorbell's record."""
        return int(await self._client.zcard(self.key))

    async def close(self) -> None:
        """Close the Redis connection pool."""
        await self._client.aclose()


class DoorbellRecord:
    """The job's side of the record: read the oldest entries, drop the handled ones, put users back."""

    def __init__(self, client: redis.Redis, *, key: str = DEFAULT_KEY, channel: str = DEFAULT_CHANNEL) -> None:
        self._client = client
        self.key = key
        self.channel = channel

    @functools.cached_property
    def _settle_script(self) -> Script:
        return self._client.register_script(SETTLE_SCRIPT)

    def oldest(self, limit: int) -> dict[str, float]:
        """Return up to ``limit`` recorded users, oldest ring first: {user_id: first ring time}."""
        return _users(self._client.zrange(self.key, 0, limit - 1, withscores=True))

    def read(self, limit: int) -> tuple[dict[str, float], int]:
        """Return ``oldest(limit)`` and the number of the last ring before it, read together (one
        transaction): ``settle`` with that number keeps the records of users that rang after it.
        Writes nothing (a dry run may read)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(rings_key(self.key))
        pipe.zrange(self.key, 0, limit - 1, withscores=True)
        rings, rows = pipe.execute()
        return _users(rows), int(rings or 0)

    def settle(
        self,
        handled: list[str],
        again: list[str],
        quiet: list[str] | None = None,
        *,
        wake: bool = False,
        read_ring: int | None = None,
    ) -> None:
        """Drop the handled users' records; record ``again`` (left over for the next run) and wake it;
        record ``quiet`` without waking anyone (users a later run should take, not the next one); with
        ``wake``, wake the next run anyway. Given ``read_ring`` (what ``read`` returned before the
        users were handled), a handled user that rang after it keeps its record (its new events may
        not be in what the run handled) and the next run is woken; without it (a record nobody
        rings, the daily scan's owed users) the handled users are dropped outright."""
        pipe = self._client.pipeline(transaction=True)
        if handled and read_ring is not None:
            self._settle_script(
                keys=[self.key, rang_key(self.key)], args=[read_ring, self.channel, WAKE_MESSAGE, *handled], client=pipe
            )
        elif handled:
            pipe.zrem(self.key, *handled)
        if quiet:
            pipe.zadd(self.key, dict.fromkeys(quiet, time.time()), nx=True)
        if again:
            pipe.zadd(self.key, dict.fromkeys(again, time.time()), nx=True)
        if again or wake:
            pipe.publish(self.channel, WAKE_MESSAGE)
        if handled or again or quiet or wake:
            pipe.execute()


def _users(rows: Any) -> dict[str, float]:
    """{user_id: score} from a ``ZRANGE ... WITHSCORES`` reply, in its order."""
    out: dict[str, float] = {}
    for member, score in rows:
        user_id = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
        out[user_id] = float(score)
    return out
