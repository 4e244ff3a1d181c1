"""A small mixed population of users for the DAG, end-to-end and UI tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database


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
