"""Kill matrix of the batch mode: SIGKILL a batch run at every step of prepare, submit, the wait's
collect and the commit, re-run it, and compare with a clean run.

The child (``kill_worker.py``, task ``batch``) runs prepare, submit, collect and the commit of two
users against the fake OpenAI server's Batch API and kills itself at a checkpoint. The re-run is
the same steps in this process (each is idempotent). The fake answers with a ledger (the previous
summary plus the ids of the events it was shown), so an event lost or folded twice shows in the
summary; the fake's batches say whether a fold was submitted twice.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from butler_memory.fold.compression import COMPRESSED, STEPS
from butler_memory.operations import batch
from tests.engine.conftest import KillRig
from tests.engine.helpers import chain_responder, insert_events, ledger, small_settings, snapshot

Doc = dict[str, Any]
RUN = "memory_compression/scheduled__2026-03-01T00:00:00+00:00"
USERS = ("u-a", "u-b")
EVENTS, KEEP = 15, 3
SETTINGS = small_settings(llm_mode="batch", keep_last_n=KEEP, lock_ttl_seconds=1, llm_timeout_seconds=0.45)
BATCH_KILLS = [(step, 1) for step in batch.STEPS]
COMMIT_KILLS = [
    *((step, 1) for step in ("locked", "selected", "summarized", "recorded", "committed", "archived", "deleted")),
    ("cleared", 1),
    ("committed", 2),
]
"""The commit's own steps (compress_user's) for the first user; one for the second."""


def test_the_matrix_covers_every_batch_step_and_the_commits() -> None:
    assert {step for step, _ in BATCH_KILLS} == set(batch.STEPS)
    folding = set(STEPS) - {"pending_archived", "pending_deleted", "quarantined", "quarantine_removed"}
    assert {step for step, _ in COMMIT_KILLS} == folding  # the others are the online kill matrix's


@pytest.mark.parametrize("kill", BATCH_KILLS + COMMIT_KILLS, ids=[f"{s}-{n}" for s, n in BATCH_KILLS + COMMIT_KILLS])
def test_a_batch_run_killed_at_any_step_and_rerun_ends_like_a_clean_run(
    kill: tuple[str, int], kill_rig: KillRig
) -> None:
    llm = kill_rig.llm
    llm.set_responder(chain_responder)
    originals = {u: insert_events(kill_rig.db, u, EVENTS) for u in USERS}
    kill_rig.kill(kill, SETTINGS, USERS[0], task="batch", user_ids=list(USERS), run_id=RUN)
    for user_id in USERS:  # a killed commit leaves its lock until the TTL ends it
        if kill_rig.redis.exists(SETTINGS.lock_key(user_id)):
            kill_rig.wait_for_lock_expiry(SETTINGS, user_id)

    engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)
    with openai.OpenAI(base_url=llm.base_url, api_key="test-key", max_retries=0) as client:
        batch.prepare(engine, RUN, USERS)
        batch.submit(engine, RUN, client)
        batch.collect(engine, RUN, client)
        results = {u: batch.commit_user(engine, u, run_key=RUN) for u in USERS}

    assert len(llm.batches) == 1, f"a fold was submitted twice: {len(llm.batches)} batches"
    assert llm.chat_requests == [], "every summary came from the one batch"
    assert llm.files == [], "a file was left at the provider"
    for user_id in USERS:
        assert results[user_id].status == COMPRESSED, results[user_id]
        folded = [ev["_id"] for ev in originals[user_id][: EVENTS - KEEP]]
        state = snapshot(kill_rig.db, user_id)
        profile = state["profile"] or {}
        assert ledger(profile["memory_summary"]) == folded, "an event was lost or folded twice"
        assert profile["memory_summary_version"] == 1 and profile.get("memory_pending_fold") is None
        assert sorted(state["events"]) == [ev["_id"] for ev in originals[user_id][EVENTS - KEEP :]]
        assert sorted(state["archive"]) == folded
        assert [e["version"] for e in state["history"]] == [1]
