"""qualify() against the real fake OpenAI server in each of its modes, and the offline summariser.

The server answers the engine's own prompt (tools/fake_openai.py): ``faithful`` plays a good model,
``drop_fact`` / ``new_only`` / ``wrong_language`` the failures the guards must catch, ``finish_reason``
"length" a model cut off at max_tokens, a context window an Ollama server that silently drops the
head of a long prompt.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from butler_memory.core.settings import Settings
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.prompt import LANGUAGE_NAMES, SYSTEM_PROMPT
from butler_memory.operations import qualify, qualify_cases
from tests.engine.conftest import OpenAIFactory
from tools.fake_openai import FakeOpenAI, faithful_responder

SETTINGS = Settings()
FACTS = sum(len(case.facts) for case in qualify_cases.CASES)


def by_user(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["user_id"]: row for row in report["cases"]}


def test_a_faithful_model_passes_through_the_real_prompt_chunk_by_chunk(
    llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_responder("faithful")

    report = qualify.qualify(SETTINGS, make_openai())

    assert report["verdict"] == qualify.PASS and report["reasons"] == [], report["reasons"]
    assert (report["facts_kept"], report["facts"]) == (FACTS, FACTS)
    assert report["users_failed"] == report["false_alarms"] == report["cut_off"] == report["truncated"] == 0
    assert report["language_kept"] == len(qualify_cases.CASES)
    rows = by_user(report)
    assert rows["qualify-en-long"]["llm_calls"] > 1, "the long history must take several prompts"
    assert report["llm_calls"] == len(llm.chat_requests)
    asked = {json.dumps(r["messages"][0]["content"]) for r in llm.chat_requests}
    languages = {case.language for case in qualify_cases.CASES}
    assert asked == {
        json.dumps(SYSTEM_PROMPT.format(language=LANGUAGE_NAMES[code], max_tokens=SETTINGS.summary_max_tokens))
        for code in languages
    }, "every call must carry the engine's own system prompt, in each user's language"
    assert report["prompt_tokens"] > 0 and all(row["latencies"] for row in report["cases"])
    assert report["latency_p95_seconds"] is not None


def test_replies_cut_off_at_max_tokens_fail_every_user(llm: FakeOpenAI, make_openai: OpenAIFactory) -> None:
    llm.set_responder("faithful")
    llm.set_finish_reason("length")

    report = qualify.qualify(SETTINGS, make_openai())

    assert report["verdict"] == qualify.FAIL
    assert report["cut_off"] == report["users_failed"] == len(qualify_cases.CASES)
    assert report["facts_kept"] == 0, "a cut-off reply is never read as a summary"
    assert any("would fail" in reason for reason in report["reasons"]), report["reasons"]


def test_an_ollama_like_server_that_truncates_long_prompts_fails_the_long_user(
    llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_responder("faithful")
    llm.set_context_window(1024)  # the short users' prompts fit; the long history's do not

    report = qualify.qualify(SETTINGS, make_openai())

    assert report["verdict"] == qualify.FAIL and report["truncated"] == 1
    statuses = {user: row["status"] for user, row in by_user(report).items()}
    assert statuses.pop("qualify-en-long") == qualify.TRUNCATED
    assert set(statuses.values()) == {qualify.ACCEPTED}, statuses


def test_a_model_that_drops_facts_is_rejected_by_the_fact_guard(llm: FakeOpenAI, make_openai: OpenAIFactory) -> None:
    llm.set_responder("drop_fact")

    report = qualify.qualify(SETTINGS, make_openai())

    with_summary = [case.user_id for case in qualify_cases.CASES if case.previous]
    assert report["guard_rejections"]["facts"] == len(with_summary)
    assert sum(report["guard_rejections"].values()) == len(with_summary), "only the fact guard rejects"
    assert sorted(report["failed_user_ids"]) == sorted(with_summary)
    assert report["fact_retention"] < 0.95 and report["false_alarms"] == 0
    assert report["verdict"] == qualify.FAIL


def test_a_model_writing_another_language_is_rejected_by_the_language_guard(
    llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_responder("wrong_language")

    report = qualify.qualify(SETTINGS, make_openai())

    assert report["guard_rejections"]["language"] == len(qualify_cases.CASES)
    assert report["language_kept"] == 0 and report["verdict"] == qualify.FAIL


def test_a_guard_rejecting_a_correct_correction_is_a_false_alarm(llm: FakeOpenAI, make_openai: OpenAIFactory) -> None:
    # A model that applies the phone correction: every planted fact kept, in Russian; the fact guard
    # cannot tell a corrected phone number from a dropped one (the events never repeat the old one).
    corrected = "- Пользователя зовут Иван Петров.\n- Живёт в Новосибирске.\n- Телефон +7 913 222-33-44."

    def respond(request: dict[str, Any]) -> str:
        return corrected if "Петров" in json.dumps(request, ensure_ascii=False) else faithful_responder(request)

    llm.set_responder(respond)

    report = qualify.qualify(SETTINGS, make_openai())

    row = by_user(report)["qualify-ru-correction"]
    assert row["status"] == qualify.REJECTED and row["guards"]["facts"] == "reject", row
    assert row["false_alarm"] and row["facts_kept"] == row["facts"] and row["corrections_applied"] == 1, row
    assert report["false_alarm_user_ids"] == ["qualify-ru-correction"] and report["verdict"] == qualify.FAIL


def test_the_offline_summariser_passes() -> None:
    report = qualify.qualify(SETTINGS, OfflineSummarizer())

    assert report["verdict"] == qualify.PASS, report["reasons"]
    assert report["summarizer"] == "offline" and report["facts_kept"] == FACTS


@pytest.mark.parametrize("status", [404, 401, 500])
def test_an_endpoint_answering_errors_fails_naming_it_without_content(
    status: int, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_default_status(status)

    with pytest.raises(qualify.EndpointError) as caught:
        qualify.qualify(SETTINGS, make_openai(), endpoint="LLM connection 'openai_default' (127.0.0.1:1)")

    message = str(caught.value)
    assert message.startswith("LLM connection 'openai_default' (127.0.0.1:1) cannot be used: "), message
    assert f"HTTP {status}" in message and "qualify-ru-short" in message, message
    assert len(llm.chat_requests) == 1, "one failing call is enough to stop"
    sent = llm.chat_requests[0]["messages"][1]["content"]
    assert "Ольга" in sent and "Ольга" not in message, "the error must not quote the prompt"
