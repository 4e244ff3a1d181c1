"""A forget after an undo or a killed run (second review): history versions off the current summary's
lineage (undone by a rollback, or written by a killed compression the profile never reached) that
folded a forgotten event are dropped too, the undone events are not counted as lost, and a range
forget after rolling back the user's only run finishes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED
from butler_memory.operations import forget
from tests.engine.erasure_helpers import FACT_USER, SECRET, fact_content, fact_settings, mongo_mentions
from tests.engine.helpers import START, events_of, insert_events, make_engine, profile_of, raise_at

Doc = dict[str, Any]

SECRET_FACT = "Мой номер паспорта 4509 778812."
"""Planted in event 33, folded by a second run."""


def with_secret(user_id: str, i: int) -> str:
    return SECRET_FACT if i == 33 else fact_content(user_id, i)


def eid(i: int) -> str:
    return f"{FACT_USER}-e{i:03d}"


def two_runs(db: Database[Doc], client: redis.Redis) -> Any:
    """FACT_USER: run "seed" folds 30 events into v1..v5; run "r2" folds 10 more (one holds SECRET_FACT) into v6+."""
    settings = fact_settings()
    engine = make_engine(db, client, settings)
    insert_events(db, FACT_USER, 30, content=fact_content)
    assert engine.compress(FACT_USER, run_id="seed").summary_version == 5
    insert_events(db, FACT_USER, 10, first=30, content=with_secret)
    second = engine.compress(FACT_USER, run_id="r2")
    assert second.status == COMPRESSED, second
    assert SECRET_FACT in profile_of(db, FACT_USER)["memory_summary"], "the second run should have folded the fact"
    return engine, second.summary_version


class Killed(Exception):
    """A checkpoint stands for the process dying there."""


def _orphan_v6(db: Database[Doc], client: redis.Redis) -> Any:
    """Run "seed" folds 30 events into v1..v5; run "r2" (10 more, event 33 holds SECRET_FACT) is killed
    after writing history v7 (its second chunk) and before that commit: v7 is an entry the profile never reached."""
    engine = make_engine(db, client, fact_settings())
    insert_events(db, FACT_USER, 30, content=fact_content)
    assert engine.compress(FACT_USER, run_id="seed").summary_version == 5
    insert_events(db, FACT_USER, 10, first=30, content=with_secret)

    recorded = []

    def die(step: str) -> None:
        if step == "recorded":
            recorded.append(step)
            if len(recorded) == 2:  # event 33 is in r2's second chunk (v7)
                raise Killed

    with pytest.raises(Killed):
        engine.compress(FACT_USER, run_id="r2", checkpoint=die)
    client.flushdb()  # its lock expired
    assert profile_of(db, FACT_USER)["memory_summary_version"] == 6
    assert SECRET_FACT in db["user_memory_summaries"].find_one({"user_id": FACT_USER, "version": 7})["text"]
    return engine


def _undo_r2(db: Database[Doc], client: redis.Redis) -> Any:
    """Two runs, the second (which folded event 33) rolled back: its versions are off the lineage, its
    events live again, and the archive no longer names those versions."""
    engine, _ = two_runs(db, client)
    assert engine.rollback(FACT_USER, "r2", rollback_id="undo-r2").status == "rolled_back"
    assert SECRET_FACT not in profile_of(db, FACT_USER)["memory_summary"]
    return engine


@pytest.mark.parametrize("setup", [_undo_r2, _orphan_v6], ids=["undone-by-a-rollback", "killed-compression-entry"])
def test_forgetting_an_event_leaves_no_history_version_off_the_lineage_holding_its_fact(
    mongo_db: Database[Doc], redis_client: redis.Redis, setup: Any
) -> None:
    """Event 33's fact is in history versions no summary descends from; forgetting event 33 drops them
    (they kept it: second review)."""
    engine = setup(mongo_db, redis_client)

    done = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(33)])

    assert done.status == forget.FORGOTTEN, done
    assert mongo_mentions(mongo_db, [SECRET_FACT]) == [], "a forgotten fact is still stored"


@pytest.mark.parametrize("step", ["planned", "deleted", "dropped", "audited"])
@pytest.mark.parametrize("setup", [_undo_r2, _orphan_v6], ids=["undone-by-a-rollback", "killed-compression-entry"])
def test_a_forget_of_a_fact_off_the_lineage_killed_at_any_step_ends_clean_on_its_re_run(
    mongo_db: Database[Doc], redis_client: redis.Redis, setup: Any, step: str
) -> None:
    """Stopped at each step such a forget reaches (no rebuild), the re-run finishes it: the fact is
    gone and only event 33 is (the kill matrices kill for real; this is each step of the new case)."""
    engine = setup(mongo_db, redis_client)
    live = set(events_of(mongo_db, FACT_USER))
    with pytest.raises(Killed):
        forget.forget_events(
            FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(33)], checkpoint=raise_at(step, Killed)
        )
    redis_client.flushdb()  # the stopped run's lock expired

    done = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(33)])

    assert done.status == forget.FORGOTTEN, done
    assert mongo_mentions(mongo_db, [SECRET_FACT]) == [], "a forgotten fact is still stored"
    assert set(events_of(mongo_db, FACT_USER)) == live - {eid(33)}


def test_forgetting_after_a_rollback_does_not_report_the_undone_events_as_lost(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """After undoing r2 its events are live in user_memory, not lost: forgetting an older event must
    not say that events 'are no longer in the archive (retention)' and could not be kept (second review)."""
    engine, _ = two_runs(mongo_db, redis_client)
    assert engine.rollback(FACT_USER, "r2", rollback_id="undo-r2").status == "rolled_back"

    done = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[eid(14)])

    assert done.status == forget.FORGOTTEN, done
    assert mongo_db["user_memory_archive"].count_documents({"user_id": FACT_USER, "event_id": eid(14)}) == 0
    assert done.lost == {}, (
        f"nothing was lost (the archive holds every event still summarised): {done.lost} {done.notes}"
    )


def test_a_range_forget_after_rolling_back_the_first_run_finishes(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """Roll back the user's only run (the summary is v0's again: no watermark), then forget a time
    range whose events that run had folded (now live again). The forget finishes: it used to record
    its intent, delete the events, then raise InvalidProfileError on the missing watermark at every
    re-run, the user stuck with compressions refused (second review)."""
    from butler_memory.core.errors import CompressionError
    from butler_memory.storage.profiles import FORGET_FIELD

    engine = make_engine(mongo_db, redis_client, fact_settings())
    insert_events(mongo_db, FACT_USER, 30, content=fact_content)
    assert engine.compress(FACT_USER, run_id="seed").summary_version == 5
    assert engine.rollback(FACT_USER, "seed", rollback_id="undo-seed").status == "rolled_back"
    since, until = START + timedelta(minutes=19), START + timedelta(minutes=21)

    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(
                forget.forget_events(FACT_USER, engine=engine, secret=SECRET, since=since, until=until).status
            )
        except CompressionError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        redis_client.flushdb()

    assert profile_of(mongo_db, FACT_USER).get(FORGET_FIELD) is None, f"the forget is stuck unfinished: {outcomes}"
    assert outcomes[0] == forget.FORGOTTEN, outcomes
