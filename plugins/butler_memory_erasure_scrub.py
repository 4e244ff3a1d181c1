"""Airflow plugin: once a ``memory_erasure`` run finished, the ids it named leave Airflow's metadata DB.

Registers the listeners of ``butler_memory.orchestration.airflow_scrub`` (see there, and docs/erasure.md). Every
Airflow process loads plugins; the listeners act only where a DAG run's state changes, which is
where the metadata DB is reachable (scheduler, API server, ``dag.test()``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from butler_memory.orchestration import airflow_scrub


class ButlerMemoryErasureScrubPlugin(AirflowPlugin):
    """The listeners that scrub finished erasure runs."""

    name = "butler_memory_erasure_scrub"
    listeners = [airflow_scrub]  # noqa: RUF012  # the plugin manager's own attribute type
