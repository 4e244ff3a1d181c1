"""Durations as a person reads them (butler_memory.core.units)."""

from __future__ import annotations

import pytest

from butler_memory.core.units import duration, markdown_table


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0 ms"),
        (0.0042, "4 ms"),
        (0.35, "350 ms"),
        (1.0, "1.0 s"),
        (12.34, "12.3 s"),
        (59.4, "59.4 s"),
        (60, "1 min 00 s"),
        (245, "4 min 05 s"),
        (3599.6, "1 h 00 min"),
        (11_520, "3 h 12 min"),
        (86_400, "1 d 00 h"),
        (29_331_486, "339 d 11 h"),
        (-90, "-1 min 30 s"),
        (None, "–"),
        (float("nan"), "–"),
        (float("inf"), "–"),
    ],
)
def test_duration_in_human_units(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_markdown_table_right_aligns_the_figure_columns_it_is_told_to() -> None:
    assert markdown_table(["a", "b"], [(1, "x")]) == ["| a | b |", "|---|---|", "| 1 | x |"]
    assert markdown_table(["name", "n", "m"], [("x", 1, 2)], right_from=1)[1] == "|---|---:|---:|"
    assert markdown_table(["n"], [], right_from=0) == ["| n |", "|---:|"]
