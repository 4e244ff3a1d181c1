"""The injection guard's attack and honest sets (tests/data), for its tests and tools/bench_guards.py."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def load_set(name: str) -> list[tuple[str, str]]:
    """Return ``[(language, text)]`` of a data file (``language | text`` lines, ``#`` comments)."""
    rows = []
    for line in (DATA / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            language, text = line.split(" | ", 1)
            rows.append((language.strip(), text.strip()))
    return rows


ATTACKS = load_set("injection_attacks.txt")
"""Instruction-like or fence-breaking texts that must be flagged."""
HONEST = load_set("injection_honest.txt")
"""The users' own sentences that look like instructions and must not be flagged."""
