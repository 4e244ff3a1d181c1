"""``python -m butler_memory qualify`` in a subprocess, against the fake OpenAI server through the
test's ``openai_default`` connection, the offline summariser, and endpoints it cannot use."""

from __future__ import annotations

import json

import redis
from pymongo.database import Database

from tests.cli.test_cli import Doc, cli
from tools.fake_openai import FakeOpenAI
from tools.services import AirflowConns, RedisService, free_port

PLANTED = ("Ольга", "Татнефти", "Schwabing", "Valencia", "Toronto")
"""Words of the synthetic users' events: the output carries counts, never them."""


def assert_nothing_written(db: Database[Doc], client: redis.Redis) -> None:
    assert db.list_collection_names() == [], "qualify wrote to the Butler's database"
    assert client.keys("*") == [], "qualify left keys in Redis"


def test_a_good_model_passes_and_nothing_is_written(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    llm.set_responder("faithful")

    result = cli("qualify", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass" and report["model"] == "test-model" and report["users"] == 5, report
    assert report["thresholds"]["min_fact_retention"] == 0.95
    assert len(llm.chat_requests) == report["llm_calls"] > 5
    assert_nothing_written(mongo_db, redis_client)
    assert not any(word in result.stdout + result.stderr for word in PLANTED), "the report quoted content"


def test_a_model_dropping_facts_fails_with_its_reasons_and_thresholds(
    airflow_conns: AirflowConns, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI
) -> None:
    llm.set_responder("drop_fact")

    # Looser thresholds are options: three failed users allowed, but 67 % of the facts is under 70 %.
    result = cli("qualify", "--max-failed-users", "3", "--min-fact-retention", "0.7")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "## Model qualification: **FAIL**" in result.stdout, result.stdout
    assert "fact retention ≥ 70%" in result.stdout and "failed users ≤ 3" in result.stdout, result.stdout
    assert "Fails because: fact retention 67% is under 70%." in result.stdout, result.stdout
    assert "| `qualify-en-long` | en | 480 | 1 | rejected |" in result.stdout, result.stdout
    assert not any(word in result.stdout + result.stderr for word in PLANTED), "the report quoted content"
    assert_nothing_written(mongo_db, redis_client)


def test_the_offline_summariser_passes(airflow_conns: AirflowConns, llm: FakeOpenAI) -> None:
    result = cli("qualify", "--json", env={"BUTLER_MEMORY_SUMMARIZER": "offline"})

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["summarizer"] == "offline"
    assert llm.request_count == 0, "the offline summariser must not call the LLM"


def test_an_unreachable_endpoint_fails_naming_the_connection(airflow_conns: AirflowConns) -> None:
    port = free_port()  # nothing listens there
    conn = json.dumps({"conn_type": "openai", "host": f"http://127.0.0.1:{port}/v1", "extra": {"model": "m"}})

    result = cli("qualify", env={"AIRFLOW_CONN_OPENAI_DEFAULT": conn, "BUTLER_MEMORY_LLM_MAX_RETRIES": "0"})

    assert result.returncode == 3, result.stdout + result.stderr
    assert (
        f"error: LLM connection 'openai_default' (127.0.0.1:{port}) cannot be used: LLMTransientError on synthetic "
        "user 'qualify-ru-short' (LLM APIConnectionError); nothing was judged\n"
    ) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_server_that_is_not_openai_fails_naming_the_connection(
    airflow_conns: AirflowConns, redis_service: RedisService
) -> None:
    # A real server on the other end, speaking another protocol (redis-server closes on HTTP).
    conn = json.dumps(
        {"conn_type": "openai", "host": f"http://127.0.0.1:{redis_service.port}/v1", "extra": {"model": "m"}}
    )

    result = cli("qualify", env={"AIRFLOW_CONN_OPENAI_DEFAULT": conn, "BUTLER_MEMORY_LLM_MAX_RETRIES": "0"})

    assert result.returncode == 3, result.stdout + result.stderr
    assert f"error: LLM connection 'openai_default' (127.0.0.1:{redis_service.port}) cannot be used" in result.stderr
    assert "Traceback" not in result.stderr and "Ольга" not in result.stderr


def test_a_threshold_out_of_range_is_refused(airflow_conns: AirflowConns, llm: FakeOpenAI) -> None:
    result = cli("qualify", "--min-fact-retention", "1.5")

    assert result.returncode == 2, result.stderr
    assert "error: min_fact_retention must be a share between 0 and 1, got 1.5\n" in result.stderr, result.stderr
    assert llm.request_count == 0
