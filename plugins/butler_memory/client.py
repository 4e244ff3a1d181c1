"""The Butler's side: read a user's memory consistently, ring the doorbell, compress inline.

No Airflow import. The caller brings its own clients (pymongo ``Database`` or
``pymongo.AsyncMongoClient``'s ``AsyncDatabase``, redis-py sync or asyncio) and settings naming
its collections and fields; docs/butler-integration.md shows both::

    client = AsyncMemoryClient(mongo["butler"], redis_async, settings=settings)
    memory = await client.memory(user_id)   # summary, version, the live events it does not cover
    await client.ring(user_id, events=n)    # after appending the user's event

Why the read is consistent. ``memory()`` makes three reads, never a write: (1) the profile
document (one atomic read: the summary, its version and every intent our writers record there),
(2) the user's events, (3) the profile's bookkeeping again. When (1) and (3) agree, the events read
in (2) belong to that one profile state, because every step of ours that changes a user's events
happens inside a state the profile announces first and leaves after, each such state carries a
version or an id that never repeats:

- a fold: the guarded commit writes the new summary *and* the pending fold (its explicit ``_id``s)
  in one update, then the events are deleted, then the pending fold is cleared. With a pending
  fold in (1) = (3), its events are hidden, whether the delete reached them yet or not (an event
  edited since it was summarised, its fingerprint changed, is not covered and stays raw);
- a rollback: the intent is recorded, archived events are put back into user_memory (still covered
  by the current summary until the commit), the commit restores the old text, the copies leave the
  archive. Before the commit the events the undone versions folded (read from the archive, which
  keeps them until after the commit) are hidden when live exactly as archived; after it they are
  raw. An event the Butler edited while it was folded is live with its newer text all along (the
  restore inserts only what is absent, the fold deleted only unchanged events): no summary covers
  that text, so it stays raw, as it is before and after the rollback;
- a forget: the intent (the events' ``_id``s) is recorded before anything is deleted; those
  events are hidden from then on, and the rebuilt summary replaces the tainted one before the
  intent is cleared, so a read that starts after the forget returned sees neither;
- a whole-user erasure: the profile is marked first; while marked, the read returns nothing;
- a re-fold changes only the summary, with a new version.

The Butler's own appends are in no summary: an event written during the read is raw if (2) saw it,
else in the next read (a linearised read, never a loss). While a rollback is half done a fourth
read, of the archive, returns the undone versions' events as the restore puts them back (between
(1) and (2)), so (2)'s copies can be told from the Butler's newer text.

A compression that ran wholly between (1) and (3) changed the version, so (1) and (3) differ and
the read starts again. Two reads cannot be enough: profile then events misses events a fold
deleted after the profile was read (in neither), events then profile returns events a fold
covered and cleared meanwhile (in both); the watermark ``memory_compressed_through`` cannot tell
them apart from a late write with an older ``created_at``. So the read never uses the watermark.

The read needs MongoDB only: without Redis it works as ever (``ring`` then returns False and
``compress_now`` raises ``LockUnavailableError``: no compression without the lock).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database
from pymongo.read_concern import ReadConcern

from butler_memory.core.errors import (
    ConcurrentUpdateError,
    InvalidEventError,
    InvalidProfileError,
)
from butler_memory.core.ids import check_user_id
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold.compression import UserResult
from butler_memory.fold.metrics import Metrics, NullMetrics
from butler_memory.freshness.doorbell import AsyncDoorbell, Doorbell
from butler_memory.llm.budget import TokenBudget
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.engine import Engine
from butler_memory.storage.archive import ARCHIVE_FIELDS, OWN_FIELDS, archived_by, as_event
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.mongo import event_digest, id_key, sanitized_errors
from butler_memory.storage.profiles import (
    ERASING_FIELD,
    FORGET_FIELD,
    OUR_PROFILE_FIELDS,
    PENDING_FIELD,
    ROLLBACK_FIELD,
    VERSION_FIELD,
    Profile,
    parse_profile,
)
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

ATTEMPTS = 8
"""Reads of one ``memory()`` before it gives up on a profile that keeps changing (a busy user's
chunks commit seconds apart; eight changes within one read mean something is wrong)."""
EVENTS_BATCH = 10_000
"""Events per reply: a backlogged user's events come in one round trip, not one per 101."""
EVENT_ORDER = [("created_at", ASCENDING), ("_id", ASCENDING)]
STATE_FIELDS = (VERSION_FIELD, PENDING_FIELD, ROLLBACK_FIELD, FORGET_FIELD, ERASING_FIELD)
"""The profile fields whose equality before and after the events read makes the read consistent."""


@dataclass(frozen=True)
class MemoryEvent:
    """One live event the summary does not cover."""

    id: Any
    """The document's ``_id``."""
    event_id: Any
    """The Butler's ``event_id`` (the ``_id`` when the document has none)."""
    role: str
    content: str = field(repr=False)
    """Conversation content: left out of ``repr``, so a logged event shows its ids only."""
    created_at: datetime


@dataclass(frozen=True)
class Memory:
    """A user's memory at one instant: the summary and the live events it does not cover, oldest first."""

    user_id: str
    summary: str
    version: int
    events: tuple[MemoryEvent, ...]
    erasing: bool = False
    """An erasure of the whole user is unfinished: nothing is returned until it is done."""

    def __repr__(self) -> str:
        """Show ids, version and counts, never the summary or the events (a logged Memory leaks nothing)."""
        return (
            f"Memory(user_id={self.user_id!r}, version={self.version}, summary_chars={len(self.summary)}, "
            f"events={len(self.events)}, erasing={self.erasing})"
        )

    def messages(self) -> list[dict[str, str]]:
        """Return the events as chat messages (``role``, ``content``), oldest first."""
        return [{"role": ev.role, "content": ev.content} for ev in self.events]


@dataclass(frozen=True)
class _View:
    """What one profile state says the read must hide."""

    profile: Profile
    erasing: bool
    forgotten: frozenset[bytes]
    pending: dict[bytes, str | None]
    """``id_key`` -> the digest of the event as summarised (None: folds of older versions)."""
    undone: list[int] | None
    """A rollback not yet committed: the versions whose restored events the summary still covers."""


def forget_intent_ids(user_id: str, doc: Mapping[str, Any]) -> frozenset[bytes]:
    """Return the ``_id``s an unfinished forget removes (``memory_forget.ids``), as ``id_key``s."""
    intent = doc.get(FORGET_FIELD)
    if intent is None:
        return frozenset()
    if not isinstance(intent, dict) or not isinstance(intent.get("ids"), list):
        raise InvalidProfileError(user_id, FORGET_FIELD, "is not {ids: list, ...}")
    return frozenset(id_key(i) for i in intent["ids"])


def rollback_undone(user_id: str, profile: Profile) -> list[int] | None:
    """Return the versions an uncommitted rollback undoes (their restored events are still covered), or None."""
    intent = profile.rollback
    if intent is None:
        return None
    expected, undoes = intent.get("expected_version"), intent.get("undoes")
    if not isinstance(expected, int) or not (isinstance(undoes, list) and all(isinstance(v, int) for v in undoes)):
        raise InvalidProfileError(user_id, ROLLBACK_FIELD, "is not {expected_version: int, undoes: [int], ...}")
    return list(undoes) if profile.version == expected else None


def _view(user_id: str, doc: Mapping[str, Any], settings: Settings) -> _View:
    profile = parse_profile(user_id, doc, settings)
    pending: dict[bytes, str | None] = {}
    if profile.pending is not None:
        digests: list[str | None] = [None] * len(profile.pending.ids)
        if profile.pending.digests is not None:
            digests = list(profile.pending.digests)
        pending = {id_key(i): d for i, d in zip(profile.pending.ids, digests, strict=True)}
    return _View(
        profile,
        erasing=doc.get(ERASING_FIELD) is not None,
        forgotten=forget_intent_ids(user_id, doc),
        pending=pending,
        undone=rollback_undone(user_id, profile),
    )


def _state(doc: Mapping[str, Any] | None) -> list[Any]:
    doc = doc or {}
    return [doc.get(name) for name in STATE_FIELDS]


def _projection(settings: Settings) -> dict[str, int]:
    # Not the language field: the read has no use for it, and a value of the Butler's own cannot fail it.
    names = ["user_id", settings.summary_field, *OUR_PROFILE_FIELDS, ERASING_FIELD]
    return dict.fromkeys(names, 1)


def _undone_filter(user_id: str, undone: list[int]) -> dict[str, Any]:
    # The records the rollback's own restore puts back (MemoryStore.archived_ids).
    return archived_by(user_id, undone)


_AS_RESTORED = dict.fromkeys(ARCHIVE_FIELDS - {OWN_FIELDS}, 0)
"""The archive read's projection: without our archive fields, but with the event's own fields of
those names (``OWN_FIELDS``), which ``as_event`` puts back: the event as ``restore`` inserts it."""


def _covered(view: _View, doc: Mapping[str, Any], restored: dict[bytes, Mapping[str, Any]]) -> bool:
    key = id_key(doc["_id"])
    # A restored event is covered only as the undone versions folded it: one that differs from its
    # archived copy is the Butler's newer text (the restore left it live), which no summary holds.
    # Compared as mappings, not digests: the restore's upsert may store the fields in another order.
    if key in view.forgotten or (key in restored and dict(restored[key]) == dict(doc)):
        return True
    if key in view.pending:
        digest = view.pending[key]
        return digest is None or digest == event_digest(doc)
    return False


def _event(user_id: str, doc: Mapping[str, Any]) -> MemoryEvent:
    for name, kind in (("role", str), ("content", str), ("created_at", datetime)):
        value = doc.get(name)
        if not isinstance(value, kind):
            problem = "is missing" if value is None else f"is a {type(value).__name__}, not a {kind.__name__}"
            raise InvalidEventError(user_id, doc["_id"], name, problem)
    created = doc["created_at"]
    return MemoryEvent(
        id=doc["_id"],
        event_id=doc.get("event_id", doc["_id"]),
        role=doc["role"],
        content=doc["content"],
        created_at=created if created.tzinfo is not None else created.replace(tzinfo=UTC),
    )


def _assemble(
    user_id: str, view: _View, docs: Iterable[Mapping[str, Any]], restored: dict[bytes, Mapping[str, Any]]
) -> Memory:
    if view.erasing:
        return Memory(user_id, "", view.profile.version, (), erasing=True)
    events = tuple(_event(user_id, doc) for doc in docs if not _covered(view, doc, restored))
    return Memory(user_id, view.profile.summary, view.profile.version, events)


@dataclass(frozen=True)
class Find:
    """One MongoDB read of a ``memory()``: ``find_one`` (one document or ``{}``) or ``find`` (all, in event order)."""

    collection: str
    """"profiles", "events" or "archive"."""
    filter: dict[str, Any]
    projection: dict[str, int] | None
    one: bool


ReadPlan = Generator[Find, Any, Memory]


def read_plan(user_id: str, settings: Settings) -> ReadPlan:
    """Yield the reads of one consistent ``memory()`` and return the Memory (see the module docstring).

    The algorithm without I/O: the sync and the asyncio client only run each ``Find`` and send back
    its reply, so both read alike.
    """
    query = {"user_id": user_id}
    for _ in range(ATTEMPTS):
        first = yield Find("profiles", query, _projection(settings), one=True)
        view = _view(user_id, first, settings)
        restored: dict[bytes, Mapping[str, Any]] = {}
        if view.undone is not None:
            found = yield Find("archive", _undone_filter(user_id, view.undone), _AS_RESTORED, one=False)
            restored = {id_key(doc["_id"]): as_event(doc) for doc in found}
        docs = yield Find("events", query, None, one=False)
        again = yield Find("profiles", query, dict.fromkeys(STATE_FIELDS, 1), one=True)
        if _state(first) == _state(again):
            return _assemble(user_id, view, docs, restored)
    raise ConcurrentUpdateError(
        f"user {user_id!r}: the profile changed during each of {ATTEMPTS} reads of the memory; try again",
        user_id=user_id,
    )


def _collections(db: Database | AsyncDatabase, settings: Settings) -> dict[str, Any]:
    concern = ReadConcern(settings.mongo_read_concern)
    names = {
        "profiles": settings.profiles_collection,
        "events": settings.events_collection,
        "archive": settings.archive_collection,
    }
    return {role: db.get_collection(name, read_concern=concern) for role, name in names.items()}


def _doorbell_options(settings: Settings) -> dict[str, Any]:
    return {"key": settings.doorbell_key, "channel": settings.doorbell_channel, "threshold": settings.threshold}


def inline_engine(
    db: Database,
    redis_client: redis.Redis,
    summarizer: Summarizer,
    *,
    settings: Settings | None = None,
    metrics: Metrics | None = None,
) -> Engine:
    """Return our engine on the Butler's synchronous clients, for ``compress_now``.

    The same engine the DAG runs (lock, intents, guards, history, token budget): one compression
    code path. The summariser is the caller's (``OpenAISummarizer(LLMConfig(...))``).
    """
    settings = settings or Settings()
    return Engine(
        settings=settings,
        store=MemoryStore(db, settings),
        locks=UserLocks(redis_client, settings),
        summarizer=summarizer,
        metrics=metrics or NullMetrics(),
        budget=TokenBudget.when_set(redis_client, settings),
    )


def _inline_run_id() -> str:
    return f"inline__{uuid.uuid4().hex[:12]}"


DbT = TypeVar("DbT", Database, AsyncDatabase)
RedisT = TypeVar("RedisT", redis.Redis, redis.asyncio.Redis)


class _Client(Generic[DbT, RedisT]):
    """What both clients hold: the settings, the collections they read, Redis for the doorbell, the engine."""

    def __init__(
        self,
        db: DbT,
        redis_client: RedisT | None = None,
        *,
        settings: Settings | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self._colls = _collections(db, self.settings)
        self._redis: RedisT | None = redis_client
        self._engine = engine

    def _plan(self, user_id: str) -> tuple[str, ReadPlan]:
        """Return the checked user id and the plan of its memory read (see the module docstring)."""
        user_id = check_user_id(user_id)
        return user_id, read_plan(user_id, self.settings)

    def _compress_now(self, user_id: str, run_id: str | None) -> tuple[Engine, str, str]:
        """Return the engine, the checked user id and the run id of an inline compression."""
        if self._engine is None:
            raise SettingsError("compress_now needs an engine: pass engine=inline_engine(db, redis, summarizer, ...)")
        return self._engine, check_user_id(user_id), run_id or _inline_run_id()


class MemoryClient(_Client[Database, redis.Redis]):
    """The Butler's client for synchronous code (pymongo ``Database``, ``redis.Redis``)."""

    @functools.cached_property
    def _bell(self) -> Doorbell | None:
        return None if self._redis is None else Doorbell(self._redis, **_doorbell_options(self.settings))

    def memory(self, user_id: str) -> Memory:
        """Return the user's summary, its version and the live events it does not cover (see the module docstring)."""
        user_id, plan = self._plan(user_id)
        with sanitized_errors(user_id, "the memory read"):
            find = next(plan)
            while True:
                try:
                    find = plan.send(self._fetch(find))
                except StopIteration as done:
                    return done.value

    def _fetch(self, find: Find) -> Any:
        coll = self._colls[find.collection]
        if find.one:
            return coll.find_one(find.filter, find.projection) or {}
        return list(coll.find(find.filter, find.projection).sort(EVENT_ORDER).batch_size(EVENTS_BATCH))

    def ring(self, user_id: str, *, events: int | None = None) -> bool:
        """Ring the doorbell for ``user_id`` (``doorbell.Doorbell.ring``); False without Redis."""
        return self._bell is not None and self._bell.ring(user_id, events=events)

    def compress_now(self, user_id: str, *, run_id: str | None = None) -> UserResult:
        """Compress the user now with our engine (``Engine.compress``), under the same lock as the DAG."""
        engine, user_id, run_id = self._compress_now(user_id, run_id)
        return engine.compress(user_id, run_id=run_id)


class AsyncMemoryClient(_Client[AsyncDatabase, redis.asyncio.Redis]):
    """The Butler's client for asyncio (``pymongo.AsyncMongoClient``'s database, ``redis.asyncio.Redis``).

    ``compress_now`` runs the synchronous engine (``inline_engine`` on synchronous clients) in a
    worker thread: the engine is one code path, shared with the DAG.
    """

    @functools.cached_property
    def _bell(self) -> AsyncDoorbell | None:
        return None if self._redis is None else AsyncDoorbell(self._redis, **_doorbell_options(self.settings))

    async def memory(self, user_id: str) -> Memory:
        """Return the same as ``MemoryClient.memory``, read through the asyncio driver."""
        user_id, plan = self._plan(user_id)
        with sanitized_errors(user_id, "the memory read"):
            find = next(plan)
            while True:
                try:
                    find = plan.send(await self._fetch(find))
                except StopIteration as done:
                    return done.value

    async def _fetch(self, find: Find) -> Any:
        coll = self._colls[find.collection]
        if find.one:
            return await coll.find_one(find.filter, find.projection) or {}
        return await coll.find(find.filter, find.projection).sort(EVENT_ORDER).batch_size(EVENTS_BATCH).to_list()

    async def ring(self, user_id: str, *, events: int | None = None) -> bool:
        """Ring the doorbell for ``user_id`` (``doorbell.AsyncDoorbell.ring``); False without Redis."""
        return self._bell is not None and await self._bell.ring(user_id, events=events)

    async def compress_now(self, user_id: str, *, run_id: str | None = None) -> UserResult:
        """Compress the user now with our engine in a worker thread (see ``MemoryClient.compress_now``)."""
        engine, user_id, run_id = self._compress_now(user_id, run_id)
        return await asyncio.to_thread(engine.compress, user_id, run_id=run_id)
