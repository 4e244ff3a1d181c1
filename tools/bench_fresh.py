"""Fresh all day, measured: Butler-like traffic into MongoDB while real Airflow compresses it.

``make bench`` runs it after ``tools/bench.py``; alone: ``.venv/bin/python tools/bench_fresh.py``.
Prints figures (no pass/fail) and writes ``.local/bench/fresh.json``.

Method. Airflow runs as ``make airflow`` starts it (API server, scheduler with the LocalExecutor,
DAG processor, triggerer; SQLite), on the embedded MongoDB wire server, redis-server and the fake
OpenAI server (``--llm-latency`` per call). A simulator writes events for ``--users`` users whose
rates are heavy-tailed (Pareto: most users write one event every many minutes, a few chat every
few seconds) and who start with 0..threshold events, so users cross the threshold during the
window. Each mode runs for ``--minutes`` on a fresh database:

* **cadence only**: the catch-up DAG on its cron (``--cadence`` minutes, shortened from the
  default 5 so that one window sees several runs), nobody rings;
* **doorbell + cadence**: the same, and the simulator rings the doorbell (with the user's event
  count) after each write, as the Butler would;
* **daily only** is not run in real time (it would need a day): its figures come from the same
  traffic model over 24 hours with one run at midnight (a user waits until the next midnight; the
  event count a user reaches is its start count plus a day of its rate).

Per mode: freshness lag p50/p95/max (from the event that took a user over the threshold to the
commit that compressed them, as the engine records it; users still waiting at the end count with
their wait so far), the largest event count any user reached, LLM calls, catch-up runs.
Then the **idle cost**: no traffic, first with the catch-up DAG paused (Airflow's own idle floor),
then unpaused (idle catch-up runs only), each for ``--idle-minutes``: CPU seconds of every Airflow
process tree (reaped task processes included), MongoDB and Redis, scaled to one hour at the default
5-minute cadence.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.freshness.doorbell import Doorbell  # noqa: E402
from tools.bench_airflow import AirflowServices, proc_cpu  # noqa: E402
from tools.bench_harness import OUT_DIR, Stack, airflow_on, log, run_phase, stand_ins, write_results  # noqa: E402

CATCHUP_ID = "memory_compression_catchup"
DB = "bench_fresh"
THRESHOLD = 50
KEEP = 20
DEFAULT_CADENCE_MINUTES = 5
POLL_SECONDS = 0.2
"""How often the waits for an idle DAG or a registered watcher look: never during a measured window."""


# -- traffic ---------------------------------------------------------------------------------------


def user_rates(n: int, seed: int) -> dict[str, float]:
    """Events per minute per user: 0.1 x Pareto(1.1) (median 0.19/min, one event every 5 minutes),
    capped at 20/min (one every 3 s)."""
    rng = random.Random(seed)
    return {f"sim-{i:04d}": min(0.1 * rng.paretovariate(1.1), 20.0) for i in range(n)}


def start_counts(rates: dict[str, float], seed: int) -> dict[str, int]:
    """Events each user has when the window opens: 25..threshold, so users cross during the window."""
    rng = random.Random(seed + 1)
    return {u: rng.randint(THRESHOLD // 2, THRESHOLD) for u in rates}


def seed(db: Any, counts: dict[str, int]) -> None:
    now = datetime.now(UTC)
    docs = [
        {"user_id": u, "role": "user" if i % 2 else "assistant", "content": f"turn {i} of {u}", "created_at": now}
        for u, n in counts.items()
        for i in range(n)
    ]
    for start in range(0, len(docs), 5000):
        db["user_memory"].insert_many(docs[start : start + 5000])


class Simulator(threading.Thread):
    """Write events at each user's rate, one tick a second; ring after each write when asked."""

    def __init__(self, db: Any, rates: dict[str, float], bell: Doorbell | None, seed: int, start_max: int) -> None:
        super().__init__(daemon=True)
        self.db, self.rates, self.bell = db, rates, bell
        self.rng = random.Random(seed + 2)
        self.stop_event = threading.Event()
        self.written = 0
        self.rings = 0
        self.max_count = start_max

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            now = datetime.now(UTC)
            for user_id, rate in self.rates.items():
                n = _poisson(self.rng, rate / 60.0)
                if not n:
                    continue
                self.db["user_memory"].insert_many(
                    [
                        {"user_id": user_id, "role": "user", "content": "simulated turn", "created_at": now}
                        for _ in range(n)
                    ]
                )
                self.written += n
                count = self.db["user_memory"].count_documents({"user_id": user_id})
                self.max_count = max(self.max_count, count)
                if self.bell is not None and self.bell.ring(user_id, events=count):
                    self.rings += 1


def _poisson(rng: random.Random, lam: float) -> int:
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# -- figures ---------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def lag_figures(lags: list[float], waiting: list[float]) -> dict[str, Any]:
    every = lags + waiting
    return {
        "compressed_users": len(lags),
        "still_waiting_users": len(waiting),
        "lag_p50_s": _r(quantile(every, 0.5)),
        "lag_p95_s": _r(quantile(every, 0.95)),
        "lag_max_s": _r(max(every) if every else None),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def daily_only(rates: dict[str, float], counts: dict[str, int]) -> dict[str, Any]:
    """The traffic model over a day with one run at midnight (see the module docstring)."""
    lags, biggest = [], 0
    for user_id, rate in rates.items():
        day_events = rate * 1440
        biggest = max(biggest, int(counts[user_id] + day_events))
        if counts[user_id] + day_events > THRESHOLD:
            crossed = (THRESHOLD + 1 - counts[user_id]) / rate if counts[user_id] <= THRESHOLD else 0.0
            lags.append((1440 - crossed) * 60.0)  # waits until the next midnight
    return {
        **lag_figures(lags, []),
        "largest_event_count": biggest,
        "note": "model: one run a day; a user waits from crossing until midnight",
    }


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """CPU seconds of these processes and of the children each has reaped."""
    return sum(proc_cpu(proc) for proc in procs)


def airflow_cpu(airflow: AirflowServices) -> float:
    """CPU seconds of every live Airflow process and of the children each has reaped (task processes)."""
    return sum(cpu_seconds(tree) for tree in airflow.service_processes().values())


# -- Airflow control -------------------------------------------------------------------------------


def active_catchup_runs(airflow: AirflowServices) -> int:
    rows = airflow.query(
        "SELECT COUNT(*) FROM dag_run WHERE dag_id = ? AND state IN ('queued', 'running')", (CATCHUP_ID,)
    )
    return int(rows[0][0]) if rows else 0


def catchup_run_count(airflow: AirflowServices) -> dict[str, int]:
    rows = airflow.query("SELECT run_type, COUNT(*) FROM dag_run WHERE dag_id = ? GROUP BY run_type", (CATCHUP_ID,))
    return {str(t): int(n) for t, n in rows}


def wait_idle(airflow: AirflowServices, timeout: float = 300.0) -> None:
    """Wait until no catch-up run is queued or running (a paused DAG's runs would never finish)."""
    deadline = time.monotonic() + timeout
    while active_catchup_runs(airflow) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def wait_watcher(airflow: AirflowServices, timeout: float = 300.0) -> float:
    """Wait until the doorbell's watcher trigger is registered and running; return the seconds waited.

    The DAG processor registers an asset's watchers only for unpaused DAGs, when it parses the file,
    so the first rings after an unpause may only be recorded (the cadence takes them).
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        rows = airflow.query("SELECT COUNT(*) FROM trigger WHERE triggerer_id IS NOT NULL")
        if rows and rows[0][0]:
            return time.monotonic() - started
        time.sleep(POLL_SECONDS)
    raise TimeoutError("the doorbell's asset watcher was not registered and running in time")


def pause(airflow: AirflowServices, paused: bool) -> None:
    """Pause (after the run in flight, if any, has finished) or unpause the catch-up DAG.

    A run the cron creates between the wait and the pause stays queued and starts on the next
    unpause, on whatever the database then holds: harmless.
    """
    if paused:
        wait_idle(airflow)
    rows = airflow.query("SELECT is_paused FROM dag WHERE dag_id = ?", (CATCHUP_ID,))
    if not rows or bool(rows[0][0]) is not paused:  # unpaused at creation (AirflowServices): no CLI call then
        airflow.cli("dags", "pause" if paused else "unpause", CATCHUP_ID)


def reset(db: Any, redis_client: Any) -> None:
    for name in db.list_collection_names():
        db[name].delete_many({})
    redis_client.flushdb()


@contextmanager
def services(args: argparse.Namespace) -> Iterator[tuple[Stack, AirflowServices]]:
    """The stand-ins and Airflow on SQLite (as ``make airflow``), the catch-up DAG on its cron."""
    with stand_ins(args.work_dir / "fresh-services") as stack:
        stack.fake.set_latency(args.llm_latency)
        extra = {
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
            "BUTLER_MEMORY_CATCHUP_SCHEDULE": f"*/{args.cadence} * * * *",
            "BUTLER_MEMORY_SCHEDULE": "0 0 31 12 *",  # the daily DAG stays out of the window
        }
        with airflow_on(stack, args.work_dir / "fresh-airflow", DB, extra_env=extra) as airflow:
            yield stack, airflow


def run_mode(
    name: str, ring: bool, args: argparse.Namespace, stack: Stack, airflow: AirflowServices, rates: dict[str, float]
) -> dict[str, Any]:
    fake = stack.fake
    redis_client = stack.redis.client()
    db = stack.client[DB]
    try:
        wait_idle(airflow)
        reset(db, redis_client)
        counts = start_counts(rates, args.seed)
        seed(db, counts)
        if ring:
            wait_watcher(airflow)
        runs_before = catchup_run_count(airflow)
        llm_before = fake.request_count
        bell = Doorbell(redis_client, threshold=THRESHOLD) if ring else None
        sim = Simulator(db, rates, bell, args.seed, max(counts.values()))
        log(f"{name}: {args.minutes} min of traffic ({len(rates)} users)")
        sim.start()
        time.sleep(args.minutes * 60)
        sim.stop_event.set()
        sim.join(30)
        now = datetime.now(UTC)
        wait_idle(airflow)  # the run in flight reports
        lags = [
            float(u["freshness_seconds"])
            for coll in ("memory_compression_catchup_runs", "memory_compression_runs")
            for doc in db[coll].find({}, {"users": 1})
            for u in doc.get("users", [])
            if u.get("status") == "compressed" and u.get("freshness_seconds") is not None
        ]
        waiting = []
        for row in db["user_memory"].aggregate(
            [{"$group": {"_id": "$user_id", "n": {"$sum": 1}}}, {"$match": {"n": {"$gt": THRESHOLD}}}]
        ):
            first = list(
                db["user_memory"]
                .find({"user_id": row["_id"]})
                .sort([("created_at", 1), ("_id", 1)])
                .skip(THRESHOLD)
                .limit(1)
            )
            if first:
                waiting.append((now - first[0]["created_at"].replace(tzinfo=UTC)).total_seconds())
        runs_after = catchup_run_count(airflow)
        return {
            **lag_figures(lags, waiting),
            "largest_event_count": sim.max_count,
            "events_written": sim.written,
            "rings": sim.rings,
            "llm_calls": fake.request_count - llm_before,
            "catchup_runs": {k: runs_after.get(k, 0) - runs_before.get(k, 0) for k in runs_after},
        }
    finally:
        redis_client.close()


def idle_cost(args: argparse.Namespace, stack: Stack, airflow: AirflowServices) -> dict[str, Any]:
    mongo, redis_srv, client = stack.mongo, stack.redis, stack.client
    redis_client = redis_srv.client()
    try:
        wait_idle(airflow)
        reset(client[DB], redis_client)
        seed(client[DB], start_counts(user_rates(args.users, args.seed), args.seed))  # under the threshold: idle
        # The first run after a reset is a full scan: not what an idle hour repeats.
        time.sleep(args.cadence * 60 + 30 if args.settle_seconds is None else args.settle_seconds)

        def measure(paused: bool) -> dict[str, float]:
            if paused:
                pause(airflow, True)
            others = [psutil.Process(s.pid) for s in (mongo, redis_srv) if s.pid]
            runs0 = sum(catchup_run_count(airflow).values())
            a0, o0, t0 = airflow_cpu(airflow), cpu_seconds(others), time.monotonic()
            time.sleep(args.idle_minutes * 60)
            a1, o1, t1 = airflow_cpu(airflow), cpu_seconds(others), time.monotonic()
            runs = sum(catchup_run_count(airflow).values()) - runs0
            return {"airflow_cpu_s": a1 - a0, "db_cpu_s": o1 - o0, "seconds": t1 - t0, "runs": runs}

        idle = measure(False)
        floor = measure(True)
        per_run_airflow = (idle["airflow_cpu_s"] - floor["airflow_cpu_s"] * idle["seconds"] / floor["seconds"]) / max(
            idle["runs"], 1
        )
        per_run_db = (idle["db_cpu_s"] - floor["db_cpu_s"] * idle["seconds"] / floor["seconds"]) / max(idle["runs"], 1)
        runs_per_hour = 60 / DEFAULT_CADENCE_MINUTES
        state = client[DB]["memory_compression_state"].find_one({"_id": "catchup"}) or {}
        return {
            "floor": floor,
            "idle": idle,
            "airflow_cpu_s_per_idle_run": round(per_run_airflow, 2),
            "db_cpu_s_per_idle_run": round(per_run_db, 3),
            "idle_hour_cpu_s_at_5_min": round((per_run_airflow + per_run_db) * runs_per_hour, 1),
            "airflow_floor_cpu_s_per_hour": round(floor["airflow_cpu_s"] * 3600 / floor["seconds"], 1),
            "run_documents_stored": client[DB]["memory_compression_catchup_runs"].count_documents({}),
            "idle_runs_counted": int(state.get("idle_runs") or 0),
        }
    finally:
        redis_client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=5.0, help="traffic window per mode (default 5)")
    parser.add_argument("--cadence", type=int, default=2, help="catch-up cron in minutes (default 2; production 5)")
    parser.add_argument("--idle-minutes", type=float, default=4.0)
    parser.add_argument("--llm-latency", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=None,
        help="wait before the idle cost is measured (default: one cadence + 30 s, past the first full scan)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=OUT_DIR, help="the services' data and Airflow home (.local/bench)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR / "fresh.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rates = user_rates(args.users, args.seed)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "traffic": {
            "users": len(rates),
            "events_per_minute_total": round(sum(rates.values()), 1),
            "users_over_1_per_minute": sum(1 for r in rates.values() if r > 1),
            "fastest_per_minute": round(max(rates.values()), 1),
            "median_per_minute": round(quantile(list(rates.values()), 0.5) or 0, 3),
        },
    }
    results["daily_only"] = daily_only(rates, start_counts(rates, args.seed))
    started = time.monotonic()

    def save() -> None:
        write_results(results, args.out)

    with services(args) as (stack, airflow):
        log(f"airflow up in {time.monotonic() - started:.0f}s")
        pause(airflow, False)
        results["watcher_registered_after_s"] = round(wait_watcher(airflow), 1)
        run_phase(
            results, "cadence_only", lambda: run_mode("cadence only", False, args, stack, airflow, rates), save=save
        )
        run_phase(
            results,
            "doorbell_cadence",
            lambda: run_mode("doorbell + cadence", True, args, stack, airflow, rates),
            save=save,
        )
        run_phase(results, "idle", lambda: idle_cost(args, stack, airflow), save=save)
    results["elapsed_seconds"] = round(time.monotonic() - started, 1)
    save()
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
