"""Shared helpers of the erasure tests: a user with data in every place we write, and a search of all of them."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.core.errors import LLMPermanentError
from butler_memory.core.settings import Settings
from butler_memory.fold.compression import COMPRESSED, failed_result
from butler_memory.fold.report import build_report
from butler_memory.freshness.doorbell import Doorbell
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.operations.engine import Engine
from butler_memory.storage.store import MemoryStore
from tests.engine.helpers import insert_events, make_engine

Doc = dict[str, Any]
SECRET = b"test-erasure-secret-0f3c9a77"
TARGET = "erase-me-7f3a"
OTHER = "keep-me-2b91"
CANARY = "CANARY-erasure-94d1e0"
"""Planted in every event of the target user: it must be gone from everywhere afterwards."""
OTHER_CANARY = "CANARY-kept-c41a"
TEST_KEY_PATTERN = "butler:memory:test-pending:{user_id}"
SHARED_KEY = "butler:memory:test-due"


def canary_content(user_id: str, i: int) -> str:
    """Return a turn carrying the user's canary (each user's own)."""
    canary = CANARY if user_id == TARGET else OTHER_CANARY
    return f"Turn {i} of {user_id}: my diary says {canary} number {i}."


def quarantine_one(db: Database[Doc], settings: Settings, user_id: str) -> None:
    """Give a user a quarantined event (an oversized one, holding their canary), moved by the store itself."""
    store = MemoryStore(db, settings)
    (event,) = insert_events(db, user_id, 1, first=900, content=lambda u, i: canary_content(u, i) * 1000)
    raw = store.quarantine_copy(
        user_id, event["_id"], field="content", problem="is too long", run_id="seed-run", now=datetime.now(UTC)
    )
    assert raw is not None and store.quarantine_remove(user_id, event["_id"], raw) == 1


def seed_everywhere(db: Database[Doc], client: redis.Redis, settings: Settings, n: int = 25) -> None:
    """Give TARGET and OTHER data in every place this package writes.

    Both users are compressed for real (profile, archive, history when the engine writes it); a run
    document names both (a compressed row for each, a failed row and a failed-user id for TARGET);
    a history entry is planted as well (in case the engine writes none); per-user and shared Redis
    keys are set.
    """
    engine = make_engine(db, client, settings)
    results = []
    for user_id in (TARGET, OTHER):
        insert_events(db, user_id, n, content=canary_content)
        result = engine.compress(user_id, run_id="seed-run")
        assert result.status == COMPRESSED, result
        results.append(result.to_dict())
    now = datetime(2026, 2, 1, tzinfo=UTC)
    store = MemoryStore(db, settings)
    store.save_run(
        build_report(run_id="seed-run", scanned=[TARGET, OTHER], results=results, started_at=now, finished_at=now)
    )
    failure = failed_result(TARGET, LLMPermanentError(f"user {TARGET!r}: the endpoint refused the prompt"))
    store.save_run(
        build_report(
            run_id="failed-run",
            scanned=[TARGET, OTHER],
            results=[failure.to_dict(), results[1]],
            started_at=now,
            finished_at=now,
        )
    )
    history = db[settings.history_collection]
    for user_id in (TARGET, OTHER):
        history.replace_one(
            {"user_id": user_id, "version": 99},
            {"user_id": user_id, "version": 99, "text": canary_content(user_id, 99), "kind": "fold"},
            upsert=True,
        )
    for user_id in (TARGET, OTHER):
        client.set(TEST_KEY_PATTERN.format(user_id=user_id), f"pending for {user_id}")
    client.sadd(SHARED_KEY, TARGET, OTHER)
    bell = Doorbell(client, key=settings.doorbell_key, threshold=None)
    assert bell.ring(TARGET) and bell.ring(OTHER)
    db[settings.catchup_runs_collection].insert_one(
        build_report(run_id="catchup-run", scanned=[TARGET, OTHER], results=results, started_at=now, finished_at=now)
    )


def mongo_mentions(db: Database[Doc], needles: list[str]) -> list[str]:
    """Return "collection: needle" for every document of every collection whose JSON holds a needle."""
    found = []
    for name in sorted(db.list_collection_names()):
        for doc in db[name].find({}):
            text = json.dumps(doc, default=str, ensure_ascii=False)
            found += [f"{name}: {needle}" for needle in needles if needle in text]
    return found


def redis_mentions(client: redis.Redis, needles: list[str]) -> list[str]:
    """Return "key: needle" for every Redis key (in every database) whose name or value holds a needle."""
    found = []
    kwargs = client.connection_pool.connection_kwargs
    databases = int(client.config_get("databases")["databases"])
    for index in range(databases):
        with redis.Redis(host=kwargs["host"], port=kwargs["port"], db=index) as db_client:
            for raw_key in db_client.scan_iter(count=1000):
                text = raw_key.decode() + " " + repr(_redis_value(db_client, raw_key))
                found += [f"db{index} {raw_key.decode()}: {needle}" for needle in needles if needle in text]
    return found


def _redis_value(client: redis.Redis, key: bytes) -> Any:
    kind = client.type(key).decode()
    readers: dict[str, Any] = {
        "string": client.get,
        "set": client.smembers,
        "hash": client.hgetall,
        "list": lambda k: client.lrange(k, 0, -1),
        "zset": lambda k: client.zrange(k, 0, -1),
        "stream": client.xrange,
    }
    return readers[kind](key) if kind in readers else kind


# -- forgetting events: a user whose facts sit in known summary versions --------------------------

FACTS = {
    2: "Меня зовут Анна Петрова.",
    8: "У меня аллергия на арахис и на пенициллин.",
    14: "Мой день рождения 14 марта.",
    20: "Я работаю врачом в Казани.",
    24: "My daughter Mia was born on 3 June 2019.",
}
"""Planted facts by event index. With 30 events, keep 3 and chunks of 6, the compression folds
versions 1..5 of 6, 6, 6, 6 and 3 events: fact i sits in version i // 6 + 1."""
FACT_USER = "facts-user"


def fact_content(user_id: str, i: int) -> str:
    """Return the planted fact of turn i, else small talk."""
    return FACTS.get(i) or ("Хорошо, понял." if i % 2 == 0 else "Я записал это.")


def fact_settings(**changes: Any) -> Settings:
    """Return the settings of the forget tests: threshold 10, keep 3, chunks of 6 events, Russian
    summaries (the planted facts are mostly Russian; the language guard checks it)."""
    from tests.engine.helpers import small_settings

    return small_settings(**{"max_events_per_chunk": 6, "summary_language": "ru", **changes})


def fact_responder(request: Doc) -> str:
    """Answer like a faithful summariser: the previous summary's lines plus the facts in the prompt."""
    from tests.engine.helpers import prompt_events, prompt_summary

    lines = [line for line in prompt_summary(request).splitlines() if line.strip()]
    lines += [f"- {ev['text']}" for ev in prompt_events(request) if ev["text"] in FACTS.values()]
    return "\n".join(dict.fromkeys(lines)) or "- Пользователь поздоровался."


class EditingSummarizer(OfflineSummarizer):
    """The offline summariser; on its ``on_call``-th call it first runs ``edit`` (the Butler changing
    an event while the LLM call is in flight)."""

    def __init__(self, on_call: int, edit: Callable[[], object]) -> None:
        super().__init__()
        self.on_call, self.edit, self.calls = on_call, edit, 0

    def summarize(self, request: SummaryRequest) -> Summary:
        self.calls += 1
        if self.calls == self.on_call:
            self.edit()
        return super().summarize(request)


def fold_an_event_twice(db: Database[Doc], client: redis.Redis, settings: Settings) -> Engine:
    """Fold FACT_USER's event 8 (a planted fact) twice: run "r1" folds 30 events into v1..v5 while
    the Butler re-tags event 8 during the call of its chunk (v2), so it stays in user_memory; 10 more
    events arrive and run "r2" folds it again (v6..v7). Return the engine."""
    from tests.engine.helpers import insert_events, make_engine

    insert_events(db, FACT_USER, 30, content=fact_content)

    def retag() -> None:
        db["user_memory"].update_one({"_id": f"{FACT_USER}-e008"}, {"$set": {"tags": ["starred"]}})

    first = make_engine(db, client, settings, EditingSummarizer(2, retag))
    result = first.compress(FACT_USER, run_id="r1")
    assert (result.status, result.summary_version, result.events_deleted) == (COMPRESSED, 5, 26), result
    insert_events(db, FACT_USER, 10, first=30, content=fact_content)
    engine = make_engine(db, client, settings)
    result = engine.compress(FACT_USER, run_id="r2")
    assert (result.status, result.summary_version, result.events_folded) == (COMPRESSED, 7, 11), result
    return engine
