"""The fact and language guards as pure logic (the engine tests run them through the real server)."""

from __future__ import annotations

import pytest

from butler_memory.core.errors import GuardRejected
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.safety import guards
from butler_memory.safety.facts import durable_facts, missing_facts
from butler_memory.safety.language import language_share

PREVIOUS_RU = """- Меня зовут Анна.
- У меня аллергия на пенициллин, телефон +7 (916) 123-45-67, почта anna@example.com.
- Мой день рождения 5 мая.
- Я живу в Санкт-Петербурге и работаю врачом в Google.
- My daughter's name is Bob, she is 7 years old.
- Приём 2026-03-05, запись на https://clinic.example.org/anna."""


def test_durable_facts_of_a_mixed_summary() -> None:
    facts = durable_facts(PREVIOUS_RU)
    assert facts == {
        ("name", "ан"),  # Анна
        ("name", "санкт"),
        ("name", "петербург"),
        ("name", "googl"),
        ("name", "bob"),
        ("phone", "79161234567"),
        ("email", "anna@example.com"),
        ("url", "clinic.example.org/anna"),
        ("date", "05-05"),
        ("date", "03-05"),
        ("number", "2026"),
        ("number", "7"),
    }


def test_a_faithful_rewording_keeps_every_fact() -> None:
    reworded = """- Пользователя зовут Анной; аллергия на пенициллин; тел. +79161234567; anna@example.com.
- День рождения: 05.05. Живёт в Санкт-Петербурге, врач в Google.
- Дочь Bob, seven years old. Приём 5 марта 2026, https://clinic.example.org/anna"""
    assert missing_facts(PREVIOUS_RU, [], reworded) == []


@pytest.mark.parametrize(
    ("dropped", "fact"),
    [
        ("Я живу в Санкт-Петербурге и работаю врачом в Google.", ("name", "googl")),
        ("Мой день рождения 5 мая.", ("date", "05-05")),
        ("+7 (916) 123-45-67", ("phone", "79161234567")),
        ("she is 7 years old", ("number", "7")),
        ("Меня зовут Анна", ("name", "ан")),
    ],
)
def test_a_dropped_fact_is_missing(dropped: str, fact: tuple[str, str]) -> None:
    assert fact in missing_facts(PREVIOUS_RU, [], PREVIOUS_RU.replace(dropped, "")), dropped


def test_russian_inflection_is_not_loss() -> None:
    previous = "- Сестра Мария живёт в Москве, брат Дмитрий работает в Казани."
    new = "- Пользователь часто звонит Марии; Дмитрия видит редко. Москва и Казань: родные города."
    assert missing_facts(previous, [], new) == []


def test_an_event_that_mentions_a_fact_excuses_its_removal() -> None:
    previous = "- Живёт в Казани, телефон 8-916-123-45-67."
    new = "- Живёт в Берлине."
    events = ["Я переехал из Казани в Берлин, старый номер 8 916 123-45-67 больше не работает."]
    assert missing_facts(previous, [], new) == [("name", "казан"), ("phone", "89161234567")]
    assert missing_facts(previous, events, new) == []


def test_sentence_openers_are_not_names_but_names_that_open_sentences_are() -> None:
    previous = "Likes jazz. Anna is the sister. The sister is called Anna."
    assert durable_facts(previous) == {("name", "anna")}
    assert missing_facts(previous, [], "Enjoys jazz; has a sister, Anna.") == []


def test_ids_and_counters_inside_words_are_not_numbers() -> None:
    assert durable_facts("u1-e003 u1-e004 user-00042") == set()


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        (PREVIOUS_RU, "ru", "pass"),
        ("- Я живу в London и работаю врачом в Google Cloud Platform.", "ru", "pass"),
        ("- Пользователь любит iPhone и MacBook Pro, летает Lufthansa.", "ru", "pass"),
        ("The user is Anna, allergic to penicillin, works as a doctor and lives in Berlin.", "ru", "fail"),
        ("The user is Anna, allergic to penicillin, works as a doctor and lives in Berlin.", "en", "pass"),
        ("Пользователь рассказывал о семье, здоровье и планах на лето.", "en", "fail"),
        ("Der Nutzer wohnt in Berlin und arbeitet als Arzt in einer Klinik.", "en", "fail"),
    ],
)
def test_language_share(text: str, language: str, expected: str) -> None:
    share, _ = language_share(text, language)
    assert share is not None
    assert (share >= 0.5) == (expected == "pass"), share


def test_too_little_text_is_not_judged() -> None:
    assert language_share("u1-e003 u1-e004 Berlin 2026", "ru") == (None, None)
    assert language_share("Some text in a language Lingua has no model for.", "xx") == (None, None)


def check(summary: str, *, previous: str = PREVIOUS_RU, language: str = "ru", **settings: str) -> list[str]:
    results = guards.check_summary(
        previous=previous, events=[], summary=summary, language=language, settings=Settings.from_mapping(settings)
    )
    return [r.outcome for r in results]


def test_modes() -> None:
    english = "The user is Anna, allergic to penicillin; she lives in Berlin."
    assert check(PREVIOUS_RU) == ["pass", "pass", "pass"]
    assert check(english) == ["reject", "reject", "pass"]
    assert check(english, fact_guard="warn", language_guard="off") == ["warn", "off", "pass"]
    assert check(english, language_guard_min_share="0.01") == ["reject", "reject", "pass"]
    assert check(english, previous="") == ["pass", "reject", "pass"], "a first summary has no facts to lose"


def test_a_rejection_names_user_and_guard_never_the_content() -> None:
    results = guards.check_summary(
        previous=PREVIOUS_RU,
        events=[],
        summary="The user likes green tea and long walks.",
        language="ru",
        settings=Settings(),
    )
    with pytest.raises(GuardRejected) as info:
        guards.enforce("u42", results)
    message = str(info.value)
    assert "'u42'" in message and "facts" in message and "language" in message, message
    assert info.value.guards == {"facts": "reject", "language": "reject", "injection": "pass"}
    assert not info.value.retryable
    for word in ("Анна", "Анн", "anna", "Google", "пеницил", "tea", "916", "clinic", "2026"):
        assert word.lower() not in message.lower(), f"the message quotes {word!r}: {message}"
    guards.enforce("u42", [r for r in results if r.outcome != "reject"])  # nothing to reject: no error


def test_the_worst_outcome_of_a_users_chunks_is_kept() -> None:
    outcome: dict[str, str] = {}
    guards.merge(outcome, [guards.GuardResult("facts", "pass"), guards.GuardResult("language", "warn")])
    guards.merge(outcome, [guards.GuardResult("facts", "warn"), guards.GuardResult("language", "pass")])
    assert outcome == {"facts": "warn", "language": "warn"}


@pytest.mark.parametrize("name", ["fact_guard", "language_guard", "injection_guard"])
def test_a_bad_mode_is_refused(name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_mapping({name: "block"})
    with pytest.raises(SettingsError, match="language_guard_min_share"):
        Settings.from_mapping({"language_guard_min_share": 0})


def test_the_users_own_words_are_not_drift_but_the_summarisers_are() -> None:
    events = ["My daughter's name is Bob, she is 7 years old.", "Привет!"]
    quoted = "- My daughter's name is Bob, she is 7 years old."
    authored = "- The user's daughter is called Bob and she is seven years old."
    assert language_share(quoted, "ru", ["", *events]) == (None, None), "nothing authored: nothing to judge"
    assert language_share(authored, "ru", ["", *events])[0] == 0.0
    previous = "- Пользователь сообщил: меня зовут Анна, я работаю врачом."
    assert language_share(f"{previous}\n{quoted}", "ru", [previous, *events]) == (None, None)


def test_a_short_russian_phrase_gets_the_benefit_of_the_doubt_over_ukrainian() -> None:
    share, _ = language_share("Пользователь сказал: меня зовут Анна.", "ru")
    assert share == 1.0
    share, detected = language_share("Користувач сказав, що його день народження у травні.", "ru")
    assert share == 0.0 and detected == "uk"
