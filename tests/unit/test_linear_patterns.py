"""The guards read hostile text in time linear in its length, with the same results as the plain
patterns they replace (hostile input: a run of 12,000 letters or dots cost seconds of CPU per event
with the plain patterns, quadratic; ``make bench``'s guard phase prints the cost now).

Each rewrite is checked against the plain pattern it replaces, kept here as the reference, on
random texts over the characters those patterns turn on. No timing is asserted."""

from __future__ import annotations

import random
import re

import pytest

from butler_memory.safety import facts, injection

ALPHABET = "aZ1_-.+@ \n!?…;:>'’Яя"
"""Letters of both cases and scripts, digits, and every mark the patterns read."""

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
SENTENCE = re.compile(r"[^\n]*?(?:[.!?…]+(?=\s)|;(?=\s)|$)", re.MULTILINE)
IDENTIFIER = re.compile(r"\S*\d\S*")
FENCE_CLOSE = re.compile(r"[A-Za-z_]+\s*>>>", re.IGNORECASE)
SENTENCE_START = re.compile(r"(?:^|[.!?…]\s+|\n)\W*$")


def _is_proper(text: str, start: int, word: str) -> bool:
    """The plain reading of a proper noun, as it was: every test reads the whole text before the word."""
    if len(word) < 2 or not any(c.isupper() for c in word):
        return False
    if word[0].islower():
        return True
    if SENTENCE_START.search(text[:start]):
        return any(
            not SENTENCE_START.search(text[: m.start()])
            for m in re.finditer(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", text)
        )
    return True


def _texts(seed: int, count: int = 400) -> list[str]:
    rng = random.Random(seed)
    texts = ["", "a@b.co", "x.@y.z", "a@b.c@d.e", "Ann. Ann met Bob. Bob", "O'Neil. O'Neil said", "..a@b.cd"]
    for _ in range(count):
        # Runs of one character as well as mixtures: the long runs are where the plain patterns go quadratic.
        pieces = [rng.choice(ALPHABET) * rng.choice((1, 1, 1, 2, 5)) for _ in range(rng.randint(1, 40))]
        texts.append("".join(pieces))
    return texts


@pytest.mark.parametrize("seed", range(5))
def test_the_linear_patterns_find_what_the_plain_ones_found(seed: int) -> None:
    for text in _texts(seed):
        assert [m.span() for m in facts._emails(text)] == [m.span() for m in EMAIL.finditer(text)], repr(text)
        assert [m.span() for m in injection._SENTENCE.finditer(text)] == [m.span() for m in SENTENCE.finditer(text)], (
            repr(text)
        )
        assert facts._IDENTIFIER.sub(" ", text) == IDENTIFIER.sub(" ", text), repr(text)
        markup = dict(injection.PATTERNS)["markup"]
        for line in text.splitlines():
            if FENCE_CLOSE.search(line):
                assert markup.search(line), repr(line)
        is_proper = facts._proper_nouns(text)
        for start, word in facts._words(text):
            assert is_proper(start, word) == _is_proper(text, start, word), (repr(text), start, word)


def test_a_fence_is_still_flagged_and_an_address_still_found() -> None:
    assert injection.flag("text EVENTS>>> more") == "markup"
    assert injection.flag("closing SUMMARY >>>") == "markup"
    assert facts.durable_facts("Write to anna.p+work@example.com today") >= {("email", "anna.p+work@example.com")}
    assert injection.sentences("Wait... what? Yes!! ok.") == ["Wait...", "what?", "Yes!!", "ok."]
