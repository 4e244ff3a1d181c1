"""Kill matrix of forgetting events: SIGKILL the forget at every step, re-run, compare with a clean forget.

The data: FACT_USER compressed into versions 1..5 (tests/engine/erasure_helpers.py); the forget
removes event 14 (folded by version 3), so a clean run drops versions 3..5 and commits version 6
re-folded from version 2 through the fake OpenAI-compatible server (a faithful responder: previous
summary plus the facts shown). Each case kills the child (``kill_worker.py``, task
``forget_events``) at a checkpoint; the re-run in this process must end in the clean run's state.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.operations import forget
from butler_memory.storage.profiles import FORGET_FIELD
from tests.engine.conftest import KillRig, OpenAIFactory
from tests.engine.erasure_helpers import FACT_USER, FACTS, SECRET, fact_content, fact_responder, fact_settings
from tests.engine.helpers import insert_events, make_engine, profile_of
from tests.engine.kill_harness import Kill
from tools.fake_openai import FakeOpenAI
from tools.services import RedisService

Doc = dict[str, Any]
SETTINGS = fact_settings(lock_ttl_seconds=1, llm_timeout_seconds=0.45, erasure_lock_wait_seconds=10)
FORGOTTEN = f"{FACT_USER}-e014"

CASES: dict[str, list[Kill]] = {step: [(step, 1)] for step in forget.STEPS}
CASES |= {
    "deleted-then-recorded": [("deleted", 1), ("recorded", 1)],
    "committed-then-dropped": [("committed", 1), ("dropped", 1)],
}


def test_the_matrix_covers_every_step() -> None:
    assert {step for kills in CASES.values() for step, _ in kills} == set(forget.STEPS)


def state(db: Database[Doc]) -> Doc:
    """Return what a forget writes, without ids that differ between runs (audit id, timestamps)."""
    profile = profile_of(db, FACT_USER) or {}
    records = list(db["memory_erasures"].find({}, {"_id": 0, "requested_at": 0, "finished_at": 0}))
    return {
        "summary": profile.get("memory_summary"),
        "version": profile.get("memory_summary_version"),
        "intent": profile.get(FORGET_FIELD),
        "pending": profile.get("memory_pending_fold"),
        "history": {
            d["version"]: (d["kind"], d["text"], d["base_version"])
            for d in db["user_memory_summaries"].find({"user_id": FACT_USER})
        },
        "archive": {d["_id"]: d["summary_version"] for d in db["user_memory_archive"].find({"user_id": FACT_USER})},
        "events": sorted(d["_id"] for d in db["user_memory"].find({"user_id": FACT_USER})),
        "audit": records,
    }


def seed(db: Database[Doc], client: redis.Redis) -> None:
    """Compress FACT_USER into versions 1..5 with the offline summariser."""
    insert_events(db, FACT_USER, 30, content=fact_content)
    assert make_engine(db, client, SETTINGS).compress(FACT_USER).summary_version == 5


@pytest.fixture
def clean_state(mongo_client: Any, redis_service: RedisService, llm: FakeOpenAI, make_openai: OpenAIFactory) -> Doc:
    """Return the final state of one uninterrupted forget on the same data."""
    db = mongo_client["forget_kill_matrix_clean_run"]
    client = redis_service.client()
    try:
        llm.set_responder(fact_responder)
        seed(db, client)
        engine = make_engine(db, client, SETTINGS, make_openai(timeout=SETTINGS.llm_timeout_seconds))
        result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[FORGOTTEN])
        assert result.status == forget.FORGOTTEN and result.versions_dropped == [3, 4, 5], result
        return state(db)
    finally:
        client.delete(SETTINGS.lock_key(FACT_USER))
        client.close()
        mongo_client.drop_database(db.name)


@pytest.mark.parametrize("kills", list(CASES.values()), ids=list(CASES))
def test_kill_then_rerun_ends_as_one_clean_forget(kills: list[Kill], clean_state: Doc, kill_rig: KillRig) -> None:
    kill_rig.llm.set_responder(fact_responder)
    seed(kill_rig.db, kill_rig.redis)
    for kill in kills:
        kill_rig.kill(kill, SETTINGS, FACT_USER, task="forget_events", secret=SECRET.decode(), event_ids=[FORGOTTEN])
    engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[FORGOTTEN])

    assert result.status in (forget.FORGOTTEN, "already_erased"), result
    got = state(kill_rig.db)
    assert got == clean_state, f"after kills at {kills} the end state differs from a clean forget"
    assert FACTS[14] not in str(got) and FACTS[8] in got["summary"]
