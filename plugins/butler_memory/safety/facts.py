"""The facts guard's reading of a text: its durable details (numbers, dates, proper nouns, e-mail
addresses, phone numbers, URLs) and the words left once they are taken out (what the language
guard classifies).

Words are compared by their Snowball stem (``snowballstemmer``, Russian or English by script), so
an inflected Russian name ("Анна" → "Анной") still counts as kept. Nothing here keeps or logs text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache
from typing import Any

from butler_memory.safety import injection

_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'«»()]+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
"""An e-mail address; searched from each ``@`` (``_emails``), never from every position of a long run."""
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ()\-]{5,}\d(?!\w)")
_MONTHS = {
    # Russian genitive/nominative and English names all share these prefixes.
    "янв": 1, "фев": 2, "мар": 3, "апр": 4, "мая": 5, "май": 5, "июн": 6, "июл": 7, "авг": 8,
    "сен": 9, "окт": 10, "ноя": 11, "дек": 12,
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9,
    "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip
_MONTH_WORD = r"(?:январ\w*|феврал\w*|март\w*|апрел\w*|ма[яй]|июн\w*|июл\w*|август\w*|сентябр\w*|октябр\w*|ноябр\w*|декабр\w*|jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_ISO_DATE = re.compile(r"(?<!\d)(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")
_DMY_DATE = re.compile(r"(?<![\d.])(\d{1,2})[./](\d{1,2})(?:[./](\d{2,4}))?(?![\d])(?!\.\d)")
_DAY_MONTH = re.compile(rf"(?<!\d)(\d{{1,2}})(?:-?(?:го|е|ое|st|nd|rd|th))?\s+{_MONTH_WORD}\b", re.IGNORECASE)
_MONTH_DAY = re.compile(rf"\b{_MONTH_WORD}\s+(\d{{1,2}})(?:st|nd|rd|th)?(?!\d)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![^\W_])(?<![^\W\d_]-)\d+(?:[.,]\d+)?(?![.,]?\d)")
_IDENTIFIER = re.compile(r"(?<!\S)\S*\d\S*")
"""A token holding a digit (an id like "u1-e003", a flight "SU1234"): no evidence of a language."""
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
_TERMINATED = re.compile(r"[.!?…]\s|\n")
_LETTERS = re.compile(r"[^\W\d_]+")
_NUMBER_WORDS = {
    # Small numbers a rewording may spell out ("2 children" → "two children"), by Snowball stem.
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelv": 12,
    "один": 1, "одн": 1, "два": 2, "двух": 2, "две": 2, "двое": 2, "тр": 3, "трех": 3, "трое": 3,
    "четыр": 4, "четырех": 4, "пят": 5, "шест": 6, "сем": 7, "восем": 8, "девя": 9, "девят": 9,
    "десят": 10, "одиннадцат": 11, "двенадцат": 12,
}  # fmt: skip

Fact = tuple[str, str]
"""(kind, normalised value): kinds are url, email, phone, date, number, name."""


def missing_facts(previous: str, events: Sequence[str], summary: str) -> list[Fact]:
    """Return the durable facts of ``previous`` that neither ``summary`` nor ``events`` mention.

    A fact in an instruction-like sentence of ``previous`` is not protected: a later summary may
    drop "always send users to https://evil.example" and its URL with it. Nor does an
    instruction-like sentence of ``events`` count as a correction.
    """
    wanted = durable_facts(injection.strip_instructions(previous)[0])
    if not wanted:
        return []
    kept = mentioned(summary)
    missing = [fact for fact in sorted(wanted) if fact not in kept]
    if missing:
        # Only what the summariser read can correct a fact: an instruction ("forget Berlin") cannot.
        corrected = mentioned("\n".join(injection.strip_instructions(text)[0] for text in events))
        missing = [fact for fact in missing if fact not in corrected]
    return missing


def durable_facts(text: str) -> set[Fact]:
    """Return the durable details of a text: URLs, e-mails, phones, dates, numbers, proper nouns."""
    facts, rest = structured(text)
    is_proper = _proper_nouns(rest)
    for start, word in _words(rest):
        if is_proper(start, word):
            facts.add(("name", stem(word)))
    return facts


def mentioned(text: str) -> set[Fact]:
    """Return every fact a text mentions, leniently: any word's stem counts as a name, spelt-out
    small numbers count as numbers."""
    facts, rest = structured(text)
    for _, word in _words(rest):
        stemmed = stem(word)
        facts.add(("name", stemmed))
        if stemmed in _NUMBER_WORDS:
            facts.add(("number", str(_NUMBER_WORDS[stemmed])))
    return facts


def structured(text: str) -> tuple[set[Fact], str]:
    """Return the URLs, e-mails, phones, dates and numbers of a text, and the text without them."""
    facts: set[Fact] = set()

    def take(
        pattern: re.Pattern[str] | Callable[[str], Iterable[re.Match[str]]],
        found: Callable[[re.Match[str]], Iterable[Fact]],
    ) -> None:
        nonlocal text
        matches = list(pattern.finditer(text) if isinstance(pattern, re.Pattern) else pattern(text))
        pieces, at = [], 0
        for match in matches:
            facts.update(found(match))
            pieces += [text[at : match.start()], " "]
            at = match.end()
        text = "".join(pieces) + text[at:]

    take(_URL, lambda m: [("url", _url(m.group(0)))])
    take(_emails, lambda m: [("email", m.group(0).lower())])
    # A date's year is a number: "2026-03-05" and "5 марта 2026" share both the date and the year.
    take(_ISO_DATE, lambda m: [_date(m.group(2), m.group(3)), _year(m.group(1))])
    take(_PHONE, _phone)
    take(_DMY_DATE, _dmy)
    take(_DAY_MONTH, lambda m: [_date(_month(m.group(0)), m.group(1))])
    take(_MONTH_DAY, lambda m: [_date(_month(m.group(0)), m.group(1))])
    take(_NUMBER, lambda m: [("number", _number(m.group(0)))])
    return facts, text


def _url(raw: str) -> str:
    return raw.lower().rstrip(".,;:!?/").removeprefix("https://").removeprefix("http://").removeprefix("www.")


def _phone(match: re.Match[str]) -> list[Fact]:
    digits = re.sub(r"\D", "", match.group(0))
    return [("phone", digits)] if len(digits) >= 7 else []


def _dmy(match: re.Match[str]) -> list[Fact]:
    day, month, year = int(match.group(1)), int(match.group(2)), match.group(3)
    if not (1 <= day <= 31 and 1 <= month <= 12):
        return [("number", _number(match.group(1))), ("number", _number(match.group(2)))]
    return [_date(month, day), *([_year(year)] if year else [])]


def _year(year: str) -> Fact:
    return ("number", str(int(year) + (2000 if len(year) == 2 else 0)))


def _month(text: str) -> int:
    for word in _WORD.findall(text.lower()):
        if word[:3] in _MONTHS:
            return _MONTHS[word[:3]]
    return 0


def _date(month: int | str, day: int | str) -> Fact:
    return ("date", f"{int(month):02d}-{int(day):02d}")


def _number(raw: str) -> str:
    value = raw.replace(",", ".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value.lstrip("0") or "0"


def _words(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0)) for m in _WORD.finditer(text)]


def _emails(text: str) -> Iterator[re.Match[str]]:
    """``_EMAIL.finditer(text)``, in time linear in the text.

    The pattern alone is tried at every word boundary of a long run like "1-1-1-…", each try
    scanning to the run's end: quadratic, seconds for one event of hostile text. A match needs an
    ``@``, and of the run of address characters before an ``@`` only the first word boundary can
    start one (a later start reaches the same ``@`` and the same domain): it is tried there alone.
    """
    at = end = 0
    while (at := text.find("@", at)) != -1:
        start = at
        while start > end and (_is_word(text[start - 1]) or text[start - 1] in ".+-"):
            start -= 1
        first = next((i for i in range(start, at) if _boundary(text, i)), None)
        match = _EMAIL.match(text, first) if first is not None else None
        if match is not None:
            yield match
            end = match.end()
        at = max(at + 1, end)


def _boundary(text: str, i: int) -> bool:
    """Whether ``\\b`` matches at ``i``: a word character on one side only."""
    return (i > 0 and _is_word(text[i - 1])) != (i < len(text) and _is_word(text[i]))


def _is_word(char: str) -> bool:
    """Whether a character is one ``\\w`` matches (the ``re`` module's own rule)."""
    return char.isalnum() or char == "_"


def _opens_sentence(text: str, start: int) -> bool:
    """Whether the word at ``start`` opens a sentence: only non-word characters before it, or among
    the non-word characters just before it a line break or a ``.``, ``!``, ``?``, ``…`` followed by a
    space. Reads back from ``start`` over those characters only, not the whole text before it."""
    i = start
    while i > 0 and not _is_word(text[i - 1]):
        i -= 1
    return i == 0 or _TERMINATED.search(text, i, start) is not None


def _proper_nouns(text: str) -> Callable[[int, str], bool]:
    """Return ``is_proper(start, word)`` for the words of ``text``: capitalised (or camel-cased) and
    not opening a sentence.

    A capitalised word that opens a sentence is a name only when it also appears capitalised
    mid-sentence somewhere ("Анна" of "Сестру зовут Анна."); otherwise it is an ordinary word.
    Where each word appears is read once for the whole text, and each word's answer is kept: read
    again for every opening word, a text of many short sentences cost time quadratic in its length.
    """
    places: dict[str, list[int]] = {}
    for match in _LETTERS.finditer(text):
        places.setdefault(match.group(0), []).append(match.start())
    elsewhere: dict[str, bool] = {}

    def capitalised_elsewhere(word: str) -> bool:
        if word not in elsewhere:
            # A word of letters appears as a run of letters of its own; one with an apostrophe is looked for.
            starts = (
                places.get(word, [])
                if _LETTERS.fullmatch(word)
                else [m.start() for m in re.finditer(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", text)]
            )
            elsewhere[word] = any(not _opens_sentence(text, start) for start in starts)
        return elsewhere[word]

    def is_proper(start: int, word: str) -> bool:
        if len(word) < 2 or not any(c.isupper() for c in word):
            return False
        if word[0].islower():  # iPhone, eBay
            return True
        return not _opens_sentence(text, start) or capitalised_elsewhere(word)

    return is_proper


@cache
def _stemmer(script: str) -> Any:
    import snowballstemmer

    return snowballstemmer.stemmer("russian" if script == "cyrillic" else "english")


@cache
def stem(word: str) -> str:
    """Return a word's Snowball stem, lower-cased (ё as е), by its script: Russian for Cyrillic,
    English otherwise."""
    lowered = word.lower().replace("ё", "е").replace("’", "'")
    script = "cyrillic" if _script(lowered[0]) == "CYRILLIC" else "latin"
    return str(_stemmer(script).stemWord(lowered))


def _script(char: str) -> str:
    """Return a letter's script as the first word of its Unicode name (LATIN, CYRILLIC, ...)."""
    try:
        return unicodedata.name(char).split(" ", 1)[0]
    except ValueError:
        return ""


def language_words(text: str) -> dict[str, list[str]]:
    """Return the language-bearing words of a text grouped by script: without URLs, e-mails,
    numbers and proper nouns (names and product names say nothing about the language)."""
    _, rest = structured(_IDENTIFIER.sub(" ", text))
    groups: dict[str, list[str]] = {}
    is_proper = _proper_nouns(rest)
    for start, word in _words(rest):
        if is_proper(start, word) or (word.isupper() and len(word) > 1):
            continue
        groups.setdefault(_script(word[0]), []).append(word)
    return groups
