"""The kill matrices' child: ``kill_worker.py`` run in a process of its own that SIGKILLs itself at a
checkpoint, and the wait for the lock the dead child leaves behind (the ``kill_rig`` fixture,
tests/engine/conftest.py, puts them on the real services of a case)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from tests.children import run_child

WORKER = Path(__file__).with_name("kill_worker.py")

Kill = tuple[str, int]
"""(step, occurrence): die the occurrence-th time the step's checkpoint is reached."""


def run_kill_worker(config: dict[str, Any], kill: Kill) -> subprocess.CompletedProcess[str]:
    """Run kill_worker.py with ``config`` (its keys: see its docstring) until it dies at ``kill``."""
    return run_child(WORKER, {**config, "kill_step": kill[0], "kill_occurrence": kill[1]}, timeout=60)


def wait_for_lock_expiry(client: redis.Redis, key: str, ttl: float) -> None:
    """Wait until the dead process's lock expires by its TTL (and no sooner than it had left)."""
    left = client.pttl(key)
    assert left > 0, f"the killed process's lock {key!r} should still be held with a TTL, got pttl={left}"
    deadline = time.monotonic() + ttl + 1.0
    while client.exists(key):
        assert time.monotonic() < deadline, f"lock {key!r} outlived its {ttl}s TTL"
        time.sleep(0.05)
