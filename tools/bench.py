"""Benchmarks of memory_compression: ``make bench`` (about 14-15 minutes on 2 cores).

Every figure is a ratio or a count taken in ONE run, so a noisy machine moves both sides of it:

1. throughput: a full DAG run under real Airflow services (LocalExecutor, pool ``llm_api``) against
   a plain sequential loop over the same engine, with a fake LLM answering in a fixed latency;
2. MongoDB round trips per user (pymongo command monitoring), by command, for 60 / 1,000 /
   100,000 events;
3. prompt efficiency: prompt characters sent per character of event text (recorded requests);
4. peak RSS of one compression of a 100,000-event user, in a subprocess;
5. Airflow overhead per mapped task with an instant LLM;
6. scan time as the event collection grows, with the server's ``explain``;
7. the guards: catch rate of the fake LLM's bad modes, false alarms on honest runs (tools/bench_guards.py).

Prints a summary table, writes ``.local/bench/results.json`` and the SVG charts in ``docs/img/``.
Every server listens on 127.0.0.1 only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools import bench_engine as eng  # noqa: E402
from tools import bench_guards, parts  # noqa: E402
from tools.bench_airflow import (  # noqa: E402
    DAG_ID,
    NOOP_DAG_ID,
    OTHER_CPU,
    STAND_INS,
    TASKS_CPU,
    AirflowServices,
    InTurn,
    RunTiming,
    cpu_delta,
    cpu_snapshot,
    machine_busy_seconds,
    reaped_children_cpu,
)
from tools.bench_harness import (  # noqa: E402
    OUT_DIR,
    Budget,
    Stack,
    airflow_on,
    log,
    machine,
    run_phase,
    shown,
    stand_ins,
    timed_out,
    write_results,
)
from tools.bench_report import IMG_DIR, print_table, summarise, write_charts  # noqa: E402
from tools.fake_openai import FakeOpenAI  # noqa: E402
from tools.standalone import TUNING  # noqa: E402

CAPPED_SCAN_SIZE = 300_000
"""Largest collection the scan figure falls back to when the next size would overrun the budget."""


# -- phases ---------------------------------------------------------------------------------------


class LoadMeter:
    """How busy the machine was during a phase, and how much of that was not the bench's processes."""

    def __init__(self, ctx: Stack) -> None:
        self.pids = [os.getpid(), ctx.mongo.pid, ctx.redis.pid]
        self.before = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        own = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.Error, TypeError):
                t = psutil.Process(pid).cpu_times()
                own += t.user + t.system + t.children_user + t.children_system
        busy, total = machine_busy_seconds()
        return busy, total, own

    def result(self) -> dict[str, float]:
        """Return the busy fraction of all cores and the fraction used by other processes."""
        busy, total, own = (a - b for a, b in zip(self._sample(), self.before, strict=True))
        return {
            "cpu_busy_fraction": round(busy / total, 3) if total else 0.0,
            "other_load_fraction": round(max(busy - own, 0.0) / total, 3) if total else 0.0,
        }


def _engine_loop(ctx: Stack, args: argparse.Namespace, label: str, latency: float, workers: int) -> dict[str, Any]:
    """Seed N users in a fresh database and compress them with the engine alone (no Airflow)."""
    db_name = f"bench_loop_{label}"
    db = ctx.client[db_name]
    MemoryStore(db, Settings()).ensure_indexes()
    eng.seed_users(db, eng.throughput_users(args.users))
    ctx.fake.reset()
    ctx.fake.set_latency(latency)
    engine = eng.build_engine(ctx.mongo.uri, db_name, ctx.redis.url, ctx.fake.base_url, Settings())
    meter = LoadMeter(ctx)
    try:
        if workers == 1:
            result = eng.run_sequential(engine, run_id=f"bench-{label}")
        else:
            result = eng.run_threaded(engine, run_id=f"bench-{label}", workers=workers)
    finally:
        engine.close()
    result.update(meter.result())
    result["latency"] = latency
    result["llm_requests"] = ctx.fake.request_count
    ctx.client.drop_database(db_name)
    ctx.fake.set_latency(0.0)
    log(
        f"engine loop {label}, LLM latency {latency:g}s, {workers} worker(s): {result['users']} users in {result['seconds']:.1f}s"
    )
    return result


def phase_sequential(ctx: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """1 and 5 without Airflow: the sequential loop at the LLM latency and at 0, and (what-if) the same
    engine with as many threads as the pool has slots, as one task compressing a batch of users would."""
    return {
        "llm_latency": _engine_loop(ctx, args, "sequential", args.latency, 1),
        "instant_llm": _engine_loop(ctx, args, "sequential_instant", 0.0, 1),
        "threaded_llm_latency": _engine_loop(ctx, args, "threaded", args.latency, args.pool_slots),
    }


def phase_per_user(ctx: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """2, 3 and 4: each user size compressed in a subprocess (commands, RSS) with its prompts recorded."""
    db_name = "bench_per_user"
    db = ctx.client[db_name]
    MemoryStore(db, Settings()).ensure_indexes()
    sizes = {f"user-{n}": n for n in args.user_sizes}
    started = time.monotonic()
    eng.seed_users(db, sizes)
    seed_seconds = time.monotonic() - started
    summary = eng.steady_summary(args.summary_chars)
    eng.seed_profiles(db, sizes, summary)
    log(f"seeded {sum(sizes.values()):,} events for {len(sizes)} users in {seed_seconds:.1f}s")
    fake: FakeOpenAI = ctx.fake
    users: dict[str, Any] = {}
    for user_id, n in sizes.items():
        fake.reset()
        fake.set_responder(lambda _request: summary)
        report = eng.compress_in_child(
            ctx.mongo.uri, db_name, ctx.redis.url, fake.base_url, user_id, timeout=max(args.budget_guard(), 60)
        )
        report["events"] = n
        report["prompts"] = eng.prompt_breakdown(fake.chat_requests)
        users[str(n)] = report
        log(
            f"user with {n:,} events: {report['seconds']:.1f}s, {report['round_trips']} MongoDB commands "
            f"{report['commands']}, peak RSS +{report['peak_delta_kb'] / 1024:.1f} MiB"
        )
    fake.reset()
    ctx.client.drop_database(db_name)
    return {"seed_seconds": round(seed_seconds, 2), "previous_summary_chars": len(summary), "users": users}


def phase_filter_order(ctx: Stack, events: int) -> dict[str, Any]:
    """Before/after of the store fix: the same ``_id``-list read, ``user_id`` first versus ``_id`` first."""
    db_name = "bench_filter_order"
    db = ctx.client[db_name]
    MemoryStore(db, Settings()).ensure_indexes()
    eng.seed_users(db, {"probe": events})
    ids = [d["_id"] for d in db["user_memory"].find({"user_id": "probe"}, {"_id": 1}).limit(160)]
    user_first, _ = eng.timed(lambda: list(db["user_memory"].find({"user_id": "probe", "_id": {"$in": ids}})), 1)
    id_first, _ = eng.timed(lambda: list(db["user_memory"].find({"_id": {"$in": ids}, "user_id": "probe"})), 3)
    ctx.client.drop_database(db_name)
    out = {
        "user_events": events,
        "batch_ids": len(ids),
        "user_id_first_seconds": round(user_first, 4),
        "id_first_seconds": round(id_first, 4),
    }
    log(f"filter order on a {events:,}-event user: user_id first {user_first:.3f}s, _id first {id_first:.3f}s")
    return out


def analyse_run(timing: RunTiming, engine_seconds: list[float], users: int) -> dict[str, Any]:
    """Reduce a run's task instances to throughput and overhead figures."""
    compress = [t for t in timing.tasks if t.task_id == "compress_user"]
    by_task = {t.task_id: t for t in timing.tasks if t.map_index < 0}
    first_start = min(t.start for t in compress if t.start)
    last_end = max(t.end for t in compress if t.end)
    span = (last_end - first_start).total_seconds()
    durations = [t.duration for t in compress]
    out: dict[str, Any] = {
        "state": timing.state,
        "run_seconds": round(timing.seconds, 3),
        "users": users,
        "users_per_second": round(users / timing.seconds, 3),
        "compress_span_seconds": round(span, 3),
        "compress_users_per_second": round(users / span, 3) if span else 0.0,
        "task_duration_median": round(statistics.median(durations), 3),
        "task_duration_mean": round(statistics.mean(durations), 3),
        "engine_seconds_median": round(statistics.median(engine_seconds), 3) if engine_seconds else None,
        "queue_wait_median": round(statistics.median(t.queue_wait for t in compress), 3),
        "average_concurrency": round(sum(durations) / span, 2) if span else 0.0,
        "tries_over_one": sum(1 for t in compress if t.try_number > 1),
        "states": {s: sum(1 for t in compress if t.state == s) for s in {t.state for t in compress}},
    }
    if engine_seconds:
        out["airflow_overhead_per_task_median"] = round(out["task_duration_median"] - out["engine_seconds_median"], 3)
    for name in ("scan", "report"):
        if name in by_task:
            out[f"{name}_task_seconds"] = round(by_task[name].duration, 3)
    if "scan" in by_task and by_task["scan"].end:
        out["scan_end_to_first_compress_start"] = round((first_start - by_task["scan"].end).total_seconds(), 3)
    if "report" in by_task and by_task["report"].start:
        out["last_compress_end_to_report_start"] = round((by_task["report"].start - last_end).total_seconds(), 3)
    return out


def cpu_figures(cpu: dict[str, float], users: int) -> dict[str, Any]:
    """Reduce a run's CPU seconds per component to busy fraction, per-user costs and other load.

    ``deployment_cpu_seconds_per_user`` is what a real deployment pays for the run: Airflow's processes
    and the task processes (our engine runs inside those), without the stand-ins (``STAND_INS``)."""
    total = cpu["machine total"]
    components = {k: v for k, v in cpu.items() if not k.startswith("machine") and k != OTHER_CPU}
    stand_ins = sum(v for k, v in components.items() if k in STAND_INS.values())
    return {
        "cpu_busy_fraction": round(cpu["machine busy"] / total, 3) if total else None,
        "task_cpu_seconds_per_user": round(cpu.get(TASKS_CPU, 0.0) / users, 3),
        "bench_cpu_seconds_per_user": round((cpu["machine busy"] - cpu[OTHER_CPU]) / users, 3),
        "deployment_cpu_seconds_per_user": round((sum(components.values()) - stand_ins) / users, 3),
        "stand_in_cpu_seconds_per_user": round(stand_ins / users, 3),
        "cpu_seconds_per_user_by_component": {k: round(v / users, 4) for k, v in components.items()},
        "other_load_fraction": round(cpu[OTHER_CPU] / total, 3) if total else None,
    }


def trigger_run(
    airflow: AirflowServices, run_id: str, conf: Mapping[str, Any] | None = None, dag_id: str = DAG_ID
) -> float:
    """Trigger a run with the CLI (after the "before" snapshot: a short run may be half done when the
    CLI returns) and return the CLI's CPU seconds, which the bench process's figure must not include."""
    started = reaped_children_cpu()
    airflow.trigger(run_id, conf, dag_id=dag_id)
    return reaped_children_cpu() - started


def without_trigger(cpu: dict[str, float], trigger_cpu: float) -> dict[str, float]:
    """Move the trigger CLI's CPU from the bench process's figure to a component of its own."""
    cpu[STAND_INS["llm"]] = round(max(cpu.get(STAND_INS["llm"], 0.0) - trigger_cpu, 0.0), 2)
    cpu[STAND_INS["trigger"]] = round(trigger_cpu, 2)
    return cpu


def stand_in_pids(ctx: Stack, airflow: AirflowServices) -> dict[str, int | None]:
    """The stand-ins' processes, for cpu_snapshot (the fake LLM runs in the bench process)."""
    pids = {STAND_INS["mongo"]: ctx.mongo.pid, STAND_INS["llm"]: os.getpid(), STAND_INS["redis"]: ctx.redis.pid}
    # The bench process's own figure includes its reaped children; without_trigger takes the CLI out.
    if airflow.postgres is not None:
        pids[STAND_INS["postgres"]] = airflow.postgres.pid
    return pids


def airflow_run(
    ctx: Stack,
    airflow: AirflowServices,
    args: argparse.Namespace,
    label: str,
    latency: float,
    users: int,
    *,
    conf: Mapping[str, Any] | None = None,
    events: int = 60,
    workers: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """Seed ``users`` users of ``events`` events, trigger one DAG run (with ``conf``) at the given LLM
    latency, wait, and analyse it. The run has an instance per user (``users_per_task`` 1, what §1 and
    §5 measure) unless ``conf`` says otherwise. ``workers``: further deployment processes whose trees'
    CPU counts (Celery workers, named ``CELERY_CPU ...``)."""
    db = ctx.client[args.airflow_db]
    ctx.client.drop_database(args.airflow_db)
    MemoryStore(db, Settings()).ensure_indexes()
    eng.seed_users(db, eng.throughput_users(users, events))
    ctx.fake.reset()
    ctx.fake.set_latency(latency)
    run_id = f"bench-{label}-{int(time.time())}"
    others = {**stand_in_pids(ctx, airflow), **(workers or {})}
    before = cpu_snapshot(airflow, others)
    wall = time.monotonic()
    trigger_cpu = trigger_run(airflow, run_id, {"users_per_task": 1, **(conf or {})})
    state = airflow.wait_run(run_id, timeout=max(args.budget_guard(), 120), progress=log)
    wall = time.monotonic() - wall
    after = cpu_snapshot(airflow, others)
    timing = airflow.run_timing(run_id)
    doc = db["memory_compression_runs"].find_one({"run_id": run_id}) or {}
    engine_seconds = [float(u.get("seconds") or 0) for u in doc.get("users", [])]
    out = analyse_run(timing, engine_seconds, users)
    out.update(
        {
            "run_id": run_id,
            "latency": latency,
            "state": state,
            "wait_seconds": round(wall, 2),
            "llm_requests": ctx.fake.request_count,
            "users_compressed": doc.get("users_compressed"),
            "cpu_seconds": without_trigger(cpu_delta(before, after), trigger_cpu),
        }
    )
    out.update(cpu_figures(out["cpu_seconds"], users))
    log(
        f"airflow, LLM latency {latency}s: {state}, {users} users in {out['run_seconds']:.1f}s "
        f"({out['users_per_second']:.2f} users/s), task median {out['task_duration_median']:.2f}s, "
        f"CPU busy {out['cpu_busy_fraction']:.0%} (processes not the bench's: {out['other_load_fraction']:.0%})"
    )
    return out


BASELINE_ENV = {
    # Airflow's defaults and the package without its preload plugin: the "before" of figure 1.
    "BUTLER_MEMORY_PRELOAD": "false",
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "5",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "1",
}


def noop_run(
    ctx: Stack,
    airflow: AirflowServices,
    args: argparse.Namespace,
    latency: float,
    users: int,
    *,
    dag_id: str = NOOP_DAG_ID,
    conf: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a no-op DAG (each user only sleeps ``latency``; ``dag_id`` bench_noop_mapped, or the batched
    shape with ``conf`` ``users_per_task``): Airflow's own floor for that shape."""
    run_id = f"bench-noop-{int(time.time())}"
    others = stand_in_pids(ctx, airflow)
    before = cpu_snapshot(airflow, others)
    trigger_cpu = trigger_run(airflow, run_id, {"users": users, "sleep": latency, **(conf or {})}, dag_id=dag_id)
    state = airflow.wait_run(run_id, timeout=max(args.budget_guard(), 120), dag_id=dag_id, progress=log)
    after = cpu_snapshot(airflow, others)
    out = analyse_run(airflow.run_timing(run_id, dag_id=dag_id), [], users)
    cpu = without_trigger(cpu_delta(before, after), trigger_cpu)
    out.update({"latency": latency, "state": state, "cpu_seconds": cpu, **cpu_figures(cpu, users)})
    log(
        f"airflow, {dag_id} sleeping {latency}s a user{f' {dict(conf)}' if conf else ''}: {state}, {users} users "
        f"in {out['run_seconds']:.1f}s ({out['users_per_second']:.2f} users/s)"
    )
    return out


def airflow_services(
    ctx: Stack,
    args: argparse.Namespace,
    home: Path,
    parallelism: int,
    extra_env: dict[str, str] | None = None,
    *,
    sqlite: bool = False,
) -> AirflowServices:
    """Airflow services in ``home`` on the stand-ins with the bench's pool (tools/bench_harness.py)."""
    return airflow_on(
        ctx,
        home,
        args.airflow_db,
        pool_slots=args.pool_slots,
        parallelism=parallelism,
        extra_env=extra_env,
        sqlite=sqlite,
    )


def phase_airflow(
    ctx: Stack,
    args: argparse.Namespace,
    *,
    results: dict[str, Any] | None = None,
    save: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """1 and 5, Airflow side, with the settings ``make airflow`` uses (``TUNING``): a run at the
    LLM latency, one with an instant LLM, one user alone, and the no-op DAG (Airflow's floor); then,
    unless ``--skip-baseline``, the run at the LLM latency with Airflow's defaults and no preload; then,
    unless ``--skip-sqlite``, the run at the LLM latency again with Airflow on SQLite."""
    out: dict[str, Any] = {
        "pool_slots": args.pool_slots,
        "parallelism": args.parallelism,
        "executor": "LocalExecutor",
        "metadata_db": "PostgreSQL",
        "tuning": dict(TUNING),
    }
    if results is not None:  # each run's figures reach results.json as the run ends, not with the phase
        results["airflow"] = out
    started = time.monotonic()
    # Each installation starts while the one before stops; nothing runs until that one has ended.
    with InTurn() as in_turn:
        with in_turn.start(airflow_services(ctx, args, args.work_dir / "airflow", args.parallelism)) as airflow:
            log(
                f"airflow up in {time.monotonic() - started:.1f}s (metadata DB ready in {airflow.prepare_seconds:.1f}s)"
            )
            out["startup_seconds"] = round(time.monotonic() - started, 1)
            run_phase(
                out,
                "llm_latency",
                lambda: airflow_run(ctx, airflow, args, "latency", args.latency, args.users),
                save=save,
            )
            run_phase(
                out, "noop_llm_latency", lambda: noop_run(ctx, airflow, args, args.latency, args.users), save=save
            )
            run_phase(
                out, "instant_llm", lambda: airflow_run(ctx, airflow, args, "instant", 0.0, args.users), save=save
            )
            # One mapped task alone on the machine: the per-task overhead without 8 tasks sharing 2 cores.
            run_phase(out, "single_user", lambda: airflow_run(ctx, airflow, args, "single", 0.0, 1), save=save)
            # Slower LLMs: the fraction of pool_slots / latency as the LLM's share of a task grows.
            sweep: dict[str, Any] = {}
            for latency in args.sweep_latencies:
                if latency != args.latency:
                    run_phase(
                        sweep,
                        f"{latency:g}",
                        functools.partial(airflow_run, ctx, airflow, args, f"sweep{latency:g}", latency, args.users),
                        save=save,
                    )
            out["latency_sweep"] = [run for run in sweep.values() if not timed_out(run)]
            out["latency_sweep_timed_out"] = [key for key, run in sweep.items() if timed_out(run)]
        if not args.skip_baseline:
            out["baseline"] = {"parallelism": args.pool_slots, "env": dict(BASELINE_ENV)}
            home = args.work_dir / "airflow-baseline"
            started = time.monotonic()
            with in_turn.start(airflow_services(ctx, args, home, args.pool_slots, BASELINE_ENV)) as airflow:
                log(
                    f"airflow (defaults) up in {time.monotonic() - started:.1f}s (metadata DB ready in {airflow.prepare_seconds:.1f}s)"
                )
                run_phase(
                    out["baseline"],
                    "llm_latency",
                    lambda: airflow_run(ctx, airflow, args, "baseline", args.latency, args.users),
                    save=save,
                )
        if not args.skip_sqlite:
            # The same DAG and settings on SQLite (Airflow's embedded default, what `make demo` uses).
            home = args.work_dir / "airflow-sqlite"
            started = time.monotonic()
            with in_turn.start(airflow_services(ctx, args, home, args.parallelism, sqlite=True)) as airflow:
                log(
                    f"airflow (SQLite) up in {time.monotonic() - started:.1f}s (metadata DB ready in {airflow.prepare_seconds:.1f}s)"
                )
                out["sqlite"] = {}
                run_phase(
                    out["sqlite"],
                    "llm_latency",
                    lambda: airflow_run(ctx, airflow, args, "sqlite", args.latency, args.users),
                    save=save,
                )
    ctx.client.drop_database(args.airflow_db)
    ctx.fake.set_latency(0.0)
    return out


def phase_task_imports() -> dict[str, Any]:
    """CPU a fresh task process spends importing what a compress_user task needs (after airflow.sdk)."""
    code = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1] + "/plugins", sys.argv[1]]
steps = {}
t = time.process_time(); import airflow.sdk; steps["airflow.sdk (the worker has it already)"] = time.process_time() - t
t = time.process_time()
import importlib.util
spec = importlib.util.spec_from_file_location("memory_compression", sys.argv[1] + "/dags/memory_compression.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
steps["parse dags/memory_compression.py"] = time.process_time() - t
t = time.process_time(); import butler_memory.orchestration.dag_tasks; steps["import butler_memory.orchestration.dag_tasks"] = time.process_time() - t
t = time.process_time(); import airflow.providers.mongo.hooks.mongo; steps["import MongoHook (pymongo)"] = time.process_time() - t
t = time.process_time(); import airflow.providers.redis.hooks.redis; steps["import RedisHook"] = time.process_time() - t
t = time.process_time(); import openai; steps["import openai"] = time.process_time() - t
print(json.dumps({k: round(v, 3) for k, v in steps.items()}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def phase_scan(ctx: Stack, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """6: grow the collection to each size, timing the scan and one user's reads at every size."""
    db_name = "bench_scan"
    ctx.client.drop_database(db_name)
    db = ctx.client[db_name]
    store = MemoryStore(db, Settings())
    store.ensure_indexes()
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    next_user, inserted, insert_seconds = 0, 0, 0.0
    for target in sorted(args.scan_sizes):
        wanted = target - inserted
        rate = inserted / insert_seconds if insert_seconds else None
        # Projected: inserting the rest, then three scans and one old-style per-user read, each
        # touching every event (about 15 us an event on 2 cores); keep 30 s in hand.
        per_event_reads = 4 * 15e-6
        projected = (wanted / rate if rate else 0) + target * per_event_reads + 30
        if rate and projected > budget.left():
            affordable = int((budget.left() - 30 + inserted / rate) / (1 / rate + per_event_reads))
            cap = min(CAPPED_SCAN_SIZE, affordable)
            note = (
                f"{target:,} events would take about {projected:.0f}s at the measured {rate:,.0f} inserts/s, "
                f"{budget.left():.0f}s left"
            )
            if cap < inserted + 50_000:
                notes.append(note + ": skipped")
                break
            notes.append(note + f": capped at {cap:,} events")
            target, wanted = cap, cap - inserted
        started = time.monotonic()
        while inserted < target:
            events, next_user = eng.scan_events(next_user, min(50_000, target - inserted))
            eng.insert_events(db, events)
            inserted += len(events)
        insert_seconds += time.monotonic() - started
        point = eng.measure_scan_point(store, db, probe_user="scan-0000002")
        point["insert_rate_per_second"] = round(inserted / insert_seconds)
        points.append(point)
        log(
            f"scan at {point['events']:,} events: {point['scan_seconds']:.2f}s "
            f"({point['scan_users_returned']} users), one user's keys {point['user_fold_keys_seconds'] * 1000:.1f} ms, "
            f"insert {point['insert_rate_per_second']:,}/s"
        )
    out: dict[str, Any] = {"points": points, "notes": notes}
    if points:
        out["explain"] = eng.explain_scan(store, db, probe_user="scan-0000002")
        log(f"explain: {out['explain']}")
    ctx.client.drop_database(db_name)
    return out


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--users",
        type=int,
        default=200,
        help="users over the threshold for the throughput runs",
    )
    parser.add_argument("--latency", type=float, default=0.5, help="fake LLM latency in seconds")
    parser.add_argument("--pool-slots", type=int, default=8, help="slots of the llm_api pool")
    parser.add_argument(
        "--parallelism",
        type=int,
        default=16,
        help="[core] parallelism (LocalExecutor worker processes), twice the pool as in docker-compose.yaml",
    )
    parser.add_argument(
        "--user-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[60, 1000, 100_000],
        help="events of the users whose round trips, prompts and memory are measured",
    )
    parser.add_argument(
        "--scan-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10_000, 100_000, 1_000_000],
        help="collection sizes for the scan figure (capped when the budget does not allow them)",
    )
    parser.add_argument(
        "--summary-chars", type=int, default=1200, help="length of the rolling summary a prompt carries"
    )
    parser.add_argument(
        "--filter-probe-events", type=int, default=10_000, help="events of the user in the filter-order probe"
    )
    parser.add_argument("--budget", type=float, default=900.0, help="wall-clock budget in seconds")
    parser.add_argument("--skip-airflow", action="store_true", help="engine figures only (no Airflow services)")
    parser.add_argument("--skip-scan", action="store_true", help="leave out the scan figure")
    parser.add_argument("--skip-guards", action="store_true", help="leave out the guard figures (about a minute)")
    parser.add_argument(
        "--sweep-latencies",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[2.0],
        help="further LLM latencies for Airflow runs (fraction of pool_slots / latency), e.g. 1,2 (+50 s for 1); "
        "empty to skip",
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="leave out the Airflow-defaults run (the 'before' of figure 1)"
    )
    parser.add_argument(
        "--skip-sqlite", action="store_true", help="leave out the run on SQLite (the metadata DB comparison)"
    )
    parser.add_argument(
        "--only-throughput", action="store_true", help="figure 1 and 5 only (no per-user sizes, no scan)"
    )
    parser.add_argument("--guard-users", type=int, default=bench_guards.USERS, help="demo users of the guard figures")
    parser.add_argument(
        "--guard-chunk", type=int, default=bench_guards.CHUNK, help="events a proposal folds in the guard figures"
    )
    parser.add_argument("--no-charts", action="store_true", help="do not rewrite the charts")
    parser.add_argument("--img-dir", type=Path, default=IMG_DIR, help="where the SVG charts go (docs/img)")
    parser.add_argument(
        "--work-dir", type=Path, default=OUT_DIR, help="the services' data and Airflow homes (.local/bench)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR / "results.json")
    args = parser.parse_args(argv)
    args.airflow_db = "bench_airflow"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every phase, print the table, write results.json and the charts."""
    args = parse_args(argv)
    budget = Budget(args.budget)
    args.budget_guard = budget.left
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    results["load_average_at_start"] = os.getloadavg()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: the machine is already busy (load average {os.getloadavg()[0]:.1f}); figures will be noisy")
    results["settings"] = {
        k: v for k, v in vars(args).items() if k not in ("budget_guard", "out", "img_dir", "work_dir")
    }
    pg_bindir = parts.POSTGRESQL.find()
    if pg_bindir is None and not args.skip_airflow:
        print(f"!! {parts.POSTGRESQL.missing_reason()}: Airflow runs on PostgreSQL in the bench", file=sys.stderr)
        return 2

    def save() -> None:
        write_results(results, args.out)

    with stand_ins(args.work_dir / "services", pg_bindir=pg_bindir) as ctx:
        log(
            f"services up: MongoDB wire server :{ctx.mongo.port}, redis :{ctx.redis.port}, fake LLM "
            f"{ctx.fake.base_url}, PostgreSQL :{ctx.postgres.port if ctx.postgres else '-'}"
        )
        run_phase(results, "sequential", lambda: phase_sequential(ctx, args), save=save)
        if not args.only_throughput:
            run_phase(results, "filter_order", lambda: phase_filter_order(ctx, args.filter_probe_events), save=save)
            run_phase(results, "per_user", lambda: phase_per_user(ctx, args), save=save)
        if not args.skip_guards and not args.only_throughput:
            ctx.fake.set_latency(0.0)
            run_phase(
                results,
                "guards",
                lambda: bench_guards.phase_guards(
                    ctx.mongo, ctx.redis.port, ctx.fake, users=args.guard_users, chunk=args.guard_chunk
                ),
                save=save,
            )
        run_phase(results, "task_imports_cpu_seconds", phase_task_imports, save=save)
        if not args.skip_airflow:
            run_phase(results, "airflow", lambda: phase_airflow(ctx, args, results=results, save=save), save=save)
        if not args.skip_scan and not args.only_throughput:
            run_phase(results, "scan", lambda: phase_scan(ctx, args, budget), save=save)
    results["elapsed_seconds"] = round(log.elapsed(), 1)
    rows = summarise(results, args)
    results["summary"] = [list(r) for r in rows]
    if not args.no_charts:
        try:
            results["charts"] = write_charts(results, args)
        except (KeyError, TypeError) as exc:  # a figure's phase timed out: no chart for it
            log(f"charts not written: a phase they need is incomplete ({type(exc).__name__}: {exc})")
    write_results(results, args.out)
    print_table(rows)
    log(f"results in {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
