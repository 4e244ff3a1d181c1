"""The language guard's measure: the share of a summary's language-bearing letters in the user's
language, by Lingua (``lingua-language-detector``, offline, restricted to the languages we write
summaries in), leaving out what the summary quotes of its input.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Any

from butler_memory.safety import injection
from butler_memory.safety.facts import language_words

LANGUAGES = ("ru", "en", "de", "fr", "es", "uk")
"""Languages the language guard tells apart (those the prompt names; see summarizer.LANGUAGE_NAMES)."""

MIN_LANGUAGE_LETTERS = 20
"""Fewer language-bearing letters than this (ids, numbers, names only) are not judged: pass."""

BENEFIT_OF_DOUBT = 0.25
"""Lingua confidence for the user's language at which a group of words counts as that language."""


def language_share(text: str, language: str, quoted: Sequence[str] = ()) -> tuple[float | None, str | None]:
    """Return (share of the text's language-bearing letters in ``language``, the dominant language).

    Sentences copied verbatim from ``quoted`` (the previous summary, the user's events) are left
    out first: the user's own words are not drift, and an extractive summariser writes nothing
    else. The share is None when too little text is left to judge, or Lingua lacks the language.
    Each script's words are classified together, which suits short mixed texts better than a
    verdict per line: a Russian summary naming an English sentence gives "ru" for its Cyrillic
    words and "en" for its Latin ones, weighted by letters. A group whose confidence for the
    user's language is at least ``BENEFIT_OF_DOUBT`` counts as that language (short Russian
    phrases score close to Ukrainian).
    """
    lingua = detector(language)
    if lingua is None:
        return None, None
    letters: Counter[str] = Counter()
    for words in language_words(_without_quotes(text, quoted)).values():
        confidence = {
            v.language.iso_code_639_1.name.lower(): v.value
            for v in lingua.compute_language_confidence_values(" ".join(words))
        }
        best = max(confidence, key=lambda code: confidence[code], default=None)
        if best is None or confidence[best] == 0:  # letters Lingua cannot place are no evidence either way
            continue
        if confidence.get(language, 0.0) >= BENEFIT_OF_DOUBT:
            best = language
        letters[best] += sum(len(w) for w in words)
    total = sum(letters.values())
    if total < MIN_LANGUAGE_LETTERS:
        return None, None
    dominant = letters.most_common(1)[0][0]
    return letters[language] / total, dominant


_QUOTE_SPLIT = re.compile(r"(?<=[.!?…])\s+|\n+")
MIN_QUOTE_CHARS = 12
"""Shorter sentences ("Ok.", "Thanks!") are not treated as quotes: they could be anyone's words."""


def _without_quotes(text: str, quoted: Sequence[str]) -> str:
    """Return ``text`` with every sentence of ``quoted`` it contains verbatim blanked out; an
    instruction-like sentence is no quote (copying an injection is not the user's own words)."""
    flat = "\n".join(" ".join(line.split()) for line in text.splitlines())
    sentences = {
        " ".join(piece.split()).lstrip("-•* ").strip() for source in quoted for piece in _QUOTE_SPLIT.split(source)
    }
    sentences = {sentence for sentence in sentences if not injection.flag(sentence)}
    for sentence in sorted(sentences, key=len, reverse=True):
        if len(sentence) >= MIN_QUOTE_CHARS and sentence in flat:
            flat = flat.replace(sentence, " ")
    return flat


def detector(language: str) -> Any:
    """Return a Lingua detector for our languages plus ``language``; None when Lingua lacks it."""
    codes = frozenset((*LANGUAGES, language))
    return _build_detector(codes) if _lingua_language(language) is not None else None


def _lingua_language(code: str) -> Any:
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except (AttributeError, ValueError):
        return None


@cache
def _build_detector(codes: frozenset[str]) -> Any:
    """Build (once per process and language set) a Lingua detector with its models loaded.

    Low-accuracy mode (trigram models only) on purpose: high accuracy loads models costing about
    1 CPU-second and 130 MB in every task process (measured), several times a whole compression's
    CPU, and the script grouping gives it enough text to be right. Preloading the models at build
    time makes the cost fixed (about 0.06 CPU-s) and, through ``warm_up``, paid before Airflow forks.
    """
    from lingua import LanguageDetectorBuilder

    languages = [lang for lang in map(_lingua_language, sorted(codes)) if lang is not None]
    return (
        LanguageDetectorBuilder.from_languages(*languages)
        .with_low_accuracy_mode()
        .with_preloaded_language_models()
        .build()
    )
