"""tools/bench_scan.py at a toy size (docs/benchmarks.md §11): it runs on the bench harness's stand-ins,
writes its figures through the harness's results writer, and the incremental daily scan covers fewer
documents than the full one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import bench_scan
from tools.services import MongoService


def test_the_scan_bench_runs_and_writes_both_scans(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    assert bench_scan.main(["--sizes", "2000", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    row = results["sizes"]["2000"]
    assert row["events"] >= 2000 and row["active_users"] >= 1, row
    full, incremental = row["full"], row["incremental"]
    assert full["users_found"] == incremental["users_found"] == row["active_users"], row
    assert incremental["documents_covered_by_aggregates"] < full["documents_covered_by_aggregates"], row
    assert "| 2,0" in capsys.readouterr().out, "the Markdown table of docs/benchmarks.md is printed"
    assert results["mongo"] == "SecantusDB (embedded stand-in)"


def test_the_scan_bench_measures_another_server_when_given_its_uri(tmp_path: Path) -> None:
    """``--mongo-uri``: the figures of a real MongoDB, here another server started for the test."""
    out = tmp_path / "scan.json"
    with MongoService(tmp_path / "other") as other:
        argv = ["--sizes", "2000", "--mongo-uri", other.uri, "--work-dir", str(tmp_path / "work"), "--out", str(out)]
        assert bench_scan.main(argv) == 0
        with other.client() as client:
            assert "bench_scan_2000" not in client.list_database_names(), "the bench drops what it created"
    results = json.loads(out.read_text())
    assert results["mongo"] == "external"
    assert results["sizes"]["2000"]["incremental"]["users_found"] >= 1
