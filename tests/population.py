"""What the DAG, end-to-end and UI tests share: a small mixed population of users, the trigger form's defaults."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

BELOW, BIG, BIGGER, LOCKED, BROKEN = "u-below", "u-big", "u-bigger", "u-locked", "u-broken"
POPULATION = {BELOW: 30, BIG: 60, BIGGER: 75, LOCKED: 55, BROKEN: 65}
"""User id: events. At the default threshold (50) one user is below it and the others over it; the tests
lock LOCKED as the bot would and make the fake LLM refuse BROKEN's content."""
COMPRESSION_DEFAULTS: dict[str, Any] = {
    "dry_run": False,
    "limit": None,
    "user_ids": [],
    "threshold": None,
    "keep_last_n": None,
    "users_per_task": None,
    "full_scan": False,
    "llm_mode": None,
}
"""memory_compression's params as its trigger form submits them untouched (None: the setting decides)."""


def seed_population(
    db: Database[dict[str, Any]], population: dict[str, int], *, canary: str, broken: str, fail_marker: str
) -> None:
    """Insert ``n`` events per user: alternating roles, a minute apart, each carrying ``canary``;
    the ``broken`` user's content also carries ``fail_marker`` (the fake LLM answers it with an error)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    db["user_memory"].insert_many(
        [
            {
                "event_id": f"{user_id}-{i:04d}",
                "user_id": user_id,
                "role": "user" if i % 2 == 0 else "assistant",
                "content": f"Turn {i} of {user_id}: {canary}" + (f" {fail_marker}" if user_id == broken else ""),
                "created_at": start + timedelta(minutes=i),
                "tags": [],
            }
            for user_id, n in population.items()
            for i in range(n)
        ]
    )
