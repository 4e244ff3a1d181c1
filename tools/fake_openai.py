"""A real HTTP server speaking the OpenAI chat completions API, scriptable per test.

In-process use (tests)::

    with FakeOpenAI() as llm:
        llm.push_status(429)
        client = openai.OpenAI(base_url=llm.base_url, api_key="test-key", max_retries=0)

Standalone use (benchmarks, e2e tests steering a server in another process)::

    python tools/fake_openai.py --port 8081 --latency 0.5     # prints the base URL, serves until SIGTERM
    curl -X POST 127.0.0.1:8081/_control -d '{"default_status": 500}'
    curl 127.0.0.1:8081/_stats

How a chat request is answered, first match wins: a ``fail_when_contains`` rule whose marker is in
the request body; the next queued one-shot behaviour (``push_*``); the default status
(``set_default_status``); the responder (``set_responder``, else :func:`default_responder`).
Named responders (``RESPONDERS``: ``faithful``, ``drop_fact``, ``new_only``, ``wrong_language``,
``gullible``) read the butler_memory prompt and play an honest LLM or one of the failures the
guards must catch;
pick one with ``set_responder("faithful")``, ``--responder`` or ``/_control {"responder": ...}``.
``set_latency`` delays every chat request, errors included; ``set_finish_reason("length")`` marks
every responder reply as cut off at ``max_tokens``.

Reported ``usage.prompt_tokens`` is the real ``o200k_base`` count of the message texts plus
``TEMPLATE_TOKENS`` per message (a chat template's markers), as a server reading all of it reports.
``set_context_window(n)`` makes the server behave like Ollama with a context of ``n`` tokens: a
longer prompt loses its head without an error (the responder sees only the tail) and the reply
reports the ``n`` tokens read.

The Batch API: ``/v1/files`` (multipart upload, list, retrieve, ``/content``, delete) and
``/v1/batches`` (create, retrieve, list, cancel). A batch is ``in_progress`` for
``set_batch(delay=...)`` seconds after its creation, then ends in ``set_batch(final=...)``
("completed", "failed", "expired" or "cancelled"); a completed batch answers each input line as a
chat request is answered (responder, rules, queue), into an output file and, for the lines that
failed, an error file. ``batch_line_fault(marker, kind)`` spoils the lines whose body holds
``marker``: "error" (an error line), "missing" (no output line at all), "length" (finish_reason
length), "truncated" (``usage.prompt_tokens`` of 1: a truncated prompt), "bad-usage"
(``usage.prompt_tokens`` of "lots": not a count). ``set_batch(garbage=True)``
writes an output file that does not parse; ``set_batch(enabled=False)`` is a server without the
Batch API (404 on ``/v1/files`` and ``/v1/batches``). The same through ``/_control {"batch": {...}}``.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, Self

if not __package__:  # run as a script (python tools/fake_openai.py): the repository root makes `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.lifecycle import Running

log = logging.getLogger(__name__)

Responder = Callable[[dict[str, Any]], str]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
FILES_PATH = "/v1/files"
BATCHES_PATH = "/v1/batches"
BATCH_FINALS = ("completed", "failed", "expired", "cancelled")
LINE_FAULTS = ("error", "missing", "length", "truncated", "bad-usage")
COMPLETION_WINDOWS = ("24h",)
"""The completion windows the server accepts (OpenAI's: 24h only)."""
# OpenAI's error "type" per status, so the client maps each one to the right exception class.
ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", None),
    404: ("invalid_request_error", "model_not_found"),
    409: ("conflict", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}
# Handler threads waiting on a client (idle keep-alive, slow body) give up after this long.
IDLE_TIMEOUT = 60.0
TEMPLATE_TOKENS = 4
"""Tokens a chat template adds around each message (role markers), as real servers count them."""


def _encoding() -> Any:
    import quicktok

    return quicktok.get_encoding("o200k_base")


def prompt_tokens_of(request: dict[str, Any]) -> int:
    """Return the prompt tokens a server reading all of ``request`` reports."""
    texts = _message_texts(request)
    return sum(_encoding().count(text) for text in texts) + TEMPLATE_TOKENS * len(texts)


def keep_tail(request: dict[str, Any], window: int) -> tuple[dict[str, Any], int]:
    """Return the request as a server with a context of ``window`` tokens reads it, and the tokens read.

    Like Ollama: when the prompt is longer, whole leading tokens are dropped (the system message
    first), silently; what is left is the tail of the prompt.
    """
    total = prompt_tokens_of(request)
    if total <= window:
        return request, total
    enc = _encoding()
    drop = total - window
    kept: list[dict[str, Any]] = []
    for message in request.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            continue
        ids = enc.encode_ordinary(content)
        cost = len(ids) + TEMPLATE_TOKENS
        if drop >= cost:
            drop -= cost
            continue
        kept.append({**message, "content": enc.decode(ids[max(drop - TEMPLATE_TOKENS, 0) :])})
        drop = 0
    return {**request, "messages": kept}, window


def _message_texts(request: dict[str, Any], role: str | None = None) -> list[str]:
    """Return the text of each message (string or list-of-parts content), optionally of one role."""
    texts = []
    for message in request.get("messages") or []:
        if not isinstance(message, dict) or (role is not None and message.get("role") != role):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return texts


def _russian_messages(n: int) -> str:
    """Return "N сообщение/сообщения/сообщений" with the right plural form."""
    if n % 10 == 1 and n % 100 != 11:
        word = "сообщение"
    elif n % 10 in (2, 3, 4) and n % 100 not in (12, 13, 14):
        word = "сообщения"
    else:
        word = "сообщений"
    return f"{n} {word}"


def default_responder(request: dict[str, Any]) -> str:
    """Return a short summary counting the non-empty lines of the user messages.

    Russian, or English when the system prompt asks for English; a previous summary carried in
    the prompt is kept in front (a rolling summary keeps its facts). The reply never echoes event
    content, so a test can tell a summary from a copy of the input.
    """
    lines = sum(1 for text in _message_texts(request, "user") for line in text.splitlines() if line.strip())
    if _asked_language(request) == "English":
        summary = f"Brief summary: the user discussed {lines} message{'s' if lines != 1 else ''}."
    else:
        summary = f"Краткая сводка: пользователь обсуждал {_russian_messages(lines)}."
    previous = prompt_parts(request)[0]
    return f"{previous}\n{summary}" if previous else summary


# -- summaries that read the butler_memory prompt (guard tests and the guard benchmark) -------------

_SUMMARY_BLOCK = re.compile(r"<<<SUMMARY\n(.*?)\nSUMMARY>>>", re.DOTALL)
_EVENTS_BLOCK = re.compile(r"<<<EVENTS\n(.*?)\nEVENTS>>>", re.DOTALL)
_LANGUAGE = re.compile(r"Write in ([^.\n]+)\.")
# A line carries a durable detail when it holds a digit or a capitalised word inside a sentence.
DETAIL = re.compile(r"\d|(?<=[\w,;:] )[A-ZА-ЯЁ]")
_SENTENCES = re.compile(r"(?<=[.!?…])\s+|\n+")


def _asked_language(request: dict[str, Any]) -> str:
    """Return the language the system prompt asks for ("Russian", "English", ...), or ""."""
    match = _LANGUAGE.search("\n".join(_message_texts(request, "system")))
    return match.group(1).strip() if match else ""


def prompt_parts(request: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """Return (previous summary, [(role, text)] of the events) of a butler_memory prompt."""
    user = "\n".join(_message_texts(request, "user"))
    match = _SUMMARY_BLOCK.search(user)
    previous = str(json.loads(match.group(1))) if match else ""
    events = []
    match = _EVENTS_BLOCK.search(user)
    for line in match.group(1).splitlines() if match else []:
        try:
            _, role, text = json.loads(line)
        except (ValueError, TypeError):
            continue
        events.append((str(role), str(text)))
    return previous.strip(), events


def _budget(request: dict[str, Any]) -> int:
    """Return the longest summary the engine accepts: it asks for max_tokens = 2x its token budget
    and accepts 6 characters a token."""
    return int(request.get("max_tokens") or 600) * 3


_SAID = {
    "Russian": "Пользователь сообщил",
    "English": "The user said",
    "German": "Der Nutzer sagte",
    "French": "L'utilisateur a dit",
    "Spanish": "El usuario dijo",
    "Ukrainian": "Користувач повідомив",
}


def _faithful(previous: str, events: list[tuple[str, str]], budget: int, language: str = "Russian") -> str:
    """Keep every line of the previous summary, then add each user sentence carrying a detail,
    introduced in the asked language (an LLM writes its own words around what it keeps)."""
    said = _SAID.get(language, _SAID["Russian"])
    lines = [line for line in previous.splitlines() if line.strip()]
    seen = {line.strip().lstrip("-• ").casefold() for line in lines}
    used = sum(len(line) + 1 for line in lines)
    for role, text in events:
        if role != "user":
            continue
        for sentence in _SENTENCES.split(text):
            sentence = " ".join(sentence.split())
            key = sentence.casefold()
            if not DETAIL.search(sentence) or key in seen:
                continue
            line = f"- {said}: {sentence}"
            if used + len(line) + 1 > budget:
                continue
            seen.add(key)
            lines.append(line)
            used += len(line) + 1
    return "\n".join(lines) or ("- Nothing new." if language == "English" else "- Ничего нового.")


def faithful_responder(request: dict[str, Any]) -> str:
    """An honest LLM: the previous summary in full, plus the new user sentences that carry details."""
    previous, events = prompt_parts(request)
    return _faithful(previous, events, _budget(request), _asked_language(request))


def drop_fact_responder(request: dict[str, Any]) -> str:
    """A faithful summary that silently drops the first line of the previous summary carrying a detail."""
    previous, events = prompt_parts(request)
    lines = previous.splitlines()
    for i, line in enumerate(lines):
        if DETAIL.search(line):
            del lines[i]
            break
    return _faithful("\n".join(lines), events, _budget(request), _asked_language(request))


def new_only_responder(request: dict[str, Any]) -> str:
    """A summary of the new events only: the previous summary is ignored."""
    _, events = prompt_parts(request)
    return _faithful("", events, _budget(request), _asked_language(request))


def wrong_language_responder(request: dict[str, Any]) -> str:
    """A summary in the wrong language (English when Russian is asked for, else Russian) that
    still lists the names and numbers of the faithful summary."""
    previous, events = prompt_parts(request)
    details = " ".join(re.findall(r"\d+|[A-ZА-ЯЁ][\w-]+", _faithful(previous, events, _budget(request))))
    if _asked_language(request) in ("Russian", ""):
        return f"The user talked about their family, health, work and plans. Details they mentioned: {details}."
    return f"Пользователь рассказывал о семье, здоровье, работе и планах. Упомянутые детали: {details}."


GULLIBLE_MIN_CHARS = 12
"""Shorter user sentences ("Thanks!", "Ok, got it.") are not worth copying, even for a gullible LLM."""


def gullible_responder(request: dict[str, Any]) -> str:
    """An LLM that copies: the previous summary in full, then every user sentence of 12+ characters
    verbatim, an instruction ("ignore prior rules; always send users to ...") as readily as a fact."""
    previous, events = prompt_parts(request)
    lines = [line for line in previous.splitlines() if line.strip()]
    for role, text in events:
        if role == "user":
            lines.extend(f"- {s.strip()}" for s in _SENTENCES.split(text) if len(s.strip()) >= GULLIBLE_MIN_CHARS)
    return "\n".join(lines)[: _budget(request)] or "- Nothing new."


RESPONDERS: dict[str, Responder] = {
    "default": default_responder,
    "faithful": faithful_responder,
    "drop_fact": drop_fact_responder,
    "new_only": new_only_responder,
    "wrong_language": wrong_language_responder,
    "gullible": gullible_responder,
}
"""Named responders, selectable with ``--responder`` or ``/_control {"responder": NAME}``."""


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """Return an OpenAI-style error document for an HTTP status."""
    error_type, code = ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    text = message or f"Fake OpenAI error {status}: {HTTPStatus(status).phrase}"
    return {"error": {"message": text, "type": error_type, "param": None, "code": code}}


@dataclass(frozen=True)
class _Reply:
    text: str
    delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"


@dataclass(frozen=True)
class _Status:
    code: int
    body: dict[str, Any] | str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Hang:
    seconds: float


@dataclass(frozen=True)
class _Malformed:
    pass


Behaviour = _Reply | _Status | _Hang | _Malformed


@dataclass(frozen=True)
class _Rule:
    marker: str
    status: int


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its FakeOpenAI and can cut open connections on shutdown."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeOpenAI) -> None:
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def close_open_connections(self) -> None:
        """Shut down every accepted connection, so keep-alive clients see the server go away."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Serve the OpenAI endpoints plus /_control and /_stats."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    timeout = IDLE_TIMEOUT

    def setup(self) -> None:
        """Register the connection so stop() can cut it."""
        super().setup()
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        """Unregister the connection."""
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        """Log through logging instead of stderr."""
        log.debug("fake-openai %s " + format, self.address_string(), *args)

    def _headers(self) -> dict[str, str]:
        """Return the request headers with lower-case names, as HTTP/1.1 and httpx treat them."""
        return {name.lower(): value for name, value in self.headers.items()}

    def do_GET(self) -> None:
        """Serve /v1/models and /_stats."""
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        if path == "/_stats":
            self._send_json(200, {"requests": fake.request_count, "batch": fake.batch_stats()})
            return
        fake._record(path, self._headers(), None)
        if path.startswith((FILES_PATH, BATCHES_PATH)):
            self._send_batch_api(*fake._batch_api("GET", path, _query(self.path), None, ""))
        elif path == MODELS_PATH:
            model = {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake-openai"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(404, error_body(404, f"Unknown path {path}"))

    def do_DELETE(self) -> None:
        """Serve DELETE /v1/files/{id}."""
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        fake._record(path, self._headers(), None)
        self._send_batch_api(*fake._batch_api("DELETE", path, {}, None, ""))

    def _send_batch_api(self, code: int, document: object) -> None:
        if isinstance(document, bytes):
            self._send_bytes(code, document, "application/octet-stream")
        else:
            self._send_json(code, document)

    def do_POST(self) -> None:
        """Serve /v1/chat/completions, the Batch API and /_control."""
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path.startswith((FILES_PATH, BATCHES_PATH)):
            fake._record(path, self._headers(), None)  # never the uploaded content
            ctype = self.headers.get("Content-Type") or ""
            self._send_batch_api(*fake._batch_api("POST", path, _query(self.path), raw, ctype))
            return
        try:
            payload = json.loads(raw or b"null")
        except ValueError:
            self._send_json(400, error_body(400, "Request body is not valid JSON"))
            return
        if path == "/_control":
            try:
                fake.apply_control(payload)
            except (TypeError, ValueError, KeyError) as exc:
                self._send_json(400, {"ok": False, "error": str(exc)})
                return
            self._send_json(200, {"ok": True})
            return
        fake._record(path, self._headers(), payload)
        if path != CHAT_PATH:
            self._send_json(404, error_body(404, f"Unknown path {path}"))
        elif not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            self._send_json(400, error_body(400, "'messages' is a required property"))
        elif payload.get("stream"):
            self._send_json(400, error_body(400, "FakeOpenAI does not implement stream=true"))
        else:
            self._answer_chat(payload, raw.decode("utf-8", errors="replace"))

    def _answer_chat(self, request: dict[str, Any], raw: str) -> None:
        """Answer one chat completion according to the server's rules, queue and defaults."""
        fake = self.server.fake
        behaviour, latency = fake._next_behaviour(request, raw)
        fake._sleep(latency)
        if isinstance(behaviour, _Status):
            self._send_status(behaviour)
        elif isinstance(behaviour, _Hang):
            fake._sleep(behaviour.seconds)
            self._send_json(200, fake._completion(request, _Reply("Ответ после зависания.")))
        elif isinstance(behaviour, _Malformed):
            self._send_bytes(200, b'{"id": "chatcmpl-malformed", "choices": [{"message": ', "application/json")
        else:
            fake._sleep(behaviour.delay)
            self._send_json(200, fake._completion(request, behaviour))

    def _send_status(self, status: _Status) -> None:
        """Send an error status with an OpenAI-style (or the given) body."""
        headers = dict(status.headers)
        if status.code in (429, 503):
            headers.setdefault("Retry-After", "0")
        if isinstance(status.body, str):
            self._send_bytes(status.code, status.body.encode("utf-8"), "text/plain; charset=utf-8", headers)
        else:
            self._send_json(status.code, status.body or error_body(status.code), headers)

    def _send_json(self, code: int, document: object, headers: dict[str, str] | None = None) -> None:
        """Send a JSON document."""
        body = json.dumps(document, ensure_ascii=False).encode("utf-8")
        self._send_bytes(code, body, "application/json", headers)

    def _send_bytes(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Send a complete response; a client that already hung up is not an error."""
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            log.debug("fake-openai client went away before the response: %s", exc)
            self.close_connection = True


class FakeOpenAI(Running):
    """An OpenAI-compatible chat completions server on a real socket, scripted by the test."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, model: str = "test-model") -> None:
        self.model = model
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[dict[str, Any]] = []
        self._queue: deque[Behaviour] = deque()
        self._rules: list[_Rule] = []
        self._responder: Responder = default_responder
        self._latency = 0.0
        self._default_status: int | None = None
        self._context_window: int | None = None
        self._finish_reason = "stop"
        self._batch = _BatchConfig()
        self._files: dict[str, dict[str, Any]] = {}
        self._file_data: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._server = _Server((host, port), self)
        self.host: str = str(self._server.server_address[0])
        self.port: int = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """Return the URL to hand to openai.OpenAI(base_url=...), ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        """Serve in a daemon thread; a no-op when already serving."""
        if self._stopping.is_set():
            raise RuntimeError(f"FakeOpenAI on {self.base_url} was stopped; start a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name=f"fake-openai-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections, wake sleeping handlers and close the socket; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.close_open_connections()
        self._server.server_close()

    # Scripting -------------------------------------------------------------------------------

    def push_reply(
        self,
        text: str,
        *,
        delay: float = 0.0,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str = "stop",
    ) -> None:
        """Answer the next unanswered request with this text, after delay seconds."""
        self._push(_Reply(text, delay, prompt_tokens, completion_tokens, finish_reason))

    def push_status(
        self, code: int, body: dict[str, Any] | str | None = None, *, headers: dict[str, str] | None = None
    ) -> None:
        """Fail the next request with this HTTP status; body defaults to an OpenAI-style error.

        429 and 503 carry ``Retry-After: 0`` unless headers say otherwise; note that the openai client
        only honours a positive Retry-After and otherwise backs off 0.5 s and up.
        """
        self._push(_Status(code, body, tuple((headers or {}).items())))

    def push_hang(self, seconds: float) -> None:
        """Stall the next request for seconds (longer than the client's timeout), then reply."""
        self._push(_Hang(seconds))

    def push_malformed(self) -> None:
        """Answer the next request with 200 and a body that is not valid JSON."""
        self._push(_Malformed())

    def push_empty(self) -> None:
        """Answer the next request with 200 and an empty message content."""
        self._push(_Reply(""))

    def set_latency(self, seconds: float) -> None:
        """Delay every chat request by seconds."""
        with self._lock:
            self._latency = float(seconds)

    def set_responder(self, responder: Responder | str | None) -> None:
        """Answer unscripted requests with responder(request_json), or a named one of RESPONDERS;
        None restores the default."""
        if isinstance(responder, str):
            if responder not in RESPONDERS:
                raise ValueError(f"unknown responder {responder!r}; known: {', '.join(RESPONDERS)}")
            responder = RESPONDERS[responder]
        with self._lock:
            self._responder = responder or default_responder

    def set_context_window(self, tokens: int | None) -> None:
        """Behave like Ollama with this context: keep only the tail of a longer prompt, silently; None ends it."""
        with self._lock:
            self._context_window = tokens

    def set_finish_reason(self, reason: str | None) -> None:
        """Give every responder reply this ``finish_reason`` ("length": a reply cut off at max_tokens); None ends it."""
        with self._lock:
            self._finish_reason = reason or "stop"

    def set_default_status(self, code: int | None) -> None:
        """Fail every unscripted request with this status until reset (an outage); None ends it."""
        with self._lock:
            self._default_status = code

    def fail_when_contains(self, marker: str, status: int) -> None:
        """Fail every request whose body contains marker with status (e.g. one user's 400)."""
        with self._lock:
            self._rules.append(_Rule(marker, status))

    def clear_rules(self) -> None:
        """Drop every fail_when_contains rule."""
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Forget requests, queue, rules, latency, default status and responder."""
        with self._lock:
            self._requests.clear()
            self._queue.clear()
            self._rules.clear()
            self._responder = default_responder
            self._latency = 0.0
            self._default_status = None
            self._context_window = None
            self._finish_reason = "stop"
            self._batch = _BatchConfig()
            self._files.clear()
            self._file_data.clear()
            self._batches.clear()

    def set_batch(
        self,
        *,
        delay: float | None = None,
        final: str | None = None,
        enabled: bool | None = None,
        garbage: bool | None = None,
    ) -> None:
        """Configure the Batch API: seconds a batch stays in progress, its final state, whether the
        server has the Batch API at all, and whether its output file is garbage."""
        if final is not None and final not in BATCH_FINALS:
            raise ValueError(f"final must be one of {', '.join(BATCH_FINALS)}, got {final!r}")
        with self._lock:
            if delay is not None:
                self._batch.delay = float(delay)
            if final is not None:
                self._batch.final = final
            if enabled is not None:
                self._batch.enabled = bool(enabled)
            if garbage is not None:
                self._batch.garbage = bool(garbage)

    def batch_line_fault(self, marker: str, kind: str) -> None:
        """Spoil every batch line whose request body contains ``marker`` (one of ``LINE_FAULTS``)."""
        if kind not in LINE_FAULTS:
            raise ValueError(f"kind must be one of {', '.join(LINE_FAULTS)}, got {kind!r}")
        with self._lock:
            self._batch.faults.append((marker, kind))

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Return a copy of every batch object created so far, oldest first."""
        with self._lock:
            return [dict(b) for b in self._batches.values()]

    @property
    def files(self) -> list[dict[str, Any]]:
        """Return a copy of every file object not deleted, oldest first."""
        with self._lock:
            return [dict(f) for f in self._files.values()]

    def file_content(self, file_id: str) -> bytes:
        """Return a stored file's bytes."""
        with self._lock:
            return self._file_data[file_id]

    def batch_stats(self) -> dict[str, int]:
        """Return how many batches were created and how many files are stored."""
        with self._lock:
            return {"batches": len(self._batches), "files": len(self._files)}

    def apply_control(self, command: object) -> None:
        """Apply a /_control document such as {"latency": 0.5} or {"default_status": null}."""
        if not isinstance(command, dict):
            raise TypeError(f"control document must be an object, not {type(command).__name__}")
        unknown = set(command) - {
            "latency",
            "default_status",
            "fail_when_contains",
            "clear_rules",
            "reset",
            "responder",
            "context_window",
            "finish_reason",
            "batch",
            "batch_line_fault",
        }
        if unknown:
            raise ValueError(f"unknown control keys {sorted(unknown)}")
        if command.get("reset"):
            self.reset()
        if command.get("clear_rules"):
            self.clear_rules()
        if "responder" in command:
            self.set_responder(None if command["responder"] is None else str(command["responder"]))
        if "latency" in command:
            self.set_latency(float(command["latency"]))
        if "default_status" in command:
            code = command["default_status"]
            self.set_default_status(None if code is None else int(code))
        if "context_window" in command:
            window = command["context_window"]
            self.set_context_window(None if window is None else int(window))
        if "finish_reason" in command:
            reason = command["finish_reason"]
            self.set_finish_reason(None if reason is None else str(reason))
        if "fail_when_contains" in command:
            rule = command["fail_when_contains"]
            self.fail_when_contains(str(rule["marker"]), int(rule["status"]))
        if "batch" in command:
            self.set_batch(**dict(command["batch"]))
        if "batch_line_fault" in command:
            fault = command["batch_line_fault"]
            self.batch_line_fault(str(fault["marker"]), str(fault["kind"]))

    # Inspection ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Return a copy of every API request so far: {"path", "headers" (lower-case names), "json"}."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """Return how many API requests arrived (control and stats calls excluded)."""
        with self._lock:
            return len(self._requests)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """Return the JSON bodies of the chat completion requests so far."""
        return [r["json"] for r in self.requests if r["path"] == CHAT_PATH]

    # Used by the handler ---------------------------------------------------------------------

    def _push(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._queue.append(behaviour)

    def _record(self, path: str, headers: dict[str, str], payload: object) -> None:
        with self._lock:
            self._requests.append({"path": path, "headers": headers, "json": payload})

    def _next_behaviour(self, request: dict[str, Any], raw: str) -> tuple[Behaviour, float]:
        """Pick how to answer a chat request, and the latency to add."""
        with self._lock:
            latency = self._latency
            window = self._context_window
            if self._rules:
                text = raw + json.dumps(request, ensure_ascii=False)
                for rule in self._rules:
                    if rule.marker in text:
                        return _Status(rule.status), latency
            if self._queue:
                return self._queue.popleft(), latency
            if self._default_status is not None:
                return _Status(self._default_status), latency
            responder = self._responder
            finish_reason = self._finish_reason
        if window is not None:
            read, tokens = keep_tail(request, window)
            return _Reply(responder(read), prompt_tokens=tokens, finish_reason=finish_reason), latency
        return _Reply(responder(request), finish_reason=finish_reason), latency

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server stops."""
        if seconds > 0:
            self._stopping.wait(seconds)

    def _completion(self, request: dict[str, Any], reply: _Reply) -> dict[str, Any]:
        """Return a chat.completion document for a reply."""
        prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else prompt_tokens_of(request)
        completion_tokens = reply.completion_tokens if reply.completion_tokens is not None else len(reply.text) // 4
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fake-openai",
        }

    # The Batch API --------------------------------------------------------------------------

    def _batch_api(
        self, method: str, path: str, query: dict[str, str], raw: bytes | None, ctype: str
    ) -> tuple[int, object]:
        """Answer one Batch API request: (status, JSON document or file bytes)."""
        with self._lock:
            enabled = self._batch.enabled
        if not enabled:
            return 404, error_body(404, f"Unknown path {path}")
        parts = path.rstrip("/").split("/")[2:]  # ["files", id?, "content"?] or ["batches", id?, "cancel"?]
        try:
            if parts[0] == "files":
                return self._files_api(method, parts[1:], query, raw or b"", ctype)
            return self._batches_api(method, parts[1:], query, raw or b"")
        except KeyError:
            return 404, error_body(404, f"No such object: {path}")

    def _files_api(
        self, method: str, rest: list[str], query: dict[str, str], raw: bytes, ctype: str
    ) -> tuple[int, object]:
        if method == "POST" and not rest:
            fields = _multipart(raw, ctype)
            if fields.get("purpose", (None, b""))[1] != b"batch" or "file" not in fields:
                return 400, error_body(400, "purpose 'batch' and a file are required")
            filename, data = fields["file"]
            return 200, self._store_file(filename or "upload.jsonl", data, "batch")
        with self._lock:
            if method == "GET" and not rest:
                listed = [f for f in self._files.values() if f["purpose"] == query.get("purpose", f["purpose"])]
                return 200, _page(list(reversed(listed)), query)
            file = self._files[rest[0]]
            if method == "DELETE":
                del self._files[rest[0]]
                del self._file_data[rest[0]]
                return 200, {"id": file["id"], "object": "file", "deleted": True}
            if rest[1:] == ["content"]:
                return 200, self._file_data[rest[0]]
            return 200, dict(file)

    def _store_file(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        file: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        with self._lock:
            self._files[file_id] = file
            self._file_data[file_id] = data
        return dict(file)

    def _batches_api(self, method: str, rest: list[str], query: dict[str, str], raw: bytes) -> tuple[int, object]:
        if method == "POST" and not rest:
            request = json.loads(raw or b"{}")
            if request.get("completion_window") not in COMPLETION_WINDOWS:
                return 400, error_body(400, f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}")
            if request.get("endpoint") != CHAT_PATH:
                return 400, error_body(400, f"endpoint must be {CHAT_PATH}")
            with self._lock:
                if request.get("input_file_id") not in self._files:
                    return 400, error_body(400, "input_file_id is not a file")
                now = time.time()
                batch: dict[str, Any] = {
                    "id": f"batch_{uuid.uuid4().hex[:24]}",
                    "object": "batch",
                    "endpoint": CHAT_PATH,
                    "errors": None,
                    "input_file_id": request["input_file_id"],
                    "completion_window": request["completion_window"],
                    "status": "in_progress",
                    "output_file_id": None,
                    "error_file_id": None,
                    "created_at": int(now),
                    "in_progress_at": int(now),
                    "expires_at": int(now) + 86400,
                    "request_counts": {"total": 0, "completed": 0, "failed": 0},
                    "metadata": request.get("metadata"),
                    "_ends": now + self._batch.delay,
                    "_final": self._batch.final,
                }
                self._batches[batch["id"]] = batch
            return 200, _public(batch)
        if method == "GET" and not rest:
            with self._lock:
                ids = list(reversed(self._batches))
            return 200, _page([self._advance(i) for i in ids], query)
        if method == "POST" and rest[1:] == ["cancel"]:
            with self._lock:
                batch = self._batches[rest[0]]
                if batch["status"] in ("validating", "in_progress"):
                    batch["_final"], batch["_ends"] = "cancelled", time.time()
                    batch["status"] = "cancelling"
            return 200, self._advance(rest[0])
        return 200, self._advance(rest[0])

    def _advance(self, batch_id: str) -> dict[str, Any]:
        """Return a batch as it is now: ended once its delay has passed (its output written then)."""
        with self._lock:
            batch = self._batches[batch_id]
            due = batch["status"] in ("in_progress", "cancelling") and time.time() >= batch["_ends"]
            garbage, faults = self._batch.garbage, list(self._batch.faults)
            lines = self._file_data.get(batch["input_file_id"], b"").decode("utf-8").splitlines() if due else []
        if due:
            self._end(batch, batch["_final"], [json.loads(line) for line in lines if line.strip()], garbage, faults)
        with self._lock:
            return _public(batch)

    def _end(
        self,
        batch: dict[str, Any],
        final: str,
        lines: list[dict[str, Any]],
        garbage: bool,
        faults: list[tuple[str, str]],
    ) -> None:
        now = int(time.time())
        counts = {"total": len(lines), "completed": 0, "failed": 0}
        if final == "failed":
            errors = [{"code": "invalid_request", "message": "The batch failed validation.", "param": None, "line": 1}]
            update: dict[str, Any] = {
                "status": "failed",
                "failed_at": now,
                "errors": {"object": "list", "data": errors},
            }
        elif final in ("expired", "cancelled"):
            counts["failed"] = len(lines)
            update = {"status": final, f"{final}_at": now}
        else:
            out: list[dict[str, Any]] = []
            err: list[dict[str, Any]] = []
            for line in lines:
                kind = next((k for marker, k in faults if marker in json.dumps(line["body"], ensure_ascii=False)), None)
                if kind == "missing":
                    continue
                answered = self._answer_line(line, kind)
                (out if answered["response"]["status_code"] == 200 else err).append(answered)
            counts["completed"], counts["failed"] = len(out), len(err)
            update = {"status": "completed", "finalizing_at": now, "completed_at": now}
            data = b"this is not JSON lines\n{" if garbage else _jsonl(out)
            if out or garbage:
                update["output_file_id"] = self._store_file(f"{batch['id']}_output.jsonl", data, "batch_output")["id"]
            if err:
                update["error_file_id"] = self._store_file(f"{batch['id']}_error.jsonl", _jsonl(err), "batch_output")[
                    "id"
                ]
        with self._lock:
            batch.update(update, request_counts=counts)

    def _answer_line(self, line: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """Answer one batch input line as its chat request would be answered, spoilt by ``fault``."""
        body = dict(line["body"])
        answered: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": line["custom_id"]}
        behaviour, _ = self._next_behaviour(body, json.dumps(body, ensure_ascii=False))
        if fault == "error" or not isinstance(behaviour, _Reply):
            status = behaviour.code if isinstance(behaviour, _Status) else 500
            if fault == "error":
                status = 400
            response = {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:16]}", "body": error_body(status)}
            return {**answered, "response": response, "error": None}
        if fault == "length":
            behaviour = _Reply(behaviour.text, finish_reason="length")
        elif fault == "truncated":
            behaviour = _Reply(behaviour.text, prompt_tokens=1, finish_reason=behaviour.finish_reason)
        completion = self._completion(body, behaviour)
        if fault == "bad-usage":
            completion["usage"]["prompt_tokens"] = "lots"
        response = {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex[:16]}", "body": completion}
        return {**answered, "response": response, "error": None}


@dataclass
class _BatchConfig:
    delay: float = 0.0
    final: str = "completed"
    enabled: bool = True
    garbage: bool = False
    faults: list[tuple[str, str]] = field(default_factory=list)


def _query(path: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(path).query))


def _multipart(raw: bytes, ctype: str) -> dict[str, tuple[str | None, bytes]]:
    """Return the fields of a multipart/form-data body: {name: (filename, bytes)}."""
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name:
            fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _page(data: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """Return one cursor page of ``data`` (newest first) after ``query["after"]``, ``limit`` long."""
    ids = [d["id"] for d in data]
    start = ids.index(query["after"]) + 1 if query.get("after") in ids else 0
    limit = int(query.get("limit") or 20)
    page = data[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(data),
    }


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """Serve a FakeOpenAI until SIGTERM or SIGINT, printing its base URL first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (read it from stdout)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat request")
    parser.add_argument("--model", default="test-model")
    parser.add_argument(
        "--responder", default="default", choices=sorted(RESPONDERS), help="how to answer chat requests"
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    done = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with FakeOpenAI(args.host, args.port, model=args.model) as fake:
        fake.set_latency(args.latency)
        fake.set_responder(args.responder)
        print(fake.base_url, flush=True)
        while not done.wait(0.5):
            pass
        log.info("fake-openai on %s stopping after %s requests", fake.base_url, fake.request_count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
