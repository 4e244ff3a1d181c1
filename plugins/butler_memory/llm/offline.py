"""OfflineSummarizer: a deterministic extractive summariser that needs no network."""

from __future__ import annotations

import re
import time

from butler_memory.llm.prompt import estimate_tokens
from butler_memory.llm.summarizer import Summary, SummaryRequest

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s+|\n+")
_FACT_WORDS = re.compile(
    r"\b(зовут|имя|меня|мой|моя|мои|моего|моей|аллерги\w*|люблю|нравится|не ем|не пью|предпочитаю|"
    r"день рождения|родил\w*|живу|работаю|жена|муж|сын|дочь|мама|папа|брат|сестра|"
    r"каждый|всегда|никогда|врач|лекарств\w*|встреч\w*|напомни\w*|"
    r"my|name|allerg\w*|love|like|prefer|hate|birthday|born|live|work|wife|husband|son|daughter|"
    r"mother|father|brother|sister|always|never|doctor|medication|meeting|remind\w*|vegetarian|vegan)\b",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"\d")
_PROPER = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-ZА-ЯЁ][a-zа-яё]{2,}")
_DATE_WORDS = re.compile(
    r"\b(январ|феврал|март|апрел|ма[яй]|июн|июл|август|сентябр|октябр|ноябр|декабр|"
    r"january|february|march|april|may|june|july|august|september|october|november|december)\w*",
    re.IGNORECASE,
)


def sentence_score(sentence: str, role: str) -> float:
    """Score how likely a sentence carries a durable fact (names, numbers, dates, preferences)."""
    score = 0.0
    score += 2.0 * len(_FACT_WORDS.findall(sentence))
    score += 1.5 * min(len(_DIGITS.findall(sentence)), 4) / 2
    score += 1.5 * len(_DATE_WORDS.findall(sentence))
    score += 1.0 * min(len(_PROPER.findall(sentence)), 3)
    # The user states facts about themselves; the assistant mostly answers and acknowledges.
    score *= 1.5 if role == "user" else 0.5
    if len(sentence) < 12:
        score -= 2.0
    if sentence.endswith("?"):
        score -= 1.0
    return score


MIN_FACT_SCORE = 1.5
"""Sentences scoring below this are small talk and never enter a summary."""

_NO_FACTS = {
    "ru": "- Сжато сообщений без устойчивых фактов: {n}.",
    "en": "- {n} messages without durable facts were compressed.",
}


class OfflineSummarizer:
    """Deterministic extractive summariser: no network; keeps the most informative sentences.

    Every line of the previous summary is kept, in its order: a rolling summary must not lose
    what it already holds (the fact guard checks it). New sentences are candidates: the
    best-scoring ones that still fit the character budget are added after it, in their original
    order, one per line, without duplicates. A full summary therefore stops growing; the events it
    could not take stay in the archive.
    """

    name = "offline"
    context_tokens: int | None = None

    def count_tokens(self, text: str) -> int:
        """Estimate tokens (no model reads the prompt; the budget only shapes the chunks)."""
        return estimate_tokens(text)

    def close(self) -> None:
        """Nothing to close: no network."""

    def summarize(self, request: SummaryRequest) -> Summary:
        """Select sentences into a summary of at most ``request.max_chars`` characters."""
        started = time.monotonic()
        kept: list[str] = []
        seen: set[str] = set()
        used = 0
        for line in request.previous_summary.splitlines():
            text = line.strip().lstrip("-• ").strip()
            # Only a smaller budget than the previous summary was written for can cut it here.
            if text and text.casefold() not in seen and used + len(text) + 3 <= request.max_chars:
                seen.add(text.casefold())
                kept.append(text)
                used += len(text) + 3
        candidates: list[tuple[float, int, str]] = []
        order = 0
        for ev in request.events:
            # Every line break str.splitlines knows ends a line (U+2028 too), as for the injection guard:
            # joining two lines into one sentence could write an instruction neither line holds.
            for raw in (piece for line in ev.content.splitlines() for piece in _SENTENCE_SPLIT.split(line)):
                text = " ".join(raw.split())
                if len(text) >= 3:
                    candidates.append((sentence_score(text, ev.role), order, text[:400]))
                    order += 1
        chosen: list[tuple[int, str]] = []
        for score, position, text in sorted(candidates, key=lambda c: (-c[0], c[1])):
            key = text.casefold()
            cost = len(text) + 3
            if score < MIN_FACT_SCORE or key in seen or used + cost > request.max_chars:
                continue
            seen.add(key)
            chosen.append((position, text))
            used += cost
        summary = "\n".join(f"- {text}" for text in [*kept, *(text for _, text in sorted(chosen))])
        if not summary:
            # Nothing scored as a fact: say what happened in numbers rather than invent content.
            template = _NO_FACTS.get(request.language, _NO_FACTS["en"])
            summary = template.format(n=len(request.events))
        prompt_chars = len(request.previous_summary) + sum(len(ev.content) for ev in request.events)
        return Summary(
            text=summary,
            prompt_tokens=estimate_tokens(prompt_chars),
            completion_tokens=estimate_tokens(summary),
            seconds=time.monotonic() - started,
        )
