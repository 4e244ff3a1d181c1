"""``python -m butler_memory compress`` in a subprocess, reading AIRFLOW_CONN_* like the DAG does
(one test runs it in-process, to erase a user while it runs).

The subprocess gets this session's environment (the throwaway AIRFLOW_HOME from tests/conftest.py and
the test's AIRFLOW_CONN_* variables from the ``airflow_conns`` fixture) plus ``plugins/`` on
PYTHONPATH, as a cron job or an operator's shell would have.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.database import Database

from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns, StatsdSink, free_port

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
SMALL = ["--threshold", "10", "--keep-last-n", "3"]
CANARY = "CANARY-cli-5d1f0c"


def seed(db: Database[Doc], counts: dict[str, int]) -> None:
    """Insert ``n`` events per user, a minute apart, each carrying the canary."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    db["user_memory"].insert_many(
        [
            {
                "_id": f"{user_id}-{i:03d}",
                "user_id": user_id,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"Turn {i}: {CANARY}.",
                "created_at": start + timedelta(minutes=i),
                "tags": [],
            }
            for user_id, n in counts.items()
            for i in range(n)
        ]
    )


def counts(db: Database[Doc]) -> dict[str, int]:
    """Return the number of events per user."""
    return {
        row["_id"]: row["n"] for row in db["user_memory"].aggregate([{"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])
    }


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line in a subprocess with this process's environment (plus overrides)."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugins"), str(REPO)])
    return subprocess.run(
        [sys.executable, "-m", "butler_memory", *args],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def report_of(result: subprocess.CompletedProcess[str]) -> Doc:
    """Parse the JSON report a run printed."""
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not a JSON report (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")


def test_dry_run_prints_the_plan_and_writes_nothing(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"big": 30, "bigger": 40, "small": 8})

    result = cli("compress", "--dry-run", "--json", *SMALL)

    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["dry_run"] is True and report["users_found"] == 2 and report["users_dry_run"] == 2, report
    plan = {u["user_id"]: (u["status"], u["events_folded"]) for u in report["users"]}
    assert plan == {"bigger": ("dry_run", 37), "big": ("dry_run", 27)}, plan
    assert [u["user_id"] for u in report["users"]] == ["bigger", "big"], "the largest backlog comes first"
    assert counts(mongo_db) == {"big": 30, "bigger": 40, "small": 8}, "a dry run deleted events"
    # Not even indexes: a preview must work with read-only credentials and never start an index build.
    assert mongo_db.list_collection_names() == ["user_memory"], "a dry run created collections"
    assert list(mongo_db["user_memory"].index_information()) == ["_id_"], "a dry run created indexes"
    assert llm.request_count == 0, "a dry run called the LLM"
    assert redis_client.keys("*") == [], "a dry run left keys in Redis"
    assert CANARY not in result.stdout + result.stderr, "the plan printed conversation content"


def test_a_run_compresses_stores_its_document_and_emits_metrics(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], llm: FakeOpenAI, statsd: StatsdSink
) -> None:
    seed(mongo_db, {"big": 30, "bigger": 40, "small": 8})

    result = cli("compress", "--json", "--run-id", "cli-test-1", *SMALL)

    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["users_compressed"] == 2 and report["events_folded"] == 27 + 37, report
    assert counts(mongo_db) == {"big": 3, "bigger": 3, "small": 8}
    assert len(llm.chat_requests) == 2, "one summary per user (one chunk each)"
    (run,) = mongo_db["memory_compression_runs"].find({}, {"_id": 0})
    assert run["run_id"] == "cli-test-1" and run["users_compressed"] == 2 and run["failed_user_ids"] == [], run
    assert mongo_db["user_memory_archive"].count_documents({}) == 64
    statsd.wait_for(lambda lines: "personalized_memory_worker_runs_total:1|c" in lines)
    assert CANARY not in result.stdout + result.stderr, "the report printed conversation content"


def test_markdown_report_by_default(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    seed(mongo_db, {"big": 30})

    result = cli("compress", *SMALL)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("## Memory compression run `cli__"), result.stdout
    assert "| `big` | compressed | 30 | 27 |" in result.stdout, result.stdout


def test_user_restricts_the_run(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    seed(mongo_db, {"big": 30, "bigger": 40, "other": 20})

    result = cli("compress", "--json", "-v", "--user", "big", "--user", "other", *SMALL)

    assert result.returncode == 0, result.stderr
    assert [u["user_id"] for u in report_of(result)["users"]] == ["big", "other"], "stdout must be only the report"
    assert "INFO butler_memory.fold.compression: user big: folding 27 of 30 events" in result.stderr, result.stderr
    assert counts(mongo_db) == {"big": 3, "bigger": 40, "other": 3}, "--user must leave other users alone"


def test_limit_takes_the_largest_backlog_first(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    seed(mongo_db, {"big": 30, "bigger": 40, "other": 20})

    result = cli("compress", "--json", "--limit", "1", *SMALL)

    assert result.returncode == 0, result.stderr
    assert counts(mongo_db) == {"big": 30, "bigger": 3, "other": 20}


def test_one_bad_user_fails_the_run_but_not_the_others(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    seed(mongo_db, {"broken": 30, "fine": 20})
    mongo_db["user_profiles"].insert_one({"user_id": "broken", "memory_summary": 42})
    mongo_db["user_memory"].update_one({"_id": "fine-004"}, {"$set": {"content": 42}})  # a bad event: quarantined

    result = cli("compress", "--json", *SMALL)

    assert result.returncode == 1, f"a failed user must exit 1, got {result.returncode}: {result.stderr}"
    report = report_of(result)
    assert report["failed_user_ids"] == ["broken"] and report["users_compressed"] == 1, report
    (row,) = [u for u in report["users"] if u["user_id"] == "broken"]
    assert row["error_type"] == "InvalidProfileError" and "'memory_summary'" in row["error"], row
    assert report["events_quarantined"] == 1, "the run report counts the quarantined event"
    assert counts(mongo_db) == {"broken": 30, "fine": 3}
    assert mongo_db["user_memory_quarantine"].count_documents({"user_id": "fine"}) == 1
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_bad_limit_exits_2_with_a_clear_message(value: str) -> None:
    result = cli("compress", "--limit", value)

    assert result.returncode == 2, result
    assert "--limit" in result.stderr and value in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_bad_setting_exits_2_naming_it(airflow_conns: AirflowConns) -> None:
    result = cli("compress", "--threshold", "5", "--keep-last-n", "9")

    assert result.returncode == 2, result
    assert "keep_last_n (9) must not exceed threshold (5)" in result.stderr, result.stderr


def test_a_user_the_job_cannot_take_exits_2_naming_it(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    """An explicit --user the job cannot take is a usage error, not left out of a green run (third review)."""
    seed(mongo_db, {"ok": 20})
    result = cli("compress", "--user", "ok", "--user", "a b", *SMALL)

    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "user id 'a b' is not a user id" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert counts(mongo_db) == {"ok": 20}, "nothing is compressed"


def test_a_bad_integer_env_setting_exits_2_naming_it(airflow_conns: AirflowConns) -> None:
    """An integer setting in the environment that int() cannot read exits 2 naming it, no traceback (second review)."""
    result = cli("compress", "--dry-run", env={"BUTLER_MEMORY_THRESHOLD": "--5"})

    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "threshold must be an integer" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(("option", "value"), [("--threshold", str(10**20)), ("--limit", str(10**20))])
def test_a_whole_number_beyond_what_mongodb_stores_is_a_usage_error(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], option: str, value: str
) -> None:
    """A threshold or limit past BSON's int64 exits 2 naming the option, not 3 as a database outage (second review)."""
    seed(mongo_db, {"big": 30})
    args = ["compress", "--dry-run", option, value] + (["--keep-last-n", "3"] if option == "--threshold" else [])

    result = cli(*args)

    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert option in result.stderr and "must be at most" in result.stderr, result.stderr[-2000:]
    assert "cannot reach the Butler database" not in result.stderr, result.stderr[-2000:]


def test_redis_down_exits_3_and_writes_nothing(airflow_conns: AirflowConns, mongo_db: Database[Doc]) -> None:
    seed(mongo_db, {"big": 30})
    dead = json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": free_port(), "extra": {"db": 0}})

    result = cli("compress", "--json", *SMALL, env={"AIRFLOW_CONN_REDIS_DEFAULT": dead})

    assert result.returncode == 3, f"expected exit 3, got {result.returncode}: {result.stderr}"
    assert "Redis" in result.stderr and "unreachable" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert counts(mongo_db) == {"big": 30}
    assert mongo_db["memory_compression_runs"].count_documents({}) == 0


def test_settings_come_from_the_environment(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], llm: FakeOpenAI
) -> None:
    seed(mongo_db, {"big": 30})
    env = {"BUTLER_MEMORY_THRESHOLD": "25", "BUTLER_MEMORY_KEEP_LAST_N": "10", "BUTLER_MEMORY_SUMMARIZER": "offline"}

    result = cli("compress", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert counts(mongo_db) == {"big": 10}
    assert llm.request_count == 0, "BUTLER_MEMORY_SUMMARIZER=offline must not call the LLM"


def test_settings_come_from_the_butler_memory_variable_like_the_dag(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    """Inside a stack whose Variable renames the lock key and the summary field, the CLI takes the
    bot's lock and writes where the Butler reads (it resolves settings like the DAG; issue 11)."""
    seed(mongo_db, {"held": 30, "free": 30})
    variable = {"lock_key_pattern": "bot:{user_id}:lock", "summary_field": "long_term_memory", "threshold": 25}
    redis_client.set("bot:held:lock", "the-bot", px=60_000)  # the bot is compressing "held" right now

    result = cli("compress", "--json", "--keep-last-n", "3", env={"AIRFLOW_VAR_BUTLER_MEMORY": json.dumps(variable)})

    assert result.returncode == 0, result.stderr
    statuses = {u["user_id"]: u["status"] for u in report_of(result)["users"]}
    assert statuses == {"held": "skipped_locked", "free": "compressed"}, statuses
    assert counts(mongo_db) == {"held": 30, "free": 3}
    profile = mongo_db["user_profiles"].find_one({"user_id": "free"}) or {}
    assert profile.get("long_term_memory") and "memory_summary" not in profile, profile


def test_a_user_erased_during_a_cli_compress_is_named_by_no_run_document(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user erased during a CLI compress is in no run document nor the printed report, only counted (third review)."""
    from butler_memory import cli as command_line
    from butler_memory.operations import erasure
    from butler_memory.operations.engine import Engine
    from butler_memory.orchestration.connections import user_locks

    secret = "cli-test-secret-5e2a91c0"
    monkeypatch.setenv("BUTLER_MEMORY_ERASURE_SECRET", secret)
    seed(mongo_db, {"u-erased": 30, "u-other": 40})
    compress = Engine.compress

    def compress_then_erase(self: Engine, user_id: str, **kwargs: Any) -> Any:
        result = compress(self, user_id, **kwargs)
        if user_id == "u-erased":  # the user asks to be forgotten right after their compression
            locks = user_locks(self.settings)
            try:
                erasure.erase_user(user_id, db=mongo_db, redis_client=locks.client, secret=secret.encode(), events=True)
            finally:
                locks.close()
        return result

    monkeypatch.setattr(Engine, "compress", compress_then_erase)
    out, err = io.StringIO(), io.StringIO()  # in-process: the patch above erases during the run
    code = command_line.main(["compress", "--json", *SMALL], out=out, err=err)

    assert code == 0, err.getvalue()
    assert mongo_db["memory_erasures"].count_documents({}) == 1, "the premise: the erasure finished"
    (run,) = mongo_db["memory_compression_runs"].find()
    assert "u-erased" not in json.dumps(run, default=str), "the run document names a user erased during the run"
    assert run["user_ids"] == ["u-other"] and run["users_erased"] == 1 and run["users_found"] == 1, run
    printed = out.getvalue()
    assert "u-erased" not in printed and json.loads(printed)["users_erased"] == 1, printed
