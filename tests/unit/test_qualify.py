"""The qualify command's pure logic: its built-in users, thresholds and fact matching."""

from __future__ import annotations

import pytest

from butler_memory.core.settings import SettingsError
from butler_memory.operations import qualify, qualify_cases
from butler_memory.safety.language import LANGUAGES


@pytest.mark.parametrize("case", qualify_cases.CASES, ids=lambda c: c.user_id)
def test_every_planted_fact_is_stated_to_the_model(case: qualify_cases.Case) -> None:
    said = "\n".join([case.previous, *(text for _, text in case.turns)])
    assert [fact for fact in case.facts if not qualify.kept(fact, said)] == []
    assert all(qualify.kept(fact, case.previous) for fact in case.stale), "a correction corrects the summary"
    assert case.language in LANGUAGES, "the language guard must know the case's language"


def test_the_cases_cover_languages_lengths_and_corrections() -> None:
    assert {"ru", "en"} < {case.language for case in qualify_cases.CASES} and len(
        {c.language for c in qualify_cases.CASES}
    ) >= 3
    lengths = sorted(len(case.turns) for case in qualify_cases.CASES)
    assert lengths[0] <= 10 and lengths[-1] >= 400, lengths
    assert sum(1 for case in qualify_cases.CASES if case.stale) >= 2
    assert len({case.user_id for case in qualify_cases.CASES}) == len(qualify_cases.CASES)


@pytest.mark.parametrize(
    ("fact", "text", "expected"),
    [
        ("Казани", "Живёт в Казани.", True),
        ("Казани", "Он из Казань.", True),  # the same Snowball stem
        ("14 марта", "день рождения: 14.03", True),
        ("+7 913 222-33-44", "телефон 79132223344", True),
        ("12 June", "on June 12th", True),
        ("Toronto", "Lives in Ottawa.", False),
        ("2015", "born in 2016", False),
    ],
)
def test_a_fact_is_kept_as_the_fact_guard_normalises_it(fact: str, text: str, expected: bool) -> None:
    assert qualify.kept(fact, text) is expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min_fact_retention": 1.2}, "min_fact_retention must be a share between 0 and 1, got 1.2"),
        ({"min_language_kept": True}, "min_language_kept must be a share between 0 and 1, got True"),
        ({"max_failed_users": -1}, "max_failed_users must be a whole number >= 0, got -1"),
        ({"max_false_alarms": 1.5}, "max_false_alarms must be a whole number >= 0, got 1.5"),
        ({"max_latency_seconds": 0}, "max_latency_seconds must be a positive number, got 0"),
        ({"max_latency_seconds": float("nan")}, "max_latency_seconds must be a positive number, got nan"),
        ({"min_facts": 1}, "unknown threshold(s): min_facts"),
    ],
)
def test_bad_thresholds_are_refused_naming_them(values: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        qualify.Thresholds.from_mapping(values)
    assert str(caught.value) == message


def test_null_thresholds_take_the_defaults() -> None:
    assert qualify.Thresholds.from_mapping({"min_fact_retention": None, "max_failed_users": 2}) == qualify.Thresholds(
        max_failed_users=2
    )
