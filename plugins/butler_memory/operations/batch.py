"""The daily run through an OpenAI-compatible Batch API: prepare, submit, collect, commit. No Airflow.

``compress_user`` split at the LLM (docs/architecture.md, "Batch mode"):

1. **prepare** (no lock, reads only): per user, the fold ``compress_user`` would make now, frozen in
   ``batch_collection``: the summary version it builds on, the events' ``_id``s and digests, the
   hash of the prompt. Content is never stored there, nor in XCom or logs. A user whose fold is not
   one plain chunk (several chunks, an unfinished earlier fold, events to quarantine, under the
   threshold) is marked ``online``: the commit step compresses it online, as an online run would.
2. **submit** (``batch_api``, with collect): the JSONL is built from MongoDB into an unnamed temporary file, uploaded through
   ``/v1/files``, and one batch is created per part (``batch_max_lines`` / ``batch_max_bytes``).
   Each part is recorded (its users) before anything is uploaded and the batch is tagged with the
   run key and part (``metadata``): a re-run after a kill between the create and the record finds
   the batch by listing, and never creates a second one for the same fold.
3. **wait**: in the triggerer (``butler_memory.orchestration.batch_trigger``), no worker slot and no lock held.
4. **collect**: the final state, the output and error files are read; each user's reply (or why
   there is none) is stored on its fold; then the input, output and error files are deleted from
   the provider.
5. **commit** per user: ``compress_user`` with the frozen fold and a summariser that hands back
   the batch's reply (``FrozenReply``): under the user's lock, only if the summary version and
   every frozen event are unchanged (else ``skipped_stale``, nothing deleted), then the same reply
   checks, validation, guards, history and crash-safe commit as online.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from butler_memory.core.errors import LLMBatchError, LLMPermanentError, StaleFoldError
from butler_memory.fold import metrics as m
from butler_memory.fold.chunks import pack_chunks
from butler_memory.fold.compression import SKIPPED_STALE, FrozenFold, UserResult, compress_user, utcnow
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.llm.openai_summarizer import OpenAISummarizer
from butler_memory.llm.prompt import known_language
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.operations.batch_api import (
    batch_client,
    check_endpoint,
    collect,
    custom_id,
    openai_of,
    prompt_hash,
    request_for,
    submit,
)
from butler_memory.operations.engine import Engine
from butler_memory.storage.batch_folds import BATCHED, ONLINE, STALE, BatchFolds
from butler_memory.storage.mongo import event_digest

log = logging.getLogger(__name__)

__all__ = ["STEPS", "batch_client", "check_endpoint", "collect", "commit_user", "openai_of", "prepare", "submit"]

STEPS = ("frozen", "intent", "uploaded", "created", "submitted", "collected", "cleaned")
"""Checkpoints of the batch steps (the commit's are ``compression.STEPS``)."""


# -- prepare --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What prepare froze: counts only."""

    batched: int = 0
    online: int = 0
    events: int = 0

    def to_dict(self) -> dict[str, int]:
        """Return a JSON-safe dict (fit for XCom)."""
        return {"batched": self.batched, "online": self.online, "events": self.events}


def prepare(
    engine: Engine, run_key: str, user_ids: Sequence[str], *, checkpoint: Checkpoint = no_checkpoint
) -> Prepared:
    """Freeze each user's fold (see the module docstring); users frozen by an earlier attempt stay as frozen."""
    summarizer = openai_of(engine)
    folds = BatchFolds(engine.store)
    folds.ensure_indexes()
    done = {f["user_id"]: f for f in folds.folds(run_key)}
    counts = Prepared()
    for user_id in user_ids:
        fold = done.get(user_id)
        if fold is None:
            fold = freeze(engine, summarizer, run_key, user_id)
            folds.add_fold(run_key, user_id, fold, utcnow())
            checkpoint("frozen")
        if fold["mode"] == BATCHED:
            counts.batched += 1
            counts.events += len(fold["ids"])
        else:
            counts.online += 1
    log.info(
        "batch prepare: %d user(s) frozen for the batch, %d left to the online path", counts.batched, counts.online
    )
    return counts


def freeze(engine: Engine, summarizer: OpenAISummarizer, run_key: str, user_id: str) -> dict[str, Any]:
    """Return the fold compress_user would make for the user now, as one batch line: ids, digests,
    version, prompt hash; or ``{"mode": "online", "reason": ...}`` when it is not one plain chunk."""
    store, settings = engine.store, engine.settings

    def online(reason: str) -> dict[str, Any]:
        log.info("user %s: batch prepare: %s; the commit step compresses the user online", user_id, reason)
        return {"mode": ONLINE, "reason": reason}

    if engine.budget is not None and engine.budget.exhausted():
        return online("today's LLM token budget is spent")
    profile = store.load_profile(user_id, create=False)
    if profile.erasing or profile.pending is not None or profile.fold_target is not None or profile.rollback:
        return online("an earlier operation on the user is unfinished")
    if store.count_events(user_id) <= settings.threshold:
        return online("not over the threshold")
    misdated: list[Any] = []
    keys = store.fold_keys(user_id, settings.keep_last_n, limit=settings.max_fold_events, misdated=misdated)
    language = profile.language or settings.summary_language
    if misdated or not keys or known_language(language) is None:
        return online("events or the language need the online path's handling")
    invalid: list[Any] = []
    events = (ev for start in range(0, len(keys), 1000) for ev in store.read_fold(user_id, keys[start : start + 1000]))
    chunks = pack_chunks(
        user_id, events, settings, summarizer, language, lambda: profile.summary, lambda i, _: invalid.append(i)
    )
    first = next(chunks, None)
    if first is not None and next(chunks, None) is not None:
        return online("the fold needs several chunks")
    if invalid or first is None or len(first) != len(keys):
        return online("some events cannot be folded (they go to quarantine)")
    request = request_for(user_id, profile.summary, first, language, settings)
    try:
        body = summarizer.chat_body(request)
    except LLMPermanentError:
        return online("the prompt does not fit the model's context")
    return {
        "mode": BATCHED,
        "custom_id": custom_id(run_key, user_id),
        "version": profile.version,
        "ids": [ev["_id"] for ev in first],
        "digests": [event_digest(ev) for ev in first],
        "prompt_hash": prompt_hash(body),
        "reply": None,
        "reply_error": None,
    }


# -- commit ---------------------------------------------------------------------------------------


class FrozenReply:
    """A summariser that hands back a batch's reply for the frozen prompt, checked as an online reply.

    Asked for any other prompt (the summary or events changed in a way the optimistic check could
    not see, or a second chunk), it raises StaleFoldError: the reply is not for this fold.
    """

    name = "openai"

    def __init__(self, online: OpenAISummarizer, frozen: FrozenFold, reply: dict[str, Any]) -> None:
        self.online = online
        self.config = online.config
        self.context_tokens = online.context_tokens
        self.frozen = frozen
        self.reply: dict[str, Any] | None = reply

    def count_tokens(self, text: str) -> int:
        """Count as the online summariser does, so the chunks are cut as at prepare."""
        return self.online.count_tokens(text)

    def summarize(self, request: SummaryRequest) -> Summary:
        """Return the batch's reply for ``request``'s prompt, after the online reply checks."""
        from openai.types.chat import ChatCompletion
        from pydantic import ValidationError

        body = self.online.chat_body(request)
        if self.reply is None or prompt_hash(body) != self.frozen.prompt_hash:
            raise StaleFoldError(
                f"user {request.user_id!r}: the prompt differs from the one the batch answered", user_id=request.user_id
            )
        try:
            response = ChatCompletion.model_validate(self.reply)
        except ValidationError:
            raise LLMBatchError(
                f"user {request.user_id!r}: the batch's reply is not a chat completion; nothing was written",
                user_id=request.user_id,
            ) from None
        self.reply = None  # one reply, one chunk
        return self.online.check_reply(request.user_id, body["messages"], response, body["max_tokens"])

    def close(self) -> None:
        """Nothing to close: the online summariser belongs to the engine."""


def commit_user(
    engine: Engine,
    user_id: str,
    *,
    run_key: str,
    holder: str | None = None,
    online: bool = False,
    checkpoint: Checkpoint = no_checkpoint,
) -> UserResult:
    """Commit one user's batch reply (see the module docstring), or compress the user online when
    prepare left it to the online path, it has no fold in this run, or ``online`` (a re-run of a
    user that failed: clear-and-rerun compresses it online).

    Raises LLMBatchError when the batch gave no usable reply (nothing written), like any failure.
    """
    folds = BatchFolds(engine.store)
    fold = folds.fold(run_key, user_id)
    if online or fold is None or fold["mode"] == ONLINE:
        result = engine.compress(user_id, run_id=run_key, checkpoint=checkpoint, holder=holder)
        if fold is not None and fold.get("reply") is not None:  # the batch commit refused it: no use now
            folds.drop_reply(run_key, user_id, result.status)
        return result
    if fold["mode"] == STALE:
        engine.metrics.incr(m.USERS_SKIPPED_STALE_TOTAL)
        return UserResult(user_id, SKIPPED_STALE)
    if fold.get("reply") is None:
        if fold.get("committed"):  # an earlier attempt ended it (killed before its outcome was stored)
            return UserResult(user_id, str(fold["committed"]))
        why = fold.get("reply_error") or "no reply was collected"
        raise LLMBatchError(
            f"user {user_id!r}: {why}; nothing was written (clear the user's compress_user task to compress it online)",
            user_id=user_id,
        )
    frozen = FrozenFold(int(fold["version"]), list(fold["ids"]), list(fold["digests"]), str(fold["prompt_hash"]))
    # The reply is paid for: it is committed whatever the budget (its tokens were counted at collect).
    try:
        parts = replace(engine, summarizer=FrozenReply(openai_of(engine), frozen, fold["reply"]), budget=None)
        result = compress_user(parts, user_id, run_id=run_key, checkpoint=checkpoint, holder=holder, frozen=frozen)
    except StaleFoldError as exc:
        log.info("user %s: %s; reply dropped, nothing deleted", user_id, exc)
        engine.metrics.incr(m.USERS_SKIPPED_STALE_TOTAL)
        result = UserResult(user_id, SKIPPED_STALE)
    folds.drop_reply(run_key, user_id, result.status)
    return result
