"""Seed synthetic Butler data: users with mixed Russian and English turns and planted facts.

Deterministic for a given seed. Used by the demo, the tests and the benchmarks; never in production.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.database import Database

NAMES = ["Анна", "Иван", "Мария", "Дмитрий", "Ольга", "Сергей", "Alice", "Bob", "Елена", "Павел"]
ALLERGENS = ["орехи", "молоко", "пыльцу", "кошек", "peanuts", "shellfish", "глютен"]
CITIES = ["Москве", "Казани", "Новосибирске", "Berlin", "Санкт-Петербурге", "London"]
MONTHS_RU = ["января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа", "сентября", "октября"]

SMALL_TALK_RU = [
    "Привет! Как дела?",
    "Спасибо, это было полезно.",
    "Хорошо, понял.",
    "А что ещё можно сделать?",
    "Ладно, давай продолжим завтра.",
    "Окей.",
    "Интересно, расскажи подробнее.",
]
SMALL_TALK_EN = ["Thanks!", "Ok, got it.", "What else can you suggest?", "Sounds good.", "Hmm, interesting."]
ASSISTANT_RU = [
    "Конечно, вот несколько вариантов.",
    "Я записал это.",
    "Хороший вопрос. Давайте разберёмся.",
    "Напомню вам об этом.",
]
ASSISTANT_EN = ["Sure, here are a few options.", "Noted.", "Good question, let me explain.", "I will remind you."]


@dataclass
class SeededUser:
    """What was planted for one user."""

    user_id: str
    events: int
    facts: list[str] = field(default_factory=list)


def facts_for(rng: random.Random) -> list[str]:
    """Return a few durable facts in the user's voice."""
    name = rng.choice(NAMES)
    day, month = rng.randint(1, 28), rng.choice(MONTHS_RU)
    return [
        f"Меня зовут {name}.",
        f"У меня аллергия на {rng.choice(ALLERGENS)}.",
        f"Мой день рождения {day} {month}.",
        f"Я живу в {rng.choice(CITIES)} и работаю врачом.",
        f"My daughter's name is {rng.choice(NAMES)}, she is {rng.randint(3, 17)} years old.",
    ]


def user_events(user_id: str, n: int, rng: random.Random, start: datetime) -> tuple[list[dict[str, Any]], list[str]]:
    """Return ``n`` events for one user (alternating roles) with facts planted at random turns."""
    facts = facts_for(rng)
    # Facts are user turns (even indices) among the events a compression folds (not the newest 20).
    slots = rng.sample(range(0, max(n - 20, 2), 2), k=min(len(facts), max(n - 20, 2) // 2)) if n > 25 else []
    fact_at = dict(zip(slots, facts, strict=False))
    events = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        if role == "user":
            content = fact_at.get(i) or rng.choice(SMALL_TALK_RU if rng.random() < 0.7 else SMALL_TALK_EN)
        else:
            content = rng.choice(ASSISTANT_RU if rng.random() < 0.7 else ASSISTANT_EN)
        events.append(
            {
                "event_id": f"{user_id}-{i:06d}",
                "user_id": user_id,
                "role": role,
                "content": content,
                "created_at": start + timedelta(minutes=MINUTES_APART * i, seconds=rng.randint(0, 59)),
                "tags": ["demo"] + (["fact"] if i in fact_at else []),
            }
        )
    return events, [f for i, f in sorted(fact_at.items())]


def population(users: int, rng: random.Random) -> Iterator[tuple[str, int]]:
    """Yield (user_id, event count): most users below the threshold, some far over it."""
    for u in range(users):
        r = rng.random()
        if r < 0.55:
            n = rng.randint(1, 50)
        elif r < 0.9:
            n = rng.randint(51, 120)
        else:
            n = rng.randint(200, 600)
        yield f"user-{u:05d}", n


MINUTES_APART = 7
"""Minutes between a user's events (plus up to a minute of jitter)."""


def seed(
    db: Database,
    *,
    users: int = 300,
    seed_value: int = 42,
    collection: str = "user_memory",
    now: datetime | None = None,
) -> list[SeededUser]:
    """Insert a synthetic population; return what was planted per user.

    Without ``now`` every history starts on 2026-01-01 (fixed, for tests and benchmarks). With it,
    every user's history ends just before ``now`` (the demo): a run's figures, freshness first, then
    read as they would for a live Butler, where a heavy user's backlog built up over the past days.
    """
    rng = random.Random(seed_value)
    fixed = datetime(2026, 1, 1, tzinfo=UTC)
    planted: list[SeededUser] = []
    batch: list[dict[str, Any]] = []
    for user_id, n in population(users, rng):
        start = fixed if now is None else now - timedelta(minutes=MINUTES_APART * n + 1)
        events, facts = user_events(user_id, n, rng, start)
        batch.extend(events)
        planted.append(SeededUser(user_id, n, facts))
        if len(batch) >= 5000:
            db[collection].insert_many(batch)
            batch = []
    if batch:
        db[collection].insert_many(batch)
    return planted
