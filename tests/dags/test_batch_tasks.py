"""compress_user with users_per_task > 1: the task body against real MongoDB, Redis and a fake LLM.

A batch tries every user, fails after all when any failed, and stores each user's outcome as it
ends; a retry or a clear of the instance then compresses only its users that failed or never
finished. The kill matrix kills the task process (SIGKILL) after 0, some and all of its users and
re-runs it: every user is compressed exactly once, nothing lost or counted twice.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pymongo.database import Database

from tests.children import run_child
from tests.population import seed_population
from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns

WORKER = Path(__file__).with_name("batch_worker.py")
CANARY = "CANARY-5d1f0a-batch"
FAIL_MARKER = "FAIL-MARKER-batch-7a2e"
USERS = ["u-a", "u-broken", "u-c"]
POPULATION = {"u-a": 60, "u-broken": 65, "u-c": 70}
RUN_ID = "manual__2026-12-06T00:00:00+00:00"
PARAMS = {"threshold": 50, "keep_last_n": 20, "users_per_task": 3}


def run_batch(kill_after: int = -1, run_id: str = RUN_ID) -> subprocess.CompletedProcess[str]:
    """Run one attempt of the batch in a child process, as a task process would."""
    config = {"user_ids": USERS, "run_id": run_id, "params": PARAMS, "kill_after": kill_after}
    return run_child(WORKER, config, timeout=120)


def rows_of(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    line = next(line for line in done.stdout.splitlines() if line.startswith("ROWS "))
    return json.loads(line.removeprefix("ROWS "))


def outcomes(db: Database[dict[str, Any]], run_id: str = RUN_ID) -> dict[str, str]:
    return {d["user_id"]: d["row"]["status"] for d in db["memory_compression_run_users"].find({"run_id": run_id})}


def versions(db: Database[dict[str, Any]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for doc in db["user_memory_summaries"].find({}, {"user_id": 1, "version": 1}).sort("version"):
        found.setdefault(doc["user_id"], []).append(doc["version"])
    return found


def events(db: Database[dict[str, Any]]) -> dict[str, int]:
    return {u: db["user_memory"].count_documents({"user_id": u}) for u in USERS}


@pytest.fixture
def seeded(
    airflow_conns: AirflowConns, mongo_db: Database[dict[str, Any]], llm: FakeOpenAI
) -> Database[dict[str, Any]]:
    seed_population(mongo_db, POPULATION, canary=CANARY, broken="u-broken", fail_marker=FAIL_MARKER)
    return mongo_db


def test_a_batch_tries_every_user_and_a_rerun_compresses_only_the_failed_one(
    seeded: Database[dict[str, Any]], llm: FakeOpenAI
) -> None:
    db = seeded
    llm.fail_when_contains(FAIL_MARKER, 400)
    first = run_batch()
    assert first.returncode == 1, (first.returncode, first.stderr[-2000:])
    assert "1 of 3 user(s) failed, first 'u-broken': LLMPermanentError" in first.stderr, first.stderr[-2000:]
    assert outcomes(db) == {"u-a": "compressed", "u-broken": "failed", "u-c": "compressed"}, (
        "a failure stopped the batch"
    )
    assert events(db) == {"u-a": 20, "u-broken": 65, "u-c": 20}

    llm.clear_rules()
    before = llm.request_count
    second = run_batch()  # what a clear of the instance (or a retry) runs
    assert second.returncode == 0, second.stderr[-2000:]
    rows = rows_of(second)
    assert [r["user_id"] for r in rows] == USERS, "one row per user, in the batch's order"
    assert all(r["status"] == "compressed" for r in rows), rows
    assert {r["user_id"]: r["events_folded"] for r in rows} == {"u-a": 40, "u-broken": 45, "u-c": 50}
    assert llm.request_count - before == 1, "the re-run must call the LLM for the failed user only"
    assert versions(db) == {"u-a": [1], "u-broken": [1], "u-c": [1]}, "a user compressed twice"
    assert events(db) == {"u-a": 20, "u-broken": 20, "u-c": 20}
    assert not any(CANARY in json.dumps(d, default=str) for d in db["memory_compression_run_users"].find()), (
        "event content reached the per-user outcomes"
    )


@pytest.mark.parametrize("kill_after", [0, 1, 3], ids=["before-any", "after-one", "after-all"])
def test_kill_matrix_of_a_batch_task(seeded: Database[dict[str, Any]], llm: FakeOpenAI, kill_after: int) -> None:
    db = seeded
    killed = run_batch(kill_after)
    assert killed.returncode == -9, f"the kill after {kill_after} user(s) was not reached: {killed.stderr[-2000:]}"
    assert len(outcomes(db)) == kill_after
    requests_before = llm.request_count

    retried = run_batch()
    assert retried.returncode == 0, retried.stderr[-2000:]
    rows = rows_of(retried)
    assert [r["status"] for r in rows] == ["compressed"] * 3, rows
    assert llm.request_count - requests_before == 3 - kill_after, "a finished user was summarised again"
    assert versions(db) == {u: [1] for u in USERS}, "each user must be compressed exactly once"
    assert events(db) == {u: 20 for u in USERS}
    archived = {u: db["user_memory_archive"].count_documents({"user_id": u}) for u in USERS}
    assert archived == {u: n - 20 for u, n in POPULATION.items()}, "an event was lost or archived twice"
