"""Issue 20, item 3: the daily scan counts the users who wrote, not the collection, and misses nobody.

Each test runs the daily scan as the DAG's scan task does, compresses what it takes with the real
engine and settles it as the report does (``fresh.settle_daily``), on real MongoDB and Redis. The
paths that could lose a user over the threshold: events without a doorbell ring, late writes (within
and beyond the margin), a restored backup, a scan killed mid-way, users a run leaves over its limit,
failed users.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pymongo
import pytest
import redis
from pymongo import monitoring
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.freshness import fresh
from butler_memory.freshness.doorbell import Doorbell, DoorbellRecord
from butler_memory.storage.events import COUNT_BATCH, Backlog
from butler_memory.storage.store import MemoryStore
from tests.engine.helpers import DocumentsRead, insert_events, make_engine, small_settings
from tools.bench_engine import CommandCounter
from tools.services import MongoService

Doc = dict[str, Any]
DAY0 = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
MARGIN = 300


def _settings(**changes: Any) -> Settings:
    return small_settings(**{"catchup_margin_seconds": MARGIN, "daily_full_scan_every_days": 7, **changes})


@dataclass(frozen=True)
class Daily:
    """A deployment's daily runs: its MongoDB, Redis and settings."""

    db: Database[Doc]
    redis: redis.Redis
    settings: Settings

    def store(self, db: Database[Doc] | None = None) -> MemoryStore:
        """Return a store on the deployment's database (or on ``db``, another client's view of it)."""
        return MemoryStore(self.db if db is None else db, self.settings)

    def owed(self) -> DoorbellRecord:
        """Return the daily run's record of the users it owes a compression."""
        return DoorbellRecord(self.redis, key=self.settings.daily_owed_key, channel="")

    def scan(
        self,
        now: datetime,
        *,
        db: Database[Doc] | None = None,
        full: bool = False,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> fresh.ScanResult:
        """Scan as the DAG's scan task does (reading through ``db`` when given)."""
        return fresh.daily_scan(
            self.store(db),
            self.settings,
            self.settings.scan_limit,
            None,
            owed=self.owed(),
            doorbell=DoorbellRecord(self.redis),
            full=full,
            now=now,
            checkpoint=checkpoint,
        )

    def run(self, now: datetime, *, full: bool = False, fail: frozenset[str] = frozenset()) -> fresh.ScanResult:
        """One daily run: scan, compress each user taken (those in ``fail`` fail), settle as the report does."""
        result = self.scan(now, full=full)
        engine = make_engine(self.db, self.redis, self.settings)
        rows = [
            {"user_id": b.user_id, "status": "failed"} if b.user_id in fail else engine.compress(b.user_id).to_dict()
            for b in result.backlog
        ]
        fresh.settle_daily(self.store(), self.owed(), result.xcom(), rows, finished_at=now)
        return result

    def first_run(self) -> None:
        """The first daily scan ever is the full one; it compresses the users seeded so far."""
        first = self.run(DAY0)
        assert first.full and first.reconciled


def _taken(result: fresh.ScanResult) -> set[str]:
    return {b.user_id for b in result.backlog}


@pytest.mark.parametrize("quiet_users", [20, 200])
def test_daily_scan_reads_only_the_users_who_wrote_without_any_doorbell_ring(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis, quiet_users: int
) -> None:
    daily = Daily(mongo_db, redis_client, _settings())
    daily.store().ensure_indexes()
    for i in range(quiet_users):  # under the threshold, written before the first scan: never counted again
        insert_events(mongo_db, f"quiet-{i:04d}", 8, start=DAY0 - timedelta(days=3))
    daily.first_run()
    day1 = DAY0 + timedelta(days=1)
    # The Butler rang for nobody: the events alone make these users due.
    insert_events(mongo_db, "chatty", 14, start=day1 - timedelta(hours=5))
    insert_events(mongo_db, "quiet-0001", 6, start=day1 - timedelta(hours=2), first=8)
    insert_events(mongo_db, "light", 2, start=day1 - timedelta(hours=1))
    counter, listener = CommandCounter(), DocumentsRead({"user_memory"})
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_service.uri, event_listeners=[counter, listener])
    try:
        result = daily.scan(day1, db=client[mongo_db.name])
        commands = Counter(counter.counts)
    finally:
        client.close()

    assert not result.full
    assert result.backlog == [Backlog("chatty", 14), Backlog("quiet-0001", 14)]
    assert result.candidates == 3  # chatty, light, quiet-0001: none of the other quiet users
    assert listener.read == 14 + 6 + 2, "the scan read an event not written since its last scan"
    # One state read, three pages of writers (the first hour, the next 16, then the rest: fresh.FIRST_WINDOW),
    # one count of the users who wrote: the same for 20 and 200 quiet users.
    assert commands == Counter({"find": 4, "aggregate": 1}), commands


def test_late_writes_within_the_margin_are_caught_and_older_ones_by_the_reconciliation(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    daily = Daily(mongo_db, redis_client, _settings())
    daily.store().ensure_indexes()
    insert_events(mongo_db, "within", 8, start=DAY0 - timedelta(days=2))
    insert_events(mongo_db, "beyond", 8, start=DAY0 - timedelta(days=2))
    daily.first_run()
    # Written after the first scan, stamped before it: one within the margin, one a day older.
    insert_events(mongo_db, "within", 5, start=DAY0 - timedelta(seconds=MARGIN - 60), step=timedelta(0), first=8)
    insert_events(mongo_db, "beyond", 5, start=DAY0 - timedelta(days=1), step=timedelta(0), first=8)

    day1 = daily.run(DAY0 + timedelta(days=1))
    assert _taken(day1) == {"within"}, "a late write within the margin was missed"
    later = [daily.run(DAY0 + timedelta(days=d)) for d in range(2, 8)]
    assert [r.full for r in later] == [False] * 5 + [True], "the reconciliation runs every 7 days"
    assert _taken(later[-1]) == {"beyond"}, "the reconciliation missed a late write beyond the margin"
    assert all(not _taken(r) for r in later[:-1])


def test_a_restored_backup_is_caught_by_a_forced_full_scan(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    daily = Daily(mongo_db, redis_client, _settings())
    daily.store().ensure_indexes()
    daily.first_run()
    # A backup restored after the first scan: old events, no ring, nothing since the watermark.
    insert_events(mongo_db, "restored", 30, start=DAY0 - timedelta(days=30))
    day1 = DAY0 + timedelta(days=1)
    assert not _taken(daily.run(day1))
    forced = daily.run(day1 + timedelta(hours=1), full=True)
    assert forced.full and _taken(forced) == {"restored"}


def test_full_scan_every_day_when_the_cadence_is_one(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    daily = Daily(mongo_db, redis_client, _settings(daily_full_scan_every_days=1))
    daily.first_run()
    insert_events(mongo_db, "restored", 30, start=DAY0 - timedelta(days=30))
    day1 = daily.run(DAY0 + timedelta(days=1))
    assert day1.full and _taken(day1) == {"restored"}


def test_users_left_over_the_limit_or_failed_are_taken_by_the_next_runs(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    daily = Daily(mongo_db, redis_client, _settings(scan_limit=2))
    daily.store().ensure_indexes()
    daily.first_run()
    day1 = DAY0 + timedelta(days=1)
    due = {f"u-{i}" for i in range(5)}
    for i in range(5):
        insert_events(mongo_db, f"u-{i}", 20 - i, start=day1 - timedelta(hours=3))

    first = daily.run(day1, fail=frozenset({"u-0"}))
    assert _taken(first) == {"u-0", "u-1"} and first.left == 3
    # Nobody writes again: what the first run left over or failed is owed, and taken all the same.
    taken: set[str] = set()
    for hours in range(1, 5):
        taken |= _taken(daily.run(day1 + timedelta(hours=hours)))
    assert taken == due - {"u-1"}, "a user left over the limit or failed was missed"
    assert daily.owed().oldest(10) == {}, "every owed user was settled"


def test_a_user_capped_by_max_fold_events_stays_owed(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    daily = Daily(mongo_db, redis_client, _settings(max_fold_events=20, max_events_per_chunk=10))
    daily.store().ensure_indexes()
    daily.first_run()
    day1 = DAY0 + timedelta(days=1)
    insert_events(mongo_db, "huge", 51, start=day1 - timedelta(hours=3), step=timedelta(seconds=1))
    runs = [daily.run(day1 + timedelta(hours=h)) for h in range(3)]
    assert [_taken(r) for r in runs] == [{"huge"}] * 3, "the capped user's rest waited for new events"


def test_the_daily_scan_reads_the_doorbell_but_leaves_it_to_the_catchup(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    daily = Daily(mongo_db, redis_client, _settings())
    daily.store().ensure_indexes()
    daily.first_run()
    # A late write far beyond the margin the Butler rang for (the catch-up may have backed the user off).
    insert_events(mongo_db, "rang", 15, start=DAY0 - timedelta(days=3))
    assert Doorbell(redis_client, threshold=daily.settings.threshold).ring("rang")
    day1 = daily.run(DAY0 + timedelta(days=1))
    assert _taken(day1) == {"rang"}
    assert set(DoorbellRecord(redis_client).oldest(10)) == {"rang"}, "the daily run dropped the catch-up's record"


class Killed(Exception):
    """Stands for the scan task's process dying at a checkpoint."""


def test_a_daily_scan_killed_mid_way_resumes_and_misses_nobody(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    daily = Daily(mongo_db, redis_client, _settings(catchup_scan_page_events=20, daily_scan_max_events=60))
    daily.store().ensure_indexes()
    daily.first_run()
    day1 = DAY0 + timedelta(days=1)
    for i in range(30):  # interleaved in time: each page holds some of them
        insert_events(
            mongo_db, f"w-{i:02d}", 12, start=day1 - timedelta(hours=5, seconds=-i), step=timedelta(minutes=1)
        )
    due = {f"w-{i:02d}" for i in range(30)}
    listener = DocumentsRead({"user_memory"})
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_service.uri, event_listeners=[listener])
    pages = [0]

    def kill_at_second_page(step: str) -> None:
        assert step in fresh.SCAN_STEPS
        pages[0] += 1
        if pages[0] == 2:
            raise Killed(step)

    try:
        scan_db = client[mongo_db.name]
        with pytest.raises(Killed):
            daily.scan(day1, db=scan_db, checkpoint=kill_at_second_page)
        killed_read = listener.read
        # The runs that follow scan and settle without compressing: every event stays, so each is read once.
        taken, runs = set(), 0
        owed = daily.owed()
        while runs < 20:
            runs += 1
            now = day1 + timedelta(minutes=runs)
            result = daily.scan(now, db=scan_db)
            fresh.settle_daily(daily.store(), owed, result.xcom(), [], finished_at=now)
            taken |= _taken(result)
            if result.scanned_at is not None:
                break
    finally:
        client.close()
    assert taken == due, "users of the killed scan's pages were lost"
    assert runs > 2, "the pass was spread over several runs (daily_scan_max_events)"
    assert killed_read == 40, killed_read
    assert listener.read == 360, "the resumed scans read the killed scan's pages again (or skipped some)"
    state = daily.store().load_state(fresh.DAILY_STATE_DOC)
    assert state[fresh.SCAN_FIELD] is None
    assert state["scanned_through"].replace(tzinfo=UTC) == day1, "the watermark is the start of the killed pass"


def test_a_full_scan_finding_more_than_it_can_record_is_followed_by_another(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    # A full scan records 1 + 1 users.
    daily = Daily(mongo_db, redis_client, _settings(scan_limit=1, doorbell_drain_max=1))
    for i in range(4):
        insert_events(mongo_db, f"old-{i}", 20 - i, start=DAY0 - timedelta(days=9))
    runs = [daily.run(DAY0 + timedelta(hours=h)) for h in range(5)]
    assert [r.full for r in runs] == [True] * 4 + [False], "an incomplete full scan is followed by another"
    assert [r.reconciled for r in runs[:4]] == [False] * 3 + [True]
    assert set().union(*(_taken(r) for r in runs)) == {f"old-{i}" for i in range(4)}, "a user was missed"
    assert runs[0].left == 3, "the full scan counts everyone over the threshold"


def test_an_erasure_removes_the_user_from_the_daily_runs_owed_record(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    from butler_memory.operations import erasure
    from butler_memory.storage.locks import UserLocks
    from tests.engine.erasure_helpers import SECRET

    daily = Daily(mongo_db, redis_client, _settings(scan_limit=1))
    insert_events(mongo_db, "kept", 20, start=DAY0 - timedelta(days=2))
    insert_events(mongo_db, "erased", 15, start=DAY0 - timedelta(days=2))
    daily.run(DAY0)
    assert set(daily.owed().oldest(10)) == {"erased"}, "left over the limit: owed"
    result = erasure.forget_user(
        "erased",
        settings=daily.settings,
        store=daily.store(),
        locks=UserLocks(redis_client, daily.settings),
        secret=SECRET,
        events=True,
        requested_by="test",
    )
    assert result.status == erasure.ERASED
    assert daily.owed().oldest(10) == {}, "the owed record still names the erased user"


def test_backlog_of_counts_users_across_its_count_batches(mongo_db: Database[Doc]) -> None:
    """More writers than one ``$group`` counts (COUNT_BATCH): every batch is counted, largest first."""
    settings = _settings()
    store = MemoryStore(mongo_db, settings)
    store.ensure_indexes()
    users = [f"writer-{i:03d}" for i in range(2 * COUNT_BATCH + 3)]
    for i, user_id in enumerate(users):
        insert_events(mongo_db, user_id, settings.threshold + 1 + i % 4, start=DAY0)
    insert_events(mongo_db, "under", settings.threshold, start=DAY0)
    found = store.backlog_of([*users, "under", "nobody", *users[:2]], settings.threshold)
    assert sorted(b.user_id for b in found) == users
    assert found == sorted(found, key=lambda b: (-b.events, b.user_id))
    assert {b.user_id: b.events for b in found} == {u: settings.threshold + 1 + i % 4 for i, u in enumerate(users)}


class Finds(monitoring.CommandListener):
    """Keep the filter of every find on user_memory."""

    def __init__(self) -> None:
        self.filters: list[Doc] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Remember a find's filter."""
        if event.command_name == "find" and event.command.get("find") == "user_memory":
            self.filters.append(dict(event.command.get("filter") or {}))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Nothing to count."""

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to count."""


def test_each_page_of_a_day_matches_about_a_page_of_events_and_a_kill_loses_nobody(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A server that gathers every match before sorting (SecantusDB) paid every event after the cursor
    at each page: a day's pass cost pages x events. Each page's query now has an upper bound on
    ``created_at`` (but the last), so what the finds match adds up to about the events once."""
    daily = Daily(mongo_db, redis_client, _settings(catchup_scan_page_events=20))
    daily.store().ensure_indexes()
    daily.first_run()
    day1 = DAY0 + timedelta(days=1)
    users = [f"day-{i:02d}" for i in range(40)]
    for i, user_id in enumerate(users):  # spread over the day, interleaved
        insert_events(mongo_db, user_id, 12, start=DAY0 + timedelta(minutes=30 + i), step=timedelta(hours=2))
    events = 40 * 12
    finds, listener = Finds(), DocumentsRead({"user_memory"})
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_service.uri, event_listeners=[finds, listener])
    pages = [0]

    def kill_at_third_page(step: str) -> None:
        pages[0] += 1
        if pages[0] == 3:
            raise Killed(step)

    try:
        with pytest.raises(Killed):
            daily.scan(day1, db=client[mongo_db.name], checkpoint=kill_at_third_page)
        result = daily.scan(day1, db=client[mongo_db.name])
    finally:
        client.close()
    assert _taken(result) == set(users), "a user was missed"
    writer_finds = [f for f in finds.filters if "created_at" in f]
    matched = sum(mongo_db["user_memory"].count_documents(f) for f in writer_finds)
    # Pages without an upper bound matched every event after the cursor at each of 24+ pages (over 12 x).
    assert matched <= 3 * events, (matched, events)
    assert listener.read <= events + 3 * 20, "the resumed scan read the killed scan's pages again"


class Gauges:
    """Collect the gauges sent (the other metric calls are dropped)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, float]] = []

    def incr(self, name: str, count: int = 1) -> None: ...

    def gauge(self, name: str, value: float) -> None:
        self.sent.append((name, value))

    def timing(self, name: str, seconds: float) -> None: ...

    def close(self) -> None: ...


def test_the_commands_scan_sends_backlog_users_as_the_daily_run_does(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """The command's scan sends backlog_users on real runs only, taken and left together (third review)."""
    gauges = Gauges()
    engine = make_engine(mongo_db, redis_client, small_settings(threshold=10, keep_last_n=5), metrics=gauges)
    for user in ("u1", "u2", "u3"):
        insert_events(mongo_db, user, 20)

    assert len(engine.scan(limit=1, dry_run=True)) == 1
    assert gauges.sent == [], f"a dry-run scan sent {gauges.sent}"
    assert len(engine.scan(limit=1)) == 1
    assert gauges.sent == [(m.BACKLOG_USERS, 3)], (
        f"3 users are over the threshold, 1 taken; the scan sent {gauges.sent}"
    )
