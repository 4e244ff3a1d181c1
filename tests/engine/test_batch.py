"""The daily run's batch mode at engine level (butler_memory.operations.batch) against real parts: the fake
OpenAI server's /v1/files and /v1/batches through the real ``openai`` client, MongoDB and Redis.

The wait is the triggerer's (tests/dags/test_batch_dag.py runs it through Airflow); here the
batches end at once (the fake's delay is 0), so collect follows submit directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import openai
import pytest
import redis
from pymongo.database import Database

from butler_memory.core.errors import CompressionError, LLMBatchError, LLMPromptTruncatedError, LLMReplyCutOffError
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold.compression import COMPRESSED, SKIPPED_STALE, UserResult
from butler_memory.operations import batch
from butler_memory.operations.engine import Engine
from tests.engine.conftest import OpenAIFactory
from tests.engine.helpers import (
    content_of,
    events_of,
    insert_events,
    make_engine,
    raise_at,
    set_profile,
    small_settings,
    snapshot,
)
from tools.fake_openai import FakeOpenAI

Doc = dict[str, Any]
RUN = "memory_compression/manual__2026-03-01T00:00:00+00:00"
USERS = ("u-a", "u-b", "u-c")


class Killed(Exception):
    """Raised by a checkpoint: the step's process dies there (the real kill -9 is the kill matrix's)."""


@pytest.fixture
def client(llm: FakeOpenAI) -> Iterator[openai.OpenAI]:
    """Return a real openai client on the fake server."""
    with openai.OpenAI(base_url=llm.base_url, api_key="test-key", max_retries=0) as made:
        yield made


def engine_of(db: Database[Doc], redis_client: redis.Redis, make_openai: OpenAIFactory, **changes: Any) -> Engine:
    return make_engine(db, redis_client, small_settings(llm_mode="batch", **changes), make_openai())


def seed(db: Database[Doc], users: tuple[str, ...] = USERS, n: int = 15) -> None:
    for user_id in users:
        insert_events(db, user_id, n)
        set_profile(db, user_id)  # a compression that fails creates an empty one: snapshots compare alike


@pytest.fixture
def engine(mongo_db: Database[Doc], redis_client: redis.Redis, make_openai: OpenAIFactory) -> Engine:
    """Return a batch-mode engine on the fake server, USERS seeded with 15 events each."""
    seed(mongo_db)
    return engine_of(mongo_db, redis_client, make_openai)


def run_batch(
    engine: Engine, client: openai.OpenAI, users: tuple[str, ...] = USERS, *, online: bool = False
) -> dict[str, UserResult | CompressionError]:
    """Prepare, submit, collect, then commit each user: its result, or the error it failed with."""
    batch.prepare(engine, RUN, users)
    batch.submit(engine, RUN, client)
    batch.collect(engine, RUN, client)
    return commit_all(engine, users, online=online)


def commit_all(engine: Engine, users: tuple[str, ...], *, online: bool = False) -> dict[str, Any]:
    outcomes: dict[str, UserResult | CompressionError] = {}
    for user_id in users:
        try:
            outcomes[user_id] = batch.commit_user(engine, user_id, run_key=RUN, online=online)
        except CompressionError as exc:
            outcomes[user_id] = exc
    return outcomes


def test_batch_run_folds_each_user_once_through_one_batch(
    mongo_db: Database[Doc], llm: FakeOpenAI, engine: Engine, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        outcomes = run_batch(engine, client)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "batch submit: 1 batch(es)" in logged
    assert not any(content_of(u, i) in logged for u in USERS for i in range(15)), "event content reached a log"

    for user_id in USERS:
        result = outcomes[user_id]
        assert isinstance(result, UserResult) and result.status == COMPRESSED, result
        assert result.events_folded == 12 and result.events_deleted == 12 and result.prompt_tokens > 0
        assert sorted(events_of(mongo_db, user_id)) == [f"{user_id}-e{i:03d}" for i in range(12, 15)]
        profile = mongo_db["user_profiles"].find_one({"user_id": user_id}) or {}
        assert profile["memory_summary_version"] == 1 and profile["memory_summary"].startswith("Brief summary")
        assert mongo_db["user_memory_archive"].count_documents({"user_id": user_id, "run_id": RUN}) == 12
    assert llm.chat_requests == []  # no online call: every summary came from the batch
    assert len(llm.batches) == 1 and llm.batches[0]["metadata"]["butler_run"] == RUN
    assert llm.files == []  # input and output files deleted from the provider
    # The batch collection holds ids and hashes, never the conversation; replies are dropped once committed.
    stored = repr(list(mongo_db["memory_batch_folds"].find()))
    assert not any(content_of(u, i) in stored for u in USERS for i in range(15))
    assert "memory_summary" not in stored and "Brief summary" not in stored


def test_the_batch_summary_is_the_online_one(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory, client: Any
) -> None:
    """The batch line is the online request: same prompt, so the same reply and the same summary."""
    seed(mongo_db, ("u-batch1", "u-online"))  # ids of one length: the faithful summaries differ only by them
    llm.set_responder("faithful")
    engine = engine_of(mongo_db, redis_client, make_openai)
    run_batch(engine, client, ("u-batch1",))
    engine.compress("u-online", run_id=RUN)
    texts = {
        u: (mongo_db["user_profiles"].find_one({"user_id": u}) or {})["memory_summary"]
        for u in ("u-batch1", "u-online")
    }
    assert "u-batch1-e000" in texts["u-batch1"]
    assert texts["u-batch1"] == texts["u-online"].replace("u-online", "u-batch1")


def test_new_events_during_the_wait_stay_and_a_changed_user_is_stale(
    mongo_db: Database[Doc], engine: Engine, client: Any
) -> None:
    batch.prepare(engine, RUN, USERS)
    batch.submit(engine, RUN, client)
    # While the batch runs: u-a keeps chatting, u-b is compressed online by the bot, one of u-c's
    # frozen events is edited.
    late = insert_events(mongo_db, "u-a", 5, first=100)
    engine.compress("u-b", run_id="bot-inline")
    mongo_db["user_memory"].update_one({"_id": "u-c-e005"}, {"$set": {"content": "edited"}})
    before = {u: snapshot(mongo_db, u) for u in ("u-b", "u-c")}
    batch.collect(engine, RUN, client)
    outcomes = commit_all(engine, USERS)

    assert outcomes["u-a"].status == COMPRESSED and outcomes["u-a"].events_folded == 12
    assert sorted(events_of(mongo_db, "u-a")) == sorted(["u-a-e012", "u-a-e013", "u-a-e014", *(e["_id"] for e in late)])
    for user_id in ("u-b", "u-c"):
        assert outcomes[user_id].status == SKIPPED_STALE, outcomes[user_id]
        assert snapshot(mongo_db, user_id) == before[user_id]  # nothing written, nothing deleted


def test_every_batch_reply_counts_once_on_the_budget_committed_refused_or_stale(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory, client: Any
) -> None:
    """A reply is paid for once it is collected: a cut-off one (u-b) and one dropped as stale (u-c)
    count too, and the commit counts nothing again (second review: both were never counted)."""
    from butler_memory.llm.budget import TokenBudget

    seed(mongo_db)
    engine = engine_of(mongo_db, redis_client, make_openai, daily_token_budget=10**9)
    engine = replace(engine, budget=TokenBudget(redis_client, engine.settings))
    llm.batch_line_fault("u-b-e000", "length")
    batch.prepare(engine, RUN, USERS)
    batch.submit(engine, RUN, client)
    batch.collect(engine, RUN, client)
    folds = {f["user_id"]: f for f in mongo_db["memory_batch_folds"].find({"kind": "fold"})}
    paid = sum(f["reply"]["usage"]["prompt_tokens"] + f["reply"]["usage"]["completion_tokens"] for f in folds.values())
    assert engine.budget is not None and engine.budget.spent() == paid > 0

    mongo_db["user_memory"].update_one({"_id": "u-c-e005"}, {"$set": {"content": "edited"}})
    batch.collect(engine, RUN, client)  # a cleared collect: the replies are stored already
    outcomes = commit_all(engine, USERS)

    assert outcomes["u-a"].status == COMPRESSED
    assert isinstance(outcomes["u-b"], LLMReplyCutOffError)
    assert outcomes["u-c"].status == SKIPPED_STALE
    assert engine.budget.spent() == paid


def test_a_forget_during_the_wait_drops_the_users_batch_reply_and_its_commit_is_stale(
    mongo_db: Database[Doc], engine: Engine, client: Any
) -> None:
    """A reply may hold a forgotten event's facts: the forget drops it at once, the batch's commit
    skips the user (second review: it waited on the fold until the commit or the retention)."""
    from butler_memory.operations import forget
    from tests.engine.erasure_helpers import SECRET

    batch.prepare(engine, RUN, USERS)
    batch.submit(engine, RUN, client)
    batch.collect(engine, RUN, client)
    assert forget.forget_events("u-a", engine=engine, secret=SECRET, event_ids=["u-a-e014"]).status == forget.FORGOTTEN
    before = snapshot(mongo_db, "u-a")

    assert mongo_db["memory_batch_folds"].count_documents({"user_id": "u-a", "reply": {"$ne": None}}) == 0
    outcomes = commit_all(engine, USERS)
    assert outcomes["u-a"].status == SKIPPED_STALE and snapshot(mongo_db, "u-a") == before
    assert outcomes["u-b"].status == COMPRESSED


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        pytest.param(lambda llm: llm.set_batch(final="failed"), LLMBatchError, id="batch-failed"),
        pytest.param(lambda llm: llm.set_batch(final="expired"), LLMBatchError, id="batch-expired"),
        pytest.param(lambda llm: llm.set_batch(final="cancelled"), LLMBatchError, id="batch-cancelled"),
        pytest.param(lambda llm: llm.batch_line_fault("u-b-e000", "error"), LLMBatchError, id="line-error"),
        pytest.param(lambda llm: llm.batch_line_fault("u-b-e000", "missing"), LLMBatchError, id="line-missing"),
        pytest.param(lambda llm: llm.batch_line_fault("u-b-e000", "length"), LLMReplyCutOffError, id="cut-off"),
        pytest.param(
            lambda llm: llm.batch_line_fault("u-b-e000", "truncated"), LLMPromptTruncatedError, id="truncated"
        ),
        pytest.param(lambda llm: llm.set_batch(garbage=True), LLMBatchError, id="output-garbage"),
        # third review: its usage ("lots") failed the whole collect as a ValueError, every user with it
        pytest.param(lambda llm: llm.batch_line_fault("u-b-e000", "bad-usage"), LLMBatchError, id="usage-malformed"),
    ],
)
def test_a_failed_batch_or_line_fails_its_users_deletes_nothing_and_an_online_rerun_compresses(
    spoil: Any, error: type[CompressionError], mongo_db: Database[Doc], llm: FakeOpenAI, engine: Engine, client: Any
) -> None:
    spoil(llm)
    before = {u: snapshot(mongo_db, u) for u in USERS}
    outcomes = run_batch(engine, client)

    whole_batch = not any(isinstance(o, UserResult) for o in outcomes.values())
    failed = USERS if whole_batch else ("u-b",)
    for user_id in USERS:
        if user_id in failed:
            assert isinstance(outcomes[user_id], error), outcomes[user_id]
            assert snapshot(mongo_db, user_id) == before[user_id]
        else:
            assert outcomes[user_id].status == COMPRESSED
    assert llm.files == []
    # Clear-and-rerun: the failed users are compressed online.
    rerun = commit_all(engine, failed, online=True)
    assert all(r.status == COMPRESSED for r in rerun.values()), rerun
    assert len(llm.chat_requests) == len(failed)
    # A reply the batch commit refused (cut off, truncated) is dropped once the online commit ended.
    folds = mongo_db[Settings().batch_collection]
    assert folds.count_documents({"kind": "fold", "reply": {"$nin": [None]}}) == 0


def test_a_server_without_the_batch_api_fails_before_anything_is_uploaded(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, client: Any
) -> None:
    llm.set_batch(enabled=False)
    with pytest.raises(SettingsError, match="llm_mode") as caught:
        batch.check_endpoint(client, Settings())
    assert "404" in str(caught.value)
    assert llm.files == [] and llm.batches == []


def test_an_unknown_completion_window_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="batch_completion_window"):
        small_settings(batch_completion_window="48h")


@pytest.mark.parametrize("step", ["intent", "uploaded", "created", "submitted"])
def test_a_submit_killed_at_any_step_and_rerun_makes_one_batch(
    step: str, llm: FakeOpenAI, engine: Engine, client: Any
) -> None:
    batch.prepare(engine, RUN, USERS)
    with pytest.raises(Killed):
        batch.submit(engine, RUN, client, checkpoint=raise_at(step, Killed))
    batch.submit(engine, RUN, client)
    assert len(llm.batches) == 1
    uploads = [f["id"] for f in llm.files if f["purpose"] == "batch"]
    assert uploads == [llm.batches[0]["input_file_id"]]  # an orphan upload was deleted
    batch.collect(engine, RUN, client)
    assert all(r.status == COMPRESSED for r in commit_all(engine, USERS).values())


def test_a_user_whose_fold_needs_several_chunks_is_compressed_online_and_the_batch_is_split(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory, client: Any
) -> None:
    seed(mongo_db)
    insert_events(mongo_db, "u-long", 40)
    users = (*USERS, "u-long")
    engine = engine_of(mongo_db, redis_client, make_openai, max_events_per_chunk=15, batch_max_lines=2)
    prepared = batch.prepare(engine, RUN, users)
    assert prepared.batched == 3 and prepared.online == 1
    batch.submit(engine, RUN, client)
    assert [len(b["metadata"]) for b in llm.batches] == [3, 3]  # 3 lines in two batches
    batch.collect(engine, RUN, client)
    outcomes = commit_all(engine, users)
    assert all(r.status == COMPRESSED for r in outcomes.values()), outcomes
    assert outcomes["u-long"].chunks == 3 and len(llm.chat_requests) == 3  # online, chunk by chunk


def test_the_trigger_fires_once_every_batch_ended(
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    make_openai: OpenAIFactory,
    client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wait's trigger, run on an event loop as the triggerer runs it, against the fake's batches."""
    import asyncio

    from butler_memory.orchestration.batch_trigger import BatchTrigger

    seed(mongo_db)
    llm.set_batch(delay=1.0, final="expired")
    engine = engine_of(mongo_db, redis_client, make_openai, batch_max_lines=2)
    batch.prepare(engine, RUN, USERS)
    ids = batch.submit(engine, RUN, client)
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)  # no connection: the environment's endpoint
    trigger = BatchTrigger(batch_ids=ids, settings={"llm_conn_id": ""}, poll_seconds=0.2)
    classpath, kwargs = trigger.serialize()
    assert classpath == "butler_memory.orchestration.batch_trigger.BatchTrigger" and "api_key" not in repr(kwargs)

    async def first_event() -> Any:
        async for event in BatchTrigger(**kwargs).run():
            return event.payload
        return None

    assert asyncio.run(first_event()) == {"states": dict.fromkeys(ids, "expired")}
    assert len(ids) == 2


VALID_SETTINGS = [
    {},
    {"summary_max_tokens": 900, "prompt_budget_tokens": 8000},
    {"max_event_chars": 20_000, "prompt_budget_tokens": 16_000},
    {"llm_timeout_seconds": 100.0, "lock_ttl_seconds": 600},
    {"llm_mode": "batch", "batch_poll_seconds": 5, "llm_conn_id": "openai_batch"},
]


@pytest.mark.parametrize("changes", VALID_SETTINGS, ids=lambda c: ",".join(c) or "defaults")
def test_the_batch_trigger_rebuilds_exactly_the_settings_the_task_resolved(changes: dict[str, Any]) -> None:
    """The triggerer rebuilds exactly the valid settings the task resolved from the trigger (third review)."""
    from butler_memory.orchestration.batch_trigger import BatchTrigger

    settings = Settings(**changes)
    trigger = BatchTrigger(batch_ids=["batch_1"], settings={**settings.as_dict(), "poll_seconds": 1.0})
    _classpath, kwargs = trigger.serialize()
    assert Settings.from_mapping(BatchTrigger(**kwargs).settings) == settings


def test_the_batch_trigger_starts_with_settings_the_task_accepted(airflow_conns: object, llm: FakeOpenAI) -> None:
    """Valid summary_max_tokens 900 with prompt_budget_tokens 8000 no longer fails the trigger (third review)."""
    import asyncio

    from butler_memory.orchestration.batch_trigger import BatchTrigger

    settings = Settings(summary_max_tokens=900, prompt_budget_tokens=8000)  # valid: the task side resolved it
    trigger = BatchTrigger(batch_ids=["batch_1"], settings={**settings.as_dict(), "poll_seconds": 1.0})
    _classpath, kwargs = trigger.serialize()
    in_triggerer = BatchTrigger(**kwargs)  # what the triggerer rebuilds
    try:
        client = in_triggerer._client()  # the first thing run() does
        error = None
    except Exception as exc:
        client, error = None, f"{type(exc).__name__}: {exc}"
    assert error is None, f"the trigger cannot start in the triggerer: {error}"
    asyncio.run(client.close())
