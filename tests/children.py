"""Run the tests' child scripts (kill workers, batch workers, readers) as processes of their own, with
``plugins/`` and the repository on PYTHONPATH and a JSON config as their one argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _command(script: Path, config: Mapping[str, Any]) -> list[str]:
    return [sys.executable, str(script), json.dumps(config)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}


def run_child(script: Path, config: Mapping[str, Any], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` to its end (a SIGKILL shows as return code -9); its output is captured as text."""
    return subprocess.run(
        _command(script, config), env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def start_child(script: Path, config: Mapping[str, Any]) -> subprocess.Popen[bytes]:
    """Start ``script`` and return at once (its output goes to the test's)."""
    return subprocess.Popen(_command(script, config), env=_env())
