"""Which summariser a run uses is never a silent fallback (issue 11, finding 3), and connection
extras are checked like settings. Connections come through Airflow's real lookup (AIRFLOW_CONN_*)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from butler_memory.core.settings import Settings, SettingsError
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.openai_summarizer import OpenAISummarizer
from butler_memory.llm.summarizer import EventText, SummaryRequest
from butler_memory.orchestration.connections import build_summarizer, llm_config
from tools.fake_openai import FakeOpenAI

CONN = "AIRFLOW_CONN_OPENAI_DEFAULT"


def conn(host: str = "http://127.0.0.1:9/v1", **extra: Any) -> str:
    return json.dumps(
        {"conn_type": "generic", "host": host, "password": "k", "extra": {"model": "gpt-4o-mini", **extra}}
    )


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (CONN, "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    yield


def summarizer_of(settings: Settings) -> Any:
    made = build_summarizer(settings)
    made.close()
    return made


def test_a_configured_connection_that_is_missing_is_an_error_not_the_offline_summariser() -> None:
    with pytest.raises(SettingsError, match=r"LLM connection 'openai_default' is not defined"):
        build_summarizer(Settings(summarizer="auto"))


def test_a_connection_that_cannot_be_read_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Airflow's own lookup reports a backend that fails to parse it as "not defined"; either way: an error.
    monkeypatch.setenv(CONN, "{not json")
    with pytest.raises(SettingsError, match="openai_default"):
        build_summarizer(Settings(summarizer="auto"))


def test_a_misspelt_connection_id_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN, conn())
    with pytest.raises(SettingsError, match="'openai_defualt' is not defined"):
        build_summarizer(Settings(summarizer="auto", llm_conn_id="openai_defualt"))


def test_an_api_key_alone_never_reaches_the_public_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert llm_config(Settings()) is None
    for choice in ("auto", "openai"):
        with pytest.raises(SettingsError, match="is not defined"):
            build_summarizer(Settings(summarizer=choice))


def test_the_offline_summariser_is_used_only_when_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN, conn())
    assert isinstance(summarizer_of(Settings(summarizer="offline")), OfflineSummarizer)
    assert isinstance(summarizer_of(Settings(summarizer="auto")), OpenAISummarizer)
    monkeypatch.delenv(CONN)
    assert isinstance(summarizer_of(Settings(summarizer="auto", llm_conn_id="")), OfflineSummarizer), (
        "auto with no LLM connection configured at all is the offline summariser"
    )


def test_an_explicit_base_url_in_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    config = llm_config(Settings())
    assert config is not None and config.base_url == "http://127.0.0.1:9/v1"


def test_a_connection_without_a_host_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN, json.dumps({"conn_type": "generic", "password": "k", "extra": {"model": "m"}}))
    with pytest.raises(SettingsError, match="has no host"):
        llm_config(Settings())


def test_connection_extras_are_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONN, conn(tokenizer="llama3", context_tokens=8192, prompt_tokens_tolerance=0.2))
    config = llm_config(Settings())
    assert config is not None
    assert (config.tokenizer, config.context_tokens, config.prompt_tokens_tolerance) == ("llama3", 8192, 0.2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"timeout": 200}, r"extra timeout \(200.0\) must be positive and under half of lock_ttl_seconds \(300\)"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"tokenizer": "bpe"}, "tokenizer 'bpe' is not one of"),
        ({"context_tokens": "8k"}, "'context_tokens' has the wrong type"),
        ({"context_tokens": 1200}, r"context_tokens \(1200\) leaves no room"),
        ({"prompt_tokens_tolerance": 1.5}, "must be in"),
        ({"verify_prompt_tokens": "no"}, "wrong type"),
        ({"timeout": float("nan")}, "extra timeout must be a finite number, got nan"),
        ({"timeout": float("inf")}, "extra timeout must be a finite number, got inf"),
    ],
)
def test_bad_extras_fail_naming_them(monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], message: str) -> None:
    monkeypatch.setenv(CONN, conn(**extra))
    with pytest.raises(SettingsError, match=message):
        llm_config(Settings())


def authorization_sent(llm: FakeOpenAI) -> str | None:
    """Summarise once through the configured connection; return the Authorization header the server got."""
    summarizer = build_summarizer(Settings(summarizer="openai"))
    try:
        event = EventText("user", "Меня зовут Анна.", datetime(2026, 1, 1, tzinfo=UTC))
        summarizer.summarize(SummaryRequest("u1", "", [event], "ru", max_tokens=300, max_chars=1800))
    finally:
        summarizer.close()
    return llm.requests[-1]["headers"].get("authorization")


def without_password(host: str) -> str:
    return json.dumps({"conn_type": "generic", "host": host, "extra": {"model": "gpt-4o-mini"}})


def test_the_environment_key_never_goes_to_a_connection_host_it_was_not_given_for(
    monkeypatch: pytest.MonkeyPatch, llm: FakeOpenAI
) -> None:
    """Issue 26, item 8: a connection without a password sent OPENAI_API_KEY to its own host (plain http here)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-for-openai")
    monkeypatch.setenv(CONN, without_password(llm.base_url))
    assert authorization_sent(llm) == "Bearer not-needed"

    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.example.org/v1")  # the key's endpoint, not this host
    assert authorization_sent(llm) == "Bearer not-needed"


def test_the_environment_key_goes_to_the_endpoint_it_came_with(
    monkeypatch: pytest.MonkeyPatch, llm: FakeOpenAI
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-for-this-server")
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
    monkeypatch.setenv(CONN, without_password(llm.base_url))
    assert authorization_sent(llm) == "Bearer sk-for-this-server"
    monkeypatch.setenv(CONN, conn(llm.base_url))  # the connection's own password always wins
    assert authorization_sent(llm) == "Bearer k"


def test_the_public_endpoint_gets_the_environment_key() -> None:
    from butler_memory.orchestration.connections import _environment_key

    env = {"OPENAI_API_KEY": "sk-x"}
    assert _environment_key(Settings(), "https://api.openai.com/v1", env) == "sk-x"
    assert _environment_key(Settings(), "https://API.openai.com:443/v1/", env) == "sk-x"
    assert _environment_key(Settings(), "http://api.openai.com/v1", env) is None, "never over plain http"
    assert _environment_key(Settings(), "https://api.openai.com.evil.example/v1", env) is None
