"""memory_compression with ``llm_mode: batch`` through ``dag.test()``: prepare, submit, the deferred
wait (``dag.test()`` runs the trigger in-process, as the triggerer would), commit per user, report;
against real MongoDB, Redis, StatsD and the fake OpenAI server's Batch API.

The same run with the real scheduler and triggerer is in tests/e2e/test_batch_e2e.py.
"""

from __future__ import annotations

from typing import Any

from tests.dags.test_dag_run import (
    CANARY,
    compress_outcomes,
    dag,
    event_counts,
    llm_pool,
    run_dag,
    seed_users,
    task_instances,
    world,
    xcom_values,
)

__all__ = ["dag", "llm_pool", "world"]  # fixtures shared with test_dag_run

BIG, BIGGER, LINE_FAILS = "u-big", "u-bigger", "u-line-fails"


def test_a_batch_run_commits_each_user_from_the_batch_and_fails_a_user_whose_line_failed(
    dag: Any, world: dict[str, Any]
) -> None:
    db, llm = world["db"], world["llm"]
    seed_users(db, {BIG: 60, BIGGER: 75, LINE_FAILS: 55})
    llm.batch_line_fault(f"of {LINE_FAILS}:", "error")  # its events name the user

    run = run_dag(dag, {"llm_mode": "batch", "users_per_task": 1})  # an instance per user: its own state

    states = {key: ti.state for key, ti in task_instances(run).items()}
    for task_id in ("scan", "prepare_batch", "submit_batch", "wait_for_batches"):
        assert states[(task_id, -1)] == "success", states
    assert run.state == "failed" and states[("report", -1)] == "failed", states
    outcomes = compress_outcomes(run)
    assert outcomes[BIG] == ("success", "compressed") and outcomes[BIGGER] == ("success", "compressed"), outcomes
    assert outcomes[LINE_FAILS] == ("failed", "failed"), outcomes
    assert event_counts(db) == {BIG: 20, BIGGER: 20, LINE_FAILS: 55}
    assert llm.chat_requests == [] and len(llm.batches) == 1
    assert llm.files == []  # input, output and error files deleted from the provider

    doc = db["memory_compression_runs"].find_one({"run_id": run.run_id}) or {}
    assert doc["users_compressed"] == 2 and doc["failed_user_ids"] == [LINE_FAILS]
    assert doc["llm_mode"] == "batch" and doc["batch"] == {
        "users_batched": 3,
        "users_online": 0,
        "batches": {"completed": 1},
    }, doc.get("batch")
    row = next(u for u in doc["users"] if u["user_id"] == LINE_FAILS)
    assert row["error_type"] == "LLMBatchError", row
    xcoms = xcom_values(run)
    leaked = [(t, i, k) for t, i, k, v in xcoms if CANARY in v]
    assert not leaked, f"event content reached XCom in {leaked}"
