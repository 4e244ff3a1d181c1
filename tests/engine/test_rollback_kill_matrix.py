"""Kill matrices of a rollback and a re-fold: SIGKILL them at every step boundary, re-run, compare.

Two runs fold a user (r0: v1-v3, then 15 new events, r1: v4-v6); a child process (``kill_worker.py``)
rolls r1 back and kills itself at a checkpoint. The re-run (a rollback, or a compression, which must
finish the rollback first) must end as one clean rollback: user_memory, the archive and the profile
equal the snapshot taken before r1 (but for the version, 7), and the history is v1-v7 with v7 the
rollback carrying v3's text.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.operations import refold
from butler_memory.operations.intent import SKIPPED_LOCKED
from butler_memory.operations.rollback import NOT_CHANGED, ROLLED_BACK, STEPS
from butler_memory.storage.profiles import ROLLBACK_FIELD, VERSION_FIELD
from tests.engine.conftest import KillRig
from tests.engine.helpers import (
    START,
    chain_responder,
    history_of,
    insert_events,
    ledger,
    make_engine,
    profile_of,
    snapshot,
    summary_version,
)
from tests.engine.kill_harness import Kill
from tests.engine.test_kill_matrix import SETTINGS
from tests.engine.test_rollback import assert_back_to

Doc = dict[str, Any]
USER = "u1"

CASES: dict[str, list[Kill]] = {step: [(step, 1)] for step in STEPS}
CASES |= {
    # The re-run, finishing the intent, killed at its own steps.
    "restored-then-committed": [("restored", 1), ("committed", 1)],
    "committed-then-unarchived": [("committed", 1), ("unarchived", 1)],
}
COMPRESS_AFTER = ("intent", "restored", "committed", "unarchived")
"""Kills after which a compression (not the rollback) is the re-run: it must finish the rollback first."""


def test_the_matrix_covers_every_step() -> None:
    killed = {step for kills in CASES.values() for step, _ in kills}
    assert killed == set(STEPS), f"steps without a kill case: {set(STEPS) - killed}"


def expected_after_kill(step: str) -> tuple[int, bool]:
    """Return the profile's version and whether the intent is recorded right after a kill at ``step``."""
    if step == "locked":
        return 6, False
    if step in ("intent", "restored", "recorded"):
        return 6, True
    return 7, step != "cleared"


def prepare(db: Database[Doc], redis_client: redis.Redis) -> Doc:
    engine = make_engine(db, redis_client, SETTINGS)
    insert_events(db, USER, 20)
    assert engine.compress(USER, run_id="r0").summary_version == 3
    insert_events(db, USER, 15, first=20, start=START + timedelta(days=1))
    before = snapshot(db, USER)
    assert engine.compress(USER, run_id="r1").summary_version == 6
    return before


RUNS = [(kills, "rollback") for kills in CASES.values()] + [([(step, 1)], "compress") for step in COMPRESS_AFTER]
RUN_IDS = [f"{name}-rollback" for name in CASES] + [f"{step}-compress" for step in COMPRESS_AFTER]


@pytest.mark.parametrize(("kills", "rerun"), RUNS, ids=RUN_IDS)
def test_kill_a_rollback_then_rerun_ends_like_a_clean_rollback(
    kills: list[Kill], rerun: str, kill_rig: KillRig
) -> None:
    mongo_db, redis_client = kill_rig.db, kill_rig.redis
    before = prepare(mongo_db, redis_client)
    v3_text = history_of(mongo_db, USER)[2]["text"]
    engine = make_engine(mongo_db, redis_client, SETTINGS)
    for n, kill in enumerate(kills):
        kill_rig.kill(kill, SETTINGS, USER, task="rollback", rollback="r1")
        if n == 0:
            version, intent = expected_after_kill(kill[0])
            profile = profile_of(mongo_db, USER) or {}
            assert profile[VERSION_FIELD] == version, f"after a kill at {kill}: v{profile[VERSION_FIELD]}"
            assert (profile.get(ROLLBACK_FIELD) is not None) == intent, f"after a kill at {kill}"
        held = snapshot(mongo_db, USER)
        assert engine.rollback(USER, "r1", rollback_id="blocked").status == SKIPPED_LOCKED
        assert snapshot(mongo_db, USER) == held, "a rollback blocked by the lock changed the database"
        kill_rig.wait_for_lock_expiry(SETTINGS, USER)

    if rerun == "rollback":
        result = engine.rollback(USER, "r1", rollback_id="rerun")
        assert result.status in (ROLLED_BACK, NOT_CHANGED), result
    else:
        quiet = make_engine(mongo_db, redis_client, SETTINGS.replace(threshold=50))
        assert quiet.compress(USER, run_id="r2").status == "skipped_below_threshold"

    assert_back_to(mongo_db, before, 7)
    history = history_of(mongo_db, USER)
    assert [e["version"] for e in history] == list(range(1, 8)), "exactly one entry per committed version"
    assert history[-1]["kind"] == "rollback" and history[-1]["base_version"] == 3
    assert history[-1]["text"] == v3_text == profile_of(mongo_db, USER)["memory_summary"]
    assert history[-1]["undoes"] == [6, 5, 4]


REFOLD_STEPS = refold.STEPS


@pytest.mark.parametrize("step", REFOLD_STEPS)
def test_kill_a_refold_then_rerun_ends_like_a_clean_refold(step: str, kill_rig: KillRig) -> None:
    """A refold moves no event: killed before its commit, the profile is as it was and the re-run
    writes v7; killed after it, v7 is there already. Either way: one v7, the ledger of all 30 events."""
    mongo_db = kill_rig.db
    prepare(mongo_db, kill_rig.redis)
    kill_rig.llm.set_responder(chain_responder)
    folded = sorted(snapshot(mongo_db, USER)["archive"])  # ids sort in time order: u1-e000 ... u1-e029
    kill_rig.kill((step, 1), SETTINGS, USER, task="refold")
    committed = step == "committed"
    assert summary_version(mongo_db, USER) == (7 if committed else 6), f"after a kill at {step}"
    kill_rig.wait_for_lock_expiry(SETTINGS, USER)
    if not committed:
        engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)
        assert engine.refold(USER, run_id="rerun").status == refold.REFOLDED

    history = history_of(mongo_db, USER)
    assert [e["version"] for e in history] == list(range(1, 8)), "exactly one entry per committed version"
    assert history[-1]["kind"] == "refold" and history[-1]["refolded_from"] == 0
    profile = profile_of(mongo_db, USER)
    assert history[-1]["text"] == profile["memory_summary"]
    assert ledger(profile["memory_summary"]) == folded, "each archived event folded again exactly once, in order"
