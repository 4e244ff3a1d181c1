"""The offline extractive summariser (pure logic): deterministic, keeps facts over small talk, in budget."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.summarizer import EventText, SummaryRequest
from butler_memory.safety.facts import missing_facts
from butler_memory.safety.validation import validate_summary
from tools.seed import SMALL_TALK_EN, SMALL_TALK_RU, user_events

START = datetime(2026, 1, 1, tzinfo=UTC)
FACTS = [
    "Меня зовут Анна Петрова.",
    "У меня аллергия на арахис и на пенициллин.",
    "Мой день рождения 14 марта.",
    "My daughter Mia was born on 3 June 2019.",
    "Я работаю врачом в Казани.",
]


def request(texts: Sequence[str], previous: str = "", max_chars: int = 600, language: str = "ru") -> SummaryRequest:
    """Return a request folding user turns (each followed by an assistant acknowledgement)."""
    events = []
    for i, text in enumerate(texts):
        events.append(EventText("user", text, START + timedelta(minutes=2 * i)))
        events.append(EventText("assistant", "Хорошо, понял.", START + timedelta(minutes=2 * i + 1)))
    return SummaryRequest("u1", previous, events, language, max_tokens=max_chars // 6, max_chars=max_chars)


def chatter(n: int, seed: int = 7) -> list[str]:
    """Return n small-talk turns."""
    rng = random.Random(seed)
    return [rng.choice(SMALL_TALK_RU + SMALL_TALK_EN) for _ in range(n)]


def test_output_is_deterministic() -> None:
    texts = chatter(30) + FACTS
    random.Random(1).shuffle(texts)

    first = OfflineSummarizer().summarize(request(texts)).text
    second = OfflineSummarizer().summarize(request(list(texts))).text

    assert first == second


def test_planted_facts_win_over_small_talk_within_the_budget() -> None:
    texts = chatter(40)
    for position, fact in zip((3, 11, 19, 27, 35), FACTS, strict=True):
        texts.insert(position, fact)

    summary = OfflineSummarizer().summarize(request(texts, max_chars=400)).text

    assert len(summary) <= 400, f"summary is {len(summary)} characters, over the budget"
    missing = [fact.rstrip(".") for fact in FACTS if fact.rstrip(".") not in summary]
    assert not missing, f"facts dropped: {missing}\n{summary}"
    kept_talk = [line for line in set(SMALL_TALK_RU + SMALL_TALK_EN) if line in summary]
    assert not kept_talk, f"small talk kept: {kept_talk}"
    assert "Хорошо, понял." not in summary, "assistant acknowledgements are not facts"
    assert summary.index("Анна") < summary.index("арахис") < summary.index("14 марта"), "facts keep their order"


def test_seeded_users_keep_their_planted_facts() -> None:
    rng = random.Random(3)
    for n in range(5):
        events, facts = user_events(f"user-{n}", 120, rng, START)
        texts = [EventText(ev["role"], ev["content"], ev["created_at"]) for ev in events[:-20]]
        req = SummaryRequest(f"user-{n}", "", texts, "ru", max_tokens=300, max_chars=1800)

        summary = OfflineSummarizer().summarize(req).text

        missing = [fact for fact in facts if fact.rstrip(".") not in summary]
        assert not missing, f"user-{n}: planted facts dropped: {missing}\n{summary}"


def test_earlier_summary_facts_survive_later_folds() -> None:
    summarizer = OfflineSummarizer()
    summary = summarizer.summarize(request([*FACTS[:3], *chatter(10)], max_chars=500)).text
    for batch in range(4):
        texts = chatter(25, seed=batch)
        if batch == 2:
            texts.insert(5, FACTS[3])
        summary = summarizer.summarize(request(texts, previous=summary, max_chars=500)).text

    missing = [fact.rstrip(".") for fact in FACTS[:4] if fact.rstrip(".") not in summary]
    assert not missing, f"facts lost across folds: {missing}\n{summary}"
    assert len(summary) <= 500


def test_a_fact_rich_history_still_fits_the_budget() -> None:
    texts = [f"Мой друг Иван{i} живёт в Москве, его день рождения {i % 28 + 1} мая." for i in range(200)]

    summary = OfflineSummarizer().summarize(request(texts, max_chars=300)).text

    assert 0 < len(summary) <= 300
    assert len(summary.splitlines()) == len(set(summary.splitlines())), "duplicate lines"


@pytest.mark.parametrize(("language", "expected"), [("ru", "Сжато сообщений"), ("en", "messages without durable")])
def test_small_talk_only_still_yields_a_valid_summary(language: str, expected: str) -> None:
    req = request(chatter(12), language=language)

    summary = OfflineSummarizer().summarize(req).text

    assert expected in summary and "24" in summary, summary
    assert validate_summary(summary, user_id="u1", max_chars=req.max_chars) == summary, "must pass validation"


def test_small_talk_after_a_summary_keeps_the_summary() -> None:
    summary = OfflineSummarizer().summarize(request(chatter(12), previous="- Аллергия на орехи.")).text

    assert "Аллергия на орехи" in summary


def test_a_full_summary_keeps_every_line_when_richer_facts_arrive() -> None:
    """Found by the fact guard: over budget, new high-scoring sentences used to push out older lines."""
    previous = "\n".join(f"- Врач: Иван{i}, кабинет {i}." for i in range(20))
    rich = [
        f"Мой брат Павел{i} живёт в Москве, его день рождения {i % 28 + 1} мая, мама Ольга{i} тоже." for i in range(5)
    ]

    summary = OfflineSummarizer().summarize(request(rich, previous=previous, max_chars=len(previous) + 40)).text

    assert len(summary) <= len(previous) + 40
    assert missing_facts(previous, rich, summary) == [], summary
    assert summary.startswith(previous), "every line of the previous summary, in its order"
