"""The guards in the engine: each bad LLM mode of the fake server is caught, and nothing is deleted.

Real parts: the fake OpenAI server on a socket (its named responders), MongoDB, Redis, StatsD.
"""

from __future__ import annotations

import pytest
from pymongo.database import Database

from butler_memory.core.errors import GuardRejected
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import COMPRESSED, failed_result
from butler_memory.llm.offline import OfflineSummarizer
from tests.engine.conftest import Rig
from tests.engine.helpers import (
    Doc,
    archive_of,
    events_of,
    insert_events,
    profile_of,
    set_profile,
    small_settings,
    snapshot,
)

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
def test_each_bad_llm_mode_is_rejected_and_nothing_changes(responder: str, guard: str, rig: Rig) -> None:
    engine = rig.engine(small_settings())
    russian_user(rig.db)
    before = snapshot(rig.db, "u1")
    rig.llm.set_responder(responder)

    with pytest.raises(GuardRejected) as info:
        engine.compress("u1")

    error = info.value
    assert snapshot(rig.db, "u1") == before, f"{responder}: a rejected summary changed the database"
    assert error.guards[guard] == "reject", error.guards
    assert "'u1'" in str(error) and f"{guard} guard" in str(error), str(error)
    assert not error.retryable, "a guard rejection must not be retried in a loop"
    for word in ("Анна", "Казан", "пеницил", "Ольга", "Иван"):
        assert word not in str(error), f"the error quotes the content: {error}"
    row = failed_result("u1", error).to_dict()
    assert row["guards"] == error.guards and row["error_type"] == "GuardRejected", row
    assert rig.redis.keys("*") == [], "the lock must be released after a rejection"
    reject = m.guard_metric(guard, "reject")
    rig.statsd.wait_for(lambda lines: any(line.startswith(f"{reject}:1|c") for line in lines))


def test_a_faithful_llm_passes_both_guards(rig: Rig) -> None:
    engine = rig.engine(small_settings(max_events_per_chunk=4))
    events = russian_user(rig.db)
    rig.llm.set_responder("faithful")

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.chunks == 3, result
    assert result.guards == {"facts": "pass", "language": "pass", "injection": "pass"}, result
    summary = profile_of(rig.db, "u1")["memory_summary"]
    assert summary.startswith(PREVIOUS) and "Ольга" in summary, "the faithful mode keeps and adds facts"
    assert sorted(archive_of(rig.db, "u1")) == [ev["_id"] for ev in events[:-3]]
    checks = m.guard_metric("facts", "checks")
    lines = rig.statsd.wait_for(lambda ls: sum(line.startswith(f"{checks}:") for line in ls) == 3)
    assert not [line for line in lines if "_reject_total" in line or "_warn_total" in line], lines


def test_a_rejection_in_a_later_chunk_keeps_the_earlier_chunks_and_deletes_nothing_of_its_own(rig: Rig) -> None:
    engine = rig.engine(small_settings(max_events_per_chunk=5))
    events = russian_user(rig.db, n=13)
    responses = iter(["faithful", "drop_fact"])

    def first_honest_then_forgetful(request: Doc) -> str:
        from tools.fake_openai import RESPONDERS

        return RESPONDERS[next(responses)](request)

    rig.llm.set_responder(first_honest_then_forgetful)

    with pytest.raises(GuardRejected, match="facts guard"):
        engine.compress("u1")

    assert sorted(archive_of(rig.db, "u1")) == [ev["_id"] for ev in events[:5]], "chunk 1 was committed"
    assert sorted(events_of(rig.db, "u1")) == [ev["_id"] for ev in events[5:]], "chunk 2 must stay"
    profile = profile_of(rig.db, "u1")
    assert profile["memory_summary_version"] == 4 and profile["memory_summary"].startswith(PREVIOUS)
    assert profile["memory_pending_fold"] is None


def test_warn_mode_commits_and_counts(rig: Rig) -> None:
    engine = rig.engine(small_settings(fact_guard="warn", language_guard="off"))
    russian_user(rig.db)
    rig.llm.set_responder("new_only")

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    assert result.guards == {"facts": "warn", "language": "off", "injection": "pass"}, result
    assert "Анна" not in profile_of(rig.db, "u1")["memory_summary"], "warn mode commits the forgetful summary"
    warn = m.guard_metric("facts", "warn")
    lines = rig.statsd.wait_for(lambda ls: any(line.startswith(f"{warn}:1|c") for line in ls))
    assert not [line for line in lines if line.startswith(f"{m.PREFIX}_guard_language")], "an off guard sends nothing"


def test_the_offline_summariser_keeps_the_previous_facts(rig: Rig) -> None:
    engine = rig.engine(small_settings(max_events_per_chunk=4), OfflineSummarizer())
    russian_user(rig.db, n=30)

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.guards == {
        "facts": "pass",
        "language": "pass",
        "injection": "pass",
    }, result


def test_a_refold_is_guarded_like_a_compression(rig: Rig) -> None:
    settings = small_settings(max_events_per_chunk=4)
    russian_user(rig.db)
    rig.engine(settings, OfflineSummarizer()).compress("u1")  # v4..v6, events archived
    before = snapshot(rig.db, "u1")
    engine = rig.engine(settings)

    rig.llm.set_responder("wrong_language")
    with pytest.raises(GuardRejected, match="language guard"):
        engine.refold("u1", run_id="refold-bad")
    assert snapshot(rig.db, "u1") == before, "a rejected re-fold changed something"

    rig.llm.set_responder("faithful")
    result = engine.refold("u1", run_id="refold-good")
    assert result.guards == {"facts": "pass", "language": "pass", "injection": "pass"}, result
    assert profile_of(rig.db, "u1")["memory_summary_version"] == before["profile"]["memory_summary_version"] + 1
