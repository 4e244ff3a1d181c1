"""Engine-level benchmarks (no Airflow): sequential loop, MongoDB round trips, prompts, memory, scan.

Everything talks to real local servers: the embedded MongoDB wire server, redis-server and the
fake OpenAI endpoint. Run as ``python tools/bench_engine.py child ...`` it is also the subprocess
that compresses one user and reports its own peak RSS and its MongoDB commands as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo
import redis
from pymongo import monitoring
from pymongo.database import Database

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer  # noqa: E402
from butler_memory.operations.engine import Engine  # noqa: E402
from butler_memory.storage.events import EventKey  # noqa: E402
from butler_memory.storage.locks import UserLocks  # noqa: E402
from butler_memory.storage.profiles import VERSION_FIELD  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools.seed import user_events  # noqa: E402

START = datetime(2026, 1, 1, tzinfo=UTC)
INSERT_BATCH = 5000
SUMMARY_LINE = "- Пользователя зовут Анна, живёт в Казани, аллергия на орехи, день рождения 12 мая."


def steady_summary(chars: int) -> str:
    """Return a plausible rolling summary of about ``chars`` characters (what a prompt carries)."""
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) + len(SUMMARY_LINE) < chars:
        lines.append(SUMMARY_LINE)
    return "\n".join(lines) or SUMMARY_LINE[:chars]


# -- engine wiring -------------------------------------------------------------------------------


class CommandCounter(monitoring.CommandListener):
    """Count the MongoDB commands a client sends, by command name (one command = one round trip)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.enabled = True

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count one command."""
        if self.enabled:
            self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing to record."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to record."""

    def reset(self) -> None:
        """Forget the counts."""
        self.counts.clear()


def build_engine(
    mongo_uri: str,
    db_name: str,
    redis_url: str,
    llm_base_url: str,
    settings: Settings,
    listeners: Iterable[monitoring.CommandListener] = (),
) -> Engine:
    """Wire the engine exactly as the DAG does, minus Airflow's hooks (plain clients on the same servers)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri, event_listeners=list(listeners))
    # The fake LLM reports o200k_base token counts: count the same way (the model name is not a real one).
    config = LLMConfig(
        base_url=llm_base_url, api_key="bench", model="bench-model", max_retries=0, tokenizer="o200k_base"
    )
    return Engine(
        settings=settings,
        store=MemoryStore(client[db_name], settings),
        locks=UserLocks(redis.Redis.from_url(redis_url), settings),
        summarizer=OpenAISummarizer(config),
    )


# -- data ----------------------------------------------------------------------------------------


def insert_events(db: Database[dict[str, Any]], events: list[dict[str, Any]], collection: str = "user_memory") -> None:
    """Insert events in unordered insert_many batches."""
    for start in range(0, len(events), INSERT_BATCH):
        db[collection].insert_many(events[start : start + INSERT_BATCH], ordered=False)


def seed_users(db: Database[dict[str, Any]], sizes: dict[str, int], seed_value: int = 7) -> float:
    """Insert synthetic Butler events (mixed Russian/English turns, planted facts); return seconds."""
    rng = random.Random(seed_value)
    started = time.monotonic()
    batch: list[dict[str, Any]] = []
    for user_id, n in sizes.items():
        events, _ = user_events(user_id, n, rng, START)
        batch.extend(events)
        if len(batch) >= INSERT_BATCH * 4:
            insert_events(db, batch)
            batch = []
    insert_events(db, batch)
    return time.monotonic() - started


def seed_profiles(db: Database[dict[str, Any]], user_ids: Iterable[str], summary: str) -> None:
    """Give users an existing rolling summary (version 1), as after earlier runs."""
    db["user_profiles"].insert_many(
        [{"user_id": uid, "memory_summary": summary, VERSION_FIELD: 1} for uid in user_ids], ordered=False
    )


def throughput_users(n: int, events: int = 60) -> dict[str, int]:
    """Return N users just over the threshold: one LLM call each (40 events folded, 20 kept)."""
    return {f"bench-{i:05d}": events for i in range(n)}


# -- 1. the sequential worker --------------------------------------------------------------------


def run_sequential(engine: Engine, run_id: str) -> dict[str, Any]:
    """Scan, then compress every user one after another (what a cron script does); time it. The
    thread's CPU time is the engine's own cost (it and its clients run in this thread; the fake LLM
    answers from threads of its own)."""
    started = time.monotonic()
    cpu_started = time.thread_time()
    backlog = engine.scan()
    per_user = []
    statuses: Counter[str] = Counter()
    for entry in backlog:
        result = engine.compress(entry.user_id, run_id=run_id)
        statuses[result.status] += 1
        per_user.append(result.seconds)
    seconds = time.monotonic() - started
    cpu = time.thread_time() - cpu_started
    return {
        "seconds": round(seconds, 3),
        "users": len(backlog),
        "engine_cpu_seconds_per_user": round(cpu / len(backlog), 4) if backlog else 0.0,
        "statuses": dict(statuses),
        "users_per_second": round(len(backlog) / seconds, 3) if seconds else 0.0,
        "user_seconds_median": round(statistics.median(per_user), 4) if per_user else 0.0,
    }


def run_threaded(engine: Engine, run_id: str, workers: int) -> dict[str, Any]:
    """Scan, then compress the users with ``workers`` threads over one engine: what one task that
    compresses a batch of users with as many LLM calls in flight as the pool has slots would do."""
    started = time.monotonic()
    backlog = engine.scan()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda b: engine.compress(b.user_id, run_id=run_id), backlog))
    seconds = time.monotonic() - started
    statuses = Counter(r.status for r in results)
    return {
        "seconds": round(seconds, 3),
        "users": len(backlog),
        "workers": workers,
        "statuses": dict(statuses),
        "users_per_second": round(len(backlog) / seconds, 3) if seconds else 0.0,
        "user_seconds_median": round(statistics.median(r.seconds for r in results), 4) if results else 0.0,
    }


# -- 2 and 4. one compression in a subprocess: round trips and peak RSS ---------------------------


def _status_kb(field_name: str) -> int:
    """Return a /proc/self/status field in kB (VmHWM = peak RSS, VmRSS = current RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def child_main(args: argparse.Namespace) -> int:
    """Compress one user; print JSON with the commands sent, the result and the peak RSS delta."""
    counter = CommandCounter()
    engine = build_engine(args.mongo_uri, args.db, args.redis_url, args.llm_base_url, Settings(), [counter])
    engine.store.db.command("ping")  # connect, handshake and warm up before the baseline
    engine.store.load_profile("warm-up-user", create=False)
    gc.collect()
    baseline_hwm = _status_kb("VmHWM")
    baseline_rss = _status_kb("VmRSS")
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counter.reset()
    started = time.monotonic()
    result = engine.compress(args.user, run_id="bench-child")
    seconds = time.monotonic() - started
    counter.enabled = False
    report = {
        "user_id": args.user,
        "seconds": round(seconds, 3),
        "result": result.to_dict(),
        "commands": dict(counter.counts),
        "round_trips": sum(counter.counts.values()),
        "baseline_rss_kb": baseline_rss,
        "baseline_hwm_kb": baseline_hwm,
        "peak_hwm_kb": _status_kb("VmHWM"),
        "peak_delta_kb": _status_kb("VmHWM") - baseline_hwm,
        "ru_maxrss_before_kb": baseline_maxrss,
        "ru_maxrss_after_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    engine.close()
    print(json.dumps(report))
    return 0


def compress_in_child(
    mongo_uri: str, db: str, redis_url: str, llm_base_url: str, user_id: str, timeout: float
) -> dict[str, Any]:
    """Run one compression in a fresh interpreter and return what it reported."""
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "child",
            "--mongo-uri",
            mongo_uri,
            "--db",
            db,
            "--redis-url",
            redis_url,
            "--llm-base-url",
            llm_base_url,
            "--user",
            user_id,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child for {user_id} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- 3. prompt efficiency -------------------------------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    _, _, rest = text.partition(start)
    body, _, _ = rest.partition(end)
    return body


def prompt_breakdown(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Split the recorded chat requests' characters into events, framing, summary and instructions."""
    totals: Counter[str] = Counter()
    for request in requests:
        messages = request["messages"]
        system = next(m["content"] for m in messages if m["role"] == "system")
        user = next(m["content"] for m in messages if m["role"] == "user")
        summary_json = _between(user, "<<<SUMMARY\n", "\nSUMMARY>>>")
        events_block = _between(user, "<<<EVENTS\n", "\nEVENTS>>>")
        lines = [line for line in events_block.split("\n") if line]
        event_chars = sum(len(json.loads(line)[2]) for line in lines)  # [time, role, text]
        summary_chars = len(json.loads(summary_json)) if summary_json else 0
        totals["requests"] += 1
        totals["events"] += len(lines)
        totals["prompt_chars"] += len(system) + len(user)
        totals["event_chars"] += event_chars
        totals["framing_chars"] += len(events_block) - event_chars
        totals["summary_chars"] += len(summary_json)
        totals["summary_text_chars"] += summary_chars
        totals["instruction_chars"] += len(system) + len(user) - len(events_block) - len(summary_json)
    out: dict[str, Any] = dict(totals)
    events = max(totals["events"], 1)
    raw = max(totals["event_chars"], 1)
    out["prompt_to_event_chars"] = round(totals["prompt_chars"] / raw, 2)
    out["prompt_chars_per_event"] = round(totals["prompt_chars"] / events, 1)
    out["event_chars_per_event"] = round(totals["event_chars"] / events, 1)
    out["framing_chars_per_event"] = round(totals["framing_chars"] / events, 1)
    out["events_per_request"] = round(totals["events"] / max(totals["requests"], 1), 1)
    # The fake reports prompt_tokens = chars // 4 (OpenAI's rule of thumb for English).
    out["prompt_tokens_per_event"] = round(totals["prompt_chars"] / 4 / events, 1)
    return out


# -- 6. scan cost as the collection grows --------------------------------------------------------

SCAN_USER_SIZES = (30, 60, 100, 210)
"""Events per user, cycled: an average of 100 and half of the users over the threshold of 50."""


def scan_events(first_user: int, count: int) -> tuple[list[dict[str, Any]], int]:
    """Return about ``count`` cheap synthetic events for users numbered from ``first_user``; next user."""
    events: list[dict[str, Any]] = []
    user = first_user
    while len(events) < count:
        n = SCAN_USER_SIZES[user % len(SCAN_USER_SIZES)]
        uid = f"scan-{user:07d}"
        events.extend(
            {
                "event_id": f"{uid}-{i}",
                "user_id": uid,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": "Хорошо, понял." if i % 2 else "Напомни мне про встречу завтра.",
                "created_at": START + timedelta(minutes=7 * i),
                "tags": [],
            }
            for i in range(n)
        )
        user += 1
    return events, user


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Return the median seconds of ``repeat`` calls and the last call's value."""
    times = []
    value = None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def explain_summary(plan: dict[str, Any]) -> dict[str, Any]:
    """Pick the winning plan's stages and the documents and keys examined out of an explain result."""
    cursor: dict[str, Any]
    stages: list[str]
    if "stages" in plan:  # aggregate: the $cursor stage holds the query plan
        cursor = next((s["$cursor"] for s in plan["stages"] if "$cursor" in s), {})
        stages = [next(iter(s)) for s in plan["stages"]]
    else:
        cursor, stages = plan, []
    winning = cursor.get("queryPlanner", {}).get("winningPlan", {})
    chain = []
    node = winning
    while isinstance(node, dict) and node.get("stage"):
        chain.append(node["stage"] + (f"({node['indexName']})" if node.get("indexName") else ""))
        node = node.get("inputStage")
    stats = cursor.get("executionStats", {})
    return {
        "pipeline_stages": stages,
        "winning_plan": " <- ".join(chain),
        "docs_examined": stats.get("totalDocsExamined"),
        "keys_examined": stats.get("totalKeysExamined"),
        "returned": stats.get("nReturned"),
    }


def old_key_range_query(user_id: str, first: EventKey, last: EventKey) -> dict[str, Any]:
    """Return the exact (created_at, _id) key-range filter iter_events used before the store fix."""
    return {
        "user_id": user_id,
        "$and": [
            {
                "$or": [
                    {"created_at": {"$gt": first.created_at}},
                    {"created_at": first.created_at, "_id": {"$gte": first.id}},
                ]
            },
            {
                "$or": [
                    {"created_at": {"$lt": last.created_at}},
                    {"created_at": last.created_at, "_id": {"$lte": last.id}},
                ]
            },
        ],
    }


def measure_scan_point(store: MemoryStore, db: Database[dict[str, Any]], probe_user: str) -> dict[str, Any]:
    """Time the scan (as the DAG runs it) and one user's reads at the collection's current size."""
    settings = store.settings
    scan_s, backlog = timed(lambda: store.scan(settings.threshold, settings.scan_limit))
    keys_s, keys = timed(lambda: store.fold_keys(probe_user, settings.keep_last_n))
    count_s, _ = timed(lambda: store.count_events(probe_user))
    iter_s, events = timed(lambda: list(store.iter_events(probe_user, keys[0], keys[-1], batch_size=1000)))
    old = old_key_range_query(probe_user, keys[0], keys[-1])
    old_s, old_events = timed(lambda: list(db["user_memory"].find(old).sort([("created_at", 1), ("_id", 1)])), 1)
    return {
        "events": db["user_memory"].estimated_document_count(),
        "scan_seconds": round(scan_s, 4),
        "scan_users_returned": len(backlog),
        "user_fold_keys_seconds": round(keys_s, 4),
        "user_fold_keys": len(keys),
        "user_count_seconds": round(count_s, 4),
        "user_iter_events_seconds": round(iter_s, 4),
        "user_iter_events": len(events),
        "user_iter_events_before_fix_seconds": round(old_s, 4),
        "user_iter_events_before_fix": len(old_events),
    }


def explain_scan(store: MemoryStore, db: Database[dict[str, Any]], probe_user: str) -> dict[str, Any]:
    """Return the server's explain of the scan aggregation and of one user's ordered read."""
    settings = store.settings
    pipeline = [
        {"$group": {"_id": "$user_id", "n": {"$sum": 1}}},
        {"$match": {"n": {"$gt": settings.threshold}}},
        {"$sort": {"n": -1, "_id": 1}},
        {"$limit": settings.scan_limit},
    ]
    out: dict[str, Any] = {}
    try:
        agg = db.command(
            "explain", {"aggregate": "user_memory", "pipeline": pipeline, "cursor": {}}, verbosity="executionStats"
        )
        out["scan"] = explain_summary(agg)
    except pymongo.errors.PyMongoError as exc:
        out["scan"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        find = (
            db["user_memory"]
            .find({"user_id": probe_user}, {"_id": 1, "created_at": 1})
            .sort([("created_at", 1), ("_id", 1)])
            .explain()
        )
        out["user_read"] = explain_summary(find)
    except pymongo.errors.PyMongoError as exc:
        out["user_read"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the subprocess mode."""
    parser = argparse.ArgumentParser(description="bench subprocess: compress one user, report RSS and commands")
    sub = parser.add_subparsers(dest="mode", required=True)
    child = sub.add_parser("child")
    child.add_argument("--mongo-uri", required=True)
    child.add_argument("--db", required=True)
    child.add_argument("--redis-url", required=True)
    child.add_argument("--llm-base-url", required=True)
    child.add_argument("--user", required=True)
    args = parser.parse_args(argv)
    return child_main(args)


if __name__ == "__main__":
    sys.exit(main())
