"""The names of the Redis keys beside the doorbell's record (``doorbell_key``): the ring counter and
each recorded user's last ring number. Here, below both users of them: the doorbell
(``freshness.doorbell``) writes them, a user erasure (``operations.erasure``) removes the user's field.
Imports nothing.
"""


def rang_key(key: str) -> str:
    """The hash of each recorded user's last ring number (field = user id) next to the record ``key``."""
    return f"{key}:rang"


def rings_key(key: str) -> str:
    """The counter that numbers the rings of the record ``key`` (no user id in it)."""
    return f"{key}:rings"
