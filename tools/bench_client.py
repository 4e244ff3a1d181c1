"""Benchmark of the Butler's request path: ``memory()`` and ``ring()`` on real local servers (no Airflow).

Four users on the embedded MongoDB wire server: 20 and 2,000 live events, each once fresh (nothing
archived, no history) and once after ``--history`` events were folded into the summary first (the
archive and the summary history then hold them: ``--history / max_events_per_chunk`` versions).
For each: MongoDB commands per ``memory()`` (a ``CommandListener``: one command = one round trip)
and latency (median and p95 over ``--reads`` reads), sync and asyncio; then Redis commands per
``ring()`` (``INFO commandstats``) and its latency. The offline summariser folds, so the figures
are MongoDB's and Redis's, not an LLM's. Prints JSON and a Markdown table.

    python tools/bench_client.py --reads 200 --history 3000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo
import redis
import redis.asyncio

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.client import AsyncMemoryClient, MemoryClient  # noqa: E402
from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.core.units import markdown_table  # noqa: E402
from butler_memory.llm.offline import OfflineSummarizer  # noqa: E402
from butler_memory.operations.engine import Engine  # noqa: E402
from butler_memory.storage.locks import UserLocks  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools.bench_engine import START, CommandCounter, insert_events, seed_users  # noqa: E402
from tools.bench_harness import OUT_DIR, log, machine, shown, stand_ins, write_results  # noqa: E402
from tools.seed import user_events  # noqa: E402
from tools.services import MongoService, RedisService  # noqa: E402

Doc = dict[str, Any]
SETTINGS = Settings(threshold=50, keep_last_n=20, max_events_per_chunk=100, summary_language="ru")


def percentiles(samples: list[float]) -> dict[str, float]:
    """Return the median and p95 of latencies in milliseconds."""
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
    }


def timed(n: int, call: Callable[[], Any]) -> list[float]:
    """Return the wall time of ``n`` calls."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def seed(db: Any, redis_client: redis.Redis, live: int, history: int) -> dict[str, int]:
    """Create the four users; return their live event counts."""
    users = {f"fresh-{live}": live, f"folded-{live}": history + SETTINGS.keep_last_n}
    seed_users(db, users)
    engine = Engine(SETTINGS, MemoryStore(db, SETTINGS), UserLocks(redis_client, SETTINGS), OfflineSummarizer())
    folded = f"folded-{live}"
    result = engine.compress(folded, run_id="bench-fold")
    assert result.status == "compressed" and result.events_after == SETTINGS.keep_last_n, result
    more = live - SETTINGS.keep_last_n
    if more > 0:
        late = START + timedelta(days=3650)
        events, _ = user_events(folded, more, random.Random(11), late)
        insert_events(db, events)
    return {user_id: db["user_memory"].count_documents({"user_id": user_id}) for user_id in users}


def bench_memory(mongo: MongoService, db_name: str, users: dict[str, int], reads: int) -> list[Doc]:
    """Measure round trips and latency of memory(), sync and asyncio.

    The users' reads are interleaved (each round reads every user once), so a load change on a
    shared machine touches every user's figures alike.
    """
    counter = CommandCounter()
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo.uri, event_listeners=[counter])
    db = client[db_name]
    reader = MemoryClient(db, settings=SETTINGS)
    rows: list[Doc] = []
    for user_id, live in users.items():
        row: Doc = {
            "user": user_id,
            "live_events": live,
            "archived": db[SETTINGS.archive_collection].count_documents({"user_id": user_id}),
            "history_versions": db[SETTINGS.history_collection].count_documents({"user_id": user_id}),
        }
        reader.memory(user_id)  # warm the connection and the server's caches
        counter.reset()
        memory = reader.memory(user_id)
        assert len(memory.events) == live, (user_id, len(memory.events), live)
        rows.append(row | {"round_trips": sum(counter.counts.values()), "commands": dict(counter.counts)})
    counter.enabled = False
    sync: dict[str, list[float]] = {user_id: [] for user_id in users}
    for _ in range(reads):
        for user_id, samples in sync.items():
            samples.extend(timed(1, functools.partial(reader.memory, user_id)))
    in_async = asyncio.run(_async_reads(mongo.uri, db_name, list(users), reads))
    for row in rows:
        row["sync"], row["async"] = percentiles(sync[row["user"]]), percentiles(in_async[row["user"]])
    client.close()
    return rows


async def _async_reads(uri: str, db_name: str, user_ids: list[str], reads: int) -> dict[str, list[float]]:
    client: pymongo.AsyncMongoClient[Doc] = pymongo.AsyncMongoClient(uri)
    try:
        reader = AsyncMemoryClient(client[db_name], settings=SETTINGS)
        samples: dict[str, list[float]] = {user_id: [] for user_id in user_ids}
        for user_id in user_ids:
            await reader.memory(user_id)
        for _ in range(reads):
            for user_id in user_ids:
                started = time.perf_counter()
                await reader.memory(user_id)
                samples[user_id].append(time.perf_counter() - started)
        return samples
    finally:
        await client.close()


def _redis_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]  # a sync client's reply
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def bench_ring(redis_service: RedisService, db: Any, rings: int) -> Doc:
    """Measure Redis round trips (commands the client sent; those a script runs are counted apart)
    and latency of ring()."""
    client = redis_service.client()
    ringer = MemoryClient(db, client, settings=SETTINGS)
    ringer.ring("warm-up")  # loads the script once (SCRIPT LOAD on the first NOSCRIPT)
    before = _redis_calls(client)
    samples = timed(rings, lambda: ringer.ring("ringing-user", events=SETTINGS.threshold + 1))
    after = _redis_calls(client)
    quiet = timed(rings, lambda: ringer.ring("quiet-user", events=SETTINGS.threshold))
    client.close()
    per_ring = {name: (n - before.get(name, 0)) / rings for name, n in after.items() if name != "info"}
    return {
        "round_trips": per_ring.get("evalsha", 0.0),
        "server_commands": {name: n for name, n in per_ring.items() if n},
        "ring": percentiles(samples),
        "at_or_under_threshold": {**percentiles(quiet), "round_trips": 0},
    }


def table(rows: list[Doc]) -> str:
    """Render the memory() figures as a Markdown table."""
    headers = ["user", "live events", "archived", "history versions", "round trips"]
    headers += ["sync median / p95 ms", "asyncio median / p95 ms"]
    cells = [
        [row["user"], row["live_events"], row["archived"], row["history_versions"], row["round_trips"]]
        + [f"{row[mode]['median_ms']} / {row[mode]['p95_ms']}" for mode in ("sync", "async")]
        for row in rows
    ]
    return "\n".join(markdown_table(headers, cells))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200, help="memory() calls timed per user and client")
    parser.add_argument("--history", type=int, default=3000, help="events folded before, for the folded users")
    parser.add_argument("--rings", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, default=OUT_DIR / "client", help="the services' data")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "client.json")
    args = parser.parse_args(argv)
    with stand_ins(args.work_dir) as ctx:
        db = ctx.client["bench_client"]
        lock_redis = ctx.redis.client()
        MemoryStore(db, SETTINGS).ensure_indexes()  # the job creates them on every run
        started = time.monotonic()
        users = seed(db, lock_redis, 20, args.history) | seed(db, lock_redis, 2000, args.history)
        seeded = round(time.monotonic() - started, 1)
        rows = bench_memory(ctx.mongo, db.name, users, args.reads)
        ring = bench_ring(ctx.redis, db, args.rings)
        lock_redis.close()
    figures = {"seed_seconds": seeded, "memory": rows, "ring": ring}
    write_results({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), **figures}, args.out)
    print(json.dumps(figures, indent=2))
    print(table(rows))
    log(f"results in {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
