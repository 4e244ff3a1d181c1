"""What every benchmark in tools/ shares: the stand-in services, Airflow on them, phases, results.

- :func:`stand_ins` starts the MongoDB wire server, redis-server and the fake LLM (and, when asked,
  PostgreSQL with its durable defaults, as a deployment runs it) in one data folder, loopback only;
- :func:`airflow_on` makes the Airflow services (tools/bench_airflow.py) that run on them;
- :func:`run_phase` runs one phase into the results, records a phase that ran out of time and
  writes the figures so far (:func:`write_results`, atomic) as each phase ends;
- :class:`Log` prints progress lines with the seconds since the benchmark started.

The charts are drawn by tools/bench_svg.py and written by tools/bench_report.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from tools.bench_airflow import AirflowServices  # noqa: E402
from tools.fake_openai import FakeOpenAI  # noqa: E402
from tools.services import MongoService, PostgresService, RedisService, airflow_connection_env  # noqa: E402

OUT_DIR = REPO / ".local" / "bench"
"""Where the benchmarks keep their services' data, Airflow homes and results by default."""

Doc = dict[str, Any]


class Log:
    """Print progress lines prefixed with the seconds since this log was made (the benchmark's start)."""

    def __init__(self, name: str = "") -> None:
        self.started = time.monotonic()
        self.prefix = f"{name} " if name else ""

    def elapsed(self) -> float:
        """Return the seconds since the start."""
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        """Print one line."""
        print(f"[{self.prefix}{self.elapsed():6.1f}s] {message}", flush=True)


log = Log()
"""The log of the benchmark this process runs."""


@dataclass
class Stack:
    """The stand-ins a benchmark runs on: what a deployment brings itself (MongoDB, Redis, an LLM,
    Airflow's metadata database)."""

    mongo: MongoService
    redis: RedisService
    fake: FakeOpenAI
    client: pymongo.MongoClient[Doc]
    postgres: PostgresService | None = None


@contextlib.contextmanager
def stand_ins(data: Path, *, pg_bindir: Path | None = None) -> Iterator[Stack]:
    """Start the stand-ins in a fresh ``data`` folder (PostgreSQL only with ``pg_bindir``); stop them on exit."""
    shutil.rmtree(data, ignore_errors=True)
    with (
        MongoService(data / "mongo") as mongo,
        RedisService(data / "redis") as redis_srv,
        FakeOpenAI() as fake,
        mongo.client() as client,
        contextlib.ExitStack() as stack,
    ):
        # PostgreSQL's defaults (fsync on), as a deployment runs it.
        postgres = (
            stack.enter_context(PostgresService(data / "postgres", pg_bindir, durable=True)) if pg_bindir else None
        )
        yield Stack(mongo=mongo, redis=redis_srv, fake=fake, client=client, postgres=postgres)


def airflow_on(
    stack: Stack,
    home: Path,
    db: str,
    *,
    pool_slots: int = 8,
    parallelism: int = 8,
    extra_env: Mapping[str, str] | None = None,
    sqlite: bool = False,
) -> AirflowServices:
    """Airflow services in ``home`` (not started yet) whose connections point at the stand-ins and
    the MongoDB database ``db``: on a fresh database of the stack's PostgreSQL when it has one (as a
    deployment runs it), else, or when ``sqlite``, on SQLite."""
    conn_env = airflow_connection_env(
        mongo=stack.mongo, db=db, redis=stack.redis, statsd=None, llm_base_url=stack.fake.base_url
    )
    return AirflowServices(
        home,
        conn_env=conn_env,
        pool_slots=pool_slots,
        parallelism=parallelism,
        extra_env=extra_env,
        postgres=None if sqlite else stack.postgres,
    )


# -- phases and results ---------------------------------------------------------------------------


class Budget:
    """A wall-clock budget: phases ask how much is left before starting expensive work."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        """Return the seconds left."""
        return self.deadline - time.monotonic()


def timed_out(record: object) -> bool:
    """Whether a phase's record says it ran out of time."""
    return isinstance(record, dict) and record.get("timed_out") is True


def timed_out_phases(results: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (dotted name, record) of every phase that timed out, nested ones included."""
    for key, value in results.items():
        if isinstance(value, dict):
            if timed_out(value):
                yield f"{prefix}{key}", value
            else:
                yield from timed_out_phases(value, f"{prefix}{key}.")


def write_results(results: Mapping[str, Any], out: Path) -> None:
    """Write the figures so far to ``out`` (atomically: a kill never leaves half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    partial.replace(out)


def run_phase(
    results: dict[str, Any], key: str, phase: Callable[[], Any], *, save: Callable[[], None] | None = None
) -> None:
    """Run one phase into ``results[key]``; ``save`` the figures so far as it ends.

    A phase that runs out of time (a slower machine: a run's wait guard raises TimeoutError) is
    recorded as ``{"timed_out": true, ...}`` and the benchmark goes on, so the other figures are
    still measured and reported.
    """
    started = time.monotonic()
    log(f"phase {key}: started")
    try:
        results[key] = phase()
    except TimeoutError as exc:
        results[key] = {"timed_out": True, "error": str(exc), "seconds": round(time.monotonic() - started, 1)}
        log(f"phase {key}: TIMED OUT after {time.monotonic() - started:.0f} s ({exc}); the other phases go on")
    else:
        log(f"phase {key}: done in {time.monotonic() - started:.0f} s")
    if save is not None:
        save()


def shown(path: Path) -> str:
    """Return ``path`` relative to the repository when it is inside it (as the docs name it)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def machine() -> dict[str, Any]:
    """Describe the machine the figures come from."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pymongo": pymongo.version,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
