"""The preload under the CeleryExecutor (the compose stack's executor): one DAG run with Airflow's
default Celery config, one with ``butler_memory.orchestration.celery_config``, in the same invocation.

    .venv/bin/python tools/bench_celery.py [--users 100] [--latency 0.5]

Runs the API server, scheduler and DAG processor of ``tools/bench_airflow.py`` with the
CeleryExecutor, a redis-server as the broker, a SQLite result backend, and an
``airflow celery worker`` (concurrency = 2 x pool slots); prints users/s and the worker process
tree's CPU seconds per user for both runs (and writes them to ``.local/bench-celery/results.json``). Not part of ``make bench`` (about 3 minutes more).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from tools import bench  # noqa: E402
from tools.bench_airflow import proc_cpu  # noqa: E402
from tools.bench_harness import Stack, stand_ins, write_results  # noqa: E402
from tools.services import RedisService  # noqa: E402
from tools.standalone import celery_pool, celery_worker  # noqa: E402

OUT_DIR = REPO / ".local" / "bench-celery"
CONFIG = "butler_memory.orchestration.celery_config.CELERY_CONFIG"


def _tree_cpu(root: psutil.Process) -> float:
    return sum(proc_cpu(p) for p in [root, *root.children(recursive=True)])


def _one(ctx: Stack, args: argparse.Namespace, broker: RedisService, configured: bool) -> dict[str, Any]:
    label = "celery_config" if configured else "airflow_default"
    home = OUT_DIR / label
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{broker.port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+sqlite:///{OUT_DIR / (label + '-results.db')}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(2 * args.pool_slots),
    }
    if configured:
        extra["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"] = CONFIG
    services = bench.airflow_services(ctx, args, home, 2 * args.pool_slots, extra)
    log_path = OUT_DIR / f"{label}-worker.log"
    with services, celery_worker(services.env, log_path) as worker:
        celery_pool(worker, 2 * args.pool_slots, log_path)
        root = psutil.Process(worker.pid)
        before = _tree_cpu(root)
        run = bench.airflow_run(ctx, services, args, label, args.latency, args.users)
        worker_cpu = _tree_cpu(root) - before
    return {
        "state": run["state"],
        "users_per_second": run["users_per_second"],
        "task_duration_median": run["task_duration_median"],
        "worker_cpu_seconds_per_user": round(worker_cpu / args.users, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both configurations and print their figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--pool-slots", type=int, default=8)
    args = parser.parse_args(argv)
    args.airflow_db = "bench_celery"
    args.budget_guard = lambda: 900.0
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    with stand_ins(OUT_DIR / "services") as ctx, RedisService(OUT_DIR / "broker") as broker:
        results = {
            "airflow_default": _one(ctx, args, broker, configured=False),
            "celery_config": _one(ctx, args, broker, configured=True),
        }
    write_results(results, OUT_DIR / "results.json")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
