"""A summary is accepted only from a complete reply to a prompt the server read in full (issue 11).

The fake OpenAI server plays an Ollama whose context is smaller than the prompt: it drops the
head of the prompt (the instructions and the previous summary go first) without an error and
reports the tokens it read, as Ollama does. Nothing may be deleted on such an answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import LLMPromptTruncatedError
from butler_memory.fold.compression import COMPRESSED
from butler_memory.llm.prompt import SYSTEM_PROMPT
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import events_of, insert_events, make_engine, set_profile, small_settings, snapshot
from tools.fake_openai import FakeOpenAI, prompt_tokens_of

Doc = dict[str, Any]
WINDOW = 700
"""The fake server's context, in tokens (an Ollama started with a small num_ctx)."""
RULES = SYSTEM_PROMPT.splitlines()[0]


def russian(user_id: str, i: int) -> str:
    return f"{user_id}-e{i:03d}: Меня зовут Анна, я живу в Казани и не ем орехи, запомни это, пожалуйста. " * 2


def reading_responder(seen: list[bool]) -> Any:
    """Answer with a short fixed summary; record whether the instructions were in what the server read."""

    def respond(request: dict[str, Any]) -> str:
        seen.append(any(RULES in (msg.get("content") or "") for msg in request["messages"]))
        return "- Анна живёт в Казани, не ест орехи."

    return respond


@pytest.mark.parametrize("tokenizer", ["o200k_base", "auto"], ids=["model-tokenizer", "unknown-model"])
def test_a_prompt_the_server_cut_is_refused_and_nothing_is_deleted(
    tokenizer: str, mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    # No context_tokens on the connection: the chunk budget (6000) is far over the server's 700.
    engine = make_engine(mongo_db, redis_client, small_settings(), make_openai(tokenizer=tokenizer))
    set_profile(mongo_db, "u1", memory_summary="- Аллергия на орехи.", memory_summary_version=2)
    insert_events(mongo_db, "u1", 40, content=russian)
    before = snapshot(mongo_db, "u1")
    seen: list[bool] = []
    llm.set_responder(reading_responder(seen))
    llm.set_context_window(WINDOW)

    with pytest.raises(LLMPromptTruncatedError, match=r"read 700 prompt tokens") as info:
        engine.compress("u1")

    assert seen == [False], "the fake must have dropped the head of the prompt (its instructions)"
    assert not info.value.retryable, "the same prompt would be cut again: fail, do not retry"
    assert snapshot(mongo_db, "u1") == before, "a summary of a truncated prompt was stored or events deleted"


def test_with_the_context_on_the_connection_every_prompt_fits(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    # Russian events, Russian summaries (the language guard); the fixed reply keeps no names (fact guard: warn).
    settings = small_settings(
        summary_max_tokens=50, max_event_chars=400, prompt_budget_tokens=6000, summary_language="ru", fact_guard="warn"
    )
    summarizer = make_openai(context_tokens=WINDOW)
    engine = make_engine(mongo_db, redis_client, settings, summarizer)
    insert_events(mongo_db, "u1", 40, content=russian)
    seen: list[bool] = []
    llm.set_responder(reading_responder(seen))
    llm.set_context_window(WINDOW)

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_folded == 37 and result.chunks > 1, result
    assert seen and all(seen), "every prompt must reach the server whole, instructions included"
    reply_room = 2 * settings.summary_max_tokens
    for request in llm.chat_requests:
        assert prompt_tokens_of(request) + reply_room <= WINDOW, "a prompt left no room for the reply"


def test_an_event_longer_than_the_context_is_quarantined_before_any_call(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(summary_max_tokens=50, max_event_chars=3000)
    engine = make_engine(mongo_db, redis_client, settings, make_openai(context_tokens=WINDOW))
    set_profile(mongo_db, "u1", memory_summary="- Аллергия на орехи.", memory_summary_version=2)
    insert_events(mongo_db, "u1", 14, content=lambda u, i: russian(u, i) * (10 if i == 0 else 1))

    result = engine.compress("u1")

    assert result.status == COMPRESSED and result.events_quarantined == 1, result
    record = mongo_db["user_memory_quarantine"].find_one({"_id": "u1-e000"})
    assert record is not None and record["field"] == "content", record
    assert re.fullmatch(r"is \d+ tokens: .*exceeds the model's context.*", record["problem"]), record["problem"]
    assert "Анна" not in record["problem"]
    assert all("u1-e000:" not in json.dumps(r, ensure_ascii=False) for r in llm.chat_requests), (
        "an event that cannot fit must never be sent"
    )
    assert len(events_of(mongo_db, "u1")) == settings.keep_last_n
