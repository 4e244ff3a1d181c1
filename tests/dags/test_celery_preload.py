"""A real ``airflow celery worker`` started with ``butler_memory.celery_config`` has the task's
libraries loaded in its pool processes before any task arrives; without it, it has not.

The observable is the shared objects a process has mapped (``/proc/PID/maps``): pymongo's
``_cmessage`` and ``jiter`` (the ``openai`` client's JSON parser) are loaded only by the preload,
never by Celery or Airflow themselves. The broker is the suite's redis-server.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tools.services import RedisService
from tools.standalone import celery_worker

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
        env["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"] = "butler_memory.celery_config.CELERY_CONFIG"
    return env


def _pool_of(root: psutil.Process) -> list[psutil.Process]:
    """Celery's prefork pool processes (titled ``[celeryd: ...:ForkPoolWorker-N]``); the worker has
    other children (Airflow's helper processes) that are not forked from it to run tasks."""
    return [p for p in root.children() if "ForkPoolWorker" in p.name()]


def _pool_processes(worker: subprocess.Popen[bytes], tmp_path: Path) -> list[psutil.Process]:
    """Wait until the worker has forked its pool (and the pool has settled); return the pool."""
    deadline = time.monotonic() + START_TIMEOUT
    root = psutil.Process(worker.pid)
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"celery worker exited {worker.returncode}:\n{(tmp_path / 'worker.log').read_text()[-3000:]}")
        if len(_pool_of(root)) >= POOL:
            time.sleep(2.0)  # let every pool process finish its own start-up
            return _pool_of(root)
        time.sleep(0.5)
    pytest.fail(f"no pool within {START_TIMEOUT:.0f}s:\n{(tmp_path / 'worker.log').read_text()[-3000:]}")


@pytest.mark.parametrize("configured", [True, False], ids=["celery_config", "airflow_default"])
def test_worker_pool_starts_with_the_task_libraries_only_with_our_config(
    tmp_path: Path, redis_service: RedisService, configured: bool
) -> None:
    env = _worker_env(tmp_path, redis_service, configured)
    with celery_worker(env, tmp_path / "worker.log") as worker:
        pool = _pool_processes(worker, tmp_path)
        loaded = {p.pid: all(marker in _maps(p.pid) for marker in MARKERS) for p in pool}
    assert len(loaded) >= POOL
    if configured:
        assert all(loaded.values()), f"pool processes without the preloaded libraries: {loaded}"
    else:
        assert not any(loaded.values()), f"libraries loaded without the config (the check proves nothing): {loaded}"
