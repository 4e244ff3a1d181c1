"""Root test configuration: a throwaway Airflow home and the real services every test tier shares.

Airflow's metadata DB for the session is a database on a PostgreSQL server started here, before
Airflow is first imported (Debian's postgresql; SQLite when it is not installed, and then the tests
that need PostgreSQL skip, or fail under CI=true). The real-scheduler tests create databases of
their own on the same server.

Servers (MongoDB wire server, redis-server, a StatsD UDP sink, a fake OpenAI endpoint) start once
per session, on 127.0.0.1 only, and only when a test asks for them; each test gets a fresh Mongo
database, a flushed Redis, a cleared sink and a reset LLM. Airflow is never imported here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest
import redis
from pymongo.database import Database

from tools import parts
from tools.fake_openai import FakeOpenAI
from tools.services import (
    AirflowConns,
    MongoService,
    PostgresService,
    RedisService,
    StatsdSink,
    airflow_connection_env,
)

REPO = Path(__file__).resolve().parent.parent
# Variables from the developer's shell that would leak into the suite: Airflow settings and
# connections, and the OpenAI fallback (a real key here would send test traffic to the internet).
HERMETIC_PREFIXES = ("AIRFLOW", "OPENAI_")
_home_key = pytest.StashKey[Path]()
_saved_env_key = pytest.StashKey[dict[str, str | None]]()
_postgres_key = pytest.StashKey[PostgresService | None]()


def airflow_test_env(home: Path, sql_alchemy_conn: str | None = None) -> dict[str, str]:
    """Return the Airflow settings every test process (and subprocess) runs with."""
    from cryptography.fernet import Fernet

    return {
        "AIRFLOW_HOME": str(home),
        # Loads Airflow's unit_tests.cfg instead of airflow.cfg; the variables below still win.
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_alchemy_conn or f"sqlite:///{home / 'airflow.db'}",
        # unit_tests.cfg draws both secrets at random per process; pin them so a Variable
        # encrypted here decrypts in an `airflow` subprocess, and tokens verify across processes.
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        # The test populations (tests/population.py, the CLI's users) write English; the language
        # guard holds summaries to this language.
        "BUTLER_MEMORY_SUMMARY_LANGUAGE": "en",
    }


def pytest_configure(config: pytest.Config) -> None:
    """Point Airflow at a temporary home before anything imports it."""
    if "airflow" in sys.modules:
        raise pytest.UsageError(
            "airflow was imported before tests/conftest.py configured AIRFLOW_HOME; "
            "import airflow inside fixtures and tests, not at the top of a conftest.py"
        )
    home = Path(tempfile.mkdtemp(prefix="butler-airflow-home-"))
    bindir = parts.POSTGRESQL.find()
    postgres = PostgresService(home / "postgres", bindir) if bindir is not None else None
    config.stash[_postgres_key] = postgres
    env = airflow_test_env(home, postgres.create_database("airflow_session") if postgres else None)
    leaked = [name for name in os.environ if name.startswith(HERMETIC_PREFIXES)]
    config.stash[_saved_env_key] = {name: os.environ.get(name) for name in [*leaked, *env]}
    for name in leaked:
        del os.environ[name]
    os.environ.update(env)
    config.stash[_home_key] = home
    plugins = str(REPO / "plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore the environment and delete the temporary Airflow home."""
    for name, value in config.stash.get(_saved_env_key, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    postgres = config.stash.get(_postgres_key, None)
    if postgres is not None:
        postgres.stop()
    home = config.stash.get(_home_key, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class AirflowHome:
    """The session's Airflow home and its migrated metadata database (PostgreSQL, else SQLite)."""

    home: Path
    db_path: Path
    sql_alchemy_conn: str
    migrate_seconds: float


@pytest.fixture(scope="session")
def airflow_db(pytestconfig: pytest.Config) -> AirflowHome:
    """Migrate the session's metadata database once, with `airflow db migrate`."""
    home = pytestconfig.stash[_home_key]
    started = time.monotonic()
    # A subprocess keeps Airflow's import-time setup and migration warnings out of this process.
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`airflow db migrate` failed with code {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return AirflowHome(
        home=home,
        db_path=home / "airflow.db",
        sql_alchemy_conn=os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        migrate_seconds=time.monotonic() - started,
    )


def require_part(part: parts.Part) -> Path:
    """Return where a system part is; a missing one fails the test under CI=true, else skips it with the reason."""
    path = part.find()
    if path is None:
        if parts.in_ci():
            pytest.fail(f"{part.missing_reason()}; CI=true: a missing part fails, never skips", pytrace=False)
        pytest.skip(part.missing_reason())
    return path


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Return Debian's chromium (tools/parts.py)."""
    return require_part(parts.CHROMIUM)


@pytest.fixture(scope="session")
def promtool_path() -> Path:
    """Return promtool (tools/parts.py)."""
    return require_part(parts.PROMTOOL)


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    """Return the PostgreSQL bin directory (tools/parts.py)."""
    return require_part(parts.POSTGRESQL)


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> PostgresService:
    """Return the session's PostgreSQL server (started in pytest_configure); skip/fail without one."""
    service = pytestconfig.stash.get(_postgres_key, None)
    if service is None:
        require_part(parts.POSTGRESQL)
        raise AssertionError("PostgreSQL is installed but was not started")  # pragma: no cover
    return service


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a session directory for server data and logs."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def mongo_service(services_dir: Path) -> Iterator[MongoService]:
    """Run the embedded MongoDB wire-protocol server for the session."""
    with MongoService(services_dir / "mongo") as service:
        yield service


@pytest.fixture(scope="session")
def redis_service(services_dir: Path) -> Iterator[RedisService]:
    """Run redis-server for the session."""
    with RedisService(services_dir / "redis") as service:
        yield service


@pytest.fixture(scope="session")
def statsd_sink() -> Iterator[StatsdSink]:
    """Listen for StatsD datagrams for the session."""
    with StatsdSink() as sink:
        yield sink


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeOpenAI]:
    """Serve the fake OpenAI API for the session."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="session")
def mongo_client(mongo_service: MongoService) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    """Return one pymongo client for the session."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_service.uri)
    yield client
    client.close()


@pytest.fixture
def llm(fake_llm: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """Return the session's fake OpenAI server, reset before and after the test."""
    fake_llm.reset()
    yield fake_llm
    fake_llm.reset()


def _db_name(node_name: str) -> str:
    """Return a unique, valid MongoDB database name that still says which test made it."""
    readable = re.sub(r"[^A-Za-z0-9_]", "_", node_name)[:40]
    return f"t_{readable}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mongo_db(
    mongo_client: pymongo.MongoClient[dict[str, Any]], request: pytest.FixtureRequest
) -> Iterator[Database[dict[str, Any]]]:
    """Return a database of its own for this test, dropped afterwards."""
    db = mongo_client[_db_name(request.node.name)]
    yield db
    mongo_client.drop_database(db.name)


@pytest.fixture
def redis_client(redis_service: RedisService) -> Iterator[redis.Redis]:
    """Return a client on database 0 of the session's Redis, after flushing every database."""
    client = redis_service.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def statsd(statsd_sink: StatsdSink) -> StatsdSink:
    """Return the session's StatsD sink with nothing recorded yet."""
    statsd_sink.clear()
    return statsd_sink


@pytest.fixture(scope="session")
def connection_env(
    mongo_service: MongoService, redis_service: RedisService, statsd_sink: StatsdSink, fake_llm: FakeOpenAI
) -> Callable[..., dict[str, str]]:
    """Return airflow_connection_env bound to the session's services (Redis database 0): call it with
    ``db=`` the MongoDB database's name for the AIRFLOW_CONN_* variables."""
    return functools.partial(
        airflow_connection_env,
        mongo=mongo_service,
        redis=redis_service,
        statsd=statsd_sink,
        llm_base_url=fake_llm.base_url,
        llm_model=fake_llm.model,
    )


@pytest.fixture
def airflow_conns(
    monkeypatch: pytest.MonkeyPatch,
    connection_env: Callable[..., dict[str, str]],
    mongo_service: MongoService,
    mongo_db: Database[dict[str, Any]],
    redis_service: RedisService,
    redis_client: redis.Redis,
    statsd: StatsdSink,
    llm: FakeOpenAI,
) -> AirflowConns:
    """Set mongo_default, redis_default, statsd_default and openai_default for this test."""
    env = connection_env(db=mongo_db.name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AirflowConns(
        db_name=mongo_db.name,
        mongo_uri=mongo_service.uri,
        redis_url=redis_service.url,
        redis_db=0,
        statsd_host=statsd.host,
        statsd_port=statsd.port,
        llm_base_url=llm.base_url,
        llm_model=llm.model,
        env=env,
    )
