"""Kill matrix of a user erasure: SIGKILL it at every step, re-run, and compare with a clean erasure.

Each case runs ``forget_user`` in a child process (``kill_worker.py``, task ``forget_user``) that kills
itself with SIGKILL at a checkpoint: no ``finally``, no lock release. The re-run (in this process)
must wait for the dead process's lock, find its intent and end as one clean erasure would: one audit
record, done, with the counts found when the first attempt started, and no trace of the user left.
"""

from __future__ import annotations

import pytest
import redis
from pymongo.database import Database

from butler_memory.operations import audit, erasure
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore
from tests.engine.conftest import KillRig
from tests.engine.erasure_helpers import (
    CANARY,
    OTHER,
    SECRET,
    SHARED_KEY,
    TARGET,
    TEST_KEY_PATTERN,
    mongo_mentions,
    redis_mentions,
    seed_everywhere,
)
from tests.engine.helpers import Doc, small_settings
from tests.engine.kill_harness import Kill

# A short lock TTL so a killed erasure's lock expires within the test; the erasure waits longer than it.
SETTINGS = small_settings(lock_ttl_seconds=1, llm_timeout_seconds=0.45, erasure_lock_wait_seconds=10)

CASES: dict[str, list[Kill]] = {step: [(step, 1)] for step in erasure.USER_STEPS}
CASES |= {
    "events-then-runs": [("events", 1), ("runs", 1)],
    "intent-then-intent": [("intent", 1), ("intent", 1)],
    "history-then-done": [("history", 1), ("done", 1)],
}


def test_the_matrix_covers_every_step() -> None:
    killed = {step for kills in CASES.values() for step, _ in kills}
    assert killed == set(erasure.USER_STEPS)


@pytest.fixture
def registered_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the test's per-user key pattern and shared key in this process too."""
    monkeypatch.setattr(erasure, "USER_KEY_PATTERNS", [*erasure.USER_KEY_PATTERNS, lambda s: TEST_KEY_PATTERN])
    monkeypatch.setattr(erasure, "SHARED_REDIS_MEMBERS", [*erasure.SHARED_REDIS_MEMBERS, lambda s: SHARED_KEY])


def others(db: Database[Doc], client: redis.Redis) -> Doc:
    """Return everything of the other user (it must not change)."""
    return {
        "mongo": {name: list(db[name].find({"user_id": OTHER}, {"_id": 0})) for name in db.list_collection_names()}
        | {name: [] for name in ["memory_erasures"]},
        "redis": [client.get(TEST_KEY_PATTERN.format(user_id=OTHER)), client.smembers(SHARED_KEY) - {TARGET.encode()}],
    }


@pytest.mark.parametrize("kills", list(CASES.values()), ids=list(CASES))
def test_kill_then_rerun_ends_as_one_clean_erasure(kills: list[Kill], kill_rig: KillRig, registered_keys: None) -> None:
    mongo_db, redis_client = kill_rig.db, kill_rig.redis
    seed_everywhere(mongo_db, redis_client, SETTINGS)
    store, locks = MemoryStore(mongo_db, SETTINGS), UserLocks(redis_client, SETTINGS)
    expected = erasure.forget_user(
        TARGET, settings=SETTINGS, store=store, locks=locks, secret=SECRET, events=True, dry_run=True
    ).removed
    other_before = others(mongo_db, redis_client)

    for kill in kills:
        kill_rig.kill(
            kill,
            SETTINGS,
            TARGET,
            task="forget_user",
            secret=SECRET.decode(),
            events=True,
            key_patterns=[TEST_KEY_PATTERN],
            shared_keys=[SHARED_KEY],
        )

    result = erasure.forget_user(TARGET, settings=SETTINGS, store=store, locks=locks, secret=SECRET, events=True)

    finished = kills[-1][0] == "done"
    assert result.status == (audit.ALREADY_ERASED if finished else erasure.ERASED), result
    records = list(mongo_db[SETTINGS.erasures_collection].find())
    assert len(records) == 1, f"one erasure, one audit record: {records}"
    assert records[0]["state"] == "done" and records[0]["_id"] == result.erasure_id
    started_before_first_kill = kills[0][0] != "locked"
    if started_before_first_kill or not finished:
        assert records[0]["removed"] == expected, "the audit counts must be those found when the erasure started"
    assert mongo_mentions(mongo_db, [TARGET, CANARY]) == [], f"after kills at {kills}, the user is still named"
    assert redis_mentions(redis_client, [TARGET, CANARY]) == [], f"after kills at {kills}, a Redis key names the user"
    assert others(mongo_db, redis_client) == other_before, "the other user's data changed"
