"""make bench on a slower machine: a phase that runs out of time is recorded and the rest still
reported, and the figures are on disk as each phase ends (issue 11, finding 12); Airflow installations
in turn and metadata DBs copied from one migrated template (issue 25). Tiny phases only: the mechanism,
not the 15-minute bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tools import bench_airflow, bench_fresh, bench_harness, bench_report
from tools.services import PostgresService


def test_a_timed_out_phase_is_recorded_and_the_others_still_run_and_are_written(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    results: dict[str, Any] = {"date": "today"}

    def save() -> None:
        bench_harness.write_results(results, out)

    def slow_phase() -> dict[str, Any]:
        time.sleep(0.05)
        raise TimeoutError("run bench-latency-1 not finished within 120s (state running)")

    seen_on_disk: list[Any] = []

    def next_phase() -> dict[str, Any]:
        seen_on_disk.append(json.loads(out.read_text()))  # what a kill at this moment would leave
        return {"seconds": 1.0, "users_per_second": 2.0}

    bench_harness.run_phase(results, "airflow", slow_phase, save=save)
    bench_harness.run_phase(results, "scan", next_phase, save=save)

    assert results["airflow"]["timed_out"] is True and results["airflow"]["seconds"] >= 0.05, results
    assert "not finished within 120s" in results["airflow"]["error"]
    assert results["scan"] == {"seconds": 1.0, "users_per_second": 2.0}, "the phase after a timeout must still run"
    assert seen_on_disk and seen_on_disk[0]["airflow"]["timed_out"] is True, (
        "figures must be written as each phase ends"
    )
    assert json.loads(out.read_text()) == results


def test_the_report_names_a_timed_out_phase_and_keeps_the_other_figures() -> None:
    args = argparse.Namespace(users=10, latency=1.0, pool_slots=8, sweep_latencies=[], target=0.7)
    results: dict[str, Any] = {
        "sequential": {"llm_latency": {"seconds": 12.0, "users_per_second": 0.83}},
        "airflow": {"llm_latency": {"timed_out": True, "error": "not finished", "seconds": 120.0}},
    }

    rows = bench_report.summarise(results, args)

    assert ("phase airflow.llm_latency", "timed out after 120 s", "", "NOT MEASURED") in rows, rows
    assert any(row[0].startswith("sequential loop") for row in rows), "the figures measured must still be reported"


class _Run(dict[str, Any]):
    """A measured run's record: every figure the report reads is there (1.0)."""

    def __init__(self) -> None:
        super().__init__(state="success")

    def __missing__(self, key: str) -> Any:
        return {"task processes": 1.0} if key == "cpu_seconds_per_user_by_component" else 1.0


def test_a_timed_out_baseline_or_sqlite_run_leaves_the_throughput_rows_and_charts(tmp_path: Path) -> None:
    args = argparse.Namespace(users=200, latency=0.5, pool_slots=8, target=0.7, img_dir=tmp_path)
    out_of_time = {"timed_out": True, "error": "not finished", "seconds": 150.0}
    results: dict[str, Any] = {
        "date": "2026-12-06T20:47:50+00:00",
        "sequential": {"llm_latency": _Run(), "instant_llm": _Run(), "threaded_llm_latency": _Run()},
        "airflow": {
            "llm_latency": _Run(),
            "noop_llm_latency": _Run(),
            "instant_llm": _Run(),
            "baseline": {"llm_latency": out_of_time},
            "sqlite": {"llm_latency": out_of_time},
        },
    }

    figures = [row[0] for row in bench_report.summarise(results, args)]

    assert "phase airflow.baseline.llm_latency" in figures and "phase airflow.sqlite.llm_latency" in figures
    assert any(f.startswith("Airflow DAG run, 200 users") for f in figures), figures
    assert any(f.startswith("  Airflow floor: no-op mapped task") for f in figures), figures
    assert any(f.startswith("CPU s per user a deployment pays") for f in figures), figures
    assert [Path(c).name for c in bench_report.write_charts(results, args)] == ["bench-throughput.svg"]


class _Installation:
    """Stands in for AirflowServices in InTurn: records when it starts and stops; its stop waits for ``release``."""

    def __init__(self, name: str, events: list[str], release: threading.Event | None = None) -> None:
        self.home = Path(name)
        self.events = events
        self.release = release

    def start(self) -> None:
        self.events.append(f"{self.home} started")

    def stop(self) -> None:
        self.events.append(f"{self.home} stopping")
        if self.release is not None:
            assert self.release.wait(60), "the test never released the stop"
        self.events.append(f"{self.home} stopped")


def test_installations_in_turn_start_during_the_previous_stop_and_run_only_after_it() -> None:
    """The next installation starts while the one before stops, but its block (the measured runs) waits
    until that stop has ended; leaving InTurn waits for the last stop; a ``last`` one stops before its block is left."""
    events: list[str] = []
    release = threading.Event()
    first, second = _Installation("first", events, release), _Installation("second", events)
    third = _Installation("third", events)

    def start_second() -> None:
        with in_turn.start(second):  # type: ignore[arg-type]  # the duck-typed stand-in
            events.append("second runs")

    with bench_airflow.InTurn() as in_turn:
        with in_turn.start(first):  # type: ignore[arg-type]
            events.append("first runs")
        while "first stopping" not in events:  # the stop runs in the background
            time.sleep(0.01)
        thread = threading.Thread(target=start_second)
        thread.start()
        while "second started" not in events:  # it starts although the first one has not stopped
            assert thread.is_alive(), events
            time.sleep(0.01)
        assert "second runs" not in events, events
        release.set()
        thread.join(60)
        in_turn.wait()  # the second one's stop, in the background
        with in_turn.start(third, last=True):  # type: ignore[arg-type]
            events.append("third runs")
        events.append("after the last one")
    assert events == [
        "first started",
        "first runs",
        "first stopping",
        "second started",
        "first stopped",
        "second runs",
        "second stopping",
        "second stopped",
        "third started",
        "third runs",
        "third stopping",
        "third stopped",
        "after the last one",
    ]


def test_metadata_dbs_are_copied_from_one_migrated_template(postgres: PostgresService) -> None:
    """migrated_template prepares the template once per pool size; a copy has what the preparation made."""
    prepared: list[str] = []

    def prepare(url: str) -> None:  # what `airflow db migrate` and `airflow pools set` leave, in small
        prepared.append(url)
        dbname = url.rsplit("/", 1)[1]
        with contextlib.closing(postgres.connect(dbname)) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE slot_pool (pool text, slots int)")
            cur.execute("INSERT INTO slot_pool VALUES ('llm_api', 3)")

    slots = 3 + uuid.uuid4().int % 1000  # a pool size no other test has made a template for
    name = bench_airflow.migrated_template(postgres, slots, prepare)
    assert bench_airflow.migrated_template(postgres, slots, prepare) == name
    assert len(prepared) == 1, "the second installation must copy the template, not migrate again"
    copy = f"copy_{uuid.uuid4().hex[:8]}"
    assert postgres.create_database(copy, template=name) == postgres.url(copy)
    with contextlib.closing(postgres.connect(copy)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pool, slots FROM slot_pool")
        assert cur.fetchall() == [("llm_api", 3)]
    assert not postgres.has_database(f"{name}_partial")


class _Metadata:
    """Stands in for AirflowServices in bench_fresh.pause: the catch-up DAG's pause flag, no run in flight."""

    def __init__(self, paused: bool) -> None:
        self.paused = paused
        self.cli_calls: list[tuple[str, ...]] = []

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [(int(self.paused),)] if "is_paused" in sql else [(0,)]

    def cli(self, *args: str) -> str:
        self.cli_calls.append(args)
        self.paused = args[1] == "pause"
        return ""


def test_bench_fresh_pauses_through_the_cli_only_when_the_flag_must_change() -> None:
    """The catch-up DAG is unpaused at creation: the unpause before the first mode costs no CLI call (2-5 s)."""
    airflow = _Metadata(paused=False)
    bench_fresh.pause(airflow, False)  # type: ignore[arg-type]  # the duck-typed stand-in
    assert airflow.cli_calls == []
    bench_fresh.pause(airflow, True)  # type: ignore[arg-type]
    bench_fresh.pause(airflow, True)  # type: ignore[arg-type]
    bench_fresh.pause(airflow, False)  # type: ignore[arg-type]
    assert airflow.cli_calls == [
        ("dags", "pause", bench_fresh.CATCHUP_ID),
        ("dags", "unpause", bench_fresh.CATCHUP_ID),
    ]
