"""``make bench`` at a toy size: every phase of tools/bench.py and tools/bench_fresh.py runs, as the
Makefile runs them (the CLI, real services, real Airflow on PostgreSQL and SQLite), and writes its
figures (issue 25). What the figures are is the bench's business: this checks that each phase
produced them and that results.json / fresh.json carry them, not their values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tools.bench_harness import timed_out_phases

REPO = Path(__file__).resolve().parents[2]
HERMETIC_PREFIXES = ("AIRFLOW", "OPENAI_")
GUARD_MODES = {"offline", "faithful", "drop_fact", "new_only", "wrong_language"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(script: str, *args: str, timeout: float) -> str:
    """Run a bench script as ``make bench`` does, without the suite's Airflow environment; return its output.

    Past ``timeout`` it gets SIGINT, as Ctrl-C would, so that its context managers stop the services
    it started (a SIGKILL would leave them running), and the test fails with its output.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(HERMETIC_PREFIXES)}
    with subprocess.Popen(
        [sys.executable, str(REPO / "tools" / script), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=120)
            pytest.fail(f"{script} did not finish within {timeout:.0f} s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{output[-8000:]}"
    return output


def _numbers(record: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert isinstance(record.get(key), int | float), f"{key} missing or not a number in {sorted(record)}"


def test_every_phase_of_bench_py_produces_its_figures(tmp_path: Path, pg_bindir: Path) -> None:
    out, img = tmp_path / "results.json", tmp_path / "img"
    _run(
        "bench.py",
        *("--users", "3", "--latency", "0.05", "--pool-slots", "2", "--parallelism", "2"),
        *("--user-sizes", "60,200", "--scan-sizes", "500,1000", "--summary-chars", "200"),
        *("--filter-probe-events", "300", "--guard-users", "3", "--guard-chunk", "30"),
        *("--sweep-latencies", "0.1", "--budget", "3000"),  # a guard: a loaded machine must not cap the scan
        *("--work-dir", str(tmp_path / "work"), "--img-dir", str(img), "--out", str(out)),
        timeout=1700,
    )
    results = json.loads(out.read_text())

    assert list(timed_out_phases(results)) == [], "no phase may run out of time at a toy size"
    for run in ("llm_latency", "instant_llm", "threaded_llm_latency"):
        _numbers(results["sequential"][run], "seconds", "users_per_second", "cpu_busy_fraction")
    _numbers(results["filter_order"], "user_id_first_seconds", "id_first_seconds")
    assert sorted(results["per_user"]["users"]) == ["200", "60"]
    for user in results["per_user"]["users"].values():
        _numbers(user, "round_trips", "peak_delta_kb", "seconds")
        _numbers(user["prompts"], "prompt_to_event_chars")
    assert GUARD_MODES <= {m["mode"] for m in results["guards"]["modes"]}, results["guards"]["modes"]
    assert "error" not in results["task_imports_cpu_seconds"], results["task_imports_cpu_seconds"]
    _numbers(results["task_imports_cpu_seconds"], "import openai")

    airflow = results["airflow"]
    runs = {name: airflow[name] for name in ("llm_latency", "noop_llm_latency", "instant_llm", "single_user")} | {
        "baseline": airflow["baseline"]["llm_latency"],
        "sqlite": airflow["sqlite"]["llm_latency"],
    }
    assert [run["latency"] for run in airflow["latency_sweep"]] == [0.1], airflow["latency_sweep_timed_out"]
    runs["sweep"] = airflow["latency_sweep"][0]
    for name, run in runs.items():
        assert run["state"] == "success", (name, run)
        _numbers(run, "run_seconds", "users_per_second", "task_duration_median", "deployment_cpu_seconds_per_user")
        assert run["cpu_seconds_per_user_by_component"], name
    _numbers(runs["llm_latency"], "airflow_overhead_per_task_median", "engine_seconds_median")

    assert len(results["scan"]["points"]) == 2, results["scan"]
    assert results["scan"]["explain"]["scan"]["winning_plan"]

    figures = {row[0] for row in results["summary"]}
    for prefix in (
        "sequential loop, 3 users",
        "Airflow DAG run, 3 users",
        "  Airflow floor: no-op mapped task",
        "  before: Airflow defaults",
        "metadata DB: PostgreSQL / SQLite",
        "CPU s per user a deployment pays",
        "  LLM 0.1 s: Airflow / limit",
        "  one task alone: duration - engine time",
        "what-if: engine in 2 threads",
        "MongoDB commands, 200-event user",
        "peak RSS over baseline, 200-event user",
        "store fix, 160 _ids",
        "scan at ",
        "guards: catch rate, drop_fact",
    ):
        assert any(f.startswith(prefix) for f in figures), f"no summary row {prefix!r}"
    for key in ("speedup", "fraction_of_limit", "fraction_of_floor", "deployment_cpu_ratio_to_floor"):
        assert isinstance(results[key], int | float), key
    assert sorted(Path(c).name for c in results["charts"]) == ["bench-scan.svg", "bench-throughput.svg"]
    for chart in results["charts"]:
        assert Path(chart).read_text().startswith("<svg"), chart


def test_bench_fresh_produces_every_mode_and_the_idle_cost(tmp_path: Path) -> None:
    out = tmp_path / "fresh.json"
    _run(
        "bench_fresh.py",
        *("--users", "5", "--minutes", "0.1", "--cadence", "1", "--idle-minutes", "0.05"),
        *("--settle-seconds", "0", "--llm-latency", "0.05"),
        *("--work-dir", str(tmp_path / "work"), "--out", str(out)),
        timeout=1700,
    )
    results = json.loads(out.read_text())

    _numbers(results["traffic"], "users", "events_per_minute_total")
    _numbers(results, "watcher_registered_after_s", "elapsed_seconds")
    for mode in ("daily_only", "cadence_only", "doorbell_cadence"):
        record = results[mode]
        for key in ("compressed_users", "still_waiting_users", "lag_p50_s", "lag_p95_s", "lag_max_s"):
            assert key in record, (mode, key)
        _numbers(record, "largest_event_count")
    for mode in ("cadence_only", "doorbell_cadence"):
        _numbers(results[mode], "events_written", "rings", "llm_calls")
        assert isinstance(results[mode]["catchup_runs"], dict)
    idle = results["idle"]
    for part in ("floor", "idle"):
        _numbers(idle[part], "airflow_cpu_s", "db_cpu_s", "seconds", "runs")
    _numbers(idle, "airflow_cpu_s_per_idle_run", "idle_hour_cpu_s_at_5_min", "airflow_floor_cpu_s_per_hour")


def test_bench_history_and_the_guard_bench_alone_produce_their_figures(tmp_path: Path) -> None:
    """Not part of ``make bench`` (bench_guards runs there as a phase of bench.py), on the same harness."""
    _run(
        "bench_history.py",
        *("--users", "3", "--events", "60", "--work-dir", str(tmp_path), "--out", str(tmp_path / "history.json")),
        timeout=300,
    )
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["drill_equal"] is True, "the rollback drill must restore the snapshot"
    for phase in ("compress_first", "compress", "rollback_dry_run", "rollback", "compress_again", "refold"):
        _numbers(history[phase], "ms_per_user", "mongo_commands_per_user")

    _run("bench_guards.py", "--users", "3", "--out", str(tmp_path / "guards.json"), timeout=300)
    guards = json.loads((tmp_path / "guards.json").read_text())
    assert GUARD_MODES <= {m["mode"] for m in guards["modes"]}, guards["modes"]
    _numbers(guards, "lingua_load_cpu_seconds", "elapsed_seconds")
    _numbers(guards["hostile_text"], "ratio")
    assert len(guards["hostile_text"]["shapes"]) == 5, guards["hostile_text"]


def test_bench_scale_runs_every_configuration_and_the_celery_one(tmp_path: Path, pg_bindir: Path) -> None:
    """``make bench-scale`` at a toy size: k = 1, a batched k, and the batched shape on two Celery workers."""
    out = tmp_path / "scale.json"
    _run(
        "bench_scale.py",
        *("--small-users", "3", "--users", "6", "--ks", "3", "--engine-users", "3"),
        *("--celery-users", "4", "--celery-k", "2", "--pool-slots", "2", "--parallelism", "2"),
        *("--work-dir", str(tmp_path / "work"), "--out", str(out)),
        timeout=600,
    )
    results = json.loads(out.read_text())

    assert list(timed_out_phases(results)) == [], "no run may run out of time at a toy size"
    _numbers(results["engine"], "engine_cpu_seconds_per_user")
    runs = results["runs"]
    assert sorted(runs) == ["celery_k2", "k1", "k3"], sorted(runs)
    for name, (users, k, tasks) in {"k1": (3, 1, 3), "k3": (6, 3, 2), "celery_k2": (4, 2, 2)}.items():
        run = runs[name]
        assert (run["state"], run["users_failed"], run["users_compressed"]) == ("success", 0, users), (name, run)
        assert (run["users_per_task"], run["compress_tasks"]) == (k, tasks), (name, run)
        _numbers(run, "run_seconds", "users_per_second", "deployment_cpu_seconds_per_user")
        _numbers(run, "deployment_with_db_cpu_seconds_per_user", "ratio_to_engine", "users_per_day_per_core")
        _numbers(run, "metadata_rows_per_1000_users", "metadata_bytes_per_1000_users", "log_bytes_per_1000_users")
        assert {"dag_run", "task_instance", "xcom"} <= set(run["metadata"]["tables"]), (name, run["metadata"])
        # Airflow's own loop timer, received by the bench's StatsD sink during the run.
        _numbers(run["scheduler_loop_ms"], "count", "median", "p95", "max")
        _numbers(run, "scheduler_loops_per_second")
    for name, (users, tasks) in {"k1": (3, 3), "k3": (6, 2)}.items():  # the no-op floor of the same shape
        floor = runs[name]["floor"]
        assert (floor["state"], floor["users"], sum(floor["states"].values())) == ("success", users, tasks), floor
        _numbers(runs[name], "floor_cpu_seconds_per_user", "ratio_to_floor")
    assert "floor" not in runs["celery_k2"]
    assert runs["celery_k2"]["executor"] == "CeleryExecutor"
    workers = [c for c in runs["celery_k2"]["cpu_seconds_per_user_by_component"] if c.startswith("Celery worker")]
    assert len(workers) == 2, runs["celery_k2"]["cpu_seconds_per_user_by_component"]
    # A task process lives about a second; the sampler looks every 0.25 s: it sees some of them.
    assert sum(run["task_processes_sampled"] for run in runs.values()) > 0, runs
    assert [row[0] for row in results["summary"][1:]] == ["k1", "k3", "celery_k2"], results["summary"]
