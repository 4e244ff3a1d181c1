"""Benchmark of the summary history, rollback and re-fold on real local servers (no Airflow).

Seeds ``--users`` users of ``--events`` events, compresses them all (run r0), adds as many events
again, compresses them all (run r1), then rolls r1 back for every user, checks the rollback drill (user_memory, the archive and the profiles equal the
snapshot taken before r1, but for the version), compresses again (r2) and re-folds every user from
the archive. Prints wall time per user and MongoDB commands per user of each phase, as JSON.
The offline summariser is used so the figures are the engine's and MongoDB's, not an LLM's.

    python tools/bench_history.py --users 50 --events 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pymongo
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.llm.offline import OfflineSummarizer  # noqa: E402
from butler_memory.operations.engine import Engine  # noqa: E402
from butler_memory.storage.locks import UserLocks  # noqa: E402
from butler_memory.storage.profiles import LEASE_FIELD, VERSION_FIELD  # noqa: E402
from butler_memory.storage.store import MemoryStore  # noqa: E402
from tools.bench_engine import START, CommandCounter, insert_events  # noqa: E402
from tools.bench_harness import OUT_DIR, Doc, stand_ins, write_results  # noqa: E402
from tools.seed import user_events  # noqa: E402


def state(db: Any) -> Doc:
    """Return user_memory and the archive by _id, and the profiles without their version and the
    lease of the run that last took the user (a fence, no state of the memory)."""
    profiles = {p["user_id"]: p for p in db["user_profiles"].find({}, {"_id": 0})}
    for profile in profiles.values():
        profile.pop(VERSION_FIELD, None)
        profile.pop(LEASE_FIELD, None)
    return {
        "events": {d["_id"]: d for d in db["user_memory"].find()},
        "archive": {d["_id"]: d for d in db["user_memory_archive"].find()},
        "profiles": profiles,
    }


def phase(users: list[str], counter: CommandCounter, act: Callable[[str], Any]) -> dict[str, Any]:
    """Run ``act`` for every user; return seconds a user and MongoDB commands a user."""
    counter.reset()
    started = time.monotonic()
    statuses: dict[str, int] = {}
    for user_id in users:
        status = act(user_id).status
        statuses[status] = statuses.get(status, 0) + 1
    seconds = time.monotonic() - started
    return {
        "ms_per_user": round(1000 * seconds / len(users), 1),
        "mongo_commands_per_user": round(sum(counter.counts.values()) / len(users), 1),
        "statuses": statuses,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument(
        "--work-dir", type=Path, default=OUT_DIR, help="the services' data (.local/bench/history-services)"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR / "history.json")
    args = parser.parse_args(argv)
    settings = Settings()
    with stand_ins(args.work_dir / "history-services") as stack:
        counter = CommandCounter()
        client: pymongo.MongoClient[Doc] = pymongo.MongoClient(stack.mongo.uri, event_listeners=[counter])
        db = client["bench_history"]
        rng = random.Random(7)
        users = [f"user-{i:04d}" for i in range(args.users)]
        events: list[Doc] = []
        for user_id in users:
            events.extend(user_events(user_id, args.events, rng, START)[0])
        insert_events(db, events)
        later: list[Doc] = []
        for user_id in users:
            for ev in user_events(user_id, args.events, rng, START + timedelta(days=365))[0]:
                later.append({**ev, "event_id": "later-" + ev["event_id"]})
        engine = Engine(
            settings,
            MemoryStore(db, settings),
            UserLocks(redis.Redis.from_url(stack.redis.url), settings),
            OfflineSummarizer(),
        )
        engine.store.ensure_indexes()
        figures: dict[str, Any] = {"users": args.users, "events_per_user": args.events}
        figures["compress_first"] = phase(users, counter, lambda u: engine.compress(u, run_id="r0"))
        insert_events(db, later)
        before = state(db)
        figures["compress"] = phase(users, counter, lambda u: engine.compress(u, run_id="r1"))
        figures["rollback_dry_run"] = phase(
            users, counter, lambda u: engine.rollback(u, "r1", rollback_id="rb", dry_run=True)
        )
        figures["rollback"] = phase(users, counter, lambda u: engine.rollback(u, "r1", rollback_id="rb"))
        figures["drill_equal"] = state(db) == before
        figures["rollback_again"] = phase(users, counter, lambda u: engine.rollback(u, "r1", rollback_id="rb2"))
        figures["compress_again"] = phase(users, counter, lambda u: engine.compress(u, run_id="r2"))
        figures["refold"] = phase(users, counter, lambda u: engine.refold(u, run_id="refold"))
        figures["history_entries"] = db["user_memory_summaries"].count_documents({})
        engine.close()
        client.close()
    write_results(figures, args.out)
    print(json.dumps(figures, indent=2))
    return 0 if figures["drill_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
