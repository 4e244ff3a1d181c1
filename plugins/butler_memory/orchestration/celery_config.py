"""Celery settings for Airflow's CeleryExecutor: Airflow's defaults, plus the preload plugin imported
when a Celery worker starts.

A Celery worker loads no Airflow plugins before its prefork pool starts, so without this each
``compress_user`` task process imports the engine, ``openai``, pymongo and redis-py again (about
0.4 CPU-s a task). Celery imports the modules listed in ``imports`` in the worker's main process
at start-up, before it forks the pool: pool processes, and the task processes Airflow forks from
them, then start with everything loaded (measured: worker CPU per user 0.63 → 0.18 s,
``docs/benchmarks.md``). Use it with::

    AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=butler_memory.orchestration.celery_config.CELERY_CONFIG

(``docker-compose.yaml`` sets it). ``BUTLER_MEMORY_PRELOAD=false`` still turns the preload off.
Importing this module needs the Celery provider; it is not an Airflow plugin (``plugins/.airflowignore``).
"""

from __future__ import annotations

from typing import Any

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

PRELOAD_MODULE = "butler_memory_preload"

CELERY_CONFIG: dict[str, Any] = {
    **DEFAULT_CELERY_CONFIG,
    "imports": [*DEFAULT_CELERY_CONFIG.get("imports", ()), PRELOAD_MODULE],
}
"""Airflow's ``DEFAULT_CELERY_CONFIG`` with ``butler_memory_preload`` added to ``imports``."""
