"""A real ``airflow celery worker`` started with ``butler_memory.orchestration.celery_config`` has the task's
libraries loaded in its pool processes before any task arrives; without it, it has not.

The observable is the shared objects a process has mapped (``/proc/PID/maps``): pymongo's
``_cmessage`` and ``jiter`` (the ``openai`` client's JSON parser) are loaded only by the preload,
never by Celery or Airflow themselves. The broker is the suite's redis-server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.services import RedisService
from tools.standalone import celery_pool, celery_worker

REPO = Path(__file__).resolve().parents[2]
MARKERS = ("pymongo/_cmessage", "jiter/jiter")
BROKER_DB = 9
POOL = 2
START_TIMEOUT = 90.0


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _worker_env(tmp_path: Path, redis_service: RedisService, configured: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__CORE__UNIT_TEST_MODE"}
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_service.port}/{BROKER_DB}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+sqlite:///{tmp_path / 'celery.db'}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(POOL),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    if configured:
        env["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"] = "butler_memory.orchestration.celery_config.CELERY_CONFIG"
    return env


@pytest.mark.parametrize("configured", [True, False], ids=["celery_config", "airflow_default"])
def test_worker_pool_starts_with_the_task_libraries_only_with_our_config(
    tmp_path: Path, redis_service: RedisService, configured: bool
) -> None:
    env = _worker_env(tmp_path, redis_service, configured)
    with celery_worker(env, tmp_path / "worker.log") as worker:
        pool = celery_pool(worker, POOL, tmp_path / "worker.log", timeout=START_TIMEOUT)
        loaded = {p.pid: all(marker in _maps(p.pid) for marker in MARKERS) for p in pool}
    assert len(loaded) >= POOL
    if configured:
        assert all(loaded.values()), f"pool processes without the preloaded libraries: {loaded}"
    else:
        assert not any(loaded.values()), f"libraries loaded without the config (the check proves nothing): {loaded}"
