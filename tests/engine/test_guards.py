"""The guards in the engine: each bad LLM mode of the fake server is caught, and nothing is deleted.

Real parts: the fake OpenAI server on a socket (its named responders), MongoDB, Redis, StatsD.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import GuardRejected
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import COMPRESSED, failed_result
from butler_memory.fold.metrics import StatsdMetrics
from butler_memory.llm.offline import OfflineSummarizer
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import (
    archive_of,
    events_of,
    insert_events,
    make_engine,
    profile_of,
    set_profile,
    small_settings,
    snapshot,
)
from tools.fake_openai import FakeOpenAI
from tools.services import StatsdSink

Doc = dict[str, Any]

PREVIOUS = """- Меня зовут Анна.
- У меня аллергия на пенициллин.
- Мой день рождения 5 мая.
- Я живу в Казани и работаю врачом."""
"""A Russian user's stored summary: a name, a date, a city."""

EVENTS_RU = [
    "Привет! Как дела?",
    "Хорошо, понял.",
    "Мою дочь зовут Ольга, ей 7 лет.",
    "Спасибо, это было полезно.",
    "Я записал это.",
    "В пятницу у меня встреча с Иваном в 15:00.",
]


def russian(user_id: str, i: int) -> str:
    return EVENTS_RU[i % len(EVENTS_RU)]


def russian_user(db: Database[Doc], user_id: str = "u1", n: int = 14) -> list[Doc]:
    """A user whose profile says Russian, with a stored summary and Russian events."""
    set_profile(db, user_id, memory_summary=PREVIOUS, memory_summary_version=3, language="ru")
    return insert_events(db, user_id, n, content=russian)


@pytest.mark.parametrize(
    ("responder", "guard"),
    [("drop_fact", "facts"), ("new_only", "facts"), ("wrong_language", "language")],
)
def test_each_bad_llm_mode_is_rejected_and_nothing_changes(
    responder: str,
    guard: str,
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    make_openai: OpenAIFactory,
    statsd: StatsdSink,
    statsd_metrics: StatsdMetrics,
) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(), make_openai(), statsd_metrics)
    russian_user(mongo_db)
    before = snapshot(mongo_db, "u1")
    llm.set_responder(responder)

    with pytest.raises(GuardRejected) as info:
        engine.compress("u1")

    error = info.value
    assert snapshot(mongo_db, "u1") == before, f"{responder}: a rejected summary changed the database"
    assert error.guards[guard] == "reject", error.guards
    assert "'u1'" in str(error) and f"{guard} guard" in str(error), str(error)
    assert not error.retryable, "a guard rejection must not be retried in a loop"
    for word in ("Анна", "Казан", "пеницил", "Ольга", "Иван"):
        assert word not in str(error), f"the error quotes the content: {error}"
    row = failed_result("u1", error).to_dict()
    assert row["guards"] == error.guards and row["error_type"] == "GuardRejected", row
    assert redis_client.keys("*") == [], "the lock must be released after a rejection"
    reject = m.guard_metric(guard, "reject")
    statsd.wait_for(lambda lines: any(line.startswith(f"{reject}:1|c") for line in lines))


def test_a_faithful_llm_passes_both_guards(
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    make_openai: OpenAIFactory,
    statsd: StatsdSink,
    statsd_metrics: StatsdMetrics,
) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(max_events_per_chunk=4), make_openai(), statsd_metrics)
    events = russian_user(mongo_db)
    llm.set_responder("faithful")

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.chunks == 3, result
    assert result.guards == {"facts": "pass", "language": "pass", "injection": "pass"}, result
    summary = profile_of(mongo_db, "u1")["memory_summary"]
    assert summary.startswith(PREVIOUS) and "Ольга" in summary, "the faithful mode keeps and adds facts"
    assert sorted(archive_of(mongo_db, "u1")) == [ev["_id"] for ev in events[:-3]]
    checks = m.guard_metric("facts", "checks")
    lines = statsd.wait_for(lambda ls: sum(line.startswith(f"{checks}:") for line in ls) == 3)
    assert not [line for line in lines if "_reject_total" in line or "_warn_total" in line], lines


def test_a_rejection_in_a_later_chunk_keeps_the_earlier_chunks_and_deletes_nothing_of_its_own(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(max_events_per_chunk=5), make_openai())
    events = russian_user(mongo_db, n=13)
    responses = iter(["faithful", "drop_fact"])

    def first_honest_then_forgetful(request: Doc) -> str:
        from tools.fake_openai import RESPONDERS

        return RESPONDERS[next(responses)](request)

    llm.set_responder(first_honest_then_forgetful)

    with pytest.raises(GuardRejected, match="facts guard"):
        engine.compress("u1")

    assert sorted(archive_of(mongo_db, "u1")) == [ev["_id"] for ev in events[:5]], "chunk 1 was committed"
    assert sorted(events_of(mongo_db, "u1")) == [ev["_id"] for ev in events[5:]], "chunk 2 must stay"
    profile = profile_of(mongo_db, "u1")
    assert profile["memory_summary_version"] == 4 and profile["memory_summary"].startswith(PREVIOUS)
    assert profile["memory_pending_fold"] is None


def test_warn_mode_commits_and_counts(
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    make_openai: OpenAIFactory,
    statsd: StatsdSink,
    statsd_metrics: StatsdMetrics,
) -> None:
    settings = small_settings(fact_guard="warn", language_guard="off")
    engine = make_engine(mongo_db, redis_client, settings, make_openai(), statsd_metrics)
    russian_user(mongo_db)
    llm.set_responder("new_only")

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    assert result.guards == {"facts": "warn", "language": "off", "injection": "pass"}, result
    assert "Анна" not in profile_of(mongo_db, "u1")["memory_summary"], "warn mode commits the forgetful summary"
    warn = m.guard_metric("facts", "warn")
    lines = statsd.wait_for(lambda ls: any(line.startswith(f"{warn}:1|c") for line in ls))
    assert not [line for line in lines if line.startswith(f"{m.PREFIX}_guard_language")], "an off guard sends nothing"


def test_the_offline_summariser_keeps_the_previous_facts(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    engine = make_engine(mongo_db, redis_client, small_settings(max_events_per_chunk=4), OfflineSummarizer())
    russian_user(mongo_db, n=30)

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.guards == {
        "facts": "pass",
        "language": "pass",
        "injection": "pass",
    }, result


def test_a_refold_is_guarded_like_a_compression(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(max_events_per_chunk=4)
    russian_user(mongo_db)
    make_engine(mongo_db, redis_client, settings, OfflineSummarizer()).compress("u1")  # v4..v6, events archived
    before = snapshot(mongo_db, "u1")
    engine = make_engine(mongo_db, redis_client, settings, make_openai())

    llm.set_responder("wrong_language")
    with pytest.raises(GuardRejected, match="language guard"):
        engine.refold("u1", run_id="refold-bad")
    assert snapshot(mongo_db, "u1") == before, "a rejected re-fold changed something"

    llm.set_responder("faithful")
    result = engine.refold("u1", run_id="refold-good")
    assert result.guards == {"facts": "pass", "language": "pass", "injection": "pass"}, result
    assert profile_of(mongo_db, "u1")["memory_summary_version"] == before["profile"]["memory_summary_version"] + 1
