"""Issue 20, item 4: one run folds at most ``max_fold_events`` per user, and says so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED
from butler_memory.fold.report import build_report, to_markdown
from tests.engine.helpers import insert_events, make_engine, small_settings

Doc = dict[str, Any]
CAPPED = "personalized_memory_worker_users_fold_capped_total"


def test_a_capped_user_says_how_many_events_it_left_and_is_counted(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd_metrics: Any, statsd: Any
) -> None:
    settings = small_settings(max_fold_events=20, max_events_per_chunk=10)
    engine = make_engine(mongo_db, redis_client, settings, metrics=statsd_metrics)
    insert_events(mongo_db, "big", 51, start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(seconds=1))
    insert_events(mongo_db, "small", 15, start=datetime(2026, 1, 1, tzinfo=UTC), step=timedelta(seconds=1))

    big, small = engine.compress("big"), engine.compress("small")

    assert big.status == COMPRESSED and big.events_folded == 20
    assert big.fold_capped and big.events_left == 51 - 20 - settings.keep_last_n, big
    assert not small.fold_capped and small.events_left == 0, small
    lines = statsd.wait_for(lambda got: any(CAPPED in line for line in got))
    assert sum(1 for line in lines if line.startswith(f"{CAPPED}:")) == 1, lines
    now = datetime(2026, 1, 2, tzinfo=UTC)
    doc = build_report(
        run_id="r", scanned=["big", "small"], results=[big.to_dict(), small.to_dict()], started_at=now, finished_at=now
    )
    assert doc["users_fold_capped"] == 1 and doc["events_left"] == 28
    assert "**28** event(s) left" in to_markdown(doc)

    # The next runs take the rest (the user is still over the threshold), the last one not capped.
    second = engine.compress("big")
    assert second.fold_capped and second.events_left == 8
    third = engine.compress("big")
    assert third.events_folded == 8 and not third.fold_capped and third.events_left == 0
