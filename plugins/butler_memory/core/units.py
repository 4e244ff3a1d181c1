"""Figures as a person reads them: durations in human units, version steps, Markdown tables (reports,
the CLI, the UI).

Stored documents, XCom and metrics keep plain seconds; only the text a person reads goes through here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

_UNITS = (("d", 86400), ("h", 3600), ("min", 60))


def duration(seconds: float | None) -> str:
    """Return a duration as ``350 ms``, ``12.3 s``, ``4 min 05 s``, ``3 h 12 min`` or ``339 d 12 h``.

    Two units at most: the figure is for reading, the document keeps the exact seconds. None (no
    figure) and a value that is not a finite number read as an en dash.
    """
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    for index, (unit, size) in enumerate(_UNITS):
        if whole >= size:
            major, rest = divmod(whole, size)
            minor_unit, minor_size = _UNITS[index + 1] if index + 1 < len(_UNITS) else ("s", 1)
            return f"{major} {unit} {rest // minor_size:02d} {minor_unit}"
    raise AssertionError("unreachable: whole >= 60 here")  # pragma: no cover


def version_step(from_version: int, to_version: int) -> str:
    """Return ``v3 → v4``, or ``v3`` when the version stayed."""
    return f"v{from_version} → v{to_version}" if to_version != from_version else f"v{from_version}"


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right_from: int | None = None
) -> list[str]:
    """Return a Markdown table's lines: the header, its rule, one line per row.

    Columns from index ``right_from`` on are right-aligned (figures); all are left-aligned without it.
    """
    cut = len(headers) if right_from is None else right_from
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * cut + "---:|" * (len(headers) - cut)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
