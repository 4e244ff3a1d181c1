"""Kill matrix of forgetting events: SIGKILL the forget at every step, re-run, compare with a clean forget.

The data: FACT_USER compressed into versions 1..5 (tests/engine/erasure_helpers.py); the forget
removes event 14 (folded by version 3), so a clean run drops versions 3..5 and commits version 6
re-folded from version 2 through the fake OpenAI-compatible server (a faithful responder: previous
summary plus the facts shown). Each case kills the child (``kill_worker.py``, task
``forget_events``) at a checkpoint; the re-run in this process must end in the clean run's state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.operations import forget
from butler_memory.storage.profiles import FORGET_FIELD
from tests.engine.conftest import OpenAIFactory
from tests.engine.erasure_helpers import FACT_USER, FACTS, SECRET, fact_content, fact_responder, fact_settings
from tests.engine.helpers import insert_events, make_engine, profile_of
from tools.fake_openai import FakeOpenAI
from tools.services import MongoService, RedisService

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("kill_worker.py")
SETTINGS = fact_settings(lock_ttl_seconds=1, llm_timeout_seconds=0.45, erasure_lock_wait_seconds=10)
FORGOTTEN = f"{FACT_USER}-e014"

Kill = tuple[str, int]

CASES: dict[str, list[Kill]] = {step: [(step, 1)] for step in forget.STEPS}
CASES |= {
    "deleted-then-recorded": [("deleted", 1), ("recorded", 1)],
    "committed-then-dropped": [("committed", 1), ("dropped", 1)],
}


def test_the_matrix_covers_every_step() -> None:
    assert {step for kills in CASES.values() for step, _ in kills} == set(forget.STEPS)


def run_worker(
    mongo_service: MongoService, db: Database[Doc], redis_service: RedisService, llm: FakeOpenAI, kill: Kill
) -> subprocess.CompletedProcess[str]:
    """Run one forget in a child process that SIGKILLs itself at ``kill``."""
    config = {
        "task": "forget_events",
        "mongo_uri": mongo_service.uri,
        "db": db.name,
        "redis_host": redis_service.host,
        "redis_port": redis_service.port,
        "llm_base_url": llm.base_url,
        "user_id": FACT_USER,
        "run_id": "forget",
        "settings": SETTINGS.as_dict(),
        "secret": SECRET.decode(),
        "event_ids": [FORGOTTEN],
        "kill_step": kill[0],
        "kill_occurrence": kill[1],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
    return subprocess.run(
        [sys.executable, str(WORKER), json.dumps(config)], env=env, capture_output=True, text=True, timeout=60
    )


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
def test_kill_then_rerun_ends_as_one_clean_forget(
    kills: list[Kill],
    clean_state: Doc,
    mongo_service: MongoService,
    mongo_db: Database[Doc],
    redis_service: RedisService,
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    make_openai: OpenAIFactory,
) -> None:
    llm.set_responder(fact_responder)
    seed(mongo_db, redis_client)
    for kill in kills:
        child = run_worker(mongo_service, mongo_db, redis_service, llm, kill)
        assert child.returncode == -9, (
            f"the child should have died at {kill}, exited {child.returncode}:\n{child.stderr[-3000:]}"
        )
    engine = make_engine(mongo_db, redis_client, SETTINGS, make_openai(timeout=SETTINGS.llm_timeout_seconds))

    result = forget.forget_events(FACT_USER, engine=engine, secret=SECRET, event_ids=[FORGOTTEN])

    assert result.status in (forget.FORGOTTEN, "already_erased"), result
    got = state(mongo_db)
    assert got == clean_state, f"after kills at {kills} the end state differs from a clean forget"
    assert FACTS[14] not in str(got) and FACTS[8] in got["summary"]
