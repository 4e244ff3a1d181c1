"""Default arguments every butler-memory DAG shares (owner, retries with exponential backoff).

Imported by the DAG files at parse time, so it imports nothing but the standard library.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "butler-memory",
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}
