"""Shared helpers of the engine tests: events, engines, snapshots and prompt parsing."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from pymongo import monitoring
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.fold.metrics import Metrics, NullMetrics
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.engine import Engine
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.profiles import LEASE_FIELD, THROUGH_FIELD, VERSION_FIELD
from butler_memory.storage.store import MemoryStore

START = datetime(2026, 1, 1, tzinfo=UTC)
"""Timestamp of every test user's first event."""

Doc = dict[str, Any]


def small_settings(**changes: Any) -> Settings:
    """Return settings small enough for fast tests: threshold 10, keep 3, 30 s lock, 5 s LLM timeout;
    summaries in English, the language of the test events (the language guard checks it)."""
    base: dict[str, Any] = {
        "summary_language": "en",
        "threshold": 10,
        "keep_last_n": 3,
        "lock_ttl_seconds": 30,
        "llm_timeout_seconds": 5.0,
        "llm_max_retries": 0,
    }
    base.update(changes)
    return Settings.from_mapping(base)


def content_of(user_id: str, i: int) -> str:
    """Return the unique content of a user's i-th event (its event id leads, so prompts can be traced)."""
    return f"{user_id}-e{i:03d}: turn {i} about the weather."


def make_events(
    user_id: str,
    n: int,
    *,
    start: datetime = START,
    step: timedelta = timedelta(minutes=1),
    first: int = 0,
    content: Callable[[str, int], str] = content_of,
) -> list[Doc]:
    """Return events ``first`` .. ``first + n - 1`` of one user: string ``_id``s, alternating roles,
    the i-th at ``start + i * step``."""
    return [
        {
            "_id": f"{user_id}-e{i:03d}",
            "event_id": f"{user_id}-e{i:03d}",
            "user_id": user_id,
            "role": "user" if i % 2 == 0 else "assistant",
            "content": content(user_id, i),
            "created_at": start + step * i,
            "tags": ["test"],
        }
        for i in range(first, first + n)
    ]


def insert_events(db: Database[Doc], user_id: str, n: int, **kwargs: Any) -> list[Doc]:
    """Insert ``n`` events of one user (see ``make_events``) and return them as stored."""
    events = make_events(user_id, n, **kwargs)
    if events:
        db["user_memory"].insert_many([dict(ev) for ev in events])
    return [_normalised(ev) for ev in events]


def _normalised(doc: Doc) -> Doc:
    """Return a document as MongoDB hands it back (naive UTC datetimes, millisecond precision)."""
    out = dict(doc)
    created = out.get("created_at")
    if isinstance(created, datetime) and created.tzinfo is not None:
        created = created.astimezone(UTC).replace(tzinfo=None)
        out["created_at"] = created.replace(microsecond=created.microsecond // 1000 * 1000)
    return out


def openai_summarizer(base_url: str, *, max_retries: int = 0, timeout: float = 2.0, **config: Any) -> OpenAISummarizer:
    """Return an OpenAISummarizer talking to the fake server, counting tokens with the fake's o200k_base
    (``config``: more LLMConfig fields, e.g. context_tokens)."""
    config.setdefault("tokenizer", "o200k_base")
    return OpenAISummarizer(
        LLMConfig(
            base_url=base_url,
            api_key="test-key",
            model="test-model",
            timeout_seconds=timeout,
            max_retries=max_retries,
            **config,
        )
    )


def make_engine(
    db: Database[Doc],
    redis_client: redis.Redis,
    settings: Settings,
    summarizer: Summarizer | None = None,
    metrics: Metrics | None = None,
) -> Engine:
    """Build the engine from its parts (the offline summariser unless one is given)."""
    return Engine(
        settings,
        MemoryStore(db, settings),
        UserLocks(redis_client, settings),
        summarizer or OfflineSummarizer(),
        metrics or NullMetrics(),
    )


def events_of(db: Database[Doc], user_id: str) -> dict[Any, Doc]:
    """Return a user's events in user_memory by ``_id``."""
    return {doc["_id"]: doc for doc in db["user_memory"].find({"user_id": user_id})}


def archive_of(db: Database[Doc], user_id: str) -> dict[Any, Doc]:
    """Return a user's archived events by ``_id``."""
    return {doc["_id"]: doc for doc in db["user_memory_archive"].find({"user_id": user_id})}


def profile_of(db: Database[Doc], user_id: str) -> Doc | None:
    """Return a user's profile document without its ``_id``."""
    return db["user_profiles"].find_one({"user_id": user_id}, {"_id": 0})


def history_of(db: Database[Doc], user_id: str) -> list[Doc]:
    """Return a user's summary history entries, oldest version first, without ``_id`` and ``write_id``
    (new at every write: bookkeeping of the history's own fence, no state of the memory)."""
    return list(db["user_memory_summaries"].find({"user_id": user_id}, {"_id": 0, "write_id": 0}).sort("version", 1))


def snapshot(db: Database[Doc], user_id: str) -> Doc:
    """Return everything a compression of one user could change (not its lease: every run that takes
    the user records its own, a fence and no state of the memory)."""
    profile = profile_of(db, user_id)
    if profile is not None:
        profile.pop(LEASE_FIELD, None)
    return {
        "events": events_of(db, user_id),
        "archive": archive_of(db, user_id),
        "profile": profile,
        "history": history_of(db, user_id),
    }


def summary_version(db: Database[Doc], user_id: str) -> int:
    """Return the stored summary version of a user (0 without a profile)."""
    return int((profile_of(db, user_id) or {}).get(VERSION_FIELD) or 0)


def watermark(db: Database[Doc], user_id: str) -> tuple[datetime, Any] | None:
    """Return the stored (created_at, _id) watermark of a user, if any."""
    through = (profile_of(db, user_id) or {}).get(THROUGH_FIELD)
    return None if not through else (through["created_at"], through["event_id"])


def set_profile(db: Database[Doc], user_id: str, **fields: Any) -> None:
    """Create or update a user's profile with the given fields."""
    db["user_profiles"].update_one({"user_id": user_id}, {"$set": {"user_id": user_id, **fields}}, upsert=True)


def raise_at(step: str, error: Callable[[str], BaseException]) -> Callable[[str], None]:
    """Return a checkpoint that raises ``error(step)`` when ``step`` is reached: an operation stopped there
    in this process (its ``finally`` blocks run; the kill matrices kill for real)."""

    def checkpoint(reached: str) -> None:
        if reached == step:
            raise error(step)

    return checkpoint


# -- reading what reached the LLM ------------------------------------------------------------------


def user_message(request: Doc) -> str:
    """Return the user message of a recorded chat completion request."""
    return next(m["content"] for m in request["messages"] if m["role"] == "user")


def system_message(request: Doc) -> str:
    """Return the system message of a recorded chat completion request."""
    return next(m["content"] for m in request["messages"] if m["role"] == "system")


def _block(text: str, opening: str, closing: str) -> str:
    """Return what lies between one fence's markers (each must occur exactly once)."""
    assert text.count(opening) == 1, f"expected one {opening!r} marker in the prompt, found {text.count(opening)}"
    assert text.count(closing) == 1, f"expected one {closing!r} marker in the prompt, found {text.count(closing)}"
    return text.split(opening, 1)[1].split(closing, 1)[0].strip("\n")


def prompt_events(request: Doc) -> list[Doc]:
    """Return the events fenced in a request's <<<EVENTS ... EVENTS>>> block, one JSON array
    ``[time, role, text]`` a line, as ``{"at", "role", "text"}``; fails on any other line."""
    events = []
    for line in _block(user_message(request), "<<<EVENTS\n", "\nEVENTS>>>").splitlines():
        at, role, text = json.loads(line)
        events.append({"at": at, "role": role, "text": text})
    return events


def prompt_summary(request: Doc) -> str:
    """Return the previous summary carried in a request's <<<SUMMARY ... SUMMARY>>> block."""
    return str(json.loads(_block(user_message(request), "<<<SUMMARY\n", "\nSUMMARY>>>")))


def texts_seen(requests: Sequence[Doc]) -> list[str]:
    """Return every event text fenced in the given requests, in order, with repeats."""
    return [ev["text"] for request in requests for ev in prompt_events(request)]


def chain_responder(request: Doc) -> str:
    """Answer with the previous summary plus the ids of the events in this prompt.

    The summary is then a ledger: each folded event's id appears in the final summary once per
    committed fold that covered it, so a lost or twice-summarised event shows up in it.
    """
    ids = [ev["text"].split(":", 1)[0] for ev in prompt_events(request)]
    return " ".join([prompt_summary(request), *ids]).strip()


def ledger(summary: str) -> list[str]:
    """Return the event ids in a summary written by ``chain_responder``."""
    return summary.split()


class AfterWrite(monitoring.CommandListener):
    """Run ``then`` once, right after a client's first write command on ``collection`` succeeded
    (on the client's own thread, before the writer goes on): another holder taking over mid-operation."""

    def __init__(self, collection: str, then: Callable[[], object]) -> None:
        self.collection, self.then = collection, then
        self._request: int | None = None
        self.fired = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Note the first write on the collection."""
        name = event.command_name
        if not self.fired and name in ("insert", "update") and event.command.get(name) == self.collection:
            self._request = event.request_id

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Run ``then`` after that write."""
        if not self.fired and event.request_id == self._request:
            self.fired = True
            self.then()

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to do."""


class CursorWatch(monitoring.CommandListener):
    """Track the server cursors a client holds open: a ``find``/``aggregate`` reply with a non-zero
    cursor id opens one, a ``getMore`` reply with id 0 or a ``killCursors`` closes it."""

    def __init__(self) -> None:
        self.open: set[int] = set()
        self._more: dict[int, int] = {}
        """request id of a getMore -> the cursor it reads."""

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Note which cursor a getMore reads; a killCursors closes its cursors."""
        if event.command_name == "getMore":
            self._more[event.request_id] = int(event.command["getMore"])
        elif event.command_name == "killCursors":
            self.open.difference_update(int(c) for c in event.command.get("cursors", []))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Record whether the reply left a cursor open."""
        cursor = event.reply.get("cursor")
        if not isinstance(cursor, dict):
            return
        cursor_id = int(cursor.get("id") or 0)
        if cursor_id:
            self.open.add(cursor_id)
        elif event.command_name == "getMore":
            self.open.discard(self._more.pop(event.request_id, 0))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing to record."""


class DocumentsRead(monitoring.CommandListener):
    """Count the documents that finds (and their getMores) return from some collections."""

    def __init__(self, collections: set[str]) -> None:
        self.collections = collections
        self.read = 0
        self._requests: set[int] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Remember a find or getMore on one of the collections."""
        key = "collection" if event.command_name == "getMore" else event.command_name
        if event.command_name in ("find", "getMore") and event.command.get(key) in self.collections:
            self._requests.add(event.request_id)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        """Count the documents of its batch."""
        if event.request_id in self._requests:
            cursor = event.reply.get("cursor") or {}
            self.read += len(cursor.get("firstBatch") or cursor.get("nextBatch") or [])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        """Nothing was read."""
        self._requests.discard(event.request_id)
