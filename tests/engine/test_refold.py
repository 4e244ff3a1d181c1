"""Re-fold from the archive: today's summariser, from the oldest version whose events are all archived."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import LockLostError
from butler_memory.operations.intent import REFUSED
from butler_memory.operations.refold import DRY_RUN, NOT_CHANGED, REFOLDED, refold_user
from butler_memory.operations.rollback import ROLLED_BACK
from tests.engine import helpers
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import Doc, archive_of, chain_responder, history_of, ledger, make_engine, profile_of, snapshot
from tests.engine.test_rollback import SETTINGS, Crash, crash_at, two_runs
from tools.fake_openai import FakeOpenAI


def folded_in_two_runs(db: Database[Doc], redis_client: redis.Redis) -> list[str]:
    """Fold 30 of 35 events with the offline summariser in two runs (v1-v3, v4-v6: test_rollback's
    two_runs); return the folded events' ids, oldest first."""
    two_runs(db, make_engine(db, redis_client, SETTINGS))
    return sorted(archive_of(db, "u1"))  # ids sort in time order: u1-e000 ... u1-e029


def test_refold_rebuilds_from_the_empty_summary_with_todays_summariser(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    folded = folded_in_two_runs(mongo_db, redis_client)
    before = snapshot(mongo_db, "u1")
    llm.set_responder(chain_responder)
    engine = make_engine(mongo_db, redis_client, SETTINGS, make_openai())

    result = engine.refold("u1", run_id="refold-1")

    assert result.status == REFOLDED, result
    assert (result.from_version, result.to_version, result.refolded_from, result.events) == (6, 7, 0, 30)
    after = snapshot(mongo_db, "u1")
    profile = after["profile"]
    assert ledger(profile["memory_summary"]) == folded, "archived events must be folded again once each, in order"
    assert after["events"] == before["events"], "raw events must stay raw and untouched"
    assert after["archive"] == before["archive"]
    assert profile["memory_compressed_through"] == before["profile"]["memory_compressed_through"]
    history = after["history"]
    assert [e["version"] for e in history] == list(range(1, 8))
    assert history[:6] == before["history"], "the history was rewritten"
    new = history[-1]
    assert (new["kind"], new["base_version"], new["refolded_from"], new["summarizer"], new["model"]) == (
        "refold",
        6,
        0,
        "openai",
        "test-model",
    )
    assert new["prompt_version"].startswith("sha256:") and new["text"] == profile["memory_summary"]

    # A re-fold is a run like any other: it can be rolled back.
    undo = engine.rollback("u1", "refold-1", rollback_id="undo")
    assert undo.status == ROLLED_BACK and undo.restored_version == 6 and undo.events_restored == 0
    assert profile_of(mongo_db, "u1")["memory_summary"] == before["profile"]["memory_summary"]


def test_refold_starts_above_versions_whose_events_are_gone(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    folded = folded_in_two_runs(mongo_db, redis_client)
    mongo_db["user_memory_archive"].delete_many({"summary_version": 2})  # as retention would
    v2_text = history_of(mongo_db, "u1")[1]["text"]
    llm.set_responder(chain_responder)
    result = make_engine(mongo_db, redis_client, SETTINGS, make_openai()).refold("u1", run_id="refold")
    assert result.status == REFOLDED and result.refolded_from == 2 and result.events == 20
    expected = " ".join([v2_text, *folded[10:30]])
    assert profile_of(mongo_db, "u1")["memory_summary"] == expected


def test_refold_refuses_when_the_current_versions_events_are_gone(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    folded_in_two_runs(mongo_db, redis_client)
    mongo_db["user_memory_archive"].delete_many({"summary_version": 6})
    before = snapshot(mongo_db, "u1")
    result = make_engine(mongo_db, redis_client, SETTINGS).refold("u1", run_id="refold")
    assert result.status == REFUSED and "no kept version" in result.message
    assert snapshot(mongo_db, "u1") == before


def test_refold_dry_run_writes_nothing(mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI) -> None:
    folded_in_two_runs(mongo_db, redis_client)
    before = snapshot(mongo_db, "u1")
    result = make_engine(mongo_db, redis_client, SETTINGS).refold("u1", run_id="refold", dry_run=True)
    assert result.status == DRY_RUN and result.events == 30 and result.refolded_from == 0
    assert snapshot(mongo_db, "u1") == before


@pytest.mark.parametrize("step", ["summarized", "recorded"])
def test_a_refold_killed_before_its_commit_leaves_the_summary_and_reruns_cleanly(
    step: str, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    folded_in_two_runs(mongo_db, redis_client)
    profile = snapshot(mongo_db, "u1")["profile"]
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    with pytest.raises(Crash):
        engine.refold("u1", run_id="refold", checkpoint=crash_at(step))
    assert snapshot(mongo_db, "u1")["profile"] == profile
    assert engine.refold("u1", run_id="refold").status == REFOLDED
    assert [e["version"] for e in history_of(mongo_db, "u1")] == list(range(1, 8))


def test_a_refold_rerun_adds_no_identical_version(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    # Issue 23.3: the same re-fold again (a retried task, an operator's second try) changes nothing.
    folded_in_two_runs(mongo_db, redis_client)
    llm.set_responder(chain_responder)
    engine = make_engine(mongo_db, redis_client, SETTINGS, make_openai())
    assert engine.refold("u1", run_id="refold-1").status == REFOLDED
    done, calls = snapshot(mongo_db, "u1"), llm.request_count

    again = engine.refold("u1", run_id="refold-2")

    assert again.status == NOT_CHANGED and (again.from_version, again.to_version) == (7, 7), again
    assert snapshot(mongo_db, "u1") == done and llm.request_count == calls, "a re-run wrote or called the LLM"
    # Another summariser (a model upgrade) is a re-fold again.
    other = make_engine(mongo_db, redis_client, SETTINGS)
    assert other.refold("u1", run_id="refold-3").status == REFOLDED


STALL_SETTINGS = helpers.small_settings(threshold=10, keep_last_n=5, max_events_per_chunk=5)
LATER = helpers.START + timedelta(days=1)


def test_a_refold_that_lost_its_lock_does_not_overwrite_the_history_of_the_run_that_took_over(
    mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A re-fold stalled past its lock's TTL after its last LLM call, while a compression took the user and
    committed the next versions, writes no history entry over theirs: a rollback of that run then restores
    the version before it and every event it folded (third review)."""
    engine = make_engine(mongo_db, redis_client, STALL_SETTINGS)
    helpers.insert_events(mongo_db, "u1", 20)
    engine.compress("u1", run_id="r0")  # v1..v3
    helpers.insert_events(mongo_db, "u1", 10, first=20, start=LATER)
    other = make_engine(mongo_db, redis_client, STALL_SETTINGS)

    def takeover(step: str) -> None:
        if step == "summarized":
            redis_client.delete(STALL_SETTINGS.lock_key("u1"))  # the TTL ran out while the re-fold stalled
            assert other.compress("u1", run_id="r2").summary_version == 5

    with pytest.raises(LockLostError):
        refold_user(engine, "u1", run_id="memory_refold/manual__x", checkpoint=takeover)

    assert profile_of(mongo_db, "u1")["memory_summary_version"] == 5  # r2 wrote v4 and v5
    v3_text = mongo_db["user_memory_summaries"].find_one({"user_id": "u1", "version": 3})["text"]
    v4 = mongo_db["user_memory_summaries"].find_one({"user_id": "u1", "version": 4})
    overwritten = (v4["run_id"], v4["kind"]) != ("r2", "fold")

    # Undo r2: the summary must return to v3 and all 10 events r2 folded must be back in user_memory.
    result = engine.rollback("u1", "r2", rollback_id="rb")
    live = set(helpers.events_of(mongo_db, "u1"))
    back = {f"u1-e{i:03d}" for i in range(15, 25)}  # r2 folded e015..e024 (e025..e029 kept raw)
    assert not overwritten and result.restored_version == 3 and back <= live, (
        f"the stale re-fold overwrote v4's history entry (run {v4['run_id']!r}, kind {v4['kind']!r}) after r2 "
        f"committed it; rolling back r2 then restored v{result.restored_version} (the re-fold's text, never "
        f"committed; same as v3: {profile_of(mongo_db, 'u1')['memory_summary'] == v3_text}) and left "
        f"{sorted(back - live)} in neither the summary nor user_memory"
    )
