"""Which events a fold takes and how they are cut into prompts: the fold list (all but the newest
``keep_last_n``, at most ``max_fold_events``, by explicit ``_id``), its events streamed from MongoDB in
short queries by ``_id``, packed into chunks that each fit one prompt, and the events that cannot be
folded moved to the quarantine collection.

Used by compression (fold/compression.py), a re-fold and qualify (operations/); it imports only
the layers below (core, llm, storage) and the fold's metrics and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from butler_memory.core.errors import InvalidEventError
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.metrics import Metrics
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.llm.prompt import build_messages, event_line
from butler_memory.llm.summarizer import EventText, Summarizer, SummaryRequest
from butler_memory.storage.events import EventKey, undecodable_field
from butler_memory.storage.locks import UserLock
from butler_memory.storage.mongo import id_key
from butler_memory.storage.profiles import Profile
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)


def fold_list(
    user_id: str,
    profile: Profile,
    store: MemoryStore,
    settings: Settings,
    count: int,
    dry_run: bool,
    misdated: list[Any],
) -> list[EventKey] | None:
    """Return the keys to fold: all but the newest ``keep_last_n``; None when the user is not due.
    Events without a date ``created_at`` are left out and their ``_id``s put in ``misdated``.

    Under the threshold, a fold target left by a run killed between chunks still selects the rest
    of that run's fold list, so the re-run ends where the clean run would have.
    """
    target = profile.fold_target
    if count <= settings.threshold and target is None:
        return None
    keys = store.fold_keys(user_id, settings.keep_last_n, limit=settings.max_fold_events, misdated=misdated)
    if count > settings.threshold:
        return keys
    assert target is not None
    keys = _through(keys, target)
    if keys:
        log.info("user %s: finishing an interrupted run's fold list", user_id)
        return keys
    if not dry_run:
        store.clear_fold_target(user_id, profile.version)
    return None


def _through(keys: list[EventKey], target: EventKey) -> list[EventKey]:
    """Return the keys up to and including ``target``, in the server's order.

    ``_id``s are compared by their BSON form, never by Python's ordering: compound or mixed-type
    ids (a document, an ObjectId beside a string) are valid MongoDB ids. A target no longer present
    (the Butler deleted that event) ends the list at its timestamp.
    """
    wanted = id_key(target.id)
    for index, key in enumerate(keys):
        if key.created_at == target.created_at and id_key(key.id) == wanted:
            return keys[: index + 1]
    return [key for key in keys if key.created_at <= target.created_at]


def chunks(
    user_id: str,
    keys: list[EventKey],
    store: MemoryStore,
    settings: Settings,
    summarizer: Summarizer,
    language: str,
    summary: Callable[[], str],
    on_invalid: Callable[[Any, InvalidEventError], None],
) -> Iterator[list[dict[str, Any]]]:
    """Yield the fold list's events in chunks that fit one prompt, streaming from MongoDB.

    Only events whose ``_id`` is in the fold list are yielded; anything else in the key range
    (an event that arrived during compression with an old timestamp) is left alone. An event that
    cannot be folded goes to ``on_invalid`` (its ``_id`` and why) instead of into a chunk.
    """
    if not keys:
        return
    events = _fold_events(user_id, keys, store, settings.max_events_per_chunk)
    yield from pack_chunks(user_id, events, settings, summarizer, language, summary, on_invalid)


def _fold_events(user_id: str, keys: list[EventKey], store: MemoryStore, group: int) -> Iterator[dict[str, Any]]:
    """Yield the fold list's events in order, one short query by ``_id`` per ``group`` keys (no cursor
    stays open across LLM calls); only the list's events, whatever else shares their timestamps."""
    for start in range(0, len(keys), group):
        yield from store.read_fold(user_id, keys[start : start + group])


def pack_chunks(
    user_id: str,
    events: Iterable[dict[str, Any]],
    settings: Settings,
    summarizer: Summarizer,
    language: str,
    summary: Callable[[], str],
    on_invalid: Callable[[Any, InvalidEventError], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Cut ``events`` (in order) into chunks that each fit one prompt with the summary they fold into.

    Tokens are counted by the summariser (the model's tokenizer, or an upper bound); a chunk's
    budget is ``prompt_budget_tokens``, capped by the model's context less the reply, less the
    instructions and the summary the chunk folds into (``summary()``, read as each chunk starts).
    An event that cannot be folded (malformed, over ``max_event_chars``, not valid UTF-8, or too
    long for the model's context even alone) raises InvalidEventError naming it, or, with
    ``on_invalid``, is handed to it (``_id`` and the error) and left out.
    """
    reply = 2 * settings.summary_max_tokens
    limit = None if summarizer.context_tokens is None else summarizer.context_tokens - reply
    ceiling = settings.prompt_budget_tokens if limit is None else min(settings.prompt_budget_tokens, limit)

    def budget() -> int:
        frame = build_messages(SummaryRequest(user_id, summary(), [], language, settings.summary_max_tokens, 0))
        return ceiling - sum(summarizer.count_tokens(message["content"]) for message in frame)

    chunk: list[dict[str, Any]] = []
    chunk_tokens = 0
    room = budget()
    for ev in events:
        try:
            _checked_content(user_id, ev, settings)
            tokens = summarizer.count_tokens(event_line(event_text(user_id, ev))) + 1  # and its newline
            if chunk and (chunk_tokens + tokens > room or len(chunk) >= settings.max_events_per_chunk):
                yield chunk
                chunk, chunk_tokens, room = [], 0, budget()
            if not chunk and limit is not None and tokens > room:
                raise InvalidEventError(
                    user_id,
                    ev["_id"],
                    "content",
                    f"is {tokens} tokens: with the instructions and the summary it exceeds the model's context "
                    f"({summarizer.context_tokens} tokens less {reply} for the reply)",
                )
        except InvalidEventError as exc:
            if on_invalid is None:
                raise
            on_invalid(ev["_id"], exc)
            continue
        chunk.append(ev)
        chunk_tokens += tokens
    if chunk:
        yield chunk


def _checked_content(user_id: str, ev: dict[str, Any], settings: Settings) -> str:
    undecodable = undecodable_field(ev)
    if undecodable is not None:
        raise InvalidEventError(user_id, ev["_id"], undecodable, "is not valid UTF-8")
    content = ev.get("content")
    if content is None:
        raise InvalidEventError(user_id, ev["_id"], "content", "is missing")
    if not isinstance(content, str):
        raise InvalidEventError(user_id, ev["_id"], "content", f"is a {type(content).__name__}, not a string")
    if len(content) > settings.max_event_chars:
        raise InvalidEventError(
            user_id,
            ev["_id"],
            "content",
            f"is {len(content)} characters, over max_event_chars={settings.max_event_chars}",
        )
    return content


def quarantine_event(
    user_id: str,
    event_id: Any,
    exc: InvalidEventError,
    store: MemoryStore,
    lock: UserLock,
    metrics: Metrics,
    *,
    run_id: str,
    now: datetime,
    checkpoint: Checkpoint = no_checkpoint,
) -> int:
    """Move one event that cannot be folded to the quarantine collection; return 1 if it moved, else 0.

    Copy first, then delete by explicit ``_id`` only if unchanged (as the archive): a kill between
    the two leaves it in both places, and the re-run finds it again and finishes the move. It is in
    no summary, so nothing is counted twice; the record says which field and why, never the content.
    """
    lock.extend()  # the lock must still be ours right before a write
    raw = store.quarantine_copy(user_id, event_id, field=exc.field, problem=exc.problem, run_id=run_id, now=now)
    checkpoint("quarantined")
    moved = 0 if raw is None else store.quarantine_remove(user_id, event_id, raw)
    checkpoint("quarantine_removed")
    if moved:
        log.warning("user %s: event %s moved to %s: %s", user_id, event_id, store.quarantine.name, exc)
        metrics.incr(m.EVENTS_QUARANTINED_TOTAL, moved)
    return moved


def event_text(user_id: str, ev: dict[str, Any]) -> EventText:
    role = ev.get("role")
    if not isinstance(role, str):
        raise InvalidEventError(user_id, ev["_id"], "role", "is missing or not a string")
    return EventText(role=role, content=ev["content"], created_at=ev["created_at"])
