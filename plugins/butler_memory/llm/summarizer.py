"""The summariser protocol and the types every summariser shares.

A summariser folds a batch of events into the previous summary (a rolling summary) and returns
the new summary text with its token counts. The implementations live in their own modules:
``openai_summarizer`` (an OpenAI-compatible chat completions client) and ``offline`` (a
deterministic extractive one); the prompt they send is built in ``prompt``, and every summary is
checked by ``validation.validate_summary`` before it is committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True)
class EventText:
    """One event as the summariser sees it."""

    role: str
    content: str
    created_at: datetime


@dataclass(frozen=True)
class SummaryRequest:
    """Fold ``events`` into ``previous_summary``."""

    user_id: str
    previous_summary: str
    events: Sequence[EventText]
    language: str
    max_tokens: int
    max_chars: int


@dataclass(frozen=True)
class Summary:
    """A new rolling summary and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class Summarizer(Protocol):
    """Anything that can fold events into a summary."""

    name: str
    context_tokens: int | None
    """The model's context window (prompt + reply) in its tokens, when known; None = unknown."""

    def count_tokens(self, text: str) -> int:
        """Return the tokens ``text`` costs in a prompt (exact, or an upper bound)."""
        ...

    def summarize(self, request: SummaryRequest) -> Summary: ...

    def close(self) -> None: ...
