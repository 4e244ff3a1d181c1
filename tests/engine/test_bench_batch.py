"""tools/bench_batch.py at a toy size: it runs on its own services, both paths fold every user, and
its figures hold the claims of docs/benchmarks.md §13 (same tokens, the batch at half the price,
no MongoDB or Redis command while the run waits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import bench_batch


def test_the_batch_bench_runs_and_the_wait_touches_neither_mongodb_nor_redis(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "batch.json"
    argv = ["--users", "4", "--latency", "0", "--batch-delay", "1.5", "--poll", "0.5"]
    assert bench_batch.main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    written = json.loads(out_file.read_text())
    assert written == json.loads(out[out.index("{\n") : out.index("\n| per 1,000 users |")])
    online, batched = written["online"], written["batch"]
    assert online["statuses"] == batched["statuses"] == {"compressed": 4}
    assert online["tokens"] == batched["tokens"], "the batch line is the online request"
    assert batched["cost_usd"] < online["cost_usd"]
    assert batched["wait"]["http_polls"] >= 2
    assert (batched["wait"]["mongo_commands"], batched["wait"]["redis_commands"]) == (0, 0)
    assert batched["llm_calls_online"] == 0 and batched["files_left_at_provider"] == 0
