"""validate_summary(): reject empty, oversized, refusing or placeholder summaries before a commit."""

from __future__ import annotations

import re

from butler_memory.core.errors import InvalidSummaryError

_REFUSALS = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i can(no|')t|i am unable|as an ai|извините|простите|"
    r"к сожалению,? я не могу|я не могу)",
    re.IGNORECASE,
)
_PLACEHOLDERS = re.compile(
    r"^\W*(n/?a|none|null|empty|nothing( meaningful| to summari[sz]e)?|no (meaningful |relevant )?"
    r"(information|content|facts)|нет (информации|данных|фактов)|ничего( существенного)?)\W*$",
    re.IGNORECASE,
)


def validate_summary(text: str, *, user_id: str, max_chars: int) -> str:
    """Return the cleaned summary or raise InvalidSummaryError (the message never quotes the text)."""
    cleaned = text.strip() if isinstance(text, str) else ""
    if not cleaned:
        raise InvalidSummaryError(f"user {user_id!r}: summariser returned an empty summary", user_id=user_id)
    try:
        # A JSON reply may escape a lone surrogate ("\\ud800"): a str the store cannot encode, which would
        # fail at the history write as a UnicodeEncodeError instead of failing this user here.
        cleaned.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSummaryError(f"user {user_id!r}: summary is not valid text", user_id=user_id) from None
    if len(cleaned) > max_chars:
        raise InvalidSummaryError(
            f"user {user_id!r}: summary is {len(cleaned)} characters, over the limit of {max_chars}",
            user_id=user_id,
        )
    if _REFUSALS.match(cleaned):
        raise InvalidSummaryError(f"user {user_id!r}: summariser refused the task", user_id=user_id)
    if _PLACEHOLDERS.match(cleaned):
        raise InvalidSummaryError(f"user {user_id!r}: summariser returned a placeholder", user_id=user_id)
    return cleaned
