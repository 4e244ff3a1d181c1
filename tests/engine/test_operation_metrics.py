"""Issue 23, item 2: rollback, re-fold, forget and erasure are observable as compression is.

Each operation sends, once per user, the users it finished with, the users whose memory it changed,
the events it touched and its wall time; a failure sends its failure counter instead. The tests read
them off the real UDP socket (the ``statsd`` sink) and check no id goes with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import ForgetInputError
from butler_memory.fold import metrics as m
from butler_memory.fold.metrics import StatsdMetrics
from butler_memory.operations import audit, erasure, forget
from butler_memory.operations.engine import Engine
from butler_memory.operations.refold import REFOLDED
from butler_memory.operations.rollback import ROLLED_BACK
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore
from tests.engine.erasure_helpers import FACT_USER, SECRET, TARGET, fact_settings, seed_everywhere
from tests.engine.helpers import START, make_engine, small_settings
from tests.engine.test_forget import seeded
from tests.engine.test_rollback import SETTINGS, Crash, crash_at, two_runs
from tools.services import StatsdSink

Doc = dict[str, Any]


def sent(statsd: StatsdSink, operation: str, *whats: str) -> dict[str, list[float]]:
    """Wait for the given metrics of an operation; return every metric received, by name."""
    names = {m.operation_metric(operation, what) for what in whats}
    statsd.wait_for(lambda lines: names <= {line.partition(":")[0] for line in lines})
    got: dict[str, list[float]] = {}
    for metric in statsd.parsed():
        got.setdefault(metric.name, []).append(metric.value)
    return got


def assert_done(got: dict[str, list[float]], operation: str, *, events: int, ids: list[str]) -> None:
    """One user done and changed, ``events`` events, one timing, no failure, no id in any name."""
    name = lambda what: m.operation_metric(operation, what)  # noqa: E731
    assert got[name("users")] == [1] and got[name("users_changed")] == [1], got
    assert got[name("events")] == [events], got
    assert len(got[name("duration")]) == 1 and got[name("duration")][0] >= 0, got
    assert name("failures") not in got, got
    assert not [n for n in got for user_id in ids if user_id in n], got


def assert_failed(got: dict[str, list[float]], operation: str) -> None:
    """One failure, and none of the counts of a user done."""
    assert got[m.operation_metric(operation, "failures")] == [1], got
    for what in ("users", "users_changed", "events", "duration"):
        assert m.operation_metric(operation, what) not in got, got


def with_metrics(engine: Engine, metrics: StatsdMetrics) -> Engine:
    """The same engine sending to the test's sink (seeded without, so only the operation is heard)."""
    return dataclasses.replace(engine, metrics=metrics)


def after_two_runs(db: Database[Doc], redis_client: redis.Redis, metrics: StatsdMetrics) -> Engine:
    """Run test_rollback's two runs (r0, r1) unheard; return the engine, now sending to the sink."""
    engine = make_engine(db, redis_client, SETTINGS)
    two_runs(db, engine)
    return with_metrics(engine, metrics)


def assert_a_crash_sends_its_failure(
    statsd: StatsdSink, operation: str, run: Callable[[Callable[[str], None]], object], step: str
) -> None:
    """Crash ``run`` (given a checkpoint) at ``step``: its operation sends one failure and no counts; clear the sink."""
    with pytest.raises(Crash):
        run(crash_at(step))
    assert_failed(sent(statsd, operation, "failures"), operation)
    statsd.clear()


def test_a_rollback_sends_its_users_events_and_duration(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    engine = after_two_runs(mongo_db, redis_client, statsd_metrics)

    result = engine.rollback("u1", "r1", rollback_id="rb")

    assert result.status == ROLLED_BACK and result.events_restored > 0, result
    got = sent(statsd, m.ROLLBACK, "users", "users_changed", "events", "duration")
    assert_done(got, m.ROLLBACK, events=result.events_restored, ids=["u1", "r1", "rb"])


def test_a_failed_rollback_sends_its_failure_and_a_dry_run_sends_nothing(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    engine = after_two_runs(mongo_db, redis_client, statsd_metrics)
    assert_a_crash_sends_its_failure(
        statsd,
        m.ROLLBACK,
        lambda checkpoint: engine.rollback("u1", "r1", rollback_id="rb", checkpoint=checkpoint),
        "restored",
    )

    engine.rollback("u1", "r1", rollback_id="rb2", dry_run=True)
    engine.rollback("u1", "r1", rollback_id="rb3")  # a marker: what the dry run sent arrived before it
    got = sent(statsd, m.ROLLBACK, "users")
    assert got[m.operation_metric(m.ROLLBACK, "users")] == [1], f"the dry run was counted: {got}"


def test_a_refold_sends_its_events_and_its_failure(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    engine = after_two_runs(mongo_db, redis_client, statsd_metrics)
    assert_a_crash_sends_its_failure(
        statsd, m.REFOLD, lambda checkpoint: engine.refold("u1", run_id="refold-0", checkpoint=checkpoint), "locked"
    )

    result = engine.refold("u1", run_id="refold-1")

    assert result.status == REFOLDED and result.events == 30, result
    got = sent(statsd, m.REFOLD, "users", "users_changed", "events", "duration")
    assert_done(got, m.REFOLD, events=30, ids=["u1", "refold-1"])


def test_a_forget_sends_the_events_it_forgot_and_its_failure_but_not_bad_input(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    engine = with_metrics(seeded(mongo_db, redis_client, fact_settings()), statsd_metrics)
    since, until = START + timedelta(minutes=19), START + timedelta(minutes=21)  # events 19 and 20

    with pytest.raises(ForgetInputError):
        forget.forget_events("nobody-here", engine=engine, secret=SECRET, event_ids=["nobody-here-e001"])
    assert_a_crash_sends_its_failure(  # one failure: the bad input is the caller's
        statsd,
        m.FORGET,
        lambda checkpoint: forget.forget_events(
            FACT_USER, engine=engine, secret=SECRET, since=since, until=until, checkpoint=checkpoint
        ),
        "planned",
    )

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=since, until=until)

    assert result.status == forget.FORGOTTEN and result.removed == {"events": 0, "archive": 2}, result
    got = sent(statsd, m.FORGET, "users", "users_changed", "events", "duration")
    assert_done(got, m.FORGET, events=2, ids=[FACT_USER])


def test_an_erasure_sends_the_events_it_erased_and_its_failure(
    mongo_db: Database[Doc], redis_client: redis.Redis, statsd: StatsdSink, statsd_metrics: StatsdMetrics
) -> None:
    settings = small_settings()
    seed_everywhere(mongo_db, redis_client, settings)
    store, locks = MemoryStore(mongo_db, settings), UserLocks(redis_client, settings)

    def erase(**kwargs: Any) -> audit.ErasureResult:
        return erasure.forget_user(
            TARGET, settings=settings, store=store, locks=locks, secret=SECRET, metrics=statsd_metrics, **kwargs
        )

    assert_a_crash_sends_its_failure(
        statsd, m.ERASURE, lambda checkpoint: erase(events=True, checkpoint=checkpoint), "archive"
    )

    result = erase(events=True)

    assert result.status == erasure.ERASED, result
    events = sum(result.removed[place] for place in ("events", "archive", "quarantine"))
    assert events > 0, result
    got = sent(statsd, m.ERASURE, "users", "users_changed", "events", "duration")
    assert_done(got, m.ERASURE, events=events, ids=[TARGET])
