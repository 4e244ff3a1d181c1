"""Run Airflow's UI and scheduler on the embedded services: ``make airflow``.

Starts the embedded MongoDB wire-protocol server and redis-server on free loopback ports, seeds
synthetic Butler users, migrates the SQLite metadata DB under ``.local/airflow``, then runs what
``airflow standalone`` runs (API server, scheduler with the LocalExecutor, DAG processor), each in a
process group of its own, with the connections pointing at those services. Prints the UI address
and the admin password, runs until Ctrl-C or SIGTERM, then stops every group and the services.

Why not ``airflow standalone`` itself: its scheduler always starts the worker log server on every
interface (``0.0.0.0:8793``, host hard-coded) and it offers no way to pass ``--skip-serve-logs``;
here everything listens on 127.0.0.1 only. The API server reads task logs from the shared log
folder, so nothing is lost. The triggerer runs the catch-up DAG's asset watcher (the doorbell).

The same helpers (``airflow_processes``, ``server_env``, ``wait_healthy``, ``stop_all``) start and
stop Airflow for the end-to-end test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Self

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from tools.demo import LOCAL, airflow_env, embedded_butler, prepare_airflow  # noqa: E402
from tools.services import LOOPBACK  # noqa: E402

DEFAULT_PORT = 8080
PARALLELISM = 4
"""Task slots of the LocalExecutor: a laptop (or a 2-core CI machine) stays responsive."""
# A cold start of scheduler, DAG processor and API server takes 10-30 s on 2 cores; 180 s absorbs
# a loaded machine without hanging forever on a broken one.
READY_TIMEOUT = 180.0
# The scheduler waits for running task processes on SIGTERM; past this, the groups are killed.
STOP_TIMEOUT = 30.0
LOG_TAIL_CHARS = 6000
TUNING = {
    # A worker's supervisor can wait up to this long after its task ended before taking the next
    # one (default 5 s); at 1 s, 200 short mapped tasks run 2.1x faster (docs/benchmarks.md).
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
    # An idle scheduler loop sleeps this long (default 1 s) before it refills freed pool slots. Costs
    # 2.3 CPU-s a minute when idle, so docker-compose.yaml leaves it opt-in (commented out there).
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
}
"""Airflow settings for many short mapped tasks (docs/deployment.md, throughput settings)."""
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
"""Where Airflow 3's SimpleAuthManager keeps the generated passwords, under AIRFLOW_HOME."""


def server_env(
    home: Path,
    *,
    port: int,
    connections: Mapping[str, str],
    parallelism: int = PARALLELISM,
) -> dict[str, str]:
    """Return the environment of the Airflow processes: the demo's (home, folders, SQLite) plus the
    API server address, the executor and the given connections.

    Connections and OpenAI settings of the caller's environment are dropped (only ``connections``
    count), and so is Airflow's unit-test mode, which the test suite sets for its own process: it
    would load ``unit_tests.cfg`` (DAGs unpaused at creation, data-interval timetables).
    """
    env = airflow_env(home)
    for name in list(env):
        if name.startswith(("AIRFLOW_CONN_", "OPENAI_")) or name == "AIRFLOW__CORE__UNIT_TEST_MODE":
            del env[name]
    env.update(
        {
            **TUNING,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__WORKERS": "1",
            # Task processes report to the execution API of this API server, not the default localhost:8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOOPBACK}:{port}/execution/",
            **connections,
        }
    )
    return env


def _log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return text[-chars:] or f"(empty log at {path})"


class AirflowProcess:
    """One ``airflow <command>`` in a process group of its own, logging to a file."""

    def __init__(self, name: str, args: Iterable[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.args = [str(Path(sys.executable).parent / "airflow"), *args]
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Spawn the command; its children (executor workers, task processes) share its group."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        """Return the process id (also the process group id) while it runs."""
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        """Return the exit code once the process has ended, else None."""
        return self._proc.poll() if self._proc is not None else None

    def terminate(self) -> None:
        """Send SIGTERM to the whole process group."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL for whatever is left after timeout s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        # The leader may be gone while a task process it spawned still runs: kill the group regardless.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """Return the end of the process's log."""
        return _log_tail(self.log_path, chars)


COMPONENTS = {
    "api-server": ["api-server"],
    # The worker log server would listen on every interface; the API server reads the log folder.
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    # Runs the doorbell's AssetWatcher (memory_compression_catchup); no log server either.
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
"""What ``airflow standalone`` runs."""


def airflow_processes(env: Mapping[str, str], log_dir: Path) -> list[AirflowProcess]:
    """Return the Airflow components, not started, each logging to ``log_dir/<name>.log``."""
    return [AirflowProcess(name, args, env, log_dir / f"{name}.log") for name, args in COMPONENTS.items()]


@contextlib.contextmanager
def celery_worker(
    env: Mapping[str, str], log_path: Path, args: Iterable[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``airflow celery worker [args]`` (own process group, no log server) for the ``with`` block;
    its output goes to ``log_path``. On exit, SIGTERM to the group, SIGKILL after ``STOP_TIMEOUT``."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "celery", "worker", "--skip-serve-logs", *args],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def celery_pool(
    worker: subprocess.Popen[bytes], size: int, log_path: Path, timeout: float = READY_TIMEOUT
) -> list[psutil.Process]:
    """Wait until a ``celery_worker`` has forked ``size`` prefork pool processes (titled
    ``[celeryd: ...:ForkPoolWorker-N]``; the worker's other children are Airflow's helpers) and they
    have settled; return them. Raise RuntimeError, with the log's tail, if it exits or times out."""
    root = psutil.Process(worker.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"celery worker exited {worker.returncode}:\n{_log_tail(log_path)}")
        if len([p for p in root.children() if "ForkPoolWorker" in p.name()]) >= size:
            time.sleep(2.0)  # let every pool process finish its own start-up
            return [p for p in root.children() if "ForkPoolWorker" in p.name()]
        time.sleep(0.5)
    raise RuntimeError(f"celery worker forked no pool of {size} within {timeout:.0f}s:\n{_log_tail(log_path)}")


def stop_all(processes: Iterable[AirflowProcess], timeout: float = STOP_TIMEOUT) -> dict[str, int | None]:
    """Stop every process group at once (SIGTERM to all, then each is waited for, then SIGKILL)."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + timeout
    return {p.name: p.stop(max(0.0, deadline - time.monotonic())) for p in processes}


def fetch_json(url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document without authentication (the health endpoint needs none)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  # a loopback http:// URL we built
        return json.load(response)


def wait_healthy(
    base_url: str,
    processes: Iterable[AirflowProcess],
    *,
    components: Iterable[str] = ("metadatabase", "scheduler", "dag_processor", "triggerer"),
    timeout: float = READY_TIMEOUT,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Wait until ``/api/v2/monitor/health`` reports the components healthy; raise with log tails if
    a process exits or time runs out. Return {} at once when ``stop`` is set."""
    processes = list(processes)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return {}
        for process in processes:
            code = process.exit_code()
            if code is not None:
                raise RuntimeError(
                    f"airflow {process.name} exited with code {code} during startup; "
                    f"log {process.log_path}:\n{process.log_tail()}"
                )
        try:
            health = fetch_json(f"{base_url}/api/v2/monitor/health")
            last = health
            if all((health.get(c) or {}).get("status") == "healthy" for c in components):
                return dict(health)
        except (OSError, ValueError) as exc:  # not listening yet, or a half-started server
            last = exc
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail()}" for p in processes)
    raise TimeoutError(f"Airflow at {base_url} not healthy within {timeout:.0f}s (last: {last!r})\n{tails}")


def admin_password(home: Path, timeout: float = 30.0) -> str:
    """Return the admin password SimpleAuthManager generated under home (waiting for the file)."""
    path = home / PASSWORDS_FILE
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(json.loads(path.read_text())["admin"])
        except (FileNotFoundError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


def main(argv: list[str] | None = None) -> int:
    """Run Airflow standalone on the embedded services until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"API server/UI port (default {DEFAULT_PORT})")
    parser.add_argument("--users", type=int, default=300, help="synthetic users to seed (default 300)")
    parser.add_argument("--parallelism", type=int, default=PARALLELISM, help="concurrent tasks (default 4)")
    args = parser.parse_args(argv)
    if _port_in_use(args.port):
        print(f"!! port {args.port} on {LOOPBACK} is in use; pick another with --port", file=sys.stderr)
        return 2

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    home = LOCAL / "airflow"
    print(f"==> Airflow home {home} (SQLite); migrating and creating pool llm_api", flush=True)
    prepare_airflow(home, server_env(home, port=args.port, connections={}), pool_slots=8)

    with embedded_butler(LOCAL / "standalone-services", args.users) as (_mongo, _planted, connections):
        env = server_env(home, port=args.port, connections=connections, parallelism=args.parallelism)
        processes = airflow_processes(env, LOCAL / "airflow-logs")
        print(f"==> Starting {', '.join(p.name for p in processes)} (logs: {LOCAL / 'airflow-logs'})", flush=True)
        try:
            for process in processes:
                process.start()
            return _serve(processes, home, f"http://{LOOPBACK}:{args.port}", stop)
        finally:
            print("==> Stopping Airflow (SIGTERM to each process group), then MongoDB and Redis", flush=True)
            codes = stop_all(processes)
            print("==> Exit codes: " + ", ".join(f"{name} {code}" for name, code in codes.items()), flush=True)


def _serve(processes: list[AirflowProcess], home: Path, url: str, stop: threading.Event) -> int:
    """Print the address and password once Airflow is healthy, then wait for a stop request."""
    try:
        if not wait_healthy(url, processes, stop=stop):
            return 0  # stopped while starting
    except (RuntimeError, TimeoutError) as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 1
    password = admin_password(home)
    print()
    print(f"    Airflow UI:  {url}")
    print(f"    User:        admin   password: {password}   (from {home / PASSWORDS_FILE})")
    print("    DAG:         memory_compression is paused. Unpause it to run: that starts today's scheduled")
    print("                 run at once; runs you trigger (with params) wait in 'queued' while it is paused.")
    print("                 memory_compression_catchup (every 5 min + the doorbell) is paused too.")
    print("    Ctrl-C stops Airflow and the services.")
    print(flush=True)
    while not stop.wait(1.0):
        for process in processes:
            code = process.exit_code()
            if code is not None:
                print(f"!! airflow {process.name} exited with code {code}:\n{process.log_tail()}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
