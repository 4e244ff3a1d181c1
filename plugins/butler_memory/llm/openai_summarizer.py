"""OpenAISummarizer: summarise through an OpenAI-compatible chat completions endpoint.

Works with OpenAI, Azure, vLLM, Ollama and other servers speaking the same API. Failures are
classified as transient (retry later) or permanent; no error message quotes user content.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

from butler_memory.core.errors import (
    LLMPermanentError,
    LLMPromptTooLongError,
    LLMPromptTruncatedError,
    LLMReplyCutOffError,
    LLMTransientError,
)
from butler_memory.core.settings import MAX_INTEGER
from butler_memory.llm.prompt import build_messages
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.llm.tokens import AUTO, TokenCounter


def usage_tokens(usage: Any) -> tuple[int, int]:
    """Return the ``(prompt_tokens, completion_tokens)`` of a reply's ``usage`` (an object, or a dict
    in a Batch API output line); a missing usage or field counts 0.

    The client hands the server's usage over unchecked: only a non-negative number BSON can store
    is a count, anything else ("lots", 1e999, NaN, -5, true) raises ValueError (naming no value).
    """
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key) if isinstance(usage, dict) else getattr(usage, key, None)
        if value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_INTEGER:
            raise ValueError(f"usage.{key} is not a token count")
        counts.append(int(value))
    return counts[0], counts[1]


@dataclass(frozen=True)
class LLMConfig:
    """How to reach an OpenAI-compatible chat completions endpoint."""

    base_url: str | None
    api_key: str
    model: str
    timeout_seconds: float = 60.0
    max_retries: int = 2
    extra_body: dict[str, Any] | None = None
    tokenizer: str = AUTO
    """How prompt tokens are counted: "auto" (by model name), an encoding of ``tokens.ENCODINGS``,
    or "utf8_bytes" (an upper bound for any tokenizer)."""
    context_tokens: int | None = None
    """The model's context window as the server runs it (prompt + reply), when known."""
    prompt_tokens_tolerance: float | None = None
    """How much less than our count the server may report reading (share; None = the counter's default)."""
    verify_prompt_tokens: bool = True
    """Refuse a reply whose server reported no ``usage.prompt_tokens`` (its reading cannot be checked)."""

    def __repr__(self) -> str:  # never print the key
        return f"LLMConfig(base_url={self.base_url!r}, model={self.model!r}, api_key=***)"


_TLS_CONTEXT: tuple[int, ssl.SSLContext] | None = None


def tls_context() -> ssl.SSLContext:
    """Return the TLS context the LLM client verifies servers with, built once per process.

    It is the client's own default (``httpcore2.default_ssl_context``: ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR``, else the system CA store); building it reads the CA bundle, about 18 ms of CPU
    that each task process would otherwise spend again. A process forked after :func:`warm_up` (an
    Airflow task process) inherits it; the context holds no connection, so sharing it is safe.
    """
    global _TLS_CONTEXT  # one context per process, on purpose
    if _TLS_CONTEXT is None or _TLS_CONTEXT[0] != _tls_key():
        import httpcore2

        _TLS_CONTEXT = (_tls_key(), httpcore2.default_ssl_context())
    return _TLS_CONTEXT[1]


def _tls_key() -> int:
    """Rebuild the context when the CA settings it was built from change."""
    return hash((os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")))


def warm_up() -> None:
    """Import what the first LLM call would import lazily and build the TLS context, without any I/O.

    Called by the ``butler_memory_preload`` Airflow plugin in each Airflow component, so that task
    processes forked from it start with all of this done.
    """
    summarizer = OpenAISummarizer(LLMConfig(base_url="http://127.0.0.1:9/v1", api_key="warm-up", model="warm-up"))
    try:
        summarizer._client.chat.completions  # noqa: B018  # the lazy import of the chat resources
    finally:
        summarizer.close()


class OpenAISummarizer:
    """Summarise through the ``openai`` client (OpenAI, Azure, vLLM, Ollama, ...), temperature 0."""

    name = "openai"

    def __init__(self, config: LLMConfig, client: Any | None = None) -> None:
        self.config = config
        self.tokens = TokenCounter.for_model(config.model, config.tokenizer)
        self.tokens.warm_up()  # about 1 s of CPU once per process: before any lock is taken, not under one
        self.context_tokens = config.context_tokens
        self.tolerance = (
            self.tokens.default_tolerance if config.prompt_tokens_tolerance is None else config.prompt_tokens_tolerance
        )
        if client is None:
            import openai

            client = openai.OpenAI(
                base_url=config.base_url,
                api_key=config.api_key,
                timeout=config.timeout_seconds,
                max_retries=config.max_retries,
                http_client=openai.DefaultHttpxClient(verify=tls_context()),
            )
        self._client = client

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def count_tokens(self, text: str) -> int:
        """Return the tokens of a prompt text for this model (an upper bound for an unknown tokenizer)."""
        return self.tokens.count(text)

    def summarize(self, request: SummaryRequest) -> Summary:
        """Call the chat completions API once; classify failures as transient or permanent.

        A reply is accepted only when it is complete (not cut off at ``max_tokens``) and the server
        reports having read the whole prompt (``usage.prompt_tokens`` against our own count).
        """
        import openai

        messages = build_messages(request)
        self.check_context(request.user_id, messages, request.max_tokens * 2)
        started = time.monotonic()
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=messages,  # type: ignore[arg-type]  # plain dicts are valid params
                temperature=0,
                max_tokens=request.max_tokens * 2,
                extra_body=self.config.extra_body or None,
            )
        except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError) as exc:
            raise LLMTransientError(
                f"user {request.user_id!r}: LLM {type(exc).__name__}", user_id=request.user_id
            ) from None
        except openai.APIStatusError as exc:
            kind = LLMTransientError if exc.status_code >= 500 or exc.status_code in (408, 409) else LLMPermanentError
            raise kind(
                f"user {request.user_id!r}: LLM HTTP {exc.status_code} ({type(exc).__name__})", user_id=request.user_id
            ) from None
        except openai.APIResponseValidationError:
            raise LLMTransientError(
                f"user {request.user_id!r}: LLM returned a malformed response", user_id=request.user_id
            ) from None
        except (json.JSONDecodeError, ValueError) as exc:
            raise LLMTransientError(
                f"user {request.user_id!r}: LLM returned a malformed response ({type(exc).__name__})",
                user_id=request.user_id,
            ) from None
        return self.check_reply(request.user_id, messages, response, request.max_tokens * 2, time.monotonic() - started)

    def chat_body(self, request: SummaryRequest) -> dict[str, Any]:
        """Return the chat completions request body ``summarize`` sends for ``request`` (a Batch API
        line's ``body``): the same model, prompt, temperature, reply limit and extra body."""
        messages = build_messages(request)
        self.check_context(request.user_id, messages, request.max_tokens * 2)
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": request.max_tokens * 2,
        }
        return {**body, **(self.config.extra_body or {})}

    def check_context(self, user_id: str, messages: list[dict[str, str]], reply_tokens: int) -> None:
        """Raise LLMPromptTooLongError when the prompt and the reply would not fit ``context_tokens``."""
        if self.context_tokens is not None and self.tokens.exact:
            sent = sum(self.tokens.count(m["content"]) for m in messages)
            if sent + reply_tokens > self.context_tokens:
                raise LLMPromptTooLongError(
                    f"user {user_id!r}: prompt is {sent} tokens + {reply_tokens} for the reply, over the "
                    f"model's context of {self.context_tokens}; not sent",
                    user_id=user_id,
                )

    def check_reply(
        self, user_id: str, messages: list[dict[str, str]], response: Any, reply_tokens: int, seconds: float = 0.0
    ) -> Summary:
        """Return the summary of a chat completion (online, or a Batch API output line's body), or raise.

        A reply is accepted only when it is complete (not cut off at ``reply_tokens``) and the server
        reports having read the whole prompt (``usage.prompt_tokens`` against our own count).
        """
        # Read first: a reply refused below was paid for all the same, so its error carries the usage.
        try:
            prompt_tokens, completion_tokens = usage_tokens(getattr(response, "usage", None))
        except ValueError:
            raise LLMTransientError(f"user {user_id!r}: LLM returned a malformed usage", user_id=user_id) from None
        spent = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise LLMTransientError(f"user {user_id!r}: LLM response has no choices", user_id=user_id, **spent)
        choice = choices[0]
        if getattr(choice, "finish_reason", None) == "content_filter":
            raise LLMPermanentError(
                f"user {user_id!r}: LLM rejected the content (content_filter)", user_id=user_id, **spent
            )
        finish_reason = getattr(choice, "finish_reason", None)
        if finish_reason not in _COMPLETE:
            shown = finish_reason if isinstance(finish_reason, str) and finish_reason.isidentifier() else "unexpected"
            raise LLMReplyCutOffError(
                f"user {user_id!r}: LLM reply is incomplete (finish_reason={shown[:32]!r}, "
                f"max_tokens={reply_tokens}); nothing was written",
                user_id=user_id,
                **spent,
            )
        try:
            self._check_read(user_id, messages, prompt_tokens)
        except LLMPromptTruncatedError as exc:
            exc.prompt_tokens, exc.completion_tokens = prompt_tokens, completion_tokens
            raise
        return Summary(
            text=choice.message.content or "",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            seconds=seconds,
        )

    def _check_read(self, user_id: str, messages: list[dict[str, str]], prompt_tokens: int) -> None:
        """Raise LLMPromptTruncatedError unless the server read (about) all of the prompt we sent.

        Servers such as Ollama drop the head of a prompt longer than their context without an error
        (the instructions and the previous summary go first); the only trace is a low
        ``usage.prompt_tokens``. Chat templates add tokens, so a complete read is never below our count.
        """
        expected = sum(self.tokens.reference(m["content"]) for m in messages)
        if prompt_tokens <= 0:
            if self.config.verify_prompt_tokens:
                raise LLMPromptTruncatedError(
                    f"user {user_id!r}: LLM server reported no usage.prompt_tokens, so a truncated prompt cannot "
                    "be ruled out (set the connection extra verify_prompt_tokens=false to accept such servers)",
                    user_id=user_id,
                )
            return
        floor = expected * (1.0 - self.tolerance)
        if prompt_tokens < floor:
            raise LLMPromptTruncatedError(
                f"user {user_id!r}: LLM server read {prompt_tokens} prompt tokens of about {expected} sent "
                f"({self.tokens.encoding}, tolerance {self.tolerance:.0%}): it truncated the prompt "
                "(is its context smaller than the connection's context_tokens?); nothing was written",
                user_id=user_id,
            )


_COMPLETE = frozenset({"stop", "eos", "eos_token", "end_turn", None})
"""finish_reason values of a complete reply ("length" = cut at max_tokens; content_filter is handled first)."""
