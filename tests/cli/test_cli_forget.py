"""``python -m butler_memory forget`` in a subprocess, reading AIRFLOW_CONN_* like the DAG does."""

from __future__ import annotations

import json
from typing import Any

import redis
from pymongo.database import Database

from tests.cli.test_cli import CANARY, SMALL, cli, counts, seed
from tools.services import AirflowConns

Doc = dict[str, Any]
SECRET_ENV = {"BUTLER_MEMORY_ERASURE_SECRET": "cli-test-secret-5e2a91c0"}


def compressed(db: Database[Doc]) -> None:
    """Seed two users and compress them, so both have a summary and an archive."""
    seed(db, {"gone": 30, "stays": 30})
    for doc in db["user_memory"].find({}, {"_id": 1}):  # the Butler's event_id (the seed sets only _id)
        db["user_memory"].update_one({"_id": doc["_id"]}, {"$set": {"event_id": doc["_id"]}})
    result = cli("compress", "--json", *SMALL)
    assert result.returncode == 0, result.stderr


def test_dry_run_lists_what_would_go_and_changes_nothing(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    compressed(mongo_db)
    before = {name: list(mongo_db[name].find()) for name in mongo_db.list_collection_names()}

    result = cli("forget", "--user", "gone", "--include-events", "--dry-run", "--json")

    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["status"] == "dry_run" and plan["removed"]["archive"] == 27 and plan["removed"]["events"] == 3, plan
    assert {name: list(mongo_db[name].find()) for name in mongo_db.list_collection_names()} == before


def test_forget_erases_the_user_and_prints_the_audit_id(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    compressed(mongo_db)

    result = cli("forget", "--user", "gone", "--include-events", env=SECRET_ENV)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("user erasure: erased (audit record "), result.stdout
    assert counts(mongo_db) == {"stays": 3}
    assert mongo_db["user_memory_archive"].count_documents({"user_id": "gone"}) == 0
    assert mongo_db["user_profiles"].count_documents({"user_id": "gone"}) == 0
    assert mongo_db["memory_erasures"].count_documents({"state": "done"}) == 1
    assert CANARY not in result.stdout + result.stderr
    assert redis_client.keys("*") == []

    again = cli("forget", "--user", "gone", "--include-events", "--json", env=SECRET_ENV)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already_erased", again
    proof = cli("forget", "--user", "gone", "--dry-run", "--json", env=SECRET_ENV)
    assert proof.returncode == 0 and json.loads(proof.stdout)["status"] == "already_erased", proof


def test_without_a_secret_nothing_is_erased(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    compressed(mongo_db)

    result = cli("forget", "--user", "gone")

    assert result.returncode == 2, result
    assert "BUTLER_MEMORY_ERASURE_SECRET" in result.stderr, result.stderr
    assert counts(mongo_db) == {"gone": 3, "stays": 3}


def test_an_unknown_user_exits_2_and_changes_nothing(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    compressed(mongo_db)
    before = {name: list(mongo_db[name].find()) for name in mongo_db.list_collection_names()}

    result = cli("forget", "--user", "nobody", env=SECRET_ENV)

    assert result.returncode == 2, result
    assert "'nobody'" in result.stderr and "unknown" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert {name: list(mongo_db[name].find()) for name in mongo_db.list_collection_names()} == before


def test_forget_events_rebuilds_the_summary(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    compressed(mongo_db)
    env = {**SECRET_ENV, "BUTLER_MEMORY_SUMMARIZER": "offline"}

    result = cli("forget", "--user", "gone", "--event", "gone-005", "--json", env=env)

    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["status"] == "forgotten" and done["summary_version"] == 2 and done["versions_dropped"] == [1], done
    assert mongo_db["user_memory_archive"].count_documents({"_id": "gone-005"}) == 0


def test_forget_events_refuses_bad_input(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    compressed(mongo_db)
    cases = [
        ["--event", "stays-003"],
        ["--since", "2026-01-02", "--until", "2026-01-01"],
        ["--since", "not-a-time", "--until", "2026-01-01"],
        ["--event", "gone-003", "--include-events"],
    ]
    for args in cases:
        result = cli("forget", "--user", "gone", *args, env=SECRET_ENV)
        assert result.returncode == 2, (args, result)
        assert "\nerror: " in "\n" + result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert mongo_db["memory_erasures"].count_documents({}) == 0


def test_forget_with_a_time_out_of_range_in_utc_exits_2_without_a_traceback(
    airflow_conns: AirflowConns, mongo_db: Database[Doc]
) -> None:
    """A --since the pattern accepts but UTC cannot hold (year 0) exits 2 naming it, no traceback (second review)."""
    seed(mongo_db, {"gone": 5})

    result = cli(
        "forget",
        "--user",
        "gone",
        "--since",
        "0001-01-01T00:00:00+01:00",
        "--until",
        "2026-01-01T00:00:00Z",
        "--dry-run",
        env=SECRET_ENV,
    )

    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "since '0001-01-01T00:00:00+01:00' is outside" in result.stderr
    assert counts(mongo_db) == {"gone": 5}
