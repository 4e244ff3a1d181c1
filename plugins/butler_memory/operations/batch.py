"""The daily run through an OpenAI-compatible Batch API: prepare, submit, collect, commit. No Airflow.

``compress_user`` split at the LLM (docs/architecture.md, "Batch mode"):

1. **prepare** (no lock, reads only): per user, the fold ``compress_user`` would make now, frozen in
   ``batch_collection``: the summary version it builds on, the events' ``_id``s and digests, the
   hash of the prompt. Content is never stored there, nor in XCom or logs. A user whose fold is not
   one plain chunk (several chunks, an unfinished earlier fold, events to quarantine, under the
   threshold) is marked ``online``: the commit step compresses it online, as an online run would.
2. **submit**: the JSONL is built from MongoDB into an unnamed temporary file, uploaded through
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

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from butler_memory.core.errors import LLMBatchError, LLMPermanentError, LLMTransientError, StaleFoldError
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import (
    SKIPPED_STALE,
    FrozenFold,
    UserResult,
    _event_text,
    compress_user,
    pack_chunks,
    utcnow,
)
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.llm.openai_summarizer import OpenAISummarizer, tls_context
from butler_memory.llm.prompt import known_language
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.operations.engine import Engine
from butler_memory.safety.injection import withheld
from butler_memory.storage.mongo import ensure_index, ensure_ttl, event_digest
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch states that do not change any more."""
STEPS = ("frozen", "intent", "uploaded", "created", "submitted", "collected", "cleaned")
"""Checkpoints of the batch steps (the commit's are ``compression.STEPS``)."""

# A fold's mode: what the commit step does with the user.
BATCHED = "batch"
ONLINE = "online"
STALE = "stale"

# A part's state.
INTENT, SUBMITTED, COLLECTED, CLEANED = "intent", "submitted", "collected", "cleaned"


def prompt_hash(body: dict[str, Any]) -> str:
    """Return the fingerprint of a chat request's prompt (its messages) and reply limit."""
    text = json.dumps([body["messages"], body.get("max_tokens")], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def custom_id(run_key: str, user_id: str) -> str:
    """Return the line's ``custom_id``: opaque (no user id leaves for the provider), stable across re-runs."""
    return "u-" + hashlib.sha256(f"{run_key}\n{user_id}".encode()).hexdigest()[:32]


def openai_of(engine: Engine) -> OpenAISummarizer:
    """Return the engine's OpenAI summariser; batch mode needs one (SettingsError naming llm_mode)."""
    if not isinstance(engine.summarizer, OpenAISummarizer):
        raise SettingsError(
            f"llm_mode 'batch' needs the OpenAI summariser (summarizer {engine.settings.summarizer!r} gave "
            f"{engine.summarizer.name!r}): set summarizer to 'openai' with an LLM connection, or llm_mode to 'online'"
        )
    return engine.summarizer


def batch_client(summarizer: OpenAISummarizer) -> Any:
    """Return a synchronous ``openai`` client for the Batch API, to the summariser's endpoint with its key."""
    import openai

    config = summarizer.config
    return openai.OpenAI(
        base_url=config.base_url,
        api_key=config.api_key,
        timeout=max(config.timeout_seconds, 60.0),  # an upload of a large file takes longer than a chat call
        max_retries=config.max_retries,
        http_client=openai.DefaultHttpxClient(verify=tls_context()),
    )


def check_endpoint(client: Any, settings: Settings) -> None:
    """Raise SettingsError (naming ``llm_mode``) when the server has no Batch API; nothing is uploaded."""
    import openai

    try:
        client.batches.list(limit=1)
    except openai.NotFoundError:
        raise SettingsError(
            "llm_mode is 'batch' but the LLM server has no Batch API (GET /v1/batches answered 404): "
            "set llm_mode to 'online', or point llm_conn_id at a server with /v1/files and /v1/batches"
        ) from None
    except openai.APIStatusError as exc:
        raise SettingsError(
            f"llm_mode is 'batch' but the LLM server refused GET /v1/batches (HTTP {exc.status_code})"
        ) from None
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise LLMTransientError(f"LLM server unreachable for the Batch API ({type(exc).__name__})") from None
    log.info("batch: the LLM server has the Batch API (completion_window %s)", settings.batch_completion_window)


# -- the collection -------------------------------------------------------------------------------


class BatchFolds:
    """The batch mode's collection: one ``fold`` document per (run, user), one ``part`` per batch."""

    def __init__(self, store: MemoryStore) -> None:
        self.settings = store.settings
        self.coll = store.db[store.settings.batch_collection]

    def ensure_indexes(self) -> None:
        """Create the lookup index and the retention TTL; safe on every run."""
        ensure_index(self.coll, [("run_key", 1), ("kind", 1), ("user_id", 1)])
        ensure_ttl(self.coll.database, self.coll, "written_at", "written_at_ttl", self.settings.batch_retention_days)

    def fold(self, run_key: str, user_id: str) -> dict[str, Any] | None:
        """Return one user's fold of a run, or None."""
        return self.coll.find_one({"_id": _fold_id(run_key, user_id)})

    def folds(self, run_key: str, mode: str | None = None) -> list[dict[str, Any]]:
        """Return the run's folds (without replies), by user id."""
        query: dict[str, Any] = {"run_key": run_key, "kind": "fold"}
        if mode is not None:
            query["mode"] = mode
        return list(self.coll.find(query, {"reply": 0}).sort([("user_id", 1)]))

    def add_fold(self, run_key: str, user_id: str, fold: dict[str, Any], now: datetime) -> None:
        """Record a user's fold once: a re-run of prepare never changes what may be submitted already."""
        doc = {"run_key": run_key, "kind": "fold", "user_id": user_id, "written_at": now, **fold}
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$setOnInsert": doc}, upsert=True)

    def mark_stale(self, run_key: str, user_id: str, reason: str) -> None:
        """Take a user out of the batch (its summary or events changed before the submit)."""
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$set": {"mode": STALE, "reason": reason}})

    def parts(self, run_key: str) -> list[dict[str, Any]]:
        """Return the run's parts (batches), in order."""
        return list(self.coll.find({"run_key": run_key, "kind": "part"}).sort([("part", 1)]))

    def add_part(self, run_key: str, part: int, custom_ids: list[str], now: datetime) -> dict[str, Any]:
        """Record a part's intent (its lines) before anything of it is uploaded."""
        doc = {
            "_id": f"{run_key}|part|{part}",
            "run_key": run_key,
            "kind": "part",
            "part": part,
            "custom_ids": custom_ids,
            "fold_hash": hashlib.sha256("\n".join(custom_ids).encode()).hexdigest()[:32],
            "state": INTENT,
            "written_at": now,
        }
        self.coll.update_one({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
        return dict(self.coll.find_one({"_id": doc["_id"]}) or doc)

    def set_part(self, part: dict[str, Any], **fields: Any) -> None:
        """Update a part's state and ids."""
        self.coll.update_one({"_id": part["_id"]}, {"$set": fields})
        part.update(fields)

    def set_reply(self, run_key: str, cid: str, *, reply: dict[str, Any] | None, error: str | None) -> None:
        """Store one line's reply (the chat completion) or why there is none, once."""
        self.coll.update_one(
            {"run_key": run_key, "kind": "fold", "custom_id": cid, "reply": None, "reply_error": None},
            {"$set": {"reply": reply, "reply_error": error}},
        )

    def drop_reply(self, run_key: str, user_id: str, status: str) -> None:
        """Forget a reply once its commit ended (it is in the summary and its history now, or stale)."""
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$set": {"reply": None, "committed": status}})


def _fold_id(run_key: str, user_id: str) -> str:
    return f"{run_key}|fold|{user_id}"


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
    request = _request(user_id, profile.summary, first, language, settings)
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


def _request(
    user_id: str, previous: str, events: Sequence[dict[str, Any]], language: str, settings: Settings
) -> SummaryRequest:
    """Return the request the online path sends for this chunk (instruction-like sentences withheld)."""
    request = SummaryRequest(
        user_id=user_id,
        previous_summary=previous,
        events=[_event_text(user_id, ev) for ev in events],
        language=language,
        max_tokens=settings.summary_max_tokens,
        max_chars=settings.summary_max_chars,
    )
    return withheld(request)


# -- submit ---------------------------------------------------------------------------------------


def submit(engine: Engine, run_key: str, client: Any, *, checkpoint: Checkpoint = no_checkpoint) -> list[str]:
    """Submit the run's frozen folds as batches (a part per batch); return every part's batch id.

    Idempotent: parts recorded by an earlier attempt keep their users, and a part whose batch
    exists (found by its metadata) is never submitted again.
    """
    summarizer = openai_of(engine)
    settings = engine.settings
    folds = BatchFolds(engine.store)
    parts = folds.parts(run_key)
    assigned = {cid for part in parts for cid in part["custom_ids"]}
    waiting = [f for f in folds.folds(run_key, BATCHED) if f["custom_id"] not in assigned]
    # New parts, cut by the server's limits; the lines themselves are built again at upload.
    current: list[str] = []
    size = 0
    for fold, line in _lines(engine, summarizer, run_key, waiting):
        if current and (len(current) >= settings.batch_max_lines or size + len(line) > settings.batch_max_bytes):
            parts.append(folds.add_part(run_key, len(parts), current, utcnow()))
            current, size = [], 0
        current.append(fold["custom_id"])
        size += len(line)
    if current:
        parts.append(folds.add_part(run_key, len(parts), current, utcnow()))
    checkpoint("intent")
    for part in parts:
        if part["state"] == INTENT:
            _submit_part(engine, summarizer, run_key, part, client, folds, checkpoint)
    ids = [str(part["batch_id"]) for part in parts if part.get("batch_id")]
    log.info("batch submit: %d batch(es) for run %s", len(ids), run_key)
    return ids


def _lines(
    engine: Engine, summarizer: OpenAISummarizer, run_key: str, folds: Sequence[dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Yield each fold with its JSONL line, built from MongoDB now; a fold whose summary or events
    changed since prepare is marked stale and left out."""
    store, settings = engine.store, engine.settings
    for fold in folds:
        user_id = fold["user_id"]
        profile = store.load_profile(user_id, create=False)
        by_id = {event_digest(ev): ev for ev in store.find_by_ids(user_id, fold["ids"])}
        events = [by_id.get(digest) for digest in fold["digests"]]
        body = None
        if profile.version == fold["version"] and all(ev is not None for ev in events):
            language = profile.language or settings.summary_language
            request = _request(user_id, profile.summary, [ev for ev in events if ev is not None], language, settings)
            body = summarizer.chat_body(request)
        if body is None or prompt_hash(body) != fold["prompt_hash"]:
            log.info("user %s: changed since the batch was prepared; left out of the batch", user_id)
            BatchFolds(store).mark_stale(run_key, user_id, "changed between prepare and submit")
            continue
        line = {"custom_id": fold["custom_id"], "method": "POST", "url": ENDPOINT, "body": body}
        yield fold, (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _filename(run_key: str, part: int) -> str:
    """Return the uploaded file's name: names the run by a hash and the part, never a user."""
    return f"butler-memory-{hashlib.sha256(run_key.encode()).hexdigest()[:16]}-part{part}.jsonl"


def _submit_part(
    engine: Engine,
    summarizer: OpenAISummarizer,
    run_key: str,
    part: dict[str, Any],
    client: Any,
    folds: BatchFolds,
    checkpoint: Checkpoint,
) -> None:
    """Upload one part's JSONL and create its batch, unless an earlier attempt created it already."""
    import openai

    settings = engine.settings
    found = find_batch(client, run_key, part)
    if found is not None:
        log.info("batch part %d: found batch %s created by an earlier attempt", part["part"], found.id)
        folds.set_part(part, state=SUBMITTED, batch_id=found.id, input_file_id=found.input_file_id)
        return
    filename = _filename(run_key, part["part"])
    _delete_orphans(client, filename)  # uploaded by an attempt killed before its batch was created
    wanted = set(part["custom_ids"])
    members = [f for f in folds.folds(run_key, BATCHED) if f["custom_id"] in wanted]
    try:
        with tempfile.TemporaryFile() as fh:  # no name on disk: the content is gone when it closes
            lines = 0
            for _, line in _lines(engine, summarizer, run_key, members):
                fh.write(line)
                lines += 1
            if not lines:
                folds.set_part(part, state=CLEANED, batch_id=None, lines=0)
                return
            fh.seek(0)
            uploaded = client.files.create(file=(filename, fh), purpose="batch")
        checkpoint("uploaded")
        folds.set_part(part, input_file_id=uploaded.id, lines=lines)
        created = client.batches.create(
            input_file_id=uploaded.id,
            endpoint=ENDPOINT,
            completion_window=settings.batch_completion_window,
            metadata={"butler_run": run_key, "butler_part": str(part["part"]), "butler_fold": part["fold_hash"]},
        )
    except openai.BadRequestError as exc:
        raise SettingsError(
            f"the LLM server refused the batch (HTTP {exc.status_code}): check batch_completion_window "
            f"({settings.batch_completion_window!r}) and llm_mode"
        ) from None
    except _transient() as exc:
        raise LLMTransientError(f"batch submit: LLM server {type(exc).__name__}") from None
    checkpoint("created")
    folds.set_part(part, state=SUBMITTED, batch_id=created.id)
    checkpoint("submitted")
    log.info("batch part %d: submitted %d line(s) as batch %s", part["part"], lines, created.id)


def find_batch(client: Any, run_key: str, part: dict[str, Any]) -> Any | None:
    """Return the batch an earlier attempt created for this part (by its metadata), or None.

    Batches are listed newest first; the search stops at batches created well before the part was recorded.
    """
    since = part["written_at"]
    since = (since if since.tzinfo else since.replace(tzinfo=UTC)) - timedelta(hours=1)
    for batch in client.batches.list(limit=100):
        if datetime.fromtimestamp(batch.created_at, UTC) < since:
            return None
        meta = batch.metadata or {}
        if meta.get("butler_run") == run_key and meta.get("butler_part") == str(part["part"]):
            return batch
    return None


def _delete_orphans(client: Any, filename: str) -> None:
    for file in client.files.list(purpose="batch"):
        if file.filename == filename:
            _delete_file(client, file.id)


def _delete_file(client: Any, file_id: str | None) -> None:
    import openai

    if not file_id:
        return
    try:
        client.files.delete(file_id)
    except openai.NotFoundError:
        pass  # deleted by an earlier attempt


# -- collect --------------------------------------------------------------------------------------


def collect(engine: Engine, run_key: str, client: Any, *, checkpoint: Checkpoint = no_checkpoint) -> dict[str, int]:
    """Read every part's final state and files; store each user's reply or why there is none; then
    delete the part's files from the provider. Return the batches' states counted."""
    folds = BatchFolds(engine.store)
    states: dict[str, int] = {}
    for part in folds.parts(run_key):
        if part["state"] == SUBMITTED:
            _collect_part(client, run_key, part, folds)
            checkpoint("collected")
        if part["state"] == COLLECTED:
            for file_id in (part.get("input_file_id"), part.get("output_file_id"), part.get("error_file_id")):
                _delete_file(client, file_id)
            folds.set_part(part, state=CLEANED)
            checkpoint("cleaned")
        status = str(part.get("status") or "empty")
        states[status] = states.get(status, 0) + 1
    log.info("batch collect: %s", ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no batch")
    return states


def _transient() -> tuple[type[Exception], ...]:
    """The ``openai`` errors a later attempt can get past (the task retries)."""
    import openai

    return (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)


def _collect_part(client: Any, run_key: str, part: dict[str, Any], folds: BatchFolds) -> None:
    try:
        batch = client.batches.retrieve(part["batch_id"])
    except _transient() as exc:
        raise LLMTransientError(f"batch collect: LLM server {type(exc).__name__}") from None
    if batch.status not in TERMINAL:
        raise LLMTransientError(f"batch {batch.id} is still {batch.status}")
    replies: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    everyone: str | None = None
    if batch.status != "completed":
        everyone = f"the batch ended {batch.status}"
    else:
        try:
            for line in [*_read_lines(client, batch.output_file_id), *_read_lines(client, batch.error_file_id)]:
                cid, reply, error = _line_outcome(line)
                if reply is not None:
                    replies[cid] = reply
                else:
                    errors[cid] = error or "the batch request failed"
        except ValueError:
            everyone = "the batch's output file does not parse"
    for cid in part["custom_ids"]:
        if everyone is not None:
            folds.set_reply(run_key, cid, reply=None, error=everyone)
        elif cid in replies:
            folds.set_reply(run_key, cid, reply=replies[cid], error=None)
        else:
            folds.set_reply(run_key, cid, reply=None, error=errors.get(cid, "the batch's output has no line for it"))
    folds.set_part(
        part,
        state=COLLECTED,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
    )
    log.info(
        "batch %s: %s, %d reply(ies), %d error line(s), %d missing",
        batch.id,
        batch.status,
        len(replies),
        len(errors),
        0 if everyone else len(set(part["custom_ids"]) - set(replies) - set(errors)),
    )


def _read_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    """Return a JSONL file's lines; ValueError when any line is not a JSON object with a custom_id."""
    if not file_id:
        return []
    text = client.files.content(file_id).text
    lines = [json.loads(raw) for raw in text.splitlines() if raw.strip()]
    if not all(isinstance(line, dict) and isinstance(line.get("custom_id"), str) for line in lines):
        raise ValueError("a line is not an object with a custom_id")
    return lines


def _line_outcome(line: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    """Return (custom_id, the chat completion, or None and why) of one output or error line; no content."""
    response: dict[str, Any] = line["response"] if isinstance(line.get("response"), dict) else {}
    status = response.get("status_code")
    body = response.get("body")
    if status == 200 and isinstance(body, dict) and not line.get("error"):
        return line["custom_id"], body, None
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    code = error.get("code") if isinstance(error, dict) else None
    shown = code if isinstance(code, str) and code.replace("_", "").isalnum() else "no code"
    return line["custom_id"], None, f"the batch request failed (HTTP {status}, {shown[:40]})"


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
        return engine.compress(user_id, run_id=run_key, checkpoint=checkpoint, holder=holder)
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
    # The reply is paid for: it is committed whatever the budget, and its tokens count on it (Spent below).
    try:
        result = compress_user(
            user_id,
            settings=engine.settings,
            store=engine.store,
            locks=engine.locks,
            summarizer=FrozenReply(openai_of(engine), frozen, fold["reply"]),
            metrics=engine.metrics,
            run_id=run_key,
            checkpoint=checkpoint,
            holder=holder,
            frozen=frozen,
        )
        if engine.budget is not None:
            engine.budget.spend(result.prompt_tokens + result.completion_tokens)
    except StaleFoldError as exc:
        log.info("user %s: %s; reply dropped, nothing deleted", user_id, exc)
        engine.metrics.incr(m.USERS_SKIPPED_STALE_TOTAL)
        result = UserResult(user_id, SKIPPED_STALE)
    folds.drop_reply(run_key, user_id, result.status)
    return result
