"""Daily scan cost: the full $group over every event against the incremental scan (issue 20.3).

Standalone: ``python tools/bench_scan.py [--sizes 100000 1000000] [--active 0.01] [--mongo-uri URI]``, on the bench harness
(tools/bench_harness.py: its stand-ins, phases and results writer; figures in ``.local/bench/scan.json``). On the embedded
MongoDB wire server (SecantusDB's secantusd-py, not MongoDB), a collection of N events (users of 20
to 50 events, all at or under the threshold of 50: yesterday's run compressed everyone) gets a first
daily scan (the full one, which sets the watermark); then ``--active`` of the users write 35 events
each, spread over the day. Both scans are then timed (median of 3, ``persist`` off so each repeat sees the same state)
and their reads counted with a pymongo CommandListener: commands, documents returned by finds, and
documents the aggregates cover (a ``$group`` without ``$match`` covers the collection; one on
``user_id $in`` covers those users' events, counted afterwards).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo
from pymongo import monitoring

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.core.units import markdown_table  # noqa: E402
from butler_memory.freshness import fresh  # noqa: E402
from butler_memory.freshness.doorbell import DoorbellRecord  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools.bench_engine import insert_events  # noqa: E402
from tools.bench_harness import OUT_DIR, log, machine, run_phase, shown, stand_ins, write_results  # noqa: E402

Doc = dict[str, Any]
DAY0 = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
SIZES = (20, 30, 40, 50)
"""Events per user, cycled: at or under the threshold (50), 35 on average."""
NEW_EVENTS = 35
"""Events each active user writes since the last scan: it takes every one of them over the threshold."""
SETTINGS = Settings(threshold=50, keep_last_n=20, summary_language="en")


class ScanReads(monitoring.CommandListener):
    """Count commands, the documents finds return from user_memory, and the aggregates' $match."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.returned = 0
        self.matches: list[Any] = []
        self._finds: set[int] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Count one command; remember what it reads."""
        if event.command_name == "endSessions":
            return
        self.commands[event.command_name] += 1
        cmd = event.command
        if event.command_name in ("find", "getMore") and "user_memory" in (cmd.get("find"), cmd.get("collection")):
            self._finds.add(event.request_id)
        if event.command_name == "aggregate" and cmd.get("aggregate") == "user_memory":
            first = (cmd.get("pipeline") or [{}])[0]
            self.matches.append(first.get("$match"))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Count the documents a find's batch returned."""
        if event.request_id in self._finds:
            self._finds.discard(event.request_id)
            cursor = event.reply.get("cursor") or {}
            self.returned += len(cursor.get("firstBatch") or cursor.get("nextBatch") or [])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing was read."""
        self._finds.discard(event.request_id)

    def covered(self, db: Any) -> int:
        """Return the events the aggregates' $match stages cover (the whole collection without one)."""
        events = db["user_memory"]
        return sum(
            events.count_documents(m) if m is not None else events.estimated_document_count() for m in self.matches
        )


def seed(db: Any, n_events: int) -> list[str]:
    """Insert about ``n_events`` old events; return the user ids."""
    users: list[str] = []
    batch: list[Doc] = []
    total = 0
    while total < n_events:
        uid = f"scan-{len(users):07d}"
        size = SIZES[len(users) % len(SIZES)]
        users.append(uid)
        start = DAY0 - timedelta(days=30)
        batch.extend(
            {"user_id": uid, "role": "user", "content": "x", "created_at": start + timedelta(minutes=7 * i), "tags": []}
            for i in range(size)
        )
        total += size
        if len(batch) >= 50_000:
            insert_events(db, batch)
            batch = []
    insert_events(db, batch)
    return users


def measure(mongo_uri: str, db_name: str, redis_client: Any, now: datetime, full: bool) -> dict[str, Any]:
    """Time one kind of daily scan (median of 3) and count what one of them reads."""
    seconds, result, reads = [], None, ScanReads()
    for i in range(3):
        listener = ScanReads() if i == 0 else None
        client: pymongo.MongoClient[Doc] = pymongo.MongoClient(
            mongo_uri, event_listeners=[listener] if listener else []
        )
        store = MemoryStore(client[db_name], SETTINGS)
        owed = DoorbellRecord(redis_client, key=SETTINGS.daily_owed_key)
        started = time.perf_counter()
        result = fresh.daily_scan(
            store, SETTINGS, SETTINGS.scan_limit, None, owed=owed, full=full, now=now, persist=False
        )
        seconds.append(time.perf_counter() - started)
        if listener:
            reads = listener
        client.close()
    assert result is not None
    plain: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_uri)
    covered = reads.covered(plain[db_name])
    plain.close()
    return {
        "seconds": round(statistics.median(seconds), 3),
        "users_found": len(result.backlog) + result.left,
        "commands": dict(reads.commands),
        "documents_returned": reads.returned,
        "documents_covered_by_aggregates": covered,
    }


def written_at(writer: int, j: int) -> datetime:
    """When the ``writer``-th active user wrote its ``j``-th new event: spread over the day after the
    last scan, the writers interleaved (a day's writes, not one burst)."""
    slot = 86_400 // NEW_EVENTS
    return DAY0 + timedelta(seconds=j * slot + (writer * 37) % slot)


def bench_size(mongo_uri: str, redis_client: Any, n_events: int, active: float) -> dict[str, Any]:
    """Seed one collection, run the first (full) daily scan, let ``active`` of the users write, measure."""
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_uri)
    db_name = f"bench_scan_{n_events}"
    db = client[db_name]
    store = MemoryStore(db, SETTINGS)
    store.ensure_indexes()
    started = time.monotonic()
    users = seed(db, n_events)
    seeded = time.monotonic() - started
    owed = DoorbellRecord(redis_client, key=SETTINGS.daily_owed_key)
    first = fresh.daily_scan(store, SETTINGS, SETTINGS.scan_limit, None, owed=owed, now=DAY0)
    fresh.settle_daily(store, owed, first.xcom(), [], finished_at=DAY0)
    writers = users[:: max(int(1 / active), 1)]
    new = [
        {"user_id": u, "role": "user", "content": "x", "created_at": written_at(k, j), "tags": []}
        for k, u in enumerate(writers)
        for j in range(NEW_EVENTS)
    ]
    insert_events(db, new)
    day1 = DAY0 + timedelta(days=1)
    row = {
        "events": db["user_memory"].estimated_document_count(),
        "users": len(users),
        "active_users": len(writers),
        "seed_seconds": round(seeded, 1),
        "full": measure(mongo_uri, db_name, redis_client, day1, full=True),
        "incremental": measure(mongo_uri, db_name, redis_client, day1, full=False),
    }
    client.drop_database(db_name)
    client.close()
    redis_client.delete(SETTINGS.daily_owed_key)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Render the figures as the Markdown table of docs/benchmarks.md."""
    headers = ["Events", "Active users", "Full scan", "Incremental", "Ratio", "Full: documents covered"]
    headers += ["Incremental: documents returned + covered", "Incremental commands"]
    cells = []
    for r in rows:
        f, i = r["full"], r["incremental"]
        ratio = f["seconds"] / i["seconds"] if i["seconds"] else float("inf")
        returned = f"{i['documents_returned']:,} + {i['documents_covered_by_aggregates']:,}"
        cells.append(
            [
                f"{r['events']:,}",
                f"{r['active_users']:,}",
                f"{f['seconds']:.2f} s",
                f"{i['seconds']:.3f} s",
                f"{ratio:.0f}x",
                f"{f['documents_covered_by_aggregates']:,}",
                returned,
                sum(i["commands"].values()),
            ]
        )
    return "\n".join(markdown_table(headers, cells, right_from=0))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--active", type=float, default=0.01, help="share of the users who write since the last scan")
    parser.add_argument("--work-dir", type=Path, default=OUT_DIR / "scan", help="the services' data")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "scan.json")
    parser.add_argument(
        "--mongo-uri",
        help="measure on this MongoDB server instead of the embedded stand-in (it creates, then drops, "
        "the databases bench_scan_<events>)",
    )
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"sizes": args.sizes, "active": args.active},
        "sizes": {},
    }
    with stand_ins(args.work_dir) as ctx:
        redis_client = ctx.redis.client()
        mongo_uri = args.mongo_uri or ctx.mongo.uri
        results["mongo"] = "external" if args.mongo_uri else "SecantusDB (embedded stand-in)"
        for n in args.sizes:
            run_phase(
                results["sizes"],
                str(n),
                functools.partial(bench_size, mongo_uri, redis_client, n, args.active),
                save=lambda: write_results(results, args.out),
            )
            print(json.dumps(results["sizes"][str(n)]), flush=True)
        redis_client.close()
    print(table([row for row in results["sizes"].values() if "full" in row]))
    log(f"results in {shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
