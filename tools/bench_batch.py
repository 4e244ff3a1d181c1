"""Benchmark of the batch mode (issue 21): the same users folded online and through the Batch API.

One run, two copies of the same synthetic users (``--users`` users of 60 events: 40 folded, one
chunk each) on the stand-ins (MongoDB wire server, redis-server, the fake OpenAI server), no
Airflow: the engine as the DAG's tasks call it.

- **online**: ``compress`` per user, ``--workers`` at a time (the ``llm_api`` pool's slots), the
  fake answering each chat call after ``--latency`` seconds. Worker-slot-seconds of the LLM phase
  = the sum of the users' compress times (a slot is held for each).
- **batch**: prepare, submit, the wait (``BatchTrigger.run()`` on an event loop, as the triggerer
  runs it, polling every ``--poll`` s while the fake keeps the batch in progress ``--batch-delay``
  seconds), collect, then the commit per user, ``--workers`` at a time. Worker-slot-seconds =
  prepare + submit + collect + the commits; the wait holds none. During the wait, MongoDB commands
  (a ``CommandListener``) and Redis commands (``INFO commandstats``) are counted, and the HTTP
  polls the fake received.

Tokens are the fake's ``usage`` (o200k_base counts of the real prompt) as each path records them;
cost at the published prices of ``gpt-4o-mini`` (``PRICES``). Prints JSON and a Markdown table.

    python tools/bench_batch.py --users 1000 --latency 0.2 --batch-delay 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.errors import CompressionError  # noqa: E402
from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.core.units import markdown_table  # noqa: E402
from butler_memory.fold.compression import UserResult, failed_result  # noqa: E402
from butler_memory.operations import batch  # noqa: E402
from butler_memory.orchestration.batch_trigger import BatchTrigger  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools.bench_engine import CommandCounter, build_engine, seed_users, throughput_users  # noqa: E402
from tools.bench_harness import OUT_DIR, Stack, log, machine, shown, stand_ins, write_results  # noqa: E402

SETTINGS = Settings(threshold=50, keep_last_n=20, summary_language="ru", llm_mode="batch", batch_poll_seconds=1.0)
PRICES = {
    "model": "gpt-4o-mini",
    "source": "https://openai.com/api/pricing/ (as reported in November 2026)",
    "online": {"input": 0.15, "output": 0.60},
    "batch": {"input": 0.075, "output": 0.30},
}
"""USD per 1M tokens."""


def cost(tokens: dict[str, int], prices: dict[str, float]) -> float:
    """Return the USD cost of the tokens at the prices (per 1M)."""
    return round((tokens["prompt"] * prices["input"] + tokens["completion"] * prices["output"]) / 1e6, 4)


def totals(results: list[UserResult]) -> dict[str, Any]:
    """Sum the users' tokens and time; count their statuses."""
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "statuses": statuses,
        "tokens": {
            "prompt": sum(r.prompt_tokens for r in results),
            "completion": sum(r.completion_tokens for r in results),
        },
        "slot_seconds": round(sum(r.seconds for r in results), 2),
    }


def guarded(user_id: str, call: Callable[[], UserResult]) -> UserResult:
    """Return the user's result, or a failed one (counted in the statuses) when it raised."""
    started = time.monotonic()
    try:
        return call()
    except CompressionError as exc:
        return failed_result(user_id, exc, time.monotonic() - started)


def redis_commands(client: Any) -> int:
    """Return the Redis server's total commands processed so far (this INFO not included)."""
    stats: dict[str, Any] = client.info("stats")
    return int(stats["total_commands_processed"])


def online(stack: Stack, db: str, users: list[str], workers: int, latency: float) -> dict[str, Any]:
    stack.fake.reset()
    stack.fake.set_latency(latency)
    engine = build_engine(
        stack.mongo.uri, db, stack.redis.url, stack.fake.base_url, SETTINGS.replace(llm_mode="online")
    )
    started = time.monotonic()
    with engine, ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda u: guarded(u, lambda: engine.compress(u, run_id="bench/online")), users))
    return {
        "seconds": round(time.monotonic() - started, 2),
        "llm_calls": len(stack.fake.chat_requests),
        **totals(results),
    }


def batched(stack: Stack, db: str, users: list[str], workers: int, delay: float, poll: float) -> dict[str, Any]:
    stack.fake.reset()
    stack.fake.set_batch(delay=delay)
    counter = CommandCounter()
    engine = build_engine(stack.mongo.uri, db, stack.redis.url, stack.fake.base_url, SETTINGS, listeners=[counter])
    run = "bench/batch"
    figures: dict[str, Any] = {}
    with engine, openai.OpenAI(base_url=stack.fake.base_url, api_key="bench", max_retries=0) as client:
        started = time.monotonic()
        figures["prepare"] = batch.prepare(engine, run, users).to_dict()
        figures["prepare_seconds"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        ids = batch.submit(engine, run, client)
        figures["submit_seconds"] = round(time.monotonic() - started, 2)
        figures["batches"] = len(ids)
        figures["input_bytes"] = sum(f["bytes"] for f in stack.fake.files if f["purpose"] == "batch")

        counter.reset()
        probe = stack.redis.client()
        redis_before, requests_before = redis_commands(probe), stack.fake.request_count
        trigger = BatchTrigger(batch_ids=ids, settings={"llm_conn_id": ""}, poll_seconds=poll)
        started, cpu = time.monotonic(), time.process_time()
        # The trigger resolves the endpoint as the online path does; restored after, so the caller's
        # environment (the test suite's, when its smoke test runs this in-process) is left as it was.
        with patch.dict(os.environ, {"OPENAI_BASE_URL": stack.fake.base_url}):
            event = asyncio.run(_first_event(trigger))
        figures["wait"] = {
            "seconds": round(time.monotonic() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu, 3),
            "http_polls": stack.fake.request_count - requests_before,
            "mongo_commands": sum(counter.counts.values()),
            "redis_commands": redis_commands(probe) - redis_before - 1,  # less the first INFO
            "event": event,
        }
        probe.close()

        started = time.monotonic()
        figures["collect"] = batch.collect(engine, run, client)
        figures["collect_seconds"] = round(time.monotonic() - started, 2)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda u: guarded(u, lambda: batch.commit_user(engine, u, run_key=run)), users))
        figures["commit_seconds"] = round(time.monotonic() - started, 2)
    figures.update(totals(results))
    figures["slot_seconds"] = round(
        figures["slot_seconds"] + figures["prepare_seconds"] + figures["submit_seconds"] + figures["collect_seconds"], 2
    )
    figures["llm_calls_online"] = len(stack.fake.chat_requests)
    figures["files_left_at_provider"] = len(stack.fake.files)
    return figures


async def _first_event(trigger: BatchTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    return {}


def table(figures: dict[str, Any], users: int) -> str:
    """Return the Markdown table of docs/benchmarks.md."""
    on, ba = figures["online"], figures["batch"]
    per = 1000 / users
    rows = [
        ("prompt tokens per 1,000 users", on["tokens"]["prompt"] * per, ba["tokens"]["prompt"] * per),
        ("completion tokens per 1,000 users", on["tokens"]["completion"] * per, ba["tokens"]["completion"] * per),
        (f"cost per 1,000 users, {PRICES['model']} (USD)", on["cost_usd"] * per, ba["cost_usd"] * per),
        ("worker-slot-seconds, LLM phase, per 1,000 users", on["slot_seconds"] * per, ba["slot_seconds"] * per),
    ]
    cells = [(name, f"{a:,.4g}", f"{b:,.4g}") for name, a, b in rows]
    return "\n".join(markdown_table(["per 1,000 users", "online", "batch"], cells, right_from=1))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8, help="users compressed at once (the llm_api pool's slots)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake takes per online chat call")
    parser.add_argument("--batch-delay", type=float, default=10.0, help="seconds the fake keeps the batch running")
    parser.add_argument("--poll", type=float, default=1.0, help="the trigger's poll interval (batch_poll_seconds)")
    parser.add_argument("--work-dir", type=Path, default=OUT_DIR / "batch", help="the services' data")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "batch.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    users = throughput_users(args.users)
    with stand_ins(args.work_dir) as stack:
        for name in ("bench_online", "bench_batch"):
            MemoryStore(stack.client[name], SETTINGS).ensure_indexes()  # before the data, as bench_client does
            seed_users(stack.client[name], users)
        log(f"seeded {args.users} users twice")
        figures: dict[str, Any] = {
            "online": online(stack, "bench_online", list(users), args.workers, args.latency),
        }
        log("online done")
        figures["batch"] = batched(stack, "bench_batch", list(users), args.workers, args.batch_delay, args.poll)
        log("batch done")
    for mode in ("online", "batch"):
        figures[mode]["cost_usd"] = cost(figures[mode]["tokens"], PRICES[mode])  # type: ignore[arg-type]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": {"before": [round(x, 1) for x in load_before], "after": [round(x, 1) for x in os.getloadavg()]},
        "args": {k: str(v) for k, v in vars(args).items()},
        "prices": PRICES,
        **figures,
    }
    write_results(result, args.out)
    print(json.dumps(result, indent=2, default=str))
    print(table(figures, args.users))
    log(f"results in {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
