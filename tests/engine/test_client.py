"""The Butler's client (butler_memory.client): a consistent read in every state our writers leave a
user in, ring and compress_now, the read without Redis, and bad input.

The fake LLM answers with a ledger (``chain_responder``: the previous summary plus the ids of the
events it was shown), so which events a summary covers is checkable: every read must hold each live
event exactly once, in the summary's ledger or in the raw list.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pymongo
import pytest
import redis
import redis.asyncio
from pymongo.database import Database

from butler_memory import client as butler
from butler_memory.core.errors import (
    ConcurrentUpdateError,
    InvalidEventError,
    InvalidProfileError,
    InvalidUserIdError,
    LockUnavailableError,
)
from butler_memory.core.settings import SettingsError
from butler_memory.fold.compression import COMPRESSED, SKIPPED_LOCKED
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.operations import forget
from butler_memory.operations.engine import Engine
from butler_memory.storage.profiles import ERASING_FIELD, FORGET_FIELD, PENDING_FIELD, ROLLBACK_FIELD, VERSION_FIELD
from tests.engine.conftest import OpenAIFactory
from tests.engine.erasure_helpers import SECRET
from tests.engine.helpers import (
    START,
    chain_responder,
    events_of,
    history_of,
    insert_events,
    ledger,
    make_engine,
    profile_of,
    set_profile,
    small_settings,
)
from tests.engine.test_kill_matrix import SETTINGS
from tools.bench_engine import CommandCounter
from tools.fake_openai import FakeOpenAI
from tools.services import MongoService, RedisService, free_port

Doc = dict[str, Any]
USER = "u1"


class Stop(Exception):
    """Raised at a checkpoint: the operation stops there, as a killed one would (the lock is released)."""


def stop_at(step: str, occurrence: int = 1) -> Any:
    """Return a checkpoint that raises Stop the ``occurrence``-th time ``step`` is reached."""
    reached: dict[str, int] = {}

    def checkpoint(name: str) -> None:
        reached[name] = reached.get(name, 0) + 1
        if name == step and reached[name] == occurrence:
            raise Stop(step)

    return checkpoint


def seen(memory: butler.Memory) -> tuple[list[str], list[str]]:
    """Return the event ids in the summary's ledger and in the raw list."""
    return ledger(memory.summary), [str(ev.id) for ev in memory.events]


def assert_exactly_once(memory: butler.Memory, expected: set[str]) -> None:
    """Every expected event is in the summary or the raw list, once; nothing else is."""
    summarised, raw = seen(memory)
    both = set(summarised) & set(raw)
    assert not both, f"v{memory.version}: in the summary and the raw list: {sorted(both)}"
    assert len(summarised) == len(set(summarised)) and len(raw) == len(set(raw)), "an event is listed twice"
    assert set(summarised) | set(raw) == expected, (
        f"v{memory.version}: missing {sorted(expected - set(summarised) - set(raw))}, "
        f"unexpected {sorted((set(summarised) | set(raw)) - expected)}"
    )


def ids_of(first: int, n: int) -> set[str]:
    return {f"{USER}-e{i:03d}" for i in range(first, first + n)}


@pytest.fixture
def engine(mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory) -> Engine:
    """Return an engine whose LLM answers with a ledger."""
    llm.set_responder(chain_responder)
    return make_engine(mongo_db, redis_client, SETTINGS, make_openai(timeout=SETTINGS.llm_timeout_seconds))


@pytest.fixture
def compressed(mongo_db: Database[Doc], engine: Engine) -> None:
    """Give the user 20 events, folded by run r0 (versions 1-3, the newest five raw)."""
    insert_events(mongo_db, USER, 20)
    assert engine.compress(USER, run_id="r0").summary_version == 3


@pytest.fixture
def reader(mongo_db: Database[Doc]) -> butler.MemoryClient:
    """Return a client that reads without Redis (the read never needs it)."""
    return butler.MemoryClient(mongo_db, settings=SETTINGS)


def test_a_plain_user_reads_summary_and_events(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    insert_events(mongo_db, USER, 20)
    assert_exactly_once(reader.memory(USER), ids_of(0, 20))
    assert engine.compress(USER, run_id="r0").summary_version == 3
    memory = reader.memory(USER)
    assert memory.version == 3 and len(memory.events) == 5
    assert [ev.event_id for ev in memory.events] == sorted(ids_of(15, 5))
    assert memory.messages()[0] == {"role": "assistant", "content": f"{USER}-e015: turn 15 about the weather."}
    assert memory.events[0].created_at.tzinfo is not None
    assert_exactly_once(memory, ids_of(0, 20))
    assert reader.memory("nobody") == butler.Memory("nobody", "", 0, ())


def test_a_pending_fold_is_not_returned_raw(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    insert_events(mongo_db, USER, 20)
    with pytest.raises(Stop):  # committed v2, its five events not yet archived or deleted
        engine.compress(USER, run_id="r0", checkpoint=stop_at("committed", 2))
    pending = profile_of(mongo_db, USER)[PENDING_FIELD]
    assert pending["version"] == 2 and set(pending["ids"]) <= set(events_of(mongo_db, USER)), "the state under test"
    memory = reader.memory(USER)
    assert memory.version == 2
    assert not {str(ev.id) for ev in memory.events} & set(pending["ids"])
    assert_exactly_once(memory, ids_of(0, 20))


def test_a_pending_fold_of_an_older_version_without_digests_is_hidden(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    insert_events(mongo_db, USER, 20)
    with pytest.raises(Stop):
        engine.compress(USER, run_id="r0", checkpoint=stop_at("committed", 1))
    mongo_db["user_profiles"].update_one({"user_id": USER}, {"$unset": {f"{PENDING_FIELD}.digests": ""}})
    assert_exactly_once(reader.memory(USER), ids_of(0, 20))


@pytest.mark.usefixtures("compressed")
def test_a_late_write_with_an_older_timestamp_is_returned(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    # Written after the fold, timed before its watermark: the watermark alone would hide it.
    insert_events(mongo_db, USER, 1, first=20, start=START - timedelta(days=1))
    memory = reader.memory(USER)
    assert memory.events[0].id == f"{USER}-e020"
    assert_exactly_once(memory, ids_of(0, 21))


@pytest.mark.parametrize("step", ["intent", "restored", "recorded", "committed", "unarchived"])
@pytest.mark.usefixtures("compressed")
def test_a_rollback_in_progress_reads_each_event_once(
    step: str, mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    insert_events(mongo_db, USER, 15, first=20, start=START + timedelta(days=1))
    assert engine.compress(USER, run_id="r1").summary_version == 6
    with pytest.raises(Stop):
        engine.rollback(USER, "r1", rollback_id="undo-r1", checkpoint=stop_at(step))
    assert profile_of(mongo_db, USER)[ROLLBACK_FIELD] is not None, "the state under test"
    memory = reader.memory(USER)
    assert memory.version == (6 if step in ("intent", "restored", "recorded") else 7)
    assert_exactly_once(memory, ids_of(0, 35))
    engine.rollback(USER, "r1", rollback_id="undo-r1")
    assert_exactly_once(reader.memory(USER), ids_of(0, 35))


@pytest.mark.parametrize("step", ["restored", "committed"])
def test_events_with_a_run_id_of_their_own_are_read_once_during_a_rollback(
    step: str, mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    """A restored event keeping its own ``run_id`` still matches its archive record, so is read once (third review)."""
    insert_events(mongo_db, USER, 20)
    mongo_db["user_memory"].update_many({"user_id": USER}, {"$set": {"run_id": "butler-agent-run-7"}})
    assert engine.compress(USER, run_id="r0").summary_version == 3
    with pytest.raises(Stop):
        engine.rollback(USER, "r0", rollback_id="undo-r0", checkpoint=stop_at(step))
    assert profile_of(mongo_db, USER)[ROLLBACK_FIELD] is not None, "the state under test"
    assert_exactly_once(reader.memory(USER), ids_of(0, 20))


def test_an_event_edited_while_it_was_folded_stays_raw_while_that_fold_is_rolled_back(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    """The fold kept an event the Butler edited meanwhile live; a half-done rollback of it must not hide it (second review)."""
    edited_text = f"{USER}-e002: the user corrected this message while it was being summarised."
    insert_events(mongo_db, USER, 20)
    edited = [False]

    def edit_during_the_llm_call(step: str) -> None:
        # After the fold read e002, before its commit: the fold keeps it live (its digest changed).
        if step == "summarized" and not edited[0]:
            mongo_db["user_memory"].update_one({"_id": f"{USER}-e002"}, {"$set": {"content": edited_text}})
            edited[0] = True

    engine.compress(USER, run_id="r0", checkpoint=edit_during_the_llm_call)
    assert edited[0] and events_of(mongo_db, USER)[f"{USER}-e002"]["content"] == edited_text, "the state under test"

    def raw(memory: butler.Memory) -> bool:
        return any(ev.content == edited_text for ev in memory.events)

    assert raw(reader.memory(USER)), "before the rollback the edited event is raw"
    with pytest.raises(Stop):  # the undone versions' events are back, the summary not yet restored
        engine.rollback(USER, "r0", rollback_id="undo-r0", checkpoint=stop_at("restored"))
    assert profile_of(mongo_db, USER)[ROLLBACK_FIELD] is not None, "the state under test"
    assert events_of(mongo_db, USER)[f"{USER}-e002"]["content"] == edited_text, "the Butler's newer text stayed"
    during = reader.memory(USER)
    assert raw(during), "during the rollback the read hid a live event that no summary covers"
    engine.rollback(USER, "r0", rollback_id="undo-r0")
    assert raw(reader.memory(USER)), "after the rollback the edited event is raw"


@pytest.mark.usefixtures("compressed")
def test_a_refold_reads_each_event_once(engine: Engine, reader: butler.MemoryClient) -> None:
    assert engine.refold(USER, run_id="refold-1").to_version == 4
    assert_exactly_once(reader.memory(USER), ids_of(0, 20))


@pytest.mark.parametrize("step", ["planned", "deleted", "summarized", "committed", "dropped"])
@pytest.mark.usefixtures("compressed")
def test_an_event_being_forgotten_is_never_returned(
    step: str, mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    archived, raw = f"{USER}-e007", f"{USER}-e018"
    with pytest.raises(Stop):
        forget.forget_events(USER, engine=engine, secret=SECRET, event_ids=[archived, raw], checkpoint=stop_at(step))
    assert profile_of(mongo_db, USER)[FORGET_FIELD] is not None, "the state under test"
    memory = reader.memory(USER)
    assert raw not in {ev.id for ev in memory.events}
    # The summary still holds the archived one until the rebuild commits (the forget has not returned).
    assert_exactly_once(memory, ids_of(0, 20) - {raw} - ({archived} if step in ("committed", "dropped") else set()))
    forget.forget_events(USER, engine=engine, secret=SECRET, event_ids=[archived, raw])
    assert_exactly_once(reader.memory(USER), ids_of(0, 20) - {archived, raw})


@pytest.mark.usefixtures("compressed")
def test_an_unfinished_erasure_of_the_user_returns_nothing(
    mongo_db: Database[Doc], engine: Engine, reader: butler.MemoryClient
) -> None:
    set_profile(mongo_db, USER, **{ERASING_FIELD: "erasure-1"})
    assert reader.memory(USER) == butler.Memory(USER, "", 3, (), erasing=True)


def test_memory_takes_three_round_trips_whatever_the_user_size_archive_and_history_four_in_a_rollback(
    mongo_service: MongoService, mongo_db: Database[Doc], engine: Engine
) -> None:
    counter = CommandCounter()
    client: pymongo.MongoClient[Doc] = pymongo.MongoClient(mongo_service.uri, event_listeners=[counter])
    try:
        reader = butler.MemoryClient(client[mongo_db.name], settings=SETTINGS)
        insert_events(mongo_db, "small", 20)
        insert_events(mongo_db, "large", 2000)
        for user_id in ("small", "large"):
            counter.reset()
            reader.memory(user_id)
            assert dict(counter.counts) == {"find": 3}, f"{user_id}: {dict(counter.counts)}"
        insert_events(mongo_db, USER, 60)
        engine.compress(USER, run_id="r0")  # 55 archived events, 11 history versions
        assert len(history_of(mongo_db, USER)) == 11
        counter.reset()
        reader.memory(USER)
        assert dict(counter.counts) == {"find": 3}, dict(counter.counts)
        insert_events(mongo_db, USER, 15, first=60, start=START + timedelta(days=1))
        engine.compress(USER, run_id="r1")
        with pytest.raises(Stop):  # a rollback half done: its restored events are read from the archive
            engine.rollback(USER, "r1", rollback_id="undo-r1", checkpoint=stop_at("restored"))
        counter.reset()
        reader.memory(USER)
        assert dict(counter.counts) == {"find": 4}, dict(counter.counts)
    finally:
        client.close()


@pytest.mark.parametrize(
    "user_id",
    [None, "", "two words", "x" * 201, 42, "tab\there", "bell\x07"],
    ids=["none", "empty", "space", "long", "int", "tab", "control"],
)
def test_an_invalid_user_id_is_refused_before_mongodb(user_id: Any, reader: butler.MemoryClient) -> None:
    with pytest.raises(InvalidUserIdError, match="is not a user id"):
        reader.memory(user_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"memory_summary": ["not", "text"]}, "memory_summary"),
        ({VERSION_FIELD: "3"}, VERSION_FIELD),
        ({PENDING_FIELD: {"version": 1, "ids": "e1"}}, PENDING_FIELD),
        ({ROLLBACK_FIELD: {"version": 2}}, ROLLBACK_FIELD),
        ({FORGET_FIELD: {"ids": None}}, FORGET_FIELD),
    ],
    ids=["summary", "version", "pending", "rollback", "forget"],
)
def test_a_profile_field_of_the_wrong_shape_is_named(
    fields: Doc, field: str, mongo_db: Database[Doc], reader: butler.MemoryClient
) -> None:
    set_profile(mongo_db, USER, **fields)
    with pytest.raises(InvalidProfileError, match=f"user '{USER}': profile field '{field}'"):
        reader.memory(USER)


def test_a_profile_written_before_our_bookkeeping_reads(mongo_db: Database[Doc], reader: butler.MemoryClient) -> None:
    set_profile(mongo_db, USER, memory_summary="written by the bot's own inline compression")
    insert_events(mongo_db, USER, 2)
    memory = reader.memory(USER)
    assert (memory.summary, memory.version, len(memory.events)) == ("written by the bot's own inline compression", 0, 2)


def test_an_event_of_the_wrong_shape_is_named(mongo_db: Database[Doc], reader: butler.MemoryClient) -> None:
    insert_events(mongo_db, USER, 2)
    mongo_db["user_memory"].update_one({"_id": f"{USER}-e001"}, {"$set": {"content": 7}})
    with pytest.raises(InvalidEventError, match=f"user '{USER}': event {USER}-e001: field 'content' is a int"):
        reader.memory(USER)


def test_without_redis_the_read_works_and_ring_and_compress_now_fail_closed(
    mongo_db: Database[Doc], llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    insert_events(mongo_db, USER, 20)
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    summarizer = make_openai(timeout=SETTINGS.llm_timeout_seconds)
    client = butler.MemoryClient(
        mongo_db, dead, settings=SETTINGS, engine=butler.inline_engine(mongo_db, dead, summarizer, settings=SETTINGS)
    )
    assert len(client.memory(USER).events) == 20
    assert client.ring(USER) is False
    with pytest.raises(LockUnavailableError):
        client.compress_now(USER)
    assert butler.MemoryClient(mongo_db, settings=SETTINGS).ring(USER) is False
    assert llm.requests == [], "nothing was summarised without the lock"


def test_ring_records_the_user(mongo_db: Database[Doc], redis_client: redis.Redis) -> None:
    client = butler.MemoryClient(mongo_db, redis_client, settings=SETTINGS)
    assert client.ring(USER, events=SETTINGS.threshold) is False, "at the threshold a ring is a no-op"
    assert client.ring(USER, events=SETTINGS.threshold + 1) is True
    assert redis_client.zscore(SETTINGS.doorbell_key, USER) is not None


def test_compress_now_runs_the_engine_under_the_shared_lock(
    mongo_db: Database[Doc], redis_client: redis.Redis, llm: FakeOpenAI, make_openai: OpenAIFactory
) -> None:
    llm.set_responder(chain_responder)
    insert_events(mongo_db, USER, 20)
    summarizer = make_openai(timeout=SETTINGS.llm_timeout_seconds)
    engine = butler.inline_engine(mongo_db, redis_client, summarizer, settings=SETTINGS)
    client = butler.MemoryClient(mongo_db, redis_client, settings=SETTINGS, engine=engine)
    held = engine.locks.acquire(USER)
    assert held is not None
    assert client.compress_now(USER).status == SKIPPED_LOCKED
    held.release()
    result = client.compress_now(USER)
    assert (result.status, result.summary_version) == (COMPRESSED, 3)
    runs = {entry["run_id"] for entry in history_of(mongo_db, USER)}
    assert len(runs) == 1 and runs.pop().startswith("inline__"), "the history records the inline run"
    assert_exactly_once(client.memory(USER), ids_of(0, 20))
    with pytest.raises(SettingsError, match="compress_now needs an engine"):
        butler.MemoryClient(mongo_db, settings=SETTINGS).compress_now(USER)


def test_the_async_client_reads_as_the_sync_one(
    mongo_service: MongoService,
    mongo_db: Database[Doc],
    redis_service: RedisService,
    redis_client: redis.Redis,
    engine: Engine,
    reader: butler.MemoryClient,
) -> None:
    insert_events(mongo_db, USER, 20)
    with pytest.raises(Stop):
        engine.compress(USER, run_id="r0", checkpoint=stop_at("committed", 1))
    engine.compress(USER, run_id="r0")
    insert_events(mongo_db, USER, 15, first=20, start=START + timedelta(days=1))
    engine.compress(USER, run_id="r1")
    with pytest.raises(Stop):
        engine.rollback(USER, "r1", rollback_id="undo-r1", checkpoint=stop_at("restored"))

    async def read() -> tuple[butler.Memory, bool, Any]:
        mongo: pymongo.AsyncMongoClient[Doc] = pymongo.AsyncMongoClient(mongo_service.uri)
        bell = redis.asyncio.Redis(host=redis_service.host, port=redis_service.port)
        try:
            client = butler.AsyncMemoryClient(mongo[mongo_db.name], bell, settings=SETTINGS, engine=engine)
            memory = await client.memory(USER)
            rang = await client.ring(USER)
            with pytest.raises(InvalidUserIdError):
                await client.memory("")
            return memory, rang, await client.compress_now(USER)
        finally:
            await mongo.close()
            await bell.aclose()

    before = reader.memory(USER)
    memory, rang, result = asyncio.run(read())
    assert memory == before
    assert_exactly_once(memory, ids_of(0, 35))
    assert rang is True and redis_client.zscore(SETTINGS.doorbell_key, USER) is not None
    assert result.status == COMPRESSED, result
    assert_exactly_once(reader.memory(USER), ids_of(0, 35))


def run_find(db: Database[Doc], find: butler.Find) -> Any:
    """Run one read of a read plan on the test's database, as MemoryClient does."""
    coll = db[{"profiles": "user_profiles", "events": "user_memory", "archive": "user_memory_archive"}[find.collection]]
    if find.one:
        return coll.find_one(find.filter, find.projection) or {}
    return list(coll.find(find.filter, find.projection).sort(butler.EVENT_ORDER))


def test_a_fold_between_the_profile_and_the_events_read_makes_the_read_start_again(
    mongo_db: Database[Doc], engine: Engine
) -> None:
    insert_events(mongo_db, USER, 20)
    plan = butler.read_plan(USER, SETTINGS)
    find = next(plan)
    assert find.collection == "profiles"
    find = plan.send(run_find(mongo_db, find))
    assert find.collection == "events"
    # A whole fold (commit, delete, clear) between the two reads: the 15 folded events are gone from
    # user_memory, and the profile read before it has no summary of them.
    engine.compress(USER, run_id="r0")
    find = plan.send(run_find(mongo_db, find))
    assert find.collection == "profiles"
    find = plan.send(run_find(mongo_db, find))
    assert find.collection == "profiles", "the profile moved during the read: the read must start again"
    try:
        while True:
            find = plan.send(run_find(mongo_db, find))
    except StopIteration as done:
        memory = done.value
    assert memory.version == 3
    assert_exactly_once(memory, ids_of(0, 20))


def test_a_profile_that_moves_during_every_read_gives_a_clear_retryable_error(mongo_db: Database[Doc]) -> None:
    insert_events(mongo_db, USER, 3)
    plan = butler.read_plan(USER, SETTINGS)
    find = next(plan)
    with pytest.raises(ConcurrentUpdateError, match=f"user '{USER}': the profile changed during each of 8 reads"):
        for version in range(1, 100):
            if find.collection == "events":  # a writer commits between every profile read and its re-check
                set_profile(mongo_db, USER, **{VERSION_FIELD: version})
            find = plan.send(run_find(mongo_db, find))
    assert version == 3 * butler.ATTEMPTS, "three reads an attempt, then it gives up"


@pytest.mark.usefixtures("compressed")
def test_a_logged_memory_shows_no_content(reader: butler.MemoryClient) -> None:
    memory = reader.memory(USER)
    shown = f"{memory!r} {memory.events!r} {memory}"
    assert "weather" not in shown and memory.summary not in shown, shown
    assert (
        repr(memory) == f"Memory(user_id='u1', version=3, summary_chars={len(memory.summary)}, events=5, erasing=False)"
    )


def _uuid_events(db: Database[Doc], n: int) -> list[uuid.UUID]:
    """Insert ``n`` events of USER with native UUID ``_id``s (through a standard-UUID client); return the ids."""
    ids = [uuid.uuid4() for _ in range(n)]
    db["user_memory"].insert_many(
        [
            {
                "_id": i,
                "user_id": USER,
                "role": "user",
                "content": f"turn {k} about the weather.",
                "created_at": START + timedelta(minutes=k),
            }
            for k, i in enumerate(ids)
        ]
    )
    return ids


def test_memory_reads_events_with_uuid_ids_on_a_standard_uuid_client(
    mongo_service: MongoService, mongo_db: Database[Doc]
) -> None:
    """A Butler client decoding UUID ``_id``s to ``uuid.UUID`` reads the memory, no bare ValueError (third review)."""
    butler_client: pymongo.MongoClient[Doc] = mongo_service.client(uuidRepresentation="standard")
    try:
        db = butler_client[mongo_db.name]
        ids = _uuid_events(db, 3)
        memory = butler.MemoryClient(db, settings=small_settings()).memory(USER)
    finally:
        butler_client.close()
    assert [ev.id for ev in memory.events] == ids


def test_compress_now_folds_events_with_uuid_ids_on_a_standard_uuid_client(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """``compress_now`` on a standard-UUID client folds events with UUID ``_id``s (third review)."""
    settings = small_settings()
    butler_client: pymongo.MongoClient[Doc] = mongo_service.client(uuidRepresentation="standard")
    try:
        db = butler_client[mongo_db.name]
        _uuid_events(db, 14)
        engine = butler.inline_engine(db, redis_client, OfflineSummarizer(), settings=settings)
        result = butler.MemoryClient(db, redis_client, settings=settings, engine=engine).compress_now(USER)
    finally:
        butler_client.close()
    assert (result.status, result.events_folded) == (COMPRESSED, 11), result


def test_a_standard_uuid_client_hides_the_jobs_pending_fold_of_uuid_ids(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    """The job (default codec: UUIDs read as Binary) and a standard-UUID client agree on an event's digest,
    so a pending fold's events are hidden from the Butler's read (third review)."""
    settings = small_settings()
    butler_client: pymongo.MongoClient[Doc] = mongo_service.client(uuidRepresentation="standard")
    try:
        db = butler_client[mongo_db.name]
        ids = _uuid_events(db, 14)
        with pytest.raises(Stop):  # the job committed v1, its events not yet archived or deleted
            make_engine(mongo_db, redis_client, settings).compress(USER, run_id="r0", checkpoint=stop_at("committed"))
        pending = profile_of(db, USER)[PENDING_FIELD]["ids"]
        memory = butler.MemoryClient(db, settings=settings).memory(USER)
    finally:
        butler_client.close()
    assert memory.version == 1 and pending, "the state under test"
    assert [ev.id for ev in memory.events] == [i for i in ids if i not in pending], memory
