"""The batch mode's side of the provider: the OpenAI-compatible Batch API (``/v1/files``,
``/v1/batches``). Submit builds each part's JSONL from MongoDB into an unnamed temporary file,
uploads it and creates its batch, recorded first so a re-run never creates a second one; collect
reads the ended batches' output and error files into each user's fold, then deletes the files.

No Airflow. The whole run (prepare, submit, wait, collect, commit) is described in
``butler_memory.operations.batch``, which builds on this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from butler_memory.core.errors import LLMTransientError
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold.chunks import event_text
from butler_memory.fold.compression import utcnow
from butler_memory.fold.rebuild import Checkpoint, no_checkpoint
from butler_memory.llm.budget import TokenBudget
from butler_memory.llm.openai_summarizer import OpenAISummarizer, tls_context, usage_tokens
from butler_memory.llm.summarizer import SummaryRequest
from butler_memory.operations.engine import Engine
from butler_memory.safety.injection import withheld
from butler_memory.storage.batch_folds import BATCHED, CLEANED, COLLECTED, INTENT, SUBMITTED, BatchFolds
from butler_memory.storage.mongo import event_digest

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
"""Batch states that do not change any more."""


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


def request_for(
    user_id: str, previous: str, events: Sequence[dict[str, Any]], language: str, settings: Settings
) -> SummaryRequest:
    """Return the request the online path sends for this chunk (instruction-like sentences withheld)."""
    request = SummaryRequest(
        user_id=user_id,
        previous_summary=previous,
        events=[event_text(user_id, ev) for ev in events],
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
            request = request_for(user_id, profile.summary, [ev for ev in events if ev is not None], language, settings)
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
            _collect_part(client, run_key, part, folds, engine.budget)
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


def _reply_tokens(reply: dict[str, Any]) -> int:
    """Return what a reply cost (prompt + completion tokens of its ``usage``; 0 when it has none).
    ``_line_outcome`` passes only replies whose usage ``usage_tokens`` reads."""
    return sum(usage_tokens(reply.get("usage")))


def _transient() -> tuple[type[Exception], ...]:
    """The ``openai`` errors a later attempt can get past (the task retries)."""
    import openai

    return (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError)


def _collect_part(
    client: Any, run_key: str, part: dict[str, Any], folds: BatchFolds, budget: TokenBudget | None
) -> None:
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
            # Paid for once it is here, whatever its commit makes of it (committed, refused, stale):
            # counted on the day's budget when first stored, so a collect re-run counts nothing twice.
            if folds.set_reply(run_key, cid, reply=replies[cid], error=None) and budget is not None:
                budget.spend(_reply_tokens(replies[cid]))
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
        try:
            usage_tokens(body.get("usage"))
        except ValueError:  # its cost is unknown, and the online check would refuse it anyway
            return line["custom_id"], None, "the batch's reply has a malformed usage"
        return line["custom_id"], body, None
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    code = error.get("code") if isinstance(error, dict) else None
    shown = code if isinstance(code, str) and code.replace("_", "").isalnum() else "no code"
    return line["custom_id"], None, f"the batch request failed (HTTP {status}, {shown[:40]})"
