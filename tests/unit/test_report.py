"""Run report: counts, missing results counted as failed, Markdown, metrics, a large run's caps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

from butler_memory.core.errors import LLMTransientError
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import failed_result
from butler_memory.fold.report import MAX_USER_ROWS, NO_RESULT, build_report, emit_run_metrics, to_markdown
from butler_memory.storage.store import MemoryStore

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


class RecordingMetrics:
    """Collect metric calls (pure logic: the real UDP path is tested against a socket elsewhere)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def incr(self, name: str, count: int = 1) -> None:
        self.calls.append(("incr", name, count))

    def gauge(self, name: str, value: float) -> None:
        self.calls.append(("gauge", name, value))

    def timing(self, name: str, seconds: float) -> None:
        self.calls.append(("timing", name, seconds))


def _result(user_id: str, status: str, folded: int = 0) -> dict:
    return {"user_id": user_id, "status": status, "events_folded": folded, "events_deleted": folded, "seconds": 0.5}


def test_counts_by_status_and_users_without_result_fail() -> None:
    report = build_report(
        run_id="r1",
        scanned=["a", "b", "c", "d", "e"],
        results=[_result("a", "compressed", 30), _result("b", "skipped_locked"), None, _result("d", "failed")],
        started_at=T0,
        finished_at=T0 + timedelta(seconds=90),
        backlog={"a": 50, "b": 60},
    )
    assert report["users_found"] == 5
    assert report["users_compressed"] == 1
    assert report["users_skipped_locked"] == 1
    assert report["failed_user_ids"] == ["c", "d", "e"]
    assert report["users_failed"] == 3
    assert report["events_folded"] == 30
    assert report["backlog_events"] == 110
    assert report["seconds"] == 90.0
    missing = next(u for u in report["users"] if u["user_id"] == "c")
    assert missing["error_type"] == NO_RESULT


def test_markdown_lists_failed_users_first_and_escapes_pipes() -> None:
    failed = {**_result("zz", "failed"), "error": "user 'zz': field 'content' | bad"}
    report = build_report(
        run_id="r2",
        scanned=["aa", "zz"],
        results=[_result("aa", "compressed", 5), failed],
        started_at=T0,
        finished_at=T0,
    )
    text = to_markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `zz` | failed")
    assert "field 'content' / bad" in rows[0]
    assert "Failed users: `zz`" in text


def test_run_metrics_mark_success_only_when_nothing_failed() -> None:
    ok = build_report(run_id="r", scanned=["a"], results=[_result("a", "compressed", 3)], started_at=T0, finished_at=T0)
    bad = build_report(run_id="r", scanned=["a"], results=[None], started_at=T0, finished_at=T0)
    rec_ok, rec_bad = RecordingMetrics(), RecordingMetrics()
    emit_run_metrics(ok, rec_ok)
    emit_run_metrics(bad, rec_bad)
    assert ("gauge", m.LAST_SUCCESS_TIMESTAMP, T0.timestamp()) in rec_ok.calls
    assert all(name != m.LAST_SUCCESS_TIMESTAMP for _, name, _ in rec_bad.calls)
    assert ("incr", m.ERRORS_TOTAL, 1) in rec_bad.calls
    assert ("gauge", m.RUN_USERS_FAILED, 1) in rec_bad.calls


def test_markdown_reads_durations_in_human_units() -> None:
    # The demo's first report printed "p95 29331486 s" for data planted months before the run.
    rows = [{**_result("a", "compressed", 30), "freshness_seconds": 29_331_486.0, "seconds": 75.2}]
    report = build_report(
        run_id="r3", scanned=["a"], results=rows, started_at=T0, finished_at=T0 + timedelta(seconds=4000)
    )
    text = to_markdown(report)
    assert "Freshness (over the threshold -> compressed): p95 339 d 11 h, max 339 d 11 h." in text, text
    assert "completion; 1 h 06 min." in text, text
    assert "| summary chars | duration | error |" in text and "| 1 min 15 s |" in text, text
    assert report["freshness_seconds_p95"] == 29_331_486.0, "the document keeps plain seconds"


def test_the_document_of_a_160k_user_run_that_all_failed_fits_mongodb(mongo_db: Database[dict[str, Any]]) -> None:
    """A run's id lists are capped like its rows: 160,000 failed UUID users still fit one document (third review)."""
    users = [str(uuid.UUID(int=i)) for i in range(160_000)]
    down = LLMTransientError("LLM server unreachable (APIConnectionError)")
    rows = [failed_result(u, down, 1.0).to_dict() for u in users]
    doc = build_report(
        run_id="scheduled__2026-12-01T00:00:00+00:00",
        scanned=users,
        results=rows,
        started_at=T0,
        finished_at=T0,
        backlog=dict.fromkeys(users, 60),
    )
    store = MemoryStore(mongo_db, Settings())
    try:
        store.save_run(doc)
        saved = None
    except Exception as exc:
        saved = f"{type(exc).__name__}: {str(exc)[:200]}"
    assert saved is None, f"the report task cannot store the run document of a {len(users):,}-user run: {saved}"
    (stored,) = mongo_db["memory_compression_runs"].find({}, {"users": 0})
    assert stored["users_found"] == stored["users_failed"] == len(users), "the counts stay whole"
    assert len(stored["failed_user_ids"]) == len(stored["user_ids"]) == MAX_USER_ROWS
    assert stored["failed_user_ids_truncated"] and stored["users_truncated"]
    assert stored["user_ids"] == sorted(users[:MAX_USER_ROWS]), "user_ids names every user of the rows kept"
    assert "more (in the run-users collection)" in to_markdown(doc)


def test_a_run_within_the_row_cap_lists_every_user_and_failed_id() -> None:
    """Under MAX_USER_ROWS nothing is cut: every id listed, the truncation flags false (third review)."""
    report = build_report(
        run_id="r",
        scanned=["a", "b", "c"],
        results=[_result("a", "compressed", 3), _result("b", "failed"), None],
        started_at=T0,
        finished_at=T0,
    )
    assert report["user_ids"] == ["a", "b", "c"] and report["failed_user_ids"] == ["b", "c"]
    assert not report["failed_user_ids_truncated"] and not report["users_truncated"]
