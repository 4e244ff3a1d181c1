"""LLM fault modes through OpenAISummarizer against the fake OpenAI server: each failure is classified
(transient = retry later, permanent = fail fast) and none of them deletes or changes anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import (
    CompressionError,
    InvalidSummaryError,
    LLMPermanentError,
    LLMPromptTruncatedError,
    LLMReplyCutOffError,
    LLMTransientError,
)
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import COMPRESSED
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer
from tests.engine.conftest import Rig
from tests.engine.helpers import (
    events_of,
    insert_events,
    make_engine,
    openai_summarizer,
    set_profile,
    small_settings,
    snapshot,
)
from tools.fake_openai import FakeOpenAI
from tools.services import free_port

Doc = dict[str, Any]

SUMMARY = "- Аллергия на орехи."

FAULTS: dict[str, tuple[Callable[[FakeOpenAI], None], type[CompressionError], bool]] = {
    "429": (lambda llm: llm.push_status(429), LLMTransientError, True),
    "500": (lambda llm: llm.push_status(500), LLMTransientError, True),
    "503": (lambda llm: llm.push_status(503), LLMTransientError, True),
    "timeout": (lambda llm: llm.push_hang(2.0), LLMTransientError, True),
    "malformed-json": (lambda llm: llm.push_malformed(), LLMTransientError, True),
    "401": (lambda llm: llm.push_status(401), LLMPermanentError, False),
    "400": (lambda llm: llm.push_status(400), LLMPermanentError, False),
    "content-filter": (lambda llm: llm.push_reply("-", finish_reason="content_filter"), LLMPermanentError, False),
    "empty": (lambda llm: llm.push_empty(), InvalidSummaryError, False),
    "over-long": (lambda llm: llm.push_reply("Факт. " * 400), InvalidSummaryError, False),
    # A reply cut at max_tokens reads like a summary, but lost whatever it did not get to write.
    "cut-off": (lambda llm: llm.push_reply("- Аллергия на", finish_reason="length"), LLMReplyCutOffError, False),
    # A server that reports reading far less than was sent dropped part of the prompt.
    "read-less": (lambda llm: llm.push_reply("- Факт.", prompt_tokens=40), LLMPromptTruncatedError, False),
    "no-usage": (lambda llm: llm.push_reply("- Факт.", prompt_tokens=0), LLMPromptTruncatedError, False),
}


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_llm_fault_is_classified_and_changes_nothing(
    fault: tuple[Callable[[FakeOpenAI], None], type[CompressionError], bool], rig: Rig
) -> None:
    script, expected, retryable = fault
    engine = rig.engine(small_settings(), max_retries=0, timeout=0.5)
    set_profile(rig.db, "u1", memory_summary=SUMMARY, memory_summary_version=4)
    insert_events(rig.db, "u1", 14)
    before = snapshot(rig.db, "u1")
    script(rig.llm)

    with pytest.raises(CompressionError) as info:
        engine.compress("u1")

    assert type(info.value) is expected, f"expected {expected.__name__}, got {type(info.value).__name__}: {info.value}"
    assert info.value.retryable is retryable, f"{type(info.value).__name__}.retryable should be {retryable}"
    assert info.value.user_id == "u1" and "'u1'" in str(info.value), f"the error must name the user: {info.value}"
    assert len(rig.llm.chat_requests) == 1, "with max_retries=0 the client must call exactly once"
    assert snapshot(rig.db, "u1") == before, "a failed LLM call changed the database"
    assert rig.redis.keys("*") == [], "the lock must be released after a failure"
    if expected is not InvalidSummaryError:
        rig.statsd.wait_for(lambda lines: f"{m.LLM_ERRORS_TOTAL}:1|c" in lines)


def test_unreachable_llm_is_transient(rig: Rig) -> None:
    summarizer = openai_summarizer(f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout=0.5)
    engine = rig.engine(small_settings(), summarizer)
    insert_events(rig.db, "u1", 14)
    before = snapshot(rig.db, "u1")
    try:
        with pytest.raises(LLMTransientError, match="APIConnectionError") as info:
            engine.compress("u1")
    finally:
        summarizer.close()

    assert info.value.retryable
    assert snapshot(rig.db, "u1")["events"] == before["events"], "events were deleted without a summary"


@pytest.mark.parametrize("status", [429, 500])
def test_a_retry_inside_the_client_recovers(status: int, rig: Rig) -> None:
    settings = small_settings(summary_language="ru")  # the reply is Russian
    engine = rig.engine(settings, max_retries=1, timeout=2.0)
    insert_events(rig.db, "u1", 14)
    rig.llm.push_status(status)
    rig.llm.push_reply("- Пользователь любит чай.")

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 11, result
    assert len(rig.llm.chat_requests) == 2, "one failed call and one retry"
    assert rig.db["user_profiles"].find_one({"user_id": "u1"})["memory_summary"] == "- Пользователь любит чай."


def test_the_request_asks_for_the_model_at_temperature_zero(rig: Rig) -> None:
    settings = small_settings(summary_max_tokens=200, summary_language="ru")  # the reply is Russian
    engine = rig.engine(settings)
    insert_events(rig.db, "u1", 14)
    rig.llm.push_reply("- Пользователь любит чай.", prompt_tokens=4321, completion_tokens=7)

    result = engine.compress("u1")

    (request,) = rig.llm.requests
    body = request["json"]
    assert body["model"] == "test-model" and body["temperature"] == 0, body
    assert body["max_tokens"] >= settings.summary_max_tokens, "the completion must have room for a full summary"
    assert [msg["role"] for msg in body["messages"]] == ["system", "user"]
    assert request["headers"]["authorization"] == "Bearer test-key"
    assert (result.prompt_tokens, result.completion_tokens) == (4321, 7), "token usage must be reported"


# -- a reply the real openai client hands over unchecked -------------------------------------------


def summarizer_replying(body: bytes) -> OpenAISummarizer:
    """The real OpenAISummarizer on the real openai client, whose server answers every call with ``body``."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    client = openai.OpenAI(
        base_url="http://llm.invalid/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    config = LLMConfig(
        base_url="http://llm.invalid/v1",
        api_key="k",
        model="test-model",
        tokenizer="o200k_base",
        verify_prompt_tokens=False,
    )
    return OpenAISummarizer(config, client=client)


def completion(content_json: str, usage_json: str) -> bytes:
    """A chat completion's JSON body with the given (JSON) message content and usage."""
    return (
        '{"id":"c1","object":"chat.completion","created":1,"model":"test-model","choices":[{"index":0,'
        '"message":{"role":"assistant","content":' + content_json + '},"finish_reason":"stop"}],'
        '"usage":' + usage_json + "}"
    ).encode()


USAGE = '{"prompt_tokens":0,"completion_tokens":5,"total_tokens":5}'
HOSTILE_REPLIES: dict[str, tuple[str, str, type[CompressionError]]] = {
    # JSON's \ud800 escape is valid JSON: the client hands back a str with a lone surrogate.
    "lone-surrogate-in-summary": (
        '"The user likes tea and lives in Berlin \\ud800 today."',
        USAGE,
        InvalidSummaryError,
    ),
    "usage-not-a-number": (
        '"The user likes tea and lives in Berlin today."',
        '{"prompt_tokens":"lots","completion_tokens":5,"total_tokens":5}',
        LLMTransientError,
    ),
    "usage-infinite": (
        '"The user likes tea and lives in Berlin today."',
        '{"prompt_tokens":1e999,"completion_tokens":5,"total_tokens":5}',
        LLMTransientError,
    ),
    "usage-negative": (
        '"The user likes tea and lives in Berlin today."',
        '{"prompt_tokens":0,"completion_tokens":-5,"total_tokens":5}',
        LLMTransientError,
    ),
}


@pytest.mark.parametrize("reply", list(HOSTILE_REPLIES.values()), ids=list(HOSTILE_REPLIES))
def test_a_hostile_llm_reply_fails_its_user_with_a_compression_error(
    reply: tuple[str, str, type[CompressionError]], mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """A reply that is not valid text, or whose usage is not a count, fails its user as a CompressionError (third review)."""
    content, usage, error = reply
    engine = make_engine(mongo_db, redis_client, small_settings(), summarizer_replying(completion(content, usage)))
    insert_events(mongo_db, "u1", 14)
    events_before = events_of(mongo_db, "u1")

    with pytest.raises(error) as raised:
        engine.compress("u1", run_id="r1")

    assert "Berlin" not in str(raised.value), "no content in the error"
    assert events_of(mongo_db, "u1") == events_before, "nothing may be deleted"
    assert mongo_db["user_memory_summaries"].count_documents({}) == 0, "nothing may be written"
