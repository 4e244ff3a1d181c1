"""The batch mode's wait: a trigger that polls the run's batches in the triggerer until all ended.

Why not ``OpenAIBatchTrigger`` of apache-airflow-providers-openai (2.2.0): its ``run()`` calls the
synchronous ``OpenAIHook.get_batch`` inside the triggerer's event loop, so every poll blocks every
other trigger of the triggerer (the doorbell watcher among them) for the length of an HTTP call;
and it needs an Airflow connection of type ``openai``, which bypasses our connection checks
(``connections.llm_config``: the key is never sent to another host than the one it is for). This
one asks with ``openai.AsyncOpenAI``, resolves the endpoint and key exactly as the online path
does, waits for several batches (a run split by the server's limits), and carries only batch ids,
the run's settings and states: no content, no key (it is read again from the connection in the triggerer).

A failed poll (the server unreachable, a 5xx, a rate limit) is retried at the next poll; a batch
that does not end is ended by the provider itself (``completion_window``: "expired"), which the
trigger reports like any other end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from butler_memory.core.settings import Settings

log = logging.getLogger(__name__)

CLASSPATH = "butler_memory.orchestration.batch_trigger.BatchTrigger"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
SETTINGS_PASSED = tuple(f.name for f in dataclasses.fields(Settings))
"""Every setting (names, numbers, flags: no secret lives there): the triggerer rebuilds ``Settings``
to resolve the endpoint (``connections.llm_config``), and its checks read settings together
(summary_max_tokens against prompt_budget_tokens and max_event_chars): a subset of a valid
deployment's settings could be refused there, at every poll, though the task side accepted them."""


class BatchTrigger(BaseTrigger):
    """Fire once every batch of ``batch_ids`` has ended: ``{"states": {batch_id: status}}``."""

    def __init__(self, *, batch_ids: list[str], settings: dict[str, Any], poll_seconds: float = 60.0) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.settings = {name: settings[name] for name in SETTINGS_PASSED if name in settings}
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {"batch_ids": self.batch_ids, "settings": self.settings, "poll_seconds": self.poll_seconds},
        )

    def _client(self) -> Any:
        """Return an async client to the endpoint the online path would call, with its key (sync: connections)."""
        import openai

        from butler_memory.core.settings import SettingsError
        from butler_memory.llm.openai_summarizer import tls_context
        from butler_memory.orchestration.connections import llm_config

        config = llm_config(Settings.from_mapping(self.settings))
        if config is None:
            raise SettingsError(f"LLM connection {self.settings.get('llm_conn_id')!r} is not defined")
        return openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key,
            timeout=config.timeout_seconds,
            max_retries=0,  # the next poll is the retry
            http_client=openai.DefaultAsyncHttpxClient(verify=tls_context()),
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import openai
        from asgiref.sync import sync_to_async

        client = await sync_to_async(self._client)()
        states: dict[str, str] = {}
        try:
            while True:
                for batch_id in self.batch_ids:
                    if states.get(batch_id) in TERMINAL:
                        continue
                    try:
                        states[batch_id] = str((await client.batches.retrieve(batch_id)).status)
                    except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
                        log.warning("batch %s: poll failed (%s); asking again later", batch_id, type(exc).__name__)
                    except openai.APIStatusError as exc:  # 4xx: the batch is gone or the key refused
                        yield TriggerEvent({"states": states, "error": f"HTTP {exc.status_code} polling {batch_id}"})
                        return
                if all(states.get(batch_id) in TERMINAL for batch_id in self.batch_ids):
                    log.info("batches ended: %s", ", ".join(f"{b} {s}" for b, s in states.items()))
                    yield TriggerEvent({"states": states})
                    return
                await asyncio.sleep(self.poll_seconds)
        finally:
            await client.close()


class WaitForBatches(BaseOperator):
    """Wait for the run's batches in the triggerer (deferred: no worker slot held), then collect them.

    Nothing to wait for (online mode, or no user in a batch): returns at once. The deferral's timeout
    is past the completion window: by then the provider has ended every batch ("expired") itself.
    """

    def __init__(self, *, defer_timeout: timedelta = timedelta(hours=25), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.defer_timeout = defer_timeout

    def execute(self, context: Any) -> dict[str, Any] | None:
        from butler_memory.orchestration import dag_tasks

        ids, settings = dag_tasks.batch_wait(context["params"], context["ti"])
        if not ids:
            return None
        log.info("waiting in the triggerer for %d batch(es): %s", len(ids), ", ".join(ids))
        self.defer(
            trigger=BatchTrigger(batch_ids=ids, settings=settings, poll_seconds=float(settings["poll_seconds"])),
            method_name="execute_complete",
            timeout=self.defer_timeout,
        )
        return None  # not reached: defer() raises

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        from butler_memory.orchestration import dag_tasks

        return dag_tasks.batch_collect(context["params"], context["ti"], context["run_id"], event or {})
