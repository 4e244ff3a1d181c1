"""Real Airflow services for the benchmarks: scheduler (LocalExecutor), dag-processor, api-server.

Reuses ``tools/standalone.py`` (the components ``make airflow`` runs, loopback only) on a fresh
metadata DB (a new database on the bench's PostgreSQL server, or SQLite under ``.local/bench/airflow``)
with the ``llm_api`` pool; adds what the bench
needs: ``airflow dags trigger``, waiting for the run, and the run's task instance timings read back
from the metadata DB (scheduled/queued/start/end dates), which is where per-task overhead shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from tools.demo import prepare_airflow  # noqa: E402
from tools.services import PostgresService, free_port  # noqa: E402
from tools.standalone import (  # noqa: E402
    READY_TIMEOUT,
    AirflowProcess,
    airflow_processes,
    server_env,
    stop_all,
    wait_healthy,
)

DAG_ID = "memory_compression"
NOOP_DAG_ID = "bench_noop_mapped"
"""``tools/bench_dags/noop_mapped.py``: the same DAG shape whose mapped task only sleeps (Airflow's floor)."""
NOOP_BATCHED_DAG_ID = "bench_noop_batched"
"""``tools/bench_dags/noop_batched.py``: the batched shape (``users_per_task``) whose task only sleeps (the scale
bench's floor)."""
BENCH_DAGS = (
    REPO / "dags" / "memory_compression.py",
    REPO / "tools" / "bench_dags" / "noop_mapped.py",
    REPO / "tools" / "bench_dags" / "noop_batched.py",
)
WAITED_DAGS = (DAG_ID, NOOP_DAG_ID, NOOP_BATCHED_DAG_ID)
TERMINAL_STATES = {"success", "failed"}
TASKS_CPU = "task processes (LocalExecutor workers, supervisors, tasks)"
OTHER_CPU = "not the bench's processes"
STAND_INS = {
    "mongo": "stand-in: MongoDB wire server (secantusd-py)",
    "llm": "stand-in: fake LLM (the bench process, its polling included)",
    "redis": "stand-in: redis-server",
    "postgres": "stand-in: PostgreSQL (Airflow's metadata DB)",
    "trigger": "bench: its `airflow dags trigger` CLI call",
}
"""The CPU components a real deployment does not pay as such (its own MongoDB, LLM, Redis, database),
and the bench's own ``airflow dags trigger`` calls."""
TREE_STAND_INS = {STAND_INS["postgres"]}
"""Stand-ins counted with their child processes (the others' children are measured apart or not at all)."""
CELERY_CPU = "Celery worker (pool processes, supervisors, tasks)"
"""The prefix of a Celery worker's component: counted with its process tree, paid by a deployment."""


def _airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


def parse_ts(value: Any) -> datetime | None:
    """Parse a timestamp as SQLite stores Airflow's UtcDateTime ("2026-01-01 10:00:00.123456[+00:00]")."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value).replace(" ", "T"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class TaskTiming:
    """One task instance's dates, as the scheduler and the execution API recorded them."""

    task_id: str
    map_index: int
    state: str | None
    try_number: int
    scheduled: datetime | None
    queued: datetime | None
    start: datetime | None
    end: datetime | None

    @property
    def duration(self) -> float:
        """Seconds from running to finished (the task process's life, DAG parse included)."""
        return (self.end - self.start).total_seconds() if self.start and self.end else 0.0

    @property
    def queue_wait(self) -> float:
        """Seconds from queued (handed to the executor) to running (the supervisor reported start)."""
        return (self.start - self.queued).total_seconds() if self.start and self.queued else 0.0


@dataclass
class RunTiming:
    """A DAG run's dates and its task instances."""

    run_id: str
    state: str
    start: datetime
    end: datetime
    tasks: list[TaskTiming] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Seconds from the run's start (running) to its end, as the scheduler recorded them."""
        return (self.end - self.start).total_seconds()


class AirflowServices:
    """API server, scheduler (LocalExecutor) and DAG processor on a fresh metadata DB: a new database
    on ``postgres`` when given, else SQLite in ``home``.

    Started with ``tools/standalone.py``'s helpers (the components ``make airflow`` and the e2e test
    run, loopback only), plus: no scheduled runs (only the bench's triggered ones), DAGs unpaused.
    """

    def __init__(
        self,
        home: Path,
        *,
        conn_env: Mapping[str, str],
        pool_slots: int = 8,
        parallelism: int = 8,
        extra_env: Mapping[str, str] | None = None,
        postgres: PostgresService | None = None,
    ) -> None:
        self.home = home
        self.postgres = postgres
        self.pg_database: str | None = None
        self.dags_folder = home / "dags"
        self.pool_slots = pool_slots
        self.parallelism = parallelism
        self.api_port = free_port()
        self.env = server_env(home, port=self.api_port, connections=conn_env, parallelism=parallelism)
        self.env.update(
            {
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(max(parallelism, 16)),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                # Only the triggered runs: no scheduled run competes with them (max_active_runs=1).
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
                "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
                # The package's DAG and the no-op one (a folder of copies: the repo's dags/ stays as it is).
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            }
        )
        self.env.update(extra_env or {})
        self.processes: list[AirflowProcess] = []
        self.prepare_seconds = 0.0
        self.start_seconds = 0.0

    @property
    def db_path(self) -> Path:
        """Return the SQLite metadata DB."""
        return self.home / "airflow.db"

    @property
    def metadata_db(self) -> str:
        """Say which database Airflow runs on."""
        return "PostgreSQL" if self.postgres is not None else "SQLite"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> Self:
        """Migrate a fresh metadata DB, create the pool, start the services, wait for the DAG."""
        shutil.rmtree(self.home, ignore_errors=True)
        started = time.monotonic()
        self.dags_folder.mkdir(parents=True)
        for dag_file in BENCH_DAGS:
            shutil.copy(dag_file, self.dags_folder / dag_file.name)
        if self.postgres is not None:
            self.pg_database = f"bench_{uuid.uuid4().hex[:8]}"
            template = migrated_template(
                self.postgres,
                self.pool_slots,
                lambda url: prepare_airflow(
                    self.home, {**self.env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}, pool_slots=self.pool_slots
                ),
            )
            url = self.postgres.create_database(self.pg_database, template=template)
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = url
        else:
            prepare_airflow(self.home, self.env, pool_slots=self.pool_slots)
        self.prepare_seconds = time.monotonic() - started
        started = time.monotonic()
        self.processes = airflow_processes(self.env, self.home / "service-logs")
        try:
            for process in self.processes:
                process.start()
            wait_healthy(f"http://127.0.0.1:{self.api_port}", self.processes, timeout=timeout)
            self._wait_dag(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_dag(self, deadline: float) -> None:
        """Wait for the DAG processor's first serialisation of the bench's DAGs."""
        marks = ", ".join("?" for _ in WAITED_DAGS)
        while time.monotonic() < deadline:
            self._check_alive()
            found = self._query(
                f"SELECT COUNT(DISTINCT dag_id) FROM serialized_dag WHERE dag_id IN ({marks})",  # noqa: S608 (? marks)
                WAITED_DAGS,
            )
            if found and found[0][0] == len(WAITED_DAGS):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{'/'.join(WAITED_DAGS)} not parsed in time; logs in {self.home / 'service-logs'}")

    def _check_alive(self) -> None:
        for process in self.processes:
            code = process.exit_code()
            if code is not None:
                raise RuntimeError(f"airflow {process.name} exited with code {code}:\n{process.log_tail(3000)}")

    def stop(self) -> None:
        """Stop every service's process group; idempotent."""
        processes, self.processes = self.processes, []
        stop_all(processes)

    def __enter__(self) -> Self:
        """Start the services."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the services."""
        self.stop()

    # -- processes, for the CPU profile ----------------------------------------------------------

    def service_processes(self) -> dict[str, list[psutil.Process]]:
        """Return each service's process tree (LocalExecutor workers and task processes included)."""
        trees: dict[str, list[psutil.Process]] = {}
        for process in self.processes:
            if process.pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(process.pid)
                trees[process.name] = [root, *root.children(recursive=True)]
        return trees

    # -- runs ------------------------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        """Run ``airflow <args>`` with the services' environment; return its output, raise on failure."""
        proc = subprocess.run(
            [_airflow_bin(), *args], env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"airflow {' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc.stdout

    def trigger(self, run_id: str, conf: Mapping[str, Any] | None = None, dag_id: str = DAG_ID) -> None:
        """Trigger a run of the DAG through the CLI."""
        self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(dict(conf or {})))

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the metadata DB (read-only)."""
        return self._query(sql, args)

    def run_state(self, run_id: str, dag_id: str = DAG_ID) -> str | None:
        """Return the DAG run's state, None before it exists."""
        rows = self._query("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
        return rows[0][0] if rows else None

    def wait_run(
        self,
        run_id: str,
        timeout: float,
        poll: float = 0.5,
        dag_id: str = DAG_ID,
        progress: Callable[[str], None] | None = None,
        every: float = 30.0,
    ) -> str:
        """Wait until the run succeeds or fails; return its state (raise TimeoutError after timeout).

        With ``progress``, a line every ``every`` seconds says how far the run is (a long run on a
        slow machine is then visibly alive, and how far it got is in the output if it times out).
        """
        started = time.monotonic()
        deadline = started + timeout
        next_report = started + every
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.run_state(run_id, dag_id)
            if state in TERMINAL_STATES:
                return state
            if progress is not None and time.monotonic() >= next_report:
                next_report += every
                progress(
                    f"run {run_id}: {state}, {self.tasks_done(run_id, dag_id)}, {time.monotonic() - started:.0f} s"
                )
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} not finished within {timeout:.0f}s (state {self.run_state(run_id, dag_id)})")

    def tasks_done(self, run_id: str, dag_id: str = DAG_ID) -> str:
        """Return "N of M task instances finished" for a run."""
        rows = self._query("SELECT state FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id))
        done = sum(1 for (state,) in rows if state in ("success", "failed", "skipped", "upstream_failed"))
        return f"{done} of {len(rows)} task instances finished"

    def run_timing(self, run_id: str, dag_id: str = DAG_ID) -> RunTiming:
        """Read the run's and its task instances' dates from the metadata DB."""
        run = self._query(
            "SELECT state, start_date, end_date FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
        )[0]
        rows = self._query(
            "SELECT task_id, map_index, state, try_number, scheduled_dttm, queued_dttm, start_date, end_date "
            "FROM task_instance WHERE dag_id = ? AND run_id = ? ORDER BY start_date",
            (dag_id, run_id),
        )
        tasks = [
            TaskTiming(
                r[0], int(r[1]), r[2], int(r[3] or 0), parse_ts(r[4]), parse_ts(r[5]), parse_ts(r[6]), parse_ts(r[7])
            )
            for r in rows
        ]
        start, end = parse_ts(run[1]), parse_ts(run[2])
        assert start is not None and end is not None, f"run {run_id} has no start/end date"
        return RunTiming(run_id=run_id, state=run[0], start=start, end=end, tasks=tasks)

    def run_footprint(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, Any]:
        """Return what one run left in the metadata DB: rows and bytes (PostgreSQL's ``pg_column_size``
        of each row; rows only on SQLite) of every table with ``dag_id`` and ``run_id`` columns, and
        the bytes of its task log files."""
        if self.postgres is not None:
            names = self._query(
                "SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND column_name IN ('dag_id', 'run_id') GROUP BY table_name HAVING COUNT(*) = 2 ORDER BY 1"
            )
            size = "coalesce(sum(pg_column_size(t.*)), 0)"
        else:
            names = self._query(
                "SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) c WHERE m.type = 'table' "
                "AND c.name IN ('dag_id', 'run_id') GROUP BY m.name HAVING COUNT(*) = 2 ORDER BY 1"
            )
            size = "0"
        tables: dict[str, dict[str, int]] = {}
        for (table,) in names:
            rows, nbytes = self._query(
                f"SELECT count(*), {size} FROM {table} t WHERE dag_id = ? AND run_id = ?",  # noqa: S608 - catalogue names
                (dag_id, run_id),
            )[0]
            if rows:
                tables[table] = {"rows": int(rows), "bytes": int(nbytes)}
        logs = [f for d in self.home.rglob(f"run_id={run_id}") for f in d.rglob("*") if f.is_file()]
        return {
            "tables": tables,
            "rows": sum(t["rows"] for t in tables.values()),
            "bytes": sum(t["bytes"] for t in tables.values()),
            "log_files": len(logs),
            "log_bytes": sum(f.stat().st_size for f in logs),
        }

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query (``?`` placeholders) on the metadata DB; [] before its tables exist."""
        if self.postgres is not None:
            return self._query_postgres(sql.replace("?", "%s"), args)
        if not self.db_path.exists():
            return []
        for attempt in range(10):
            try:
                with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)) as db:
                    return list(db.execute(sql, args))
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                if attempt == 9:
                    raise
                time.sleep(0.2)
        return []

    def _query_postgres(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        import psycopg2

        assert self.postgres is not None and self.pg_database is not None
        try:
            with contextlib.closing(self.postgres.connect(self.pg_database)) as conn, conn.cursor() as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except psycopg2.errors.UndefinedTable:
            return []


def migrated_template(postgres: PostgresService, pool_slots: int, prepare: Callable[[str], None]) -> str:
    """Return the database on ``postgres`` that every installation with ``pool_slots`` copies its
    metadata DB from, made by ``prepare(url)`` (``airflow db migrate`` and ``airflow pools set``) the
    first time it is asked for.

    A copy (``CREATE DATABASE ... TEMPLATE``) is the migrated database, a second migration costs 5 to
    20 s of CLI. Nothing connects to the template after ``prepare``, so it can be copied. The migration
    does not depend on what the installations differ by (executor, ``BASELINE_ENV``, Celery's broker).
    """
    name = f"bench_template_pool{pool_slots}"
    if not postgres.has_database(name):
        partial = f"{name}_partial"  # renamed once migrated: a failed migration is never copied
        if postgres.has_database(partial):
            with contextlib.closing(postgres.connect()) as conn, conn.cursor() as cur:
                cur.execute(f'DROP DATABASE "{partial}"')
        prepare(postgres.create_database(partial))
        with contextlib.closing(postgres.connect()) as conn, conn.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{partial}" RENAME TO "{name}"')
    return name


class InTurn:
    """Airflow installations one after another, each starting while the one before stops.

    ``with in_turn.start(services) as airflow:`` starts ``services`` while the previous installation's
    processes are still stopping (their graceful shutdown takes 5-15 s), then waits until they have
    ended before the block runs: no run shares the cores with an installation that is stopping.
    Leaving the block starts its stop in the background; leaving ``with InTurn()`` waits for it.
    """

    def __init__(self) -> None:
        self._stopping: threading.Thread | None = None

    def wait(self) -> None:
        """Wait until the previous installation has stopped."""
        stopping, self._stopping = self._stopping, None
        if stopping is not None:
            stopping.join()

    @contextlib.contextmanager
    def start(self, services: AirflowServices, *, last: bool = False) -> Iterator[AirflowServices]:
        """Start ``services``, wait for the previous installation's stop, run the block, stop in the
        background (``last``: stop before leaving, e.g. before a broker it needs goes)."""
        try:
            services.start()
        finally:
            self.wait()
        try:
            yield services
        finally:
            if last:
                services.stop()
            else:
                self._stopping = threading.Thread(target=services.stop, name=f"stop {services.home.name}")
                self._stopping.start()

    def __enter__(self) -> Self:
        """Nothing to start."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Wait for the last installation's stop."""
        self.wait()


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


# -- where the CPU goes during a run -------------------------------------------------------------


def proc_cpu(proc: psutil.Process, *, children: bool = True) -> float:
    """Return a process's CPU seconds, plus those of its reaped children when asked."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    own = times.user + times.system
    return own + (times.children_user + times.children_system if children else 0.0)


def reaped_children_cpu() -> float:
    """Return the CPU seconds of this process's ended and waited-for children (e.g. a CLI call)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> tuple[float, float]:
    """Return (busy CPU seconds, total CPU seconds) of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def cpu_snapshot(services: AirflowServices, others: Mapping[str, int | None]) -> dict[str, float]:
    """Return cumulative CPU seconds per component: each Airflow service's main process, the
    scheduler's descendants (LocalExecutor workers, supervisors, task processes), the other
    named processes (MongoDB server, the bench with its fake LLM), and the whole machine."""
    snap: dict[str, float] = {}
    for name, tree in services.service_processes().items():
        root, *rest = tree
        snap[f"airflow {name} (main process)"] = proc_cpu(root, children=False)
        # Reaped children's time is in the parent's children_* fields, so count it once per level.
        below = sum(proc_cpu(p) for p in rest) + (proc_cpu(root) - proc_cpu(root, children=False))
        key = (
            "task processes (LocalExecutor workers, supervisors, tasks)"
            if name == "scheduler"
            else f"airflow {name} (children)"
        )
        snap[key] = below
    for name, pid in others.items():
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                snap[name] = proc_cpu(root)
                if name in TREE_STAND_INS or name.startswith(CELERY_CPU):
                    # postgres serves each connection from a child process: live ones are counted here,
                    # ended ones are in the root's children_* fields.
                    snap[name] += sum(proc_cpu(p, children=False) for p in root.children(recursive=True))
    snap["machine busy"], snap["machine total"] = machine_busy_seconds()
    return snap


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Return per-component CPU seconds spent between two snapshots, and what no component explains
    (other processes on the machine, e.g. another engineer's test suite)."""
    delta = {k: round(after[k] - before.get(k, 0.0), 2) for k in after}
    known = sum(v for k, v in delta.items() if not k.startswith("machine"))
    delta[OTHER_CPU] = round(max(delta["machine busy"] - known, 0.0), 2)
    return delta
