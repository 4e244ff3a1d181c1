"""Tests of the test harness itself: real servers, real clients, real Airflow hooks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import redis
import statsd as statsd_package  # type: ignore[import-untyped]
from pymongo.database import Database
from pymongo.errors import ServerSelectionTimeoutError

from tools.fake_openai import FakeOpenAI, default_responder, prompt_tokens_of
from tools.services import (
    LOOPBACK,
    AirflowConns,
    MongoService,
    PostgresService,
    RedisService,
    ServiceStartError,
    StatsdSink,
    airflow_connection_env,
    free_port,
    parse_statsd_line,
    postgres_user,
)

REPO = Path(__file__).resolve().parents[2]
USER_TEXT = "Секретная строка пользователя 42"


# MongoDB -----------------------------------------------------------------------------------------


def test_mongo_service_round_trip(mongo_service: MongoService, mongo_db: Database[dict[str, Any]]) -> None:
    """Insert, index and query through pymongo on the embedded server."""
    events = mongo_db["user_memory"]
    events.create_index([("user_id", 1), ("created_at", 1)])
    events.insert_many([{"user_id": "u1", "created_at": i, "content": f"m{i}"} for i in range(5)])

    newest = list(events.find({"user_id": "u1"}).sort("created_at", -1).limit(2))

    assert [doc["content"] for doc in newest] == ["m4", "m3"]
    assert "user_id_1_created_at_1" in events.index_information()
    assert mongo_service.uri == f"mongodb://127.0.0.1:{mongo_service.port}/?directConnection=true"
    assert mongo_db.client.admin.command("hello")["setName"] == "secantus"


@pytest.mark.slow
def test_mongo_service_restart_keeps_data_and_port(tmp_path: Path) -> None:
    """Stop and start a server on the same storage dir: same port, same data; stop is idempotent."""
    service = MongoService(tmp_path / "mongo")
    try:
        port = service.port
        with service.client() as client:
            client["keep"]["docs"].insert_one({"_id": 1, "v": "kept"})
        service.stop()
        service.stop()
        assert not service.is_running()
        with (
            service.client(serverSelectionTimeoutMS=300) as client,
            pytest.raises(ServerSelectionTimeoutError, match="refused"),
        ):
            client.admin.command("ping")

        service.start()

        assert service.port == port
        with service.client() as client:
            assert client["keep"]["docs"].find_one({"_id": 1}) == {"_id": 1, "v": "kept"}
        assert (tmp_path / "mongo" / "secantusd.log").read_text()
    finally:
        service.stop()


def test_mongo_service_start_failure_names_the_cause(tmp_path: Path) -> None:
    """A server that cannot bind its port fails fast with the tail of its log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()

        with pytest.raises(ServiceStartError, match="Address already in use") as failure:
            MongoService(tmp_path / "mongo", port=port)

    assert failure.value.address_in_use
    assert time.monotonic() - started < 15


def test_mongo_hook_uses_the_test_database(
    airflow_conns: AirflowConns, mongo_db: Database[dict[str, Any]], mongo_service: MongoService
) -> None:
    """MongoHook("mongo_default") reads and writes this test's database."""
    from airflow.providers.mongo.hooks.mongo import MongoHook

    mongo_db["seeded"].insert_one({"_id": "from-pymongo"})
    with MongoHook("mongo_default") as hook:
        hook.get_collection("written").insert_one({"_id": "from-hook"})
        seen = hook.get_collection("seeded").find_one()
        uri = hook.uri

    assert seen == {"_id": "from-pymongo"}
    assert mongo_db["written"].find_one() == {"_id": "from-hook"}
    assert uri == f"mongodb://127.0.0.1:{mongo_service.port}/{airflow_conns.db_name}"


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_gets_its_own_database(
    run: str, airflow_conns: AirflowConns, mongo_db: Database[dict[str, Any]]
) -> None:
    """The per-test database is empty and the hook follows the per-test connection (no caching)."""
    from airflow.providers.mongo.hooks.mongo import MongoHook

    with MongoHook("mongo_default") as hook:
        assert hook.connection.schema == mongo_db.name == airflow_conns.db_name
        collection = hook.get_collection("marker")
        assert collection.count_documents({}) == 0
        collection.insert_one({"run": run})


# Redis -------------------------------------------------------------------------------------------


def test_demo_seed_ends_every_history_just_before_now(mongo_db: Database[dict[str, Any]]) -> None:
    """The demo's data is recent (its freshness figures then mean something); without ``now`` it stays fixed."""
    from datetime import UTC, datetime, timedelta

    from tools.seed import MINUTES_APART, seed

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    planted = seed(mongo_db, users=20, now=now)
    newest = {
        row["_id"]: row["at"].replace(tzinfo=UTC)
        for row in mongo_db["user_memory"].aggregate([{"$group": {"_id": "$user_id", "at": {"$max": "$created_at"}}}])
    }
    assert set(newest) == {u.user_id for u in planted}
    assert all(now - timedelta(minutes=MINUTES_APART + 1) <= at < now for at in newest.values()), newest
    oldest = mongo_db["user_memory"].find_one(sort=[("created_at", 1)])
    longest = max(u.events for u in planted)
    assert oldest is not None and oldest["created_at"].replace(tzinfo=UTC) >= now - timedelta(
        minutes=MINUTES_APART * longest + 1
    )

    mongo_db["user_memory"].drop()
    seed(mongo_db, users=2)
    first = mongo_db["user_memory"].find_one(sort=[("created_at", 1)])
    assert first is not None and first["created_at"].replace(tzinfo=UTC) < datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


def test_redis_service_is_loopback_without_persistence(redis_client: redis.Redis) -> None:
    """The server binds 127.0.0.1 and neither snapshots nor appends to disk."""
    config = redis_client.config_get("*")

    assert config["bind"] == "127.0.0.1"
    assert config["save"] == ""
    assert config["appendonly"] == "no"
    assert redis_client.ping()


def test_redis_hook_selects_the_configured_db(
    monkeypatch: pytest.MonkeyPatch,
    redis_service: RedisService,
    redis_client: redis.Redis,
    mongo_service: MongoService,
) -> None:
    """RedisHook("redis_default") pings and writes to the db named in the connection's extra."""
    from airflow.providers.redis.hooks.redis import RedisHook

    env = airflow_connection_env(
        mongo=mongo_service, db="unused", redis=redis_service, redis_db=3, statsd=None, llm_base_url=None
    )
    monkeypatch.setenv("AIRFLOW_CONN_REDIS_DEFAULT", env["AIRFLOW_CONN_REDIS_DEFAULT"])
    hook_client = RedisHook("redis_default").get_conn()
    try:
        assert hook_client.ping()
        hook_client.set("lock:u1", "token")
    finally:
        hook_client.close()

    with redis_service.client(db=3) as db3:
        assert db3.get("lock:u1") == b"token"
    assert redis_client.get("lock:u1") is None


def test_redis_client_fixture_starts_empty(redis_client: redis.Redis, redis_service: RedisService) -> None:
    """Every database is flushed before each test."""
    assert redis_client.dbsize() == 0
    with redis_service.client(db=3) as db3:
        assert db3.dbsize() == 0
    redis_client.set("left-over", "1")


# StatsD ------------------------------------------------------------------------------------------


def test_statsd_sink_receives_the_statsd_package(statsd: StatsdSink) -> None:
    """Counters, timers and gauges sent by statsd.StatsClient arrive as lines and parse."""
    client = statsd_package.StatsClient(statsd.host, statsd.port, prefix="butler")
    try:
        client.incr("x")
        client.timing("compress.seconds", 12.5)
        client.gauge("backlog", 7)
        lines = statsd.wait_for(lambda got: len(got) >= 3, timeout=5)
    finally:
        client.close()

    assert lines == ["butler.x:1|c", "butler.compress.seconds:12.500000|ms", "butler.backlog:7|g"]
    assert statsd.parsed() == [
        ("butler.x", 1, "c"),
        ("butler.compress.seconds", 12.5, "ms"),
        ("butler.backlog", 7, "g"),
    ]


def test_statsd_sink_splits_batched_datagrams_and_times_out(statsd: StatsdSink) -> None:
    """A pipeline batch is split on newlines; wait_for raises TimeoutError naming what came."""
    client = statsd_package.StatsClient(statsd.host, statsd.port)
    try:
        with client.pipeline() as pipe:
            pipe.incr("a", 2)
            pipe.decr("b")
        statsd.wait_for(lambda got: len(got) == 2)
    finally:
        client.close()

    assert statsd.parsed() == [("a", 2, "c"), ("b", -1, "c")]
    with pytest.raises(TimeoutError, match="a:2"):
        statsd.wait_for(lambda got: "never" in got, timeout=0.2)
    statsd.clear()
    assert statsd.lines == []


def test_statsd_sink_cuts_its_lines_by_the_time_they_arrived(statsd: StatsdSink) -> None:
    """lines_between keeps the lines received in a time window (the scale bench cuts a run's loops so)."""
    client = statsd_package.StatsClient(statsd.host, statsd.port)
    try:
        client.incr("before")
        statsd.wait_for(lambda got: got == ["before:1|c"])
        cut = time.time()
        client.incr("after")
        statsd.wait_for(lambda got: len(got) == 2)
    finally:
        client.close()

    assert statsd.lines_between(0, cut) == ["before:1|c"]
    assert statsd.lines_between(cut, time.time()) == ["after:1|c"]
    statsd.clear()
    assert statsd.lines_between(0, time.time()) == []


def test_parse_statsd_line_rejects_garbage() -> None:
    """A line without name:value|type is an error, not a silent zero."""
    assert parse_statsd_line("x:0.5|c|@0.1") == ("x", 0.5, "c")
    with pytest.raises(ValueError, match="not a StatsD line"):
        parse_statsd_line("garbage")


# Airflow connections -----------------------------------------------------------------------------


def test_connection_env_in_process(airflow_conns: AirflowConns, llm: FakeOpenAI, statsd: StatsdSink) -> None:
    """BaseHook resolves openai_default and statsd_default from the JSON variables."""
    from airflow.sdk import BaseHook

    llm_conn = BaseHook.get_connection("openai_default")
    statsd_conn = BaseHook.get_connection("statsd_default")

    assert (llm_conn.conn_type, llm_conn.host, llm_conn.password) == ("openai", llm.base_url, "test-key")
    assert llm_conn.extra_dejson == {"model": "test-model"}
    assert (statsd_conn.conn_type, statsd_conn.host, statsd_conn.port) == ("generic", "127.0.0.1", statsd.port)


def test_connection_env_optional_parts(mongo_service: MongoService, redis_service: RedisService) -> None:
    """No sink, no LLM: those connections are left out; a prefix lands in the statsd extra."""
    bare = airflow_connection_env(mongo=mongo_service, db="d", redis=redis_service, statsd=None, llm_base_url=None)
    with StatsdSink() as sink:
        prefixed = airflow_connection_env(
            mongo=mongo_service,
            db="d",
            redis=redis_service,
            statsd=sink,
            statsd_prefix="butler",
            llm_base_url="http://127.0.0.1:1/v1",
        )

    assert set(bare) == {"AIRFLOW_CONN_MONGO_DEFAULT", "AIRFLOW_CONN_REDIS_DEFAULT"}
    assert json.loads(prefixed["AIRFLOW_CONN_STATSD_DEFAULT"])["extra"] == {"prefix": "butler"}


HOOKS_SCRIPT = textwrap.dedent(
    """
    import json
    from airflow.providers.mongo.hooks.mongo import MongoHook
    from airflow.providers.redis.hooks.redis import RedisHook
    from airflow.sdk import BaseHook

    with MongoHook("mongo_default") as hook:
        hook.get_collection("from_subprocess").insert_one({"ok": 1})
        schema = hook.connection.schema
    redis_client = RedisHook("redis_default").get_conn()
    llm = BaseHook.get_connection("openai_default")
    statsd = BaseHook.get_connection("statsd_default")
    print("RESULT " + json.dumps({
        "schema": schema,
        "redis_ping": redis_client.ping(),
        "llm": [llm.host, llm.password, llm.extra_dejson],
        "statsd": [statsd.host, statsd.port],
    }))
    """
)


@pytest.mark.slow
def test_connection_env_in_a_subprocess(airflow_conns: AirflowConns, mongo_db: Database[dict[str, Any]]) -> None:
    """A separate Python process (as Airflow runs tasks) resolves every connection from the env."""
    result = subprocess.run(
        [sys.executable, "-c", HOOKS_SCRIPT],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    seen = json.loads(line.removeprefix("RESULT "))
    assert seen == {
        "schema": airflow_conns.db_name,
        "redis_ping": True,
        "llm": [airflow_conns.llm_base_url, "test-key", {"model": "test-model"}],
        "statsd": ["127.0.0.1", airflow_conns.statsd_port],
    }
    assert mongo_db["from_subprocess"].count_documents({"ok": 1}) == 1


@pytest.mark.slow
def test_airflow_db_is_migrated(airflow_db: Any, postgres: PostgresService) -> None:
    """The session database is a PostgreSQL database with Airflow's tables; the home is temporary."""
    assert os.environ["AIRFLOW_HOME"] == str(airflow_db.home)
    assert airflow_db.sql_alchemy_conn == postgres.url("airflow_session")
    with contextlib.closing(postgres.connect("airflow_session")) as conn, conn.cursor() as cur:
        cur.execute("select tablename from pg_tables where schemaname = 'public'")
        tables = {row[0] for row in cur.fetchall()}
        cur.execute("select pool from slot_pool")
        pools = [row[0] for row in cur.fetchall()]
    assert {"dag", "task_instance", "connection", "variable", "alembic_version"} <= tables
    assert pools == ["default_pool"]


def test_postgres_runs_unprivileged_on_loopback_and_stop_removes_the_cluster(
    postgres: PostgresService, tmp_path: Path
) -> None:
    """A second server: as root it runs as the postgres user, listens on 127.0.0.1 only, and stop()
    deletes its temporary cluster."""
    with PostgresService(tmp_path, postgres.bindir) as other:
        assert other.port != postgres.port and other.data_dir is not None
        data_dir = other.data_dir
        process = psutil.Process(other.pid)
        assert process.username() == (postgres_user() or psutil.Process().username())
        listening = {c.laddr for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {(LOOPBACK, other.port)}
        with contextlib.closing(other.connect()) as conn, conn.cursor() as cur:
            cur.execute("select current_setting('fsync'), current_setting('unix_socket_directories')")
            assert cur.fetchone() == ("off", "")
    assert not data_dir.exists()
    assert not other.is_running()


def test_environment_is_hermetic() -> None:
    """The suite runs against the temporary Airflow home and never against a real OpenAI key."""
    assert os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] == "True"
    assert os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert os.environ["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")
    assert "butler-airflow-home-" in os.environ["AIRFLOW_HOME"]
    assert not [name for name in os.environ if name.startswith("OPENAI_")]


# Fake OpenAI -------------------------------------------------------------------------------------


@pytest.fixture
def client(llm: FakeOpenAI) -> Iterator[openai.OpenAI]:
    """Return a real openai client on the fake server, without retries."""
    with openai.OpenAI(base_url=llm.base_url, api_key="test-key", max_retries=0, timeout=5.0) as api:
        yield api


def ask(api: openai.OpenAI, text: str = USER_TEXT, **kwargs: Any) -> Any:
    """Send one chat completion with a system and a user message."""
    messages = [{"role": "system", "content": "Сожми историю."}, {"role": "user", "content": text}]
    return api.chat.completions.create(model="test-model", messages=messages, **kwargs)  # type: ignore[arg-type]


def test_default_reply_is_a_summary_with_usage(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """The default responder counts the user's lines, never echoes them, and reports usage."""
    text = "привет\nкак дела\n\nпока"

    reply = ask(client, text)

    content = reply.choices[0].message.content
    assert content == "Краткая сводка: пользователь обсуждал 3 сообщения."
    assert "привет" not in content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.model == "test-model"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == prompt_tokens_of(
        {"messages": [{"content": "Сожми историю."}, {"content": text}]}
    ), "a server that read the whole prompt reports all of its tokens"
    assert reply.usage.completion_tokens == len(content) // 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_default_responder_plurals() -> None:
    """The Russian count agrees with its noun."""
    replies = [default_responder({"messages": [{"role": "user", "content": "x\n" * n}]}) for n in (1, 2, 5, 11, 21)]

    assert [r.split("обсуждал ")[1] for r in replies] == [
        "1 сообщение.",
        "2 сообщения.",
        "5 сообщений.",
        "11 сообщений.",
        "21 сообщение.",
    ]


def test_queued_behaviours_are_consumed_in_order(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """push_reply, push_empty and the responder answer successive requests."""
    llm.push_reply("первый", prompt_tokens=100, completion_tokens=7, delay=0.2)
    llm.push_empty()
    llm.set_responder(lambda request: f"модель {request['model']}")

    started = time.monotonic()
    first = ask(client)
    elapsed = time.monotonic() - started
    second = ask(client)
    third = ask(client)

    assert first.choices[0].message.content == "первый"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (100, 7)
    assert elapsed >= 0.2
    assert second.choices[0].message.content == ""
    assert third.choices[0].message.content == "модель test-model"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (401, openai.AuthenticationError),
        (400, openai.BadRequestError),
    ],
)
def test_error_statuses_map_to_openai_exceptions(
    client: openai.OpenAI, llm: FakeOpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    """Each scripted status raises the matching openai exception, once."""
    llm.push_status(status)

    with pytest.raises(error) as raised:
        ask(client)

    assert raised.value.status_code == status
    assert ask(client).choices[0].message.content
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "0"


def test_error_body_is_openai_style(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """A custom error body reaches the client's message, code and body."""
    llm.push_status(
        400,
        {"error": {"message": "context too long", "type": "invalid_request_error", "code": "context_length"}},
    )

    with pytest.raises(openai.BadRequestError, match="context too long") as raised:
        ask(client)

    assert raised.value.code == "context_length"
    assert raised.value.type == "invalid_request_error"


def test_hang_longer_than_the_timeout(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """A stalled request raises APITimeoutError at the client's timeout, not the server's pace."""
    llm.push_hang(10)
    started = time.monotonic()

    with pytest.raises(openai.APITimeoutError):
        ask(client, timeout=0.5)

    assert time.monotonic() - started < 3
    assert ask(client).choices[0].message.content


def test_malformed_body_raises_json_decode_error(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """openai 3.57 lets a 200 with broken JSON escape as json.JSONDecodeError, not an APIError."""
    llm.push_malformed()

    with pytest.raises(json.JSONDecodeError):
        ask(client)


def test_outage_and_per_user_rules(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """set_default_status fails everything until lifted; a rule fails only matching requests."""
    llm.set_default_status(503)
    with pytest.raises(openai.InternalServerError):
        ask(client)
    with pytest.raises(openai.InternalServerError):
        ask(client)
    llm.set_default_status(None)

    llm.fail_when_contains("u_bad", 400)
    with pytest.raises(openai.BadRequestError):
        ask(client, "история пользователя u_bad")
    assert ask(client, "история пользователя u_good").choices[0].message.content
    llm.clear_rules()
    assert ask(client, "история пользователя u_bad").choices[0].message.content


def test_latency_applies_to_every_request(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """set_latency delays replies and errors alike."""
    llm.set_latency(0.3)
    llm.push_status(500)

    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        ask(client)
    ask(client)

    assert time.monotonic() - started >= 0.6


def test_requests_are_recorded(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """Path, headers and JSON body of every API call are kept, and models are listed."""
    ask(client, temperature=0)
    models = client.models.list()

    assert llm.request_count == 2
    chat, listing = llm.requests
    assert chat["path"] == "/v1/chat/completions"
    assert chat["headers"]["authorization"] == "Bearer test-key"
    assert chat["json"]["messages"][1] == {"role": "user", "content": USER_TEXT}
    assert chat["json"]["temperature"] == 0
    assert llm.chat_requests == [chat["json"]]
    assert listing["path"] == "/v1/models"
    assert [model.id for model in models] == ["test-model"]


def test_reset_forgets_everything(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """reset() clears requests, queue, rules, latency, outage and responder."""
    llm.push_status(500)
    llm.push_status(500)
    llm.fail_when_contains("x", 400)
    llm.set_latency(0.3)
    llm.set_default_status(500)
    llm.set_responder(lambda request: "custom")
    with pytest.raises(openai.InternalServerError):
        ask(client, "y")

    llm.reset()
    started = time.monotonic()
    reply = ask(client, "x")

    assert time.monotonic() - started < 0.25
    assert reply.choices[0].message.content.startswith("Краткая сводка")
    assert llm.request_count == 1


def post_json(url: str, document: object) -> tuple[int, dict[str, Any]]:
    """POST a JSON document and return the status and decoded reply."""
    request = urllib.request.Request(  # noqa: S310 - a loopback http:// URL built by the test
        url, data=json.dumps(document).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def get_json(url: str) -> dict[str, Any]:
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        document: dict[str, Any] = json.loads(response.read())
    return document


def test_control_endpoint_steers_the_server(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """/_control changes behaviour over HTTP; /_stats counts API requests only."""
    root = llm.base_url.removesuffix("/v1")

    assert post_json(f"{root}/_control", {"default_status": 500}) == (200, {"ok": True})
    with pytest.raises(openai.InternalServerError):
        ask(client)
    post_json(f"{root}/_control", {"default_status": None, "fail_when_contains": {"marker": "u_bad", "status": 400}})
    with pytest.raises(openai.BadRequestError):
        ask(client, "u_bad")
    post_json(f"{root}/_control", {"clear_rules": True, "latency": 0.0})
    assert ask(client, "u_bad").choices[0].message.content

    assert get_json(f"{root}/_stats") == {"requests": 3, "batch": {"batches": 0, "files": 0}}
    status, reply = post_json(f"{root}/_control", {"no_such_knob": 1})
    assert status == 400
    assert "no_such_knob" in reply["error"]


def test_named_responders_read_the_butler_prompt(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """The guard modes: each answers the engine's own prompt, chosen over /_control by name."""
    from datetime import UTC, datetime

    from butler_memory.llm.prompt import build_messages
    from butler_memory.llm.summarizer import EventText, SummaryRequest

    events = [EventText("user", "Мою дочь зовут Ольга, ей 7 лет.", datetime(2026, 1, 1, tzinfo=UTC))]
    request = SummaryRequest("u1", "- Меня зовут Анна.\n- Живу в Казани.", events, "ru", 300, 1800)
    root = llm.base_url.removesuffix("/v1")

    def answer(responder: str) -> str:
        assert post_json(f"{root}/_control", {"responder": responder}) == (200, {"ok": True})
        reply = client.chat.completions.create(model="m", messages=build_messages(request), max_tokens=600)  # type: ignore[arg-type]
        return str(reply.choices[0].message.content)

    faithful = answer("faithful")
    assert faithful.startswith("- Меня зовут Анна.\n- Живу в Казани.\n") and "Ольга" in faithful, faithful
    assert "Анна" not in answer("drop_fact") and "Казани" in answer("drop_fact")
    assert "Анна" not in answer("new_only") and "Ольга" in answer("new_only")
    assert answer("wrong_language").startswith("The user talked about")
    status, reply = post_json(f"{root}/_control", {"responder": "no_such_mode"})
    assert status == 400 and "no_such_mode" in reply["error"]


def test_finish_reason_control_cuts_every_reply_and_reset_ends_it(client: openai.OpenAI, llm: FakeOpenAI) -> None:
    """/_control {"finish_reason": "length"} marks responder replies as cut off (qualify's length mode)."""
    root = llm.base_url.removesuffix("/v1")

    assert post_json(f"{root}/_control", {"finish_reason": "length", "responder": "faithful"}) == (200, {"ok": True})
    assert [ask(client).choices[0].finish_reason for _ in range(2)] == ["length", "length"]
    post_json(f"{root}/_control", {"finish_reason": None})
    assert ask(client).choices[0].finish_reason == "stop"
    llm.set_finish_reason("length")
    llm.reset()
    assert ask(client).choices[0].finish_reason == "stop"


def test_faithful_responder_writes_the_asked_language() -> None:
    """Its own words are in the language the prompt asks for (German here), around the kept sentences."""
    from datetime import UTC, datetime

    from butler_memory.llm.prompt import build_messages
    from butler_memory.llm.summarizer import EventText, SummaryRequest
    from tools.fake_openai import faithful_responder

    events = [EventText("user", "Ich wohne jetzt in München.", datetime(2026, 1, 1, tzinfo=UTC))]
    request = SummaryRequest("u1", "", events, "de", 300, 1800)
    reply = faithful_responder({"messages": build_messages(request), "max_tokens": 600})
    assert reply == "- Der Nutzer sagte: Ich wohne jetzt in München.", reply


def test_stop_wakes_hanging_requests() -> None:
    """stop() returns promptly even while a request is parked in push_hang."""
    server = FakeOpenAI().start()
    server.push_hang(60)
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.3) as api:
        with pytest.raises(openai.APITimeoutError):
            ask(api)
        started = time.monotonic()
        server.stop()
        server.stop()
        assert time.monotonic() - started < 2
        with pytest.raises(openai.APIConnectionError):
            ask(api)
    with pytest.raises(RuntimeError, match="was stopped"):
        server.start()


@pytest.mark.slow
def test_standalone_cli(tmp_path: Path) -> None:
    """`python tools/fake_openai.py` prints its URL, obeys /_control and exits 0 on SIGTERM."""
    port = free_port()
    command = [sys.executable, str(REPO / "tools" / "fake_openai.py"), "--port", str(port), "--latency", "0.2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert base_url == f"http://127.0.0.1:{port}/v1"
            root = base_url.removesuffix("/v1")
            with openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0, timeout=5) as api:
                started = time.monotonic()
                assert ask(api).choices[0].message.content.startswith("Краткая сводка")
                assert time.monotonic() - started >= 0.2
                post_json(f"{root}/_control", {"default_status": 500})
                with pytest.raises(openai.InternalServerError):
                    ask(api)
                post_json(f"{root}/_control", {"default_status": None})
                ask(api)
            assert get_json(f"{root}/_stats") == {"requests": 3, "batch": {"batches": 0, "files": 0}}
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
