"""The scale benchmark (issue 20 item 6): what a run costs per user as users share a task. ``make bench-scale``.

    .venv/bin/python tools/bench_scale.py [--small-users 1000] [--users 10000] [--ks 20,50,200]
                                          [--celery-users 2000 --celery-k 50]

One invocation, one machine, on the bench harness (tools/bench_harness.py): the stand-ins, Airflow on
the bench's PostgreSQL (durable defaults) with the LocalExecutor and the settings ``make airflow``
uses, the fake LLM answering after ``--latency`` (10 ms: the figures are orchestration's, not an LLM's):

1. ``engine``: the engine alone, a sequential loop over ``--engine-users`` users: its own CPU-s per
   user (the thread's CPU time, as docs/benchmarks.md §1b);
2. ``k1``: ``--small-users`` users at ``users_per_task`` 1 (an instance per user, the most a run took
   before batches);
3. ``k<K>``: ``--users`` users in one run at each of ``--ks``;
4. with ``--celery-users``: that many users at ``--celery-k`` on the CeleryExecutor with
   ``--celery-workers`` workers (a redis-server broker, results in PostgreSQL).

Every user has ``--events`` events (60: one LLM call folds 40, as §1). Per run: wall time, users/s,
the CPU-s per user a deployment pays (Airflow's processes and the task processes, as §1b; then with
the metadata DB's server), its ratio to the engine's own, the rows and bytes the run left in the
metadata DB per 1,000 users (every table with ``dag_id`` and ``run_id``, and the task log files),
the peak RSS of a task process (``VmHWM`` of every ``airflow worker --`` process, sampled), the
scheduler's loop time (Airflow's own ``scheduler.scheduler_loop_duration`` timer, sent to a StatsD
sink the bench starts: count, median, p95 and max in ms, loops per second), the load average before
and after, and the CPU share of processes that are not the bench's. Writes
``.local/bench-scale/results.json`` as each run ends and prints a table. Not part of ``make test``
(tests/harness/test_bench_smoke.py runs it at a toy size).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools import bench, parts  # noqa: E402
from tools import bench_engine as eng  # noqa: E402
from tools.bench_airflow import CELERY_CPU, NOOP_BATCHED_DAG_ID, STAND_INS, AirflowServices, InTurn  # noqa: E402
from tools.bench_fresh import quantile  # noqa: E402
from tools.bench_harness import (  # noqa: E402
    Stack,
    airflow_on,
    log,
    machine,
    run_phase,
    shown,
    stand_ins,
    write_results,
)
from tools.services import RedisService, StatsdSink, parse_statsd_line  # noqa: E402
from tools.standalone import celery_pool, celery_worker  # noqa: E402

OUT_DIR = REPO / ".local" / "bench-scale"
TASK_TITLE = "airflow worker --"
"""The title the Task SDK gives a task process (setproctitle), under the LocalExecutor and Celery alike."""
DB_CPU = STAND_INS["postgres"]
DAY = 86_400
LOOP_TIMER = "scheduler.scheduler_loop_duration"
"""Airflow's scheduler times each of its loops (scheduler_job_runner.py), the idle sleep left out."""


class TaskRss:
    """Sample, every ``interval`` seconds, the peak RSS (``VmHWM``) of every task process below ``roots``.

    ``VmHWM`` is the process's own high-water mark, so a task sampled once before it ends gives its
    peak; a task shorter than the interval can be missed. RSS counts the pages a task shares with the
    worker it was forked from (the preloaded libraries).
    """

    def __init__(self, roots: Iterable[int], interval: float = 0.25) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for root in self.roots:
                with contextlib.suppress(psutil.Error):
                    for proc in psutil.Process(root).children(recursive=True):
                        self._sample(proc)

    def _sample(self, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error, OSError, ValueError):
            if TASK_TITLE not in " ".join(proc.cmdline()):
                return
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), int(line.split()[1]))

    def __enter__(self) -> Self:
        """Start sampling."""
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)

    def figures(self) -> dict[str, Any]:
        """Return the peak and median peak RSS of the task processes seen, in MiB."""
        peaks = list(self.peaks.values())
        return {
            "task_processes_sampled": len(peaks),
            "task_peak_rss_mib": round(max(peaks) / 1024, 1) if peaks else None,
            "task_peak_rss_median_mib": round(statistics.median(peaks) / 1024, 1) if peaks else None,
        }


def uptime() -> str:
    """Return ``uptime``'s line (load averages over 1, 5 and 15 minutes)."""
    proc = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False)
    return proc.stdout.strip() or str(os.getloadavg())


def statsd_env(sink: StatsdSink) -> dict[str, str]:
    """Airflow's StatsD on, to ``sink``, and only the loop timer: every other metric would cost CPU-s the
    deployment figures count."""
    return {
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": sink.host,
        "AIRFLOW__METRICS__STATSD_PORT": str(sink.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "AIRFLOW__METRICS__METRICS_ALLOW_LIST": LOOP_TIMER,
    }


def loop_figures(lines: Iterable[str], seconds: float) -> dict[str, Any]:
    """Return the scheduler's loops among the StatsD ``lines`` of a run of ``seconds``: count, median, p95
    and max in ms, and loops per second."""
    ms = [m.value for m in map(parse_statsd_line, lines) if m.name == f"airflow.{LOOP_TIMER}" and m.type == "ms"]
    figures = {"median": statistics.median(ms) if ms else None, "p95": quantile(ms, 0.95), "max": max(ms, default=None)}
    return {
        "scheduler_loop_ms": {
            "count": len(ms),
            **{k: round(v, 2) if v is not None else None for k, v in figures.items()},
        },
        "scheduler_loops_per_second": round(len(ms) / seconds, 2) if seconds else None,
    }


def phase_engine(ctx: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The engine alone: a sequential loop over ``--engine-users`` users of the same shape."""
    db_name = "bench_scale_engine"
    ctx.client.drop_database(db_name)
    MemoryStore(ctx.client[db_name], Settings()).ensure_indexes()
    eng.seed_users(ctx.client[db_name], eng.throughput_users(args.engine_users, args.events))
    ctx.fake.reset()
    ctx.fake.set_latency(args.latency)
    engine = eng.build_engine(ctx.mongo.uri, db_name, ctx.redis.url, ctx.fake.base_url, Settings())
    try:
        result = eng.run_sequential(engine, run_id="bench-scale-engine")
    finally:
        engine.close()
    ctx.client.drop_database(db_name)
    log(f"engine alone: {result['users']} users, {result['engine_cpu_seconds_per_user']} CPU-s a user")
    return result


def scale_run(
    ctx: Stack,
    airflow: AirflowServices,
    args: argparse.Namespace,
    label: str,
    users: int,
    k: int,
    *,
    sink: StatsdSink,
    workers: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """One DAG run of ``users`` users at ``users_per_task`` ``k`` (a full scan: the first of a database);
    ``sink`` receives the services' StatsD (``statsd_env``)."""
    ctx.redis.client().flushdb()  # the daily scan's owed users of the previous run
    sink.clear()  # the previous run's loops
    load_before = uptime()
    roots = [pid for pid in (workers or {}).values() if pid] or [
        p.pid for p in airflow.processes if p.name == "scheduler" and p.pid
    ]
    with TaskRss(roots) as rss:
        out = bench.airflow_run(
            ctx,
            airflow,
            args,
            label,
            args.latency,
            users,
            conf={"users_per_task": k, "limit": users, "full_scan": True},
            events=args.events,
            workers=workers,
        )
    doc = ctx.client[args.airflow_db]["memory_compression_runs"].find_one({"run_id": out["run_id"]}) or {}
    footprint = airflow.run_footprint(out["run_id"])
    timing = airflow.run_timing(out["run_id"])
    loops = loop_figures(sink.lines_between(timing.start.timestamp(), timing.end.timestamp()), timing.seconds)
    deploy = out["deployment_cpu_seconds_per_user"]
    with_db = deploy + out["cpu_seconds_per_user_by_component"].get(DB_CPU, 0.0)
    engine_cpu = args.engine_cpu_seconds_per_user
    out.update(
        {
            "users_per_task": k,
            "executor": "CeleryExecutor" if workers else "LocalExecutor",
            "compress_tasks": sum(out["states"].values()),
            "users_found": doc.get("users_found"),
            "users_failed": doc.get("users_failed"),
            "deployment_with_db_cpu_seconds_per_user": round(with_db, 4),
            "ratio_to_engine": round(deploy / engine_cpu, 1) if engine_cpu else None,
            "ratio_with_db_to_engine": round(with_db / engine_cpu, 1) if engine_cpu else None,
            "users_per_day_per_core": round(DAY / with_db) if with_db else None,
            "metadata": footprint,
            "metadata_rows_per_1000_users": round(footprint["rows"] * 1000 / users, 1),
            "metadata_bytes_per_1000_users": round(footprint["bytes"] * 1000 / users),
            "log_bytes_per_1000_users": round(footprint["log_bytes"] * 1000 / users),
            "load_before": load_before,
            "load_after": uptime(),
            **rss.figures(),
            **loops,
        }
    )
    if workers is None:  # the LocalExecutor runs: the floor of the same shape, on the same services
        out.update(
            floor_figures(
                bench.noop_run(
                    ctx, airflow, args, args.latency, users, dag_id=NOOP_BATCHED_DAG_ID, conf={"users_per_task": k}
                ),
                deploy,
            )
        )
    log(
        f"{label}: {out['state']}, {users} users at k={k} in {out['run_seconds']:.1f}s "
        f"({out['users_per_second']:.1f} users/s), {deploy:.4f} CPU-s a user ({with_db:.4f} with the DB), "
        f"{out['metadata_rows_per_1000_users']:.0f} metadata rows / 1,000 users, no-op floor "
        f"{out.get('floor_cpu_seconds_per_user')} CPU-s a user (x{out.get('ratio_to_floor')}), task peak RSS "
        f"{out['task_peak_rss_mib']} MiB, scheduler loop {_loop_ms(out)} ms (median/p95/max), "
        f"other load {out['other_load_fraction']:.0%}"
    )
    return out


def floor_figures(floor: Mapping[str, Any], deploy: float) -> dict[str, Any]:
    """Return the no-op floor's figures beside a run's: its run, its CPU-s a user a deployment pays, and the
    run's ``deploy`` CPU-s a user over it."""
    floor_cpu = floor["deployment_cpu_seconds_per_user"]
    return {
        "floor": dict(floor),
        "floor_cpu_seconds_per_user": floor_cpu,
        "ratio_to_floor": round(deploy / floor_cpu, 2) if floor_cpu else None,
    }


def _loop_ms(run: Mapping[str, Any]) -> str:
    loop = run["scheduler_loop_ms"]
    return f"{loop['median']}/{loop['p95']}/{loop['max']}"


@contextlib.contextmanager
def celery_workers(
    ctx: Stack, args: argparse.Namespace, broker: RedisService, sink: StatsdSink, in_turn: InTurn
) -> Iterator[tuple[AirflowServices, dict[str, int | None]]]:
    """Airflow on the CeleryExecutor with ``--celery-workers`` workers of ``parallelism / workers`` processes,
    started while the installation before it stops (``in_turn``), stopped before the broker."""
    concurrency = max(args.parallelism // args.celery_workers, 1)
    assert ctx.postgres is not None, "the scale bench runs Airflow on PostgreSQL"
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{broker.port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + ctx.postgres.create_database("celery_results"),
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
        "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "butler_memory.orchestration.celery_config.CELERY_CONFIG",
        **statsd_env(sink),
    }
    home = args.work_dir / "airflow-celery"
    services = airflow_on(
        ctx, home, args.airflow_db, pool_slots=args.pool_slots, parallelism=args.parallelism, extra_env=extra
    )
    with in_turn.start(services, last=True) as airflow, contextlib.ExitStack() as stack:
        pids: dict[str, int | None] = {}
        for n in range(1, args.celery_workers + 1):
            log_path = home / f"celery-worker-{n}.log"
            worker = stack.enter_context(celery_worker(airflow.env, log_path, ("-H", f"bench{n}@%h")))
            celery_pool(worker, concurrency, log_path)
            pids[f"{CELERY_CPU} {n}"] = worker.pid
        pids["Celery broker (redis-server)"] = broker.pid  # the compose stack's broker: a deployment pays it
        yield airflow, pids


def summary(results: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Return the table's rows: one per run."""
    rows: list[tuple[str, ...]] = [
        (
            "run",
            "users",
            "k",
            "tasks",
            "state",
            "failed",
            "wall s",
            "users/s",
            "CPU-s/user",
            "+DB",
            "x engine",
            "floor",
            "x floor",
            "rows/1k",
            "bytes/1k",
            "log B/1k",
            "task RSS MiB",
            "loop ms med/p95/max",
            "loops/s",
            "other load",
        )
    ]
    for label, run in results.get("runs", {}).items():
        if run.get("timed_out"):
            rows.append((label, "timed out", str(run.get("error", ""))[:60]))
            continue
        rows.append(
            (
                label,
                f"{run['users']:,}",
                str(run["users_per_task"]),
                str(run["compress_tasks"]),
                run["state"],
                str(run["users_failed"]),
                f"{run['run_seconds']:.1f}",
                f"{run['users_per_second']:.1f}",
                f"{run['deployment_cpu_seconds_per_user']:.4f}",
                f"{run['deployment_with_db_cpu_seconds_per_user']:.4f}",
                f"{run['ratio_to_engine']}",
                f"{run.get('floor_cpu_seconds_per_user', '-')}",
                f"{run.get('ratio_to_floor', '-')}",
                f"{run['metadata_rows_per_1000_users']:.0f}",
                f"{run['metadata_bytes_per_1000_users']:,}",
                f"{run['log_bytes_per_1000_users']:,}",
                f"{run['task_peak_rss_mib']}",
                _loop_ms(run),
                f"{run['scheduler_loops_per_second']}",
                f"{run['other_load_fraction']:.0%}",
            )
        )
    return rows


def print_rows(rows: list[tuple[str, ...]]) -> None:
    """Print the rows as aligned columns."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small-users", type=int, default=1000, help="users of the run at users_per_task 1")
    parser.add_argument("--users", type=int, default=10_000, help="users of each run at the --ks")
    parser.add_argument(
        "--ks", type=lambda s: [int(x) for x in s.split(",") if x], default=[20, 50, 200], help="users_per_task"
    )
    parser.add_argument("--events", type=int, default=60, help="events a user has (threshold 50: 40 folded)")
    parser.add_argument("--engine-users", type=int, default=200, help="users of the engine-alone loop")
    parser.add_argument("--latency", type=float, default=0.01, help="fake LLM latency in seconds")
    parser.add_argument("--pool-slots", type=int, default=8, help="slots of the llm_api pool")
    parser.add_argument("--parallelism", type=int, default=16, help="[core] parallelism, twice the pool")
    parser.add_argument("--celery-users", type=int, default=0, help="users of a Celery run (0: none)")
    parser.add_argument("--celery-k", type=int, default=50, help="users_per_task of the Celery run")
    parser.add_argument("--celery-workers", type=int, default=2, help="Celery workers of the Celery run")
    parser.add_argument("--run-timeout", type=float, default=5400.0, help="seconds a DAG run may take")
    parser.add_argument("--work-dir", type=Path, default=OUT_DIR, help="services' data and Airflow homes")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "results.json")
    args = parser.parse_args(argv)
    args.airflow_db = "bench_scale"
    args.budget_guard = lambda: args.run_timeout
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the engine loop and every configuration, write results.json, print the table."""
    args = parse_args(argv)
    pg_bindir = parts.POSTGRESQL.find()
    if pg_bindir is None:
        print(f"!! {parts.POSTGRESQL.missing_reason()}: the scale bench runs Airflow on PostgreSQL", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": uptime(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("budget_guard", "out", "work_dir")},
        "runs": {},
    }
    runs: dict[str, Any] = results["runs"]

    def save() -> None:
        write_results(results, args.out)

    with stand_ins(args.work_dir / "services", pg_bindir=pg_bindir) as ctx, StatsdSink() as sink:
        run_phase(results, "engine", lambda: phase_engine(ctx, args), save=save)
        args.engine_cpu_seconds_per_user = results["engine"].get("engine_cpu_seconds_per_user")
        configs = [("k1", args.small_users, 1)] if args.small_users else []
        configs += [(f"k{k}", args.users, k) for k in args.ks]
        local = airflow_on(
            ctx,
            args.work_dir / "airflow",
            args.airflow_db,
            pool_slots=args.pool_slots,
            parallelism=args.parallelism,
            extra_env=statsd_env(sink),
        )
        # The Celery installation starts while the LocalExecutor one stops; its run waits until that one has ended.
        with InTurn() as in_turn:
            with in_turn.start(local, last=not args.celery_users) as airflow:
                for label, users, k in configs:
                    run = functools.partial(scale_run, ctx, airflow, args, label, users, k, sink=sink)
                    run_phase(runs, label, run, save=save)
            if args.celery_users:
                with (
                    RedisService(args.work_dir / "broker") as broker,
                    celery_workers(ctx, args, broker, sink, in_turn) as (airflow, pids),
                ):
                    label = f"celery_k{args.celery_k}"
                    run_phase(
                        runs,
                        label,
                        lambda: scale_run(
                            ctx, airflow, args, label, args.celery_users, args.celery_k, sink=sink, workers=pids
                        ),
                        save=save,
                    )
    results["load_after"] = uptime()
    results["elapsed_seconds"] = round(log.elapsed(), 1)
    rows = summary(results)
    results["summary"] = [list(r) for r in rows]
    save()
    print_rows(rows)
    log(f"results in {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
