"""tools/parts.py, the installer ``make test`` runs: what it asks apt-get for and when it fails the run.

A fake ``apt-get`` first on PATH records its arguments, so nothing is installed; the overrides point
the lookups at paths that do not exist, which is how a machine that has every part tries the
"missing" path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *, ci: bool, root_apt: bool = True, **overrides: str) -> tuple[int, str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "apt-calls"
    fake = bin_dir / "apt-get"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "BUTLER_NO_APT"}}
    env.update(overrides)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if ci:
        env["CI"] = "true"
    if not root_apt:
        env["BUTLER_NO_APT"] = "1"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "parts.py"), "install"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result.returncode, result.stdout + result.stderr, lines


@pytest.mark.skipif(os.geteuid() != 0, reason="the installer only uses apt-get as root")
def test_missing_parts_are_installed_with_apt_and_still_missing_fails_under_ci(tmp_path: Path) -> None:
    code, output, apt = _run(
        tmp_path, ci=True, BUTLER_CHROMIUM="/nonexistent/chromium", BUTLER_PG_BINDIR="/nonexistent"
    )
    assert apt == ["update -qq", "install -y -qq --no-install-recommends chromium postgresql"], output
    assert code == 1, output
    assert "chromium not found at /nonexistent/chromium" in output and "CI=true: the run fails" in output


def test_a_missing_part_is_reported_and_only_fails_under_ci(tmp_path: Path) -> None:
    code, output, apt = _run(tmp_path, ci=False, root_apt=False, BUTLER_PROMTOOL="/nonexistent/promtool")
    assert (code, apt) == (0, []), output
    assert "promtool not found at /nonexistent/promtool (Debian package 'prometheus'" in output
    assert "its tests will be skipped" in output
    code, output, _ = _run(tmp_path, ci=True, root_apt=False, BUTLER_PROMTOOL="/nonexistent/promtool")
    assert code == 1, output


def test_only_missing_packages_are_asked_for_and_nothing_when_all_are_there(tmp_path: Path) -> None:
    present = {"BUTLER_CHROMIUM": sys.executable, "BUTLER_PROMTOOL": sys.executable}
    pg = tmp_path / "pg"
    pg.mkdir()
    code, output, apt = _run(tmp_path, ci=True, **present, BUTLER_PG_BINDIR=str(pg))  # no initdb/postgres there
    assert (code, apt) == (1, ["update -qq", "install -y -qq --no-install-recommends postgresql"]), output
    for tool in ("initdb", "postgres"):
        (pg / tool).symlink_to(sys.executable)
    (tmp_path / "apt-calls").unlink()
    code, output, apt = _run(tmp_path, ci=True, **present, BUTLER_PG_BINDIR=str(pg))
    assert (code, apt, output) == (0, [], "")
