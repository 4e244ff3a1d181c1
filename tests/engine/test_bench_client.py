"""tools/bench_client.py at a toy size: it runs on its own services and its figures hold the claim of
docs/benchmarks.md §10 (memory() takes three round trips whatever the user's size, archive and
history; ring() one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import bench_client


def test_the_client_bench_runs_and_its_round_trips_do_not_grow(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "client.json"
    argv = ["--reads", "3", "--history", "150", "--rings", "5", "--work-dir", str(tmp_path / "work")]
    assert bench_client.main([*argv, "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out[: out.index("\n| user |")])
    written = json.loads(out_file.read_text())
    assert {k: written[k] for k in figures} == figures, "the harness's results writer has the printed figures"
    rows = {row["user"]: row for row in figures["memory"]}
    assert set(rows) == {"fresh-20", "folded-20", "fresh-2000", "folded-2000"}
    assert rows["folded-20"]["archived"] == 150 and rows["folded-20"]["history_versions"] == 2
    assert {row["round_trips"] for row in rows.values()} == {3}
    assert figures["ring"]["round_trips"] == 1
