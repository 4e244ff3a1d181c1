"""Run the memory_compression DAG end to end on embedded services: ``make demo``.

Starts the embedded MongoDB wire-protocol server and redis-server on free loopback ports, seeds
synthetic Butler users, runs ``airflow dags test memory_compression`` on a SQLite metadata DB under
``.local/airflow``, prints the run report, and stops everything it started. Uses the offline
summariser (chosen explicitly: summarizer=offline) unless OPENAI_BASE_URL (with OPENAI_API_KEY and
OPENAI_MODEL) points at an OpenAI-compatible endpoint; an OPENAI_API_KEY alone is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.units import duration  # noqa: E402
from tools.seed import MINUTES_APART, SeededUser, seed  # noqa: E402
from tools.services import MongoService, RedisService, airflow_connection_env  # noqa: E402

LOCAL = REPO / ".local"


def airflow_env(home: Path) -> dict[str, str]:
    """Return the environment for Airflow commands run against this checkout."""
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)]),
        }
    )
    return env


def airflow(*args: str, env: dict[str, str], quiet: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ``airflow`` CLI command from the venv; raise with its output when it fails."""
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=quiet, check=False)
    if proc.returncode != 0:
        output = (proc.stdout or "")[-3000:] + (proc.stderr or "")[-3000:]
        raise SystemExit(f"`airflow {' '.join(args)}` failed with exit code {proc.returncode}\n{output}")
    return proc


def prepare_airflow(home: Path, env: dict[str, str], pool_slots: int) -> None:
    """Migrate the metadata DB and create the llm_api pool (both idempotent)."""
    home.mkdir(parents=True, exist_ok=True)
    airflow("db", "migrate", env=env)
    airflow("pools", "set", "llm_api", str(pool_slots), "LLM calls of memory_compression", env=env)


def llm_env() -> tuple[str | None, str, str]:
    """Return (base URL, model, key) of a configured OpenAI-compatible endpoint, if any."""
    base = os.environ.get("OPENAI_BASE_URL") or None  # never the public endpoint by default
    return base, os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), os.environ.get("OPENAI_API_KEY", "not-needed")


@contextlib.contextmanager
def embedded_butler(data: Path, users: int) -> Iterator[tuple[MongoService, list[SeededUser], dict[str, str]]]:
    """Start MongoDB and Redis under ``data`` (fresh), seed ``users``; yield them and the AIRFLOW_CONN_* env."""
    shutil.rmtree(data, ignore_errors=True)  # every start begins from fresh synthetic data
    data.mkdir(parents=True)
    with MongoService(data / "mongo") as mongo, RedisService(data / "redis") as redis_srv:
        print(f"==> MongoDB wire server on {mongo.host}:{mongo.port}, redis-server on {redis_srv.port}", flush=True)
        with mongo.client() as client:
            # Histories end now: freshness reads as the time each user's backlog has waited, not since 2026-01-01.
            planted = seed(client["butler"], users=users, now=datetime.now(UTC))
        over = sum(1 for u in planted if u.events > 50)
        span = duration(max(u.events for u in planted) * MINUTES_APART * 60)
        print(
            f"==> Seeded {len(planted)} users, {sum(u.events for u in planted)} events ending now "
            f"(one every {MINUTES_APART} min, the longest history over the last {span}); {over} over the threshold"
        )
        base_url, model, key = llm_env()
        print("==> Summariser:", f"OpenAI-compatible {base_url} ({model})" if base_url else "offline extractive")
        connections = airflow_connection_env(
            mongo=mongo,
            db="butler",
            redis=redis_srv,
            statsd=None,
            llm_base_url=base_url,
            llm_model=model,
            llm_api_key=key,
        )
        if base_url is None:  # no LLM connection: say so, the DAG never falls back on its own
            connections["BUTLER_MEMORY_SUMMARIZER"] = "offline"
        yield mongo, planted, connections


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the DAG run's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300, help="synthetic users to seed (default 300)")
    parser.add_argument("--conf", default=None, help="DAG run conf as JSON, e.g. '{\"limit\": 10}'")
    args = parser.parse_args(argv)

    home = LOCAL / "airflow"
    env = airflow_env(home)
    print(f"==> Airflow home {home} (SQLite); migrating and creating pool llm_api", flush=True)
    prepare_airflow(home, env, pool_slots=8)

    with embedded_butler(LOCAL / "demo-services", args.users) as (mongo, planted, connections):
        env.update(connections)
        dag_args = ["dags", "test", "memory_compression"]
        if args.conf:
            dag_args += ["--conf", args.conf]
        print("==> airflow " + " ".join(dag_args) + f"  (task logs: {LOCAL / 'demo-dag-test.log'})", flush=True)
        with open(LOCAL / "demo-dag-test.log", "w") as log_file:
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "airflow"), *dag_args],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                check=False,
            )
        print_report(mongo, planted)
    print(f"==> DAG run exit code {proc.returncode}; services stopped")
    return proc.returncode


def print_report(mongo: MongoService, planted: list[SeededUser]) -> None:
    """Print the stored run report and one user's before/after, as an example."""
    from butler_memory.fold.report import to_markdown

    with mongo.client() as client:
        db = client["butler"]
        run = db.memory_compression_runs.find_one(sort=[("finished_at", -1)])
        if run is None:
            print("!! no run document was stored; see the DAG log above")
            return
        print()
        print(to_markdown(run, max_rows=15))
        example = max(planted, key=lambda u: u.events)
        profile = db.user_profiles.find_one({"user_id": example.user_id}) or {}
        left = db.user_memory.count_documents({"user_id": example.user_id})
        print(f"Example (synthetic) user {example.user_id}: {example.events} events -> {left} raw events left.")
        print("Planted facts:\n" + "\n".join(f"  * {f}" for f in example.facts))
        summary = str(profile.get("memory_summary") or "")
        print("Stored summary:\n" + "\n".join(f"  {line}" for line in summary.splitlines()))


if __name__ == "__main__":
    sys.exit(main())
