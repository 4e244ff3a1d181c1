"""Airflow plugin: import the compression task's libraries once per Airflow process, not per task.

Every ``compress_user`` task instance runs in a process that Airflow forks for it (LocalExecutor: the
scheduler forks its workers, a worker forks each task; Celery: a worker process forks each task). A fresh
task process imports what the task needs: the ``openai`` client alone cost 0.4 CPU-s, and imports
were 90 % of a task's own CPU (py-spy, ``docs/benchmarks.md``). Airflow imports
plugin modules in each component before it forks (the scheduler does it when its job starts, before
the LocalExecutor's workers exist), so importing the libraries here makes every forked task process
inherit them, already loaded, through copy-on-write memory. A Celery worker loads no plugins
before it forks its pool: ``butler_memory.orchestration.celery_config`` makes it import this module first.

The plugin registers nothing. Set ``BUTLER_MEMORY_PRELOAD=false`` to turn it off (e.g. to keep the
API server's memory smaller); the DAG then works as before, each task importing what it uses.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping

from airflow.plugins_manager import AirflowPlugin

PRELOAD_ENV = "BUTLER_MEMORY_PRELOAD"
PRELOADED_MODULES = (
    "butler_memory.orchestration.dag_tasks",  # engine, store, locks, settings, report, metrics, connections
    "airflow.providers.mongo.hooks.mongo",  # pymongo
    "airflow.providers.redis.hooks.redis",  # redis-py
    "statsd",
    # What the DAG file's ``from airflow.sdk import dag, task`` resolves lazily when a task parses it.
    "airflow.sdk.definitions.decorators",
    "airflow.providers.standard.decorators.python",
)
"""What a ``compress_user`` task process imports; each is imported at most once."""

log = logging.getLogger(__name__)


def preload_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Return False when ``BUTLER_MEMORY_PRELOAD`` is false (0, false, no, off). Any other value that
    is not true (1, true, yes, on) is logged and treated as true: a plugin must not stop Airflow."""
    from butler_memory.core.settings import FALSE_VALUES, TRUE_VALUES

    raw = (os.environ if env is None else env).get(PRELOAD_ENV)
    value = "true" if raw is None else raw.strip().lower()
    if value in FALSE_VALUES:
        return False
    if value not in TRUE_VALUES:
        log.warning("butler_memory preload: %s=%r is not true or false; preloading", PRELOAD_ENV, raw)
    return True


def preload(modules: tuple[str, ...] = PRELOADED_MODULES) -> dict[str, float]:
    """Import ``modules``; return the seconds each took. A module that fails to import is logged
    and skipped: the task imports it again itself and reports the error where it belongs."""
    took: dict[str, float] = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # never break the component that loads plugins
            log.warning("butler_memory preload: %s not imported (%s)", name, type(exc).__name__)
            continue
        took[name] = round(time.perf_counter() - started, 4)
    return took


def warm_up(what: str, module: str) -> float | None:
    """Call ``module.warm_up()`` (no I/O): the LLM client's lazy imports and TLS context
    (``butler_memory.llm.openai_summarizer``), the guards' stemmers and language detector
    (``butler_memory.safety.guards``). Return the seconds it took, None when it failed (logged; the task
    then does it itself and reports any error)."""
    started = time.perf_counter()
    try:
        importlib.import_module(module).warm_up()
    except Exception as exc:  # never break the component that loads plugins
        log.warning("butler_memory preload: %s not warmed up (%s)", what, type(exc).__name__)
        return None
    return round(time.perf_counter() - started, 4)


if preload_enabled():
    PRELOAD_SECONDS = preload()
    PRELOAD_SECONDS["openai (client warm-up)"] = warm_up("LLM client", "butler_memory.llm.openai_summarizer") or 0.0
    PRELOAD_SECONDS["guards (Lingua, Snowball)"] = warm_up("guards", "butler_memory.safety.guards") or 0.0


class ButlerMemoryPreloadPlugin(AirflowPlugin):
    """Registers nothing: importing this module is its whole effect."""

    name = "butler_memory_preload"
