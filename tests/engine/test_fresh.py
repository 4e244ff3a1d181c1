"""Fresh all day, below Airflow: the catch-up scan, the doorbell and its record, on real MongoDB and Redis.

The catch-up scan's MongoDB commands are counted with a pymongo command listener (as
``tools/bench_engine.py`` counts them): they must not grow with the collection, only with the users
who wrote since the last scan.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import pytest
import redis
import redis.asyncio
from pymongo.database import Database

from butler_memory.freshness import fresh
from butler_memory.freshness.backoff import FailureBackoff
from butler_memory.freshness.doorbell import AsyncDoorbell, Doorbell, DoorbellRecord, valid_user_id
from butler_memory.storage.events import Backlog
from butler_memory.storage.store import MemoryStore
from tests.engine.helpers import DocumentsRead, insert_events, small_settings
from tools.bench_engine import CommandCounter
from tools.services import MongoService, RedisService

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LAST_SCAN = NOW - timedelta(minutes=5)


def _seed_quiet(db: Database[dict[str, Any]], users: int, events: int = 15) -> None:
    """Users over the threshold (10) whose events are all old: the catch-up scan must not count them."""
    for i in range(users):
        insert_events(db, f"quiet-{i:04d}", events)


def _counted_scan(
    mongo_service: MongoService, db_name: str, redis_client: redis.Redis, **setting: Any
) -> tuple[fresh.ScanResult, Counter[str]]:
    settings = small_settings(catchup_margin_seconds=60, **setting)
    counter = CommandCounter()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_service.uri, event_listeners=[counter])
    try:
        store = MemoryStore(client[db_name], settings)
        counter.reset()
        result = fresh.catchup_scan(store, DoorbellRecord(redis_client), settings, settings.scan_limit, now=NOW)
        return result, Counter(counter.counts)
    finally:
        client.close()


@pytest.mark.parametrize("quiet_users", [20, 200])
def test_catchup_scan_counts_only_users_with_new_events(
    mongo_service: MongoService,
    mongo_db: Database[dict[str, Any]],
    redis_client: redis.Redis,
    quiet_users: int,
) -> None:
    settings = small_settings()
    store = MemoryStore(mongo_db, settings)
    store.ensure_indexes()
    _seed_quiet(mongo_db, quiet_users)
    # Since the last scan: one user crossed the threshold, one wrote but stays under it.
    insert_events(mongo_db, "chatty", 14, start=LAST_SCAN - timedelta(minutes=10), step=timedelta(minutes=1))
    insert_events(mongo_db, "light", 2, start=LAST_SCAN + timedelta(seconds=30))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})

    result, commands = _counted_scan(mongo_service, mongo_db.name, redis_client)

    assert result.backlog == [Backlog("chatty", 14)]
    assert result.candidates == 2  # chatty and light; none of the quiet users
    assert result.left == 0
    assert result.scanned_at == NOW
    # One state read, one page of writers, one count for the page (the pass's last page: no cursor
    # written): the same for 20 and 200 quiet users.
    assert commands == Counter({"find": 2, "aggregate": 1}), commands


def test_catchup_scan_takes_doorbell_users_and_leaves_the_rest_past_the_limit(
    mongo_service: MongoService, mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    store = MemoryStore(mongo_db, settings)
    _seed_quiet(mongo_db, 3, events=12)  # old events only: found through the doorbell alone
    insert_events(mongo_db, "fresh-big", 20, start=LAST_SCAN + timedelta(seconds=1), step=timedelta(seconds=1))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})
    bell = Doorbell(redis_client, threshold=settings.threshold)
    for user_id in ("quiet-0000", "quiet-0001", "nobody-at-all"):
        assert bell.ring(user_id)

    result, _ = _counted_scan(mongo_service, mongo_db.name, redis_client, scan_limit=2)

    assert result.backlog == [Backlog("fresh-big", 20), Backlog("quiet-0000", 12)]
    assert result.left == 1 and result.left_ids == ["quiet-0001"]
    assert set(result.rung) == {"quiet-0000", "nobody-at-all"}  # the records the report drops

    record = DoorbellRecord(redis_client)
    fresh.settle_catchup(store, record, result.xcom(), idle=False, finished_at=NOW)
    # Handled records are dropped (the unknown user too); the user left over waits for the next run.
    assert set(record.oldest(10)) == {"quiet-0001"}
    state = store.load_state(fresh.STATE_DOC)
    assert state["scanned_through"].replace(tzinfo=UTC) == NOW
    assert state["runs"] == 1


def test_a_page_ending_on_a_numeric_user_id_skips_no_string_user_of_the_same_millisecond(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    """Second review: the cursor's ``$gt`` on a number matched numbers only."""
    # Numbers sort before strings: a page that ends on (t, 5) resumes with {created_at: t, user_id: {$gt: 5}},
    # which by MongoDB's type bracketing matches numbers only, so "alice" at t is never read.
    settings = small_settings(catchup_scan_page_events=2, catchup_scan_max_events=100)
    store = MemoryStore(mongo_db, settings)
    store.ensure_indexes()
    at = LAST_SCAN + timedelta(seconds=5)
    mongo_db["user_memory"].insert_many(
        [{"user_id": 5, "role": "user", "content": "x", "created_at": at} for _ in range(2)]
    )
    insert_events(mongo_db, "alice", 12, start=at, step=timedelta(0))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})

    result = fresh.catchup_scan(store, DoorbellRecord(redis_client), settings, settings.scan_limit, now=NOW)

    assert [b.user_id for b in result.backlog] == ["alice"], result


def test_users_left_past_the_limit_and_doorbell_drain_max_are_not_dropped(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    """Second review: only the first doorbell_drain_max of them were recorded, and none on the last page."""
    # Module docstring: "Users over the threshold beyond scan_limit stay in (or are written back into) the
    # doorbell's record, so the next run takes them even when they write nothing more."
    settings = small_settings(scan_limit=1, doorbell_drain_max=1, catchup_margin_seconds=60)
    store = MemoryStore(mongo_db, settings)
    store.ensure_indexes()
    watermark = NOW - timedelta(minutes=40)  # one page reaches now: the pass's last page, not recorded
    for i, user_id in enumerate(("u-a", "u-b", "u-c")):
        insert_events(mongo_db, user_id, 20 - i, start=NOW - timedelta(minutes=35), step=timedelta(seconds=1))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": watermark})
    record = DoorbellRecord(redis_client)

    first = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW)
    assert [b.user_id for b in first.backlog] == ["u-a"] and first.left == 2
    fresh.settle_catchup(store, record, first.xcom(), idle=False, finished_at=NOW)

    # The next runs: u-a was compressed (pretend: its events gone), nobody writes anything more.
    mongo_db["user_memory"].delete_many({"user_id": "u-a"})
    taken: set[str] = set()
    later = NOW
    for _ in range(3):
        later += timedelta(minutes=5)
        scan = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=later)
        for b in scan.backlog:
            taken.add(b.user_id)
            mongo_db["user_memory"].delete_many({"user_id": b.user_id})
        fresh.settle_catchup(store, record, scan.xcom(), idle=not scan.backlog, finished_at=later)
    assert taken == {"u-b", "u-c"}, (
        f"left over the limit but never taken by a catch-up run: { ({'u-b', 'u-c'} - taken) }"
    )


class Killed(Exception):
    """Stands for the scan task's process dying (its execution timeout) at a checkpoint."""


PAGED = {"catchup_scan_page_events": 20, "catchup_scan_max_events": 60}


def _seed_writers(db: Database[dict[str, Any]]) -> set[str]:
    """Users who wrote since LAST_SCAN: 30 over the threshold, interleaved in time, one bulk import of
    300 events in one millisecond, and 5 under the threshold. Return the ids over the threshold."""
    for i in range(30):
        insert_events(db, f"w-{i:02d}", 12, start=LAST_SCAN + timedelta(seconds=i), step=timedelta(minutes=1))
    insert_events(db, "bulk", 300, start=LAST_SCAN + timedelta(seconds=1), step=timedelta(0))
    for i in range(5):
        insert_events(db, f"light-{i}", 3, start=LAST_SCAN + timedelta(seconds=i))
    return {f"w-{i:02d}" for i in range(30)} | {"bulk"}


def _catchup_until_done(
    mongo_service: MongoService, db_name: str, redis_client: redis.Redis, kill_at: int | None = None
) -> tuple[list[fresh.ScanResult], set[str], int]:
    """Run catch-up scans, each settled as its report would, until one completes its pass; return the
    scans, every user taken, and the new events the scans read. With ``kill_at``, the first scan dies
    at its ``kill_at``-th page checkpoint (nothing after it runs: no report)."""
    settings = small_settings(catchup_margin_seconds=60, **PAGED)
    listener = DocumentsRead({"user_memory"})
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_service.uri, event_listeners=[listener])
    store, record = MemoryStore(client[db_name], settings), DoorbellRecord(redis_client)
    pages = [0]

    def checkpoint(step: str) -> None:
        assert step in fresh.SCAN_STEPS
        pages[0] += 1
        if pages[0] == kill_at:
            raise Killed(step)

    scans, taken = [], set()
    try:
        if kill_at is not None:
            with pytest.raises(Killed):
                fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW, checkpoint=checkpoint)
        for _ in range(50):
            result = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW)
            scans.append(result)
            taken |= {b.user_id for b in result.backlog}
            fresh.settle_catchup(store, record, result.xcom(), idle=not result.backlog, finished_at=NOW)
            if result.scanned_at is not None:
                break
        return scans, taken, listener.read
    finally:
        client.close()


def test_catchup_scan_is_bounded_per_run_and_misses_nobody(
    mongo_service: MongoService, mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    """Issue 26, item 5: one distinct over every user since the watermark, one count each, could pass
    16 MB or the task's timeout, and then every later run failed the same way."""
    store = MemoryStore(mongo_db, small_settings())
    store.ensure_indexes()
    due = _seed_writers(mongo_db)
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})

    scans, taken, read = _catchup_until_done(mongo_service, mongo_db.name, redis_client)

    assert taken == due, "a user over the threshold was missed"
    assert len(scans) > 3, "the pass was spread over several runs"
    assert [s.scanned_at for s in scans[:-1]] == [None] * (len(scans) - 1) and scans[-1].scanned_at == NOW
    assert read <= len(scans) * PAGED["catchup_scan_max_events"], "a run read more than catchup_scan_max_events"
    # 360 + 15 events of the others, one page of the bulk import's 300 equal keys (then skipped past).
    assert read <= 360 + 15 + PAGED["catchup_scan_page_events"], read
    state = store.load_state(fresh.STATE_DOC)
    assert state["scanned_through"].replace(tzinfo=UTC) == NOW, "the watermark moves once the pass is done"
    assert state[fresh.SCAN_FIELD] is None


def test_a_page_ending_on_an_event_without_a_user_id_skips_nobody(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    settings = small_settings(catchup_scan_page_events=2, catchup_scan_max_events=100)
    store = MemoryStore(mongo_db, settings)
    at = LAST_SCAN + timedelta(seconds=5)
    mongo_db["user_memory"].insert_many([{"role": "user", "content": "x", "created_at": at} for _ in range(3)])
    insert_events(mongo_db, "zed", 12, start=at, step=timedelta(0))  # the same millisecond, after null
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})

    result = fresh.catchup_scan(store, DoorbellRecord(redis_client), settings, settings.scan_limit, now=NOW)

    assert result.backlog == [Backlog("zed", 12)] and result.scanned_at == NOW


def test_a_catchup_scan_killed_mid_way_is_resumed_where_it_stopped(
    mongo_service: MongoService, mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    store = MemoryStore(mongo_db, small_settings())
    store.ensure_indexes()
    due = _seed_writers(mongo_db)
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})
    _, _, uninterrupted = _catchup_until_done(mongo_service, mongo_db.name, redis_client)
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN, fresh.SCAN_FIELD: None})
    redis_client.flushall()

    _, taken, read = _catchup_until_done(mongo_service, mongo_db.name, redis_client, kill_at=2)

    assert taken == due, "the users of the killed scan's pages were lost"
    assert read == uninterrupted, "the resumed scan read the killed scan's pages again"
    assert store.load_state(fresh.STATE_DOC)["scanned_through"].replace(tzinfo=UTC) == NOW


def test_a_failing_user_is_backed_off_exponentially_up_to_the_cap(redis_client: redis.Redis) -> None:
    """Issue 26, item 6: a user failing deterministically was retried by every catch-up run (every 5 minutes)."""
    clock = [NOW.timestamp()]
    backoff = FailureBackoff(
        redis_client, small_settings(backoff_base_seconds=600, backoff_max_seconds=3000), clock=lambda: clock[0]
    )
    ends = [backoff.record_failure("stuck", "GuardRejected") - clock[0] for _ in range(5)]
    assert ends == [600, 1200, 2400, 3000, 3000]
    assert redis_client.hgetall("butler:memory:backoff:stuck") == {
        b"failures": b"5",
        b"until": str(clock[0] + 3000).encode(),
        b"error_type": b"GuardRejected",
    }
    assert 0 < redis_client.ttl("butler:memory:backoff:stuck") <= 6000
    assert backoff.backed_off(["stuck", "fine"]) == {"stuck"}
    clock[0] += 3001
    assert backoff.backed_off(["stuck"]) == set(), "the back-off ends by itself"
    assert backoff.record_failure("stuck", "GuardRejected") - clock[0] == 3000, "failures in a row keep counting"
    backoff.clear("stuck")
    assert redis_client.exists("butler:memory:backoff:stuck") == 0
    assert backoff.record_failure("stuck", "GuardRejected") - clock[0] == 600, "a success starts it over"
    off = FailureBackoff(redis_client, small_settings(backoff_base_seconds=0))
    assert off.record_failure("other", "GuardRejected") == 0 and off.backed_off(["stuck", "other"]) == set()


def test_catchup_scan_leaves_out_backed_off_users_and_keeps_their_ring_quietly(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    settings = small_settings()
    store = MemoryStore(mongo_db, settings)
    insert_events(mongo_db, "stuck", 20, start=LAST_SCAN + timedelta(seconds=1), step=timedelta(seconds=1))
    insert_events(mongo_db, "rang-stuck", 12)
    insert_events(mongo_db, "fine", 15, start=LAST_SCAN + timedelta(seconds=1), step=timedelta(seconds=1))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})
    Doorbell(redis_client, threshold=settings.threshold).ring("rang-stuck")
    clock = [NOW.timestamp()]
    backoff = FailureBackoff(redis_client, settings, clock=lambda: clock[0])
    for user_id in ("stuck", "rang-stuck"):
        backoff.record_failure(user_id, "LLMReplyCutOffError")
    record = DoorbellRecord(redis_client)

    result = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW, backoff=backoff)

    assert result.backlog == [Backlog("fine", 15)]
    assert result.backed_off == ["rang-stuck", "stuck"] and result.left == 0
    assert result.xcom()["backed_off"] == ["rang-stuck", "stuck"]
    fresh.settle_catchup(store, record, result.xcom(), idle=False, finished_at=NOW)
    # Both stay recorded (put back without a wake-up): the first catch-up run after their back-off takes them.
    assert set(record.oldest(10)) == {"rang-stuck", "stuck"}

    clock[0] += settings.backoff_base_seconds + 1
    later = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW, backoff=backoff)
    assert {b.user_id for b in later.backlog} == {"stuck", "rang-stuck", "fine"} and later.backed_off == []


def test_first_catchup_scan_is_a_full_scan(mongo_db: Database[dict[str, Any]], redis_client: redis.Redis) -> None:
    settings = small_settings()
    store = MemoryStore(mongo_db, settings)
    _seed_quiet(mongo_db, 2, events=12)
    insert_events(mongo_db, "small", 5)
    result = fresh.catchup_scan(store, DoorbellRecord(redis_client), settings, settings.scan_limit, now=NOW)
    assert [b.user_id for b in result.backlog] == ["quiet-0000", "quiet-0001"]


def test_idle_settle_counts_without_a_run(mongo_db: Database[dict[str, Any]], redis_client: redis.Redis) -> None:
    store = MemoryStore(mongo_db, small_settings())
    scan = fresh.ScanResult(backlog=[], scanned_at=NOW).xcom()
    for _ in range(3):
        fresh.settle_catchup(store, DoorbellRecord(redis_client), scan, idle=True, finished_at=NOW)
    state = store.load_state(fresh.STATE_DOC)
    assert state["idle_runs"] == 3 and "runs" not in state


def test_a_ring_during_a_catchup_run_keeps_its_record_past_the_report(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    """A ring made after the scan read the record survives the run's report (second review)."""
    # The scan read x's ring; while the run compresses x, the Butler imports older messages for x
    # (created_at before the watermark's margin, which only a ring can announce) and rings again.
    # ZADD NX keeps the old record, so the report must not drop it as handled.
    settings = small_settings(catchup_margin_seconds=60)
    store = MemoryStore(mongo_db, settings)
    old = NOW - timedelta(days=3)
    insert_events(mongo_db, "x", 12, start=old, step=timedelta(seconds=1))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})
    bell, record = Doorbell(redis_client, threshold=settings.threshold), DoorbellRecord(redis_client)
    assert bell.ring("x")

    scan = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW)
    assert [b.user_id for b in scan.backlog] == ["x"]
    mongo_db["user_memory"].delete_many({"user_id": "x", "created_at": {"$lt": old + timedelta(seconds=9)}})
    insert_events(mongo_db, "x", 12, first=100, start=old - timedelta(days=1), step=timedelta(seconds=1))
    assert bell.ring("x", events=15)  # during the run, after its scan
    fresh.settle_catchup(store, record, scan.xcom(), idle=False, finished_at=NOW)

    later = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW + timedelta(minutes=5))
    assert [b.user_id for b in later.backlog] == ["x"], "the ring made during the run was dropped"
    fresh.settle_catchup(store, record, later.xcom(), idle=False, finished_at=NOW + timedelta(minutes=5))
    assert record.oldest(10) == {}, "no ring since the second scan: its report drops the record"


def test_a_ring_during_a_catchup_run_for_a_user_it_found_by_its_events_is_kept(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis
) -> None:
    """A user the scan found by its new events, not by a ring, keeps a ring made during the run (second review)."""
    settings = small_settings(catchup_margin_seconds=60)
    store = MemoryStore(mongo_db, settings)
    insert_events(mongo_db, "y", 12, start=LAST_SCAN + timedelta(seconds=1), step=timedelta(seconds=1))
    store.save_state(fresh.STATE_DOC, set_fields={"scanned_through": LAST_SCAN})
    bell, record = Doorbell(redis_client, threshold=settings.threshold), DoorbellRecord(redis_client)
    assert bell.ring("quiet-ring")  # rang before the scan: handled by this run

    scan = fresh.catchup_scan(store, record, settings, settings.scan_limit, now=NOW)
    assert [b.user_id for b in scan.backlog] == ["y"] and record.oldest(10).keys() == {"quiet-ring"}
    assert bell.ring("y")  # during the run: the record is new, made after the scan read it
    fresh.settle_catchup(store, record, scan.xcom(), idle=False, finished_at=NOW)

    assert set(record.oldest(10)) == {"y"}, "the report dropped a ring made after its scan"


def test_freshness_is_the_lag_from_crossing_the_threshold_to_the_commit(
    mongo_db: Database[dict[str, Any]], redis_client: redis.Redis, statsd_metrics: Any, statsd: Any
) -> None:
    from butler_memory.fold.compression import compress_user
    from butler_memory.llm.offline import OfflineSummarizer
    from butler_memory.operations.engine import Engine
    from butler_memory.storage.locks import UserLocks

    settings = small_settings()  # threshold 10: the 11th event (index 10) takes the user over it
    start = NOW - timedelta(minutes=30)
    insert_events(mongo_db, "u-fresh", 14, start=start, step=timedelta(minutes=1))
    crossed = start + timedelta(minutes=10)
    store, locks = MemoryStore(mongo_db, settings), UserLocks(redis_client, settings)
    parts = Engine(settings, store, locks, OfflineSummarizer(), statsd_metrics)
    result = compress_user(parts, "u-fresh", clock=lambda: crossed + timedelta(seconds=90))
    assert result.freshness_seconds == 90.0, result
    lines = statsd.wait_for(lambda got: any("freshness_lag_seconds" in line for line in got))
    assert "personalized_memory_worker_freshness_lag_seconds:90000.000000|ms" in lines, lines


@pytest.mark.parametrize("bad", ["", " ", "a b", "x" * 201, "tab\there", "nl\n", 42, None, b"bytes"])
def test_doorbell_refuses_malformed_ids_without_touching_redis(redis_client: redis.Redis, bad: Any) -> None:
    assert not valid_user_id(bad)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("butler:memory:doorbell:ring")
    assert Doorbell(redis_client).ring(bad) is False
    assert redis_client.zcard("butler:memory:doorbell") == 0
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_doorbell_records_once_and_wakes_every_time(redis_client: redis.Redis) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("butler:memory:doorbell:ring")
    pubsub.get_message(timeout=0.2)
    bell = Doorbell(redis_client, threshold=50)
    assert bell.ring("u-1") and bell.ring("u-1", events=80)
    assert bell.ring("u-2", events=50) is False  # at the threshold: not due, nothing sent
    first = DoorbellRecord(redis_client).oldest(10)
    assert list(first) == ["u-1"] and bell.pending() == 1
    messages = [pubsub.get_message(timeout=1.0), pubsub.get_message(timeout=1.0)]
    assert all(m is not None and m["data"] == b"ring" for m in messages)
    assert pubsub.get_message(timeout=0.2) is None
    pubsub.close()


def test_doorbell_reports_a_redis_outage_as_false() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    assert Doorbell(dead).ring("u-1") is False


def test_async_doorbell_matches_the_sync_one(redis_service: RedisService, redis_client: redis.Redis) -> None:
    async def ring_some() -> tuple[list[bool], int]:
        bell = AsyncDoorbell(redis.asyncio.Redis.from_url(redis_service.url), threshold=10)
        try:
            rang = [
                await bell.ring("a-1"),
                await bell.ring("a-1"),
                await bell.ring("a 2"),
                await bell.ring("a-3", events=3),
            ]
            return rang, await bell.pending()
        finally:
            await bell.close()

    rang, pending = asyncio.run(ring_some())
    assert rang == [True, True, False, False]
    assert pending == 1
    assert list(DoorbellRecord(redis_client).oldest(5)) == ["a-1"]
