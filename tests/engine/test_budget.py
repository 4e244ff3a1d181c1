"""The daily LLM token budget on real Redis, MongoDB and the fake OpenAI server.

A run that reaches the budget stops taking users: those it has not started are ``skipped_budget``
with nothing touched (events, profile, history, archive as before), the user it had started is
finished, and the report says so without failing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import LLMPromptTruncatedError, LLMReplyCutOffError
from butler_memory.fold.compression import COMPRESSED, SKIPPED_BUDGET, failed_result
from butler_memory.fold.report import build_report, to_markdown
from butler_memory.llm.budget import TokenBudget
from butler_memory.operations.engine import Engine
from butler_memory.storage.store import MemoryStore
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import insert_events, small_settings, snapshot
from tools.fake_openai import FakeOpenAI

Doc = dict[str, Any]
DAY = datetime(2026, 6, 1, 9, 30, tzinfo=UTC)


def _engine(db: Database[Doc], client: redis.Redis, make_openai: OpenAIFactory, budget: int) -> Engine:
    from butler_memory.storage.locks import UserLocks

    settings = small_settings(daily_token_budget=budget, max_events_per_chunk=4)
    return Engine(
        settings,
        MemoryStore(db, settings),
        UserLocks(client, settings),
        make_openai(),
        budget=TokenBudget(client, settings, clock=lambda: DAY),
    )


def test_a_spent_budget_stops_taking_users_and_leaves_them_untouched(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    users = ["u-a", "u-b", "u-c"]
    for user_id in users:
        insert_events(mongo_db, user_id, 15)  # over threshold 10: 12 to fold, in 3 chunks of 4
    engine = _engine(mongo_db, redis_client, make_openai, budget=1)  # one token: spent by the first call
    untouched = {u: snapshot(mongo_db, u) for u in users[1:]}

    results = [engine.compress(u, run_id="r1") for u in users]

    assert [r.status for r in results] == [COMPRESSED, SKIPPED_BUDGET, SKIPPED_BUDGET]
    first = results[0]
    assert first.chunks == 3 and first.events_folded == 12, "a started user is finished, not left half-folded"
    assert llm.request_count == 3, "no LLM call for a user not started"
    for user_id in users[1:]:
        assert snapshot(mongo_db, user_id) == untouched[user_id], f"{user_id} was touched"
    assert redis_client.keys("butler:memory:lock:*") == [], "a skipped user's lock was taken"
    spent = int(redis_client.get("butler:memory:tokens:2026-06-01") or 0)
    assert spent == first.prompt_tokens + first.completion_tokens > 0
    assert 0 < redis_client.ttl("butler:memory:tokens:2026-06-01") <= 2 * 86400

    report = build_report(
        run_id="r1", scanned=users, results=[r.to_dict() for r in results], started_at=DAY, finished_at=DAY
    )
    assert report["users_skipped_budget"] == 2 and report["users_failed"] == 0
    assert "token budget was spent: **2** user(s) not started" in to_markdown(report)


def test_the_budget_is_shared_and_resets_the_next_day(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    settings = small_settings(daily_token_budget=100)
    today = TokenBudget(redis_client, settings, clock=lambda: DAY)
    other_task = TokenBudget(redis_client, settings, clock=lambda: DAY)
    assert not today.exhausted()
    today.spend(60)
    assert other_task.spend(40) == 100 and today.exhausted() and other_task.exhausted()
    tomorrow = TokenBudget(redis_client, settings, clock=lambda: DAY.replace(day=2))
    assert not tomorrow.exhausted() and tomorrow.spent() == 0


def test_no_budget_sends_nothing_to_redis(redis_client: redis.Redis) -> None:
    budget = TokenBudget(redis_client, small_settings(), clock=lambda: DAY)
    assert budget.spend(10_000) == 0 and not budget.exhausted()
    assert redis_client.keys("*") == []


def test_every_token_is_counted_refused_replies_and_failed_users_included(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    """Issue 26, item 6: a cut-off or truncated reply's tokens reached neither the budget nor the report."""
    for user_id in ("u-cut", "u-late"):
        insert_events(mongo_db, user_id, 15)
    engine = _engine(mongo_db, redis_client, make_openai, budget=1_000_000)

    llm.push_reply("a reply cut off at max_tokens", prompt_tokens=700, completion_tokens=600, finish_reason="length")
    with pytest.raises(LLMReplyCutOffError) as cut:
        engine.compress("u-cut", run_id="r1")
    assert (cut.value.prompt_tokens, cut.value.completion_tokens) == (700, 600)
    assert engine.budget is not None and engine.budget.spent() == 1300

    # A second chunk's server read 1 prompt token (it truncated the prompt): refused, counted, and the
    # failed user's result carries the first chunk's tokens as well.
    llm.push_reply("- The user told us about their day.", prompt_tokens=900, completion_tokens=40)
    llm.push_reply("- The user told us about their day.", prompt_tokens=1, completion_tokens=30)
    with pytest.raises(LLMPromptTruncatedError) as truncated:
        engine.compress("u-late", run_id="r1")
    assert (truncated.value.prompt_tokens, truncated.value.completion_tokens) == (901, 70)
    assert engine.budget.spent() == 1300 + 971

    rows = [failed_result("u-cut", cut.value).to_dict(), failed_result("u-late", truncated.value).to_dict()]
    report = build_report(run_id="r1", scanned=["u-cut", "u-late"], results=rows, started_at=DAY, finished_at=DAY)
    assert (report["prompt_tokens"], report["completion_tokens"]) == (1601, 670)
    assert report["users_failed"] == 2


def test_a_refold_and_a_forgets_rebuild_spend_the_days_budget(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    from butler_memory.operations import forget
    from tests.engine.erasure_helpers import SECRET

    engine = _engine(mongo_db, redis_client, make_openai, budget=10**9)
    insert_events(mongo_db, "u1", 15)
    assert engine.compress("u1", run_id="r1").status == COMPRESSED
    key = "butler:memory:tokens:2026-06-01"
    before = int(redis_client.get(key) or 0)

    refolded = engine.refold("u1", run_id="rf")
    after_refold = int(redis_client.get(key) or 0)
    forgot = forget.forget_events("u1", engine=engine, secret=SECRET, event_ids=["u1-e000"])
    after_forget = int(redis_client.get(key) or 0)

    assert refolded.chunks == 3 and after_refold - before == refolded.prompt_tokens + refolded.completion_tokens > 0
    assert forgot.status == forget.FORGOTTEN and forgot.events_refolded == 11
    assert after_forget > after_refold, "the forget's rebuild spent LLM tokens outside the day's budget"


def test_the_butlers_erase_events_counts_its_rebuild_on_the_days_budget(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    """docs/configuration.md: forgets count too, the Butler's own call included (second review: its
    engine had no budget)."""
    from butler_memory.operations.engine import erase_events
    from tests.engine.erasure_helpers import SECRET

    settings = small_settings(daily_token_budget=10**9)
    insert_events(mongo_db, "u1", 20)
    assert _engine(mongo_db, redis_client, make_openai, budget=10**9).compress("u1", run_id="r1").status == COMPRESSED
    budget = TokenBudget(redis_client, settings)
    redis_client.delete(budget.key())
    calls = len(llm.chat_requests)

    erase_events(
        "u1", db=mongo_db, redis_client=redis_client, summarizer=make_openai(), secret=SECRET,
        event_ids=["u1-e002"], settings=settings,
    )  # fmt: skip

    assert len(llm.chat_requests) > calls, "the forget rebuilt the summary with the LLM"
    assert budget.spent() > 0, "the Butler's forget spent LLM tokens that the day's budget never saw"
