"""The catch-up DAG's asset watcher: turns doorbell rings into asset events, in the triggerer.

Why not the Redis provider's ``AwaitMessageTrigger`` (directly or through common-messaging's
``MessageQueueTrigger`` with ``redis+pubsub://``): in apache-airflow-providers-redis 4.7.1 it is a
plain ``BaseTrigger`` (``AssetWatcher`` refuses it: "must inherit BaseEventTrigger"), it reads with
the synchronous client every ``poll_interval`` (60 s by default), and it yields one message and
returns, so the triggerer starts it again and subscribes anew: a ring published in between is lost.

This trigger subscribes once and yields for ever (Airflow 3.3's triggerer keeps iterating a watcher's
``run()``). It is gap-free across its own restarts: it subscribes first, then looks at the
doorbell's record, and fires at once when anyone is waiting (a ring published while it was not
listening, e.g. while Airflow was down). Rings that arrive together are coalesced for
``debounce_seconds`` into one event: many rings while a run is busy make one more run, not many.
A Redis outage is waited out (reconnect with backoff), never fails the watcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

log = logging.getLogger(__name__)

CLASSPATH = "butler_memory.freshness.doorbell_trigger.DoorbellTrigger"
SSL_EXTRA = ("ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_keyfile", "ssl_certfile", "ssl_check_hostname")
RECONNECT_MAX_SECONDS = 30.0


class DoorbellTrigger(BaseEventTrigger):
    """Fire whenever the doorbell rings (see ``butler_memory.freshness.doorbell``)."""

    def __init__(
        self,
        *,
        redis_conn_id: str = "redis_default",
        key: str = "butler:memory:doorbell",
        channel: str = "butler:memory:doorbell:ring",
        debounce_seconds: float = 1.0,
    ) -> None:
        super().__init__()
        self.redis_conn_id = redis_conn_id
        self.key = key
        self.channel = channel
        self.debounce_seconds = debounce_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "redis_conn_id": self.redis_conn_id,
                "key": self.key,
                "channel": self.channel,
                "debounce_seconds": self.debounce_seconds,
            },
        )

    async def _client(self) -> Any:
        import redis.asyncio
        from airflow.sdk import BaseHook
        from asgiref.sync import sync_to_async

        conn = await sync_to_async(BaseHook.get_connection)(self.redis_conn_id)
        extra = conn.extra_dejson or {}
        password = None if str(conn.password).lower() in ("none", "false", "") else conn.password
        return redis.asyncio.Redis(
            host=conn.host or "localhost",
            port=int(conn.port or 6379),
            username=conn.login or None,
            password=password,
            db=int(extra.get("db") or 0),
            socket_connect_timeout=5.0,
            **{name: extra[name] for name in SSL_EXTRA if name in extra},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from redis.exceptions import RedisError

        backoff = 1.0
        while True:
            client = None
            try:
                client = await self._client()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                # Subscribed: from here no ring is missed. Anyone recorded already rang while nobody listened.
                waiting = int(await client.zcard(self.key))
                backoff = 1.0
                if waiting:
                    yield TriggerEvent({"reason": "waiting", "users": waiting})
                while True:
                    message = await pubsub.get_message(timeout=60.0)
                    if message is None:
                        continue
                    await asyncio.sleep(self.debounce_seconds)
                    rings = 1
                    while await pubsub.get_message(timeout=0.0) is not None:
                        rings += 1
                    yield TriggerEvent({"reason": "rung", "rings": rings})
            except (RedisError, OSError) as exc:
                log.warning("doorbell watcher: Redis error %s; reconnecting in %.0f s", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)
            finally:
                if client is not None:
                    await client.aclose()
