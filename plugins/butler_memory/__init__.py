"""butler-memory: background compression of the Butler assistant's per-user memory."""

from __future__ import annotations

__version__ = "0.1.0"
