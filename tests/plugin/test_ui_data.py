"""The pages' data and HTML without a server: id checks, field whitelists, escaping, the chart."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from butler_memory.ui import data, render

LINKS = render.Links("/butler-memory", "/")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty"),
        ("x" * 201, "at most 200 characters, got 201"),
        ("a\x00b", "U+0000"),
        ("a\nb", "U+000A"),
        ("a\x7fb", "U+007F"),
        ("a\u200bb", "U+200B"),
        ("a\u202eb", "U+202E"),
    ],
)
def test_user_ids_are_refused_with_the_reason(value: str, problem: str) -> None:
    with pytest.raises(data.InputError, match=r"^user_id ") as refused:
        data.check_user_id(value)
    assert problem in str(refused.value)


@pytest.mark.parametrize("value", ["u-1", "x" * 200, "Пётр", "user@example.com", "a b", "<tag>"])
def test_usable_user_ids_pass(value: str) -> None:
    assert data.check_user_id(value) == value


def test_run_row_keeps_only_known_fields_and_tolerates_junk() -> None:
    doc = {
        "run_id": "manual__1",
        "started_at": datetime(2026, 1, 2, 3, 4, 5),  # naive UTC, as pymongo returns it
        "finished_at": "yesterday",
        "users_found": 3,
        "users_failed": "two",
        "events_folded": -5,
        "prompt_tokens": 10,
        "completion_tokens": 2.0,
        "seconds": float("nan"),
        "memory_summary": "must not pass",
        "users": [{"user_id": "u", "content": "must not pass"}],
    }
    row = data.run_summary(doc)
    assert row["started_at"] == "2026-01-02T03:04:05+00:00"
    assert row["finished_at"] is None
    assert (row["users_found"], row["users_failed"], row["events_folded"], row["llm_tokens"]) == (3, 0, 0, 12)
    assert (row["status"], row["seconds"]) == ("success", 0.0)
    assert "must not pass" not in repr(row) and "users" not in row


def test_user_rows_carry_their_map_index_and_no_unknown_field() -> None:
    row = data.user_row({"user_id": "u", "status": "failed", "error": "e" * 900, "summary": "secret"}, 7)
    assert row["map_index"] == 7 and len(row["error"]) == data.MAX_ERROR_CHARS
    assert "secret" not in repr(row)
    assert data.task_instance_path("manual__2026-01-01T00:00:00+00:00", 7) == (
        "dags/memory_compression/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/tasks/compress_user/mapped/7"
    )


def _run(run_id: str, folded: int, failed: int) -> dict:
    return data.run_summary(
        {
            "run_id": run_id,
            "started_at": datetime(2026, 1, 1, tzinfo=UTC),
            "events_folded": folded,
            "users_failed": failed,
        }
    )


def test_chart_draws_two_bars_per_run_and_escapes_run_ids() -> None:
    svg = render.chart_svg([_run("a", 10, 0), _run("<b>&", 0, 2)], LINKS)
    assert svg.count("<rect ") == 4
    assert "<b>&" not in svg and "&lt;b&gt;&amp;" in svg
    assert 'href="/butler-memory/runs/%3Cb%3E%26"' in svg
    assert "No runs stored yet" in render.chart_svg([], LINKS)


def test_pages_escape_every_value() -> None:
    hostile = '"><script>alert(1)</script>'
    listing = {"runs": [_run(hostile, 1, 1)], "total": 1, "limit": 25, "offset": 0}
    html = render.runs_page(listing, listing["runs"], links=LINKS, nonce="n0nce")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 1 and '<script nonce="n0nce">' in html
    error = render.error_page(404, hostile, links=LINKS, nonce="n")
    assert "<script>alert" not in error


def test_guard_outcomes_keep_only_short_strings() -> None:
    row = data.user_row({"user_id": "u", "status": "compressed", "guards": {"facts": "warn", "x": 3, 4: "y"}}, 0)
    assert row["guards"] == {"facts": "warn"}
    assert data.guard_outcomes("facts") == {} and data.guard_outcomes(None) == {}


def test_versions_table_shows_metadata_and_escapes_it() -> None:
    hostile = '"><script>alert(1)</script>'
    version = {
        "version": 3,
        "kind": "rollback",
        "run_id": hostile,
        "summarizer": "openai",
        "model": hostile,
        "prompt_version": "sha256:abc",
        "base_version": 1,
        "refolded_from": None,
        "created_at": "2026-01-02T03:04:05+00:00",
        "events": 0,
        "first_event_at": None,
        "last_event_at": None,
        "guards": {"facts": "reject", hostile: "pass"},
        "undone_runs": [hostile],
        "text_chars": 120,
    }
    html = render.versions_table([version], LINKS)
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert ">rollback<" in html and ">120<" in html and '<span class="failed">reject</span>' in html
    assert "No summary version recorded yet." in render.versions_table([], LINKS)
