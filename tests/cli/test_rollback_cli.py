"""``python -m butler_memory rollback`` in a subprocess: dry run, the drill, refusal and --cascade."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.storage.profiles import LEASE_FIELD
from tests.cli.test_cli import CANARY, SMALL, cli, seed
from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns

Doc = dict[str, Any]


def state(db: Database[Doc]) -> Doc:
    """Return user_memory by _id, the archive by _id, and the profiles without their version and the
    lease of the run that last took the user (a fence, no state of the memory)."""
    profiles = {p["user_id"]: p for p in db["user_profiles"].find({}, {"_id": 0})}
    for profile in profiles.values():
        profile.pop("memory_summary_version", None)
        profile.pop(LEASE_FIELD, None)
    return {
        "events": {d["_id"]: d for d in db["user_memory"].find()},
        "archive": {d["_id"]: d for d in db["user_memory_archive"].find()},
        "profiles": profiles,
    }


def test_rollback_dry_run_then_the_drill_through_the_command_line(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"a": 20, "b": 25})
    assert cli("compress", "--run-id", "r0", *SMALL).returncode == 0
    start = datetime(2026, 2, 1, tzinfo=UTC)
    mongo_db["user_memory"].insert_many(
        [
            {
                "_id": f"b-later-{i}",
                "user_id": "b",
                "role": "user",
                "content": f"Later {i}: {CANARY}.",
                "created_at": start + timedelta(minutes=i),
                "tags": [],
            }
            for i in range(12)
        ]
    )
    before = state(mongo_db)
    assert cli("compress", "--run-id", "r1", *SMALL).returncode == 0
    after_run = state(mongo_db)
    assert after_run != before

    dry = cli("rollback", "--run", "r1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = {r["user_id"]: (r["status"], r["events_restored"]) for r in json.loads(dry.stdout)}
    assert plan == {"b": ("dry_run", 12)}, plan
    assert state(mongo_db) == after_run, "a dry run wrote something"
    untouched = cli("rollback", "--run", "r1", "--user", "a", "--json")
    assert [r["status"] for r in json.loads(untouched.stdout)] == ["not_changed"], untouched.stdout

    done = cli("rollback", "--run", "r1")
    assert done.returncode == 0, done.stderr
    assert "| b | rolled_back | v2 → v3 |" in done.stdout, done.stdout
    assert state(mongo_db) == before, "the rollback did not restore user_memory, archive and profiles exactly"
    assert CANARY not in done.stdout + done.stderr + dry.stdout + dry.stderr, "conversation content was printed"


def test_rollback_refuses_a_run_a_later_one_built_on_unless_cascade(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"a": 20})
    before = state(mongo_db)
    assert cli("compress", "--run-id", "r0", "--threshold", "10", "--keep-last-n", "8").returncode == 0
    assert cli("compress", "--run-id", "r1", "--threshold", "5", "--keep-last-n", "3").returncode == 0
    after = state(mongo_db)

    refused = cli("rollback", "--run", "r0", "--user", "a")
    assert refused.returncode == 1
    assert "r1" in refused.stdout and "--cascade" in refused.stdout, refused.stdout
    assert state(mongo_db) == after

    done = cli("rollback", "--run", "r0", "--user", "a", "--cascade", "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["undone_runs"] == ["r1", "r0"] and result["events_restored"] == 17
    now = state(mongo_db)
    assert now["events"] == before["events"] and now["archive"] == {}
    assert now["profiles"]["a"]["memory_summary"] == ""


def test_a_run_rollback_that_some_users_refuse_applies_to_none_unless_partial(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    # Issue 23.1: one decision for the run, said up front, not a mix discovered afterwards.
    seed(mongo_db, {"a": 20, "b": 20})
    assert cli("compress", "--run-id", "r0", "--threshold", "10", "--keep-last-n", "8").returncode == 0
    assert cli("compress", "--run-id", "r1", "--user", "a", "--threshold", "5", "--keep-last-n", "3").returncode == 0
    after = state(mongo_db)

    dry = cli("rollback", "--run", "r0", "--dry-run")
    none = cli("rollback", "--run", "r0", "--json")

    assert "1 of 2 user(s) would be refused" in dry.stderr, dry.stderr
    assert none.returncode == 1 and "applies to none of them" in none.stderr, none.stderr
    assert {r["user_id"]: r["status"] for r in json.loads(none.stdout)} == {"a": "refused", "b": "dry_run"}
    assert state(mongo_db) == after, "a refused run rollback changed a user"

    partial = cli("rollback", "--run", "r0", "--partial", "--json")
    assert partial.returncode == 1, "a refused user still fails the command"
    assert {r["user_id"]: r["status"] for r in json.loads(partial.stdout)} == {"a": "refused", "b": "rolled_back"}


def test_refold_through_the_command_line(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"a": 20})
    assert cli("compress", "--run-id", "r0", *SMALL).returncode == 0
    before = state(mongo_db)

    dry = cli("refold", "--user", "a", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    [plan] = json.loads(dry.stdout)
    assert (plan["status"], plan["events"], plan["refolded_from"]) == ("dry_run", 17, 0), plan
    assert state(mongo_db) == before

    done = cli("refold", "--user", "a")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "| a | refolded | v" in done.stdout, done.stdout
    after = state(mongo_db)
    assert after["events"] == before["events"] and after["archive"] == before["archive"]
    kinds = [e["kind"] for e in mongo_db["user_memory_summaries"].find({"user_id": "a"}).sort("version", 1)]
    assert kinds[-1] == "refold" and kinds.count("refold") == 1
    assert CANARY not in done.stdout + done.stderr + dry.stdout + dry.stderr

    # The output names the re-fold's run (the Markdown heading, --json's run_id), which rollback --run undoes.
    assert done.stdout.startswith("# Re-fold run refold__") and plan["run_id"].startswith("refold__"), done.stdout
    run_id = done.stdout.split()[3]
    [entry] = mongo_db["user_memory_summaries"].find({"user_id": "a", "kind": "refold"})
    assert entry["run_id"] == run_id, "the output names another run than the history entry"
    undo = cli("rollback", "--run", run_id, "--json")
    assert undo.returncode == 0, undo.stderr + undo.stdout
    assert [r["status"] for r in json.loads(undo.stdout)] == ["rolled_back"], undo.stdout
    assert state(mongo_db) == before, "rolling the re-fold back did not return to the summary before it"


def test_a_rollback_of_an_unknown_run_or_another_dags_run_says_so(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"a": 20})
    assert cli("compress", "--run-id", "r1", *SMALL).returncode == 0
    # As the DAGs name their runs (dag_id/run_id): one of memory_compression, none of memory_refold.
    mongo_db["user_memory_summaries"].update_many({"run_id": "r1"}, {"$set": {"run_id": "memory_compression/r1"}})
    before = state(mongo_db)

    unknown = cli("rollback", "--run", "r9")
    other = cli("rollback", "--run", "memory_refold/r1", "--user", "a")

    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "error: run 'r9' is not in the summary history" in unknown.stderr, unknown.stderr
    assert other.returncode == 2, other.stdout + other.stderr
    assert (
        "error: run 'memory_refold/r1': DAG 'memory_refold' has no run 'r1' in the summary history; that run id "
        "is one of memory_compression ('memory_compression/r1')"
    ) in other.stderr, other.stderr
    assert state(mongo_db) == before, "a refused rollback changed something"
    bare = cli("rollback", "--run", "r1", "--dry-run", "--json")  # one DAG ran it: the bare id is enough
    assert bare.returncode == 0 and [r["status"] for r in json.loads(bare.stdout)] == ["dry_run"], bare.stdout
