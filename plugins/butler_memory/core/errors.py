"""Exceptions with precise meaning. Messages name users, events and fields, never content."""

from __future__ import annotations


class CompressionError(Exception):
    """A user's compression could not finish; nothing unsafe was written."""

    retryable = False
    """Whether a later attempt can succeed without anyone changing anything."""

    def __init__(
        self, message: str, *, user_id: str | None = None, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.prompt_tokens = prompt_tokens
        """LLM tokens spent before the failure (a cut-off reply's, or the user's whole attempt's): counted."""
        self.completion_tokens = completion_tokens


class InvalidEventError(CompressionError):
    """An event in user_memory does not have the shape the Butler's schema promises."""

    def __init__(self, user_id: str, event_id: object, field: str, problem: str) -> None:
        super().__init__(f"user {user_id!r}: event {event_id!s}: field {field!r} {problem}", user_id=user_id)
        self.event_id = event_id
        self.field = field
        self.problem = problem
        """What is wrong, in sizes and types only (the quarantine record keeps it)."""


class InvalidProfileError(CompressionError):
    """The user's profile document has a field in an unexpected shape."""

    def __init__(self, user_id: str, field: str, problem: str) -> None:
        super().__init__(f"user {user_id!r}: profile field {field!r} {problem}", user_id=user_id)
        self.field = field


class LockUnavailableError(CompressionError):
    """Redis could not be asked for the lock: compress nothing (fail closed)."""

    retryable = True


class LockLostError(CompressionError):
    """Our lock expired or was taken over before a write; the write was not made."""

    retryable = True


class ConcurrentUpdateError(CompressionError):
    """The profile changed under us (its summary version moved); nothing was overwritten."""

    retryable = True


class StoreError(CompressionError):
    """MongoDB failed an operation; the message names its type, code and counts, never a document.

    ``retryable`` is set per instance: a lost connection or a write-concern timeout may succeed
    later, a refused write (duplicate key, validator) will not.
    """


class StaleOwnLockError(CompressionError):
    """An earlier attempt of this same task still holds the user's lock (it keeps extending it)."""

    retryable = True


class LLMError(CompressionError):
    """The summariser failed."""


class LLMTransientError(LLMError):
    """Timeout, rate limit, server error: the same call may succeed later."""

    retryable = True


class LLMPermanentError(LLMError):
    """Bad credentials, bad request, content rejected: retrying will not help."""


class LLMReplyCutOffError(LLMPermanentError):
    """The reply stopped before it was finished (``finish_reason`` "length"): never a summary."""


class LLMPromptTooLongError(LLMPermanentError):
    """The prompt would not fit the model's context (``context_tokens``); it was not sent."""


class LLMPromptTruncatedError(LLMPermanentError):
    """The server read fewer prompt tokens than were sent (a silently truncated prompt); nothing was written."""


class InvalidSummaryError(LLMError):
    """The summariser returned something that is not a usable summary; nothing was deleted."""


class ForgetInputError(CompressionError):
    """An erasure was asked for something that cannot be done as asked (unknown user, another user's
    event, an empty or inverted time range); nothing was changed."""


class LockBusyError(CompressionError):
    """The user's lock stayed held (a compression is running) past the erasure's wait; nothing changed."""

    retryable = True


class ErasurePendingError(CompressionError):
    """An erasure of this user, or of some of their events, is unfinished: no compression until it is."""

    retryable = True


class RollbackRefusedError(CompressionError):
    """A rollback (or re-fold) cannot be done as asked; nothing was changed. The message says why."""


class GuardRejected(CompressionError):
    """A guard refused the proposed summary (facts dropped, wrong language); nothing was committed.

    Not retryable: the summariser runs at temperature 0, so the same previous summary and events
    give the same summary again; an immediate retry would only spend tokens. The next scheduled
    run is the retry, after an operator looked (docs/operations/runbook.md#a-guard-rejected-a-summary).
    """

    def __init__(self, message: str, *, user_id: str, guards: dict[str, str]) -> None:
        super().__init__(message, user_id=user_id)
        self.guards = guards
        """``{guard: outcome}`` of the rejected summary."""


class InvalidUserIdError(CompressionError, ValueError):
    """A user id that is not one (not a string, empty, too long, spaces or control characters); nothing was read."""


class LLMBatchError(LLMPermanentError):
    """A Batch API request gave no usable reply: the batch failed, expired or was cancelled, its line
    failed or is missing, or the output file does not parse. Nothing was written; clearing the user's
    task compresses the user online (docs/operations/runbook.md#a-batch-run-failed-users)."""


class StaleFoldError(CompressionError):
    """Batch mode: what was frozen at prepare no longer matches the user's summary or events; the
    batch's reply is dropped and nothing is written (reported as ``skipped_stale``)."""
