"""The one rule of what a user id is, for both ends of the job.

What the daily run compresses (the scan, ``compress_user``, the catch-up) and what erases or shows
a user (the forget CLI and the erasure DAG's param, the UI, the Butler's client and doorbell) take
the same ids, so every user the job writes a summary or history for can be looked up and erased.
The erasure's scrubbing finds an id inside free text by its ends (``erasure.ID_DELIMITERS``), which
holds only for ids without whitespace or control characters.
"""

from __future__ import annotations

from typing import TypeGuard

from butler_memory.core.errors import InvalidUserIdError

MAX_USER_ID_CHARS = 200
"""The longest user id (the forms' and the CLI's limit on event ids too)."""


def valid_user_id(user_id: object) -> TypeGuard[str]:
    """Return whether ``user_id`` is a user id: a string of 1 to ``MAX_USER_ID_CHARS`` printable
    characters, none of them whitespace."""
    return (
        isinstance(user_id, str)
        and 0 < len(user_id) <= MAX_USER_ID_CHARS
        and user_id.isprintable()
        and not any(ch.isspace() for ch in user_id)
    )


def check_user_id(user_id: object) -> str:
    """Return ``user_id`` when it is one the job accepts; raise InvalidUserIdError naming it (its
    first 60 characters, or its type)."""
    if valid_user_id(user_id):
        return user_id
    shown = repr(user_id)[:60] if isinstance(user_id, str) else f"a {type(user_id).__name__}"
    raise InvalidUserIdError(
        f"user id {shown} is not a user id (a non-empty printable string without spaces, "
        f"at most {MAX_USER_ID_CHARS} characters)"
    )
