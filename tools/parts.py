"""The system parts the test suite needs besides the venv, where it finds them, and ``make test``'s installer.

=========== ================ ====================================== ==============================
part        Debian package   looked up at (override)                used by
=========== ================ ====================================== ==============================
chromium    ``chromium``     ``/usr/bin/chromium`` (BUTLER_CHROMIUM)  the Playwright browser tests
promtool    ``prometheus``   ``promtool`` on PATH (BUTLER_PROMTOOL)   the alert-rule checks
postgresql  ``postgresql``   ``/usr/lib/postgresql/*/bin`` (newest;   Airflow's metadata DB in the
                             BUTLER_PG_BINDIR)                        real-scheduler tests and bench
=========== ================ ====================================== ==============================

``python tools/parts.py install`` (run by ``make test``) installs the missing packages with apt-get
when it runs as root on a machine with apt-get (BUTLER_NO_APT=1 turns that off), then reports what
is still missing. Under ``CI=true`` a missing part fails the run (exit code 1), and the tests that
need it fail too; elsewhere they skip and say why. Pointing an override at a path that does not
exist is how the "missing" path is tried on a machine that has everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    """One system part: its name, the Debian package that provides it, and its override variable."""

    name: str
    package: str
    env: str
    default: str

    def find(self) -> Path | None:
        """Return the part's path, or None when it is not installed (or the override names nothing)."""
        override = os.environ.get(self.env)
        if self.name == "postgresql":
            return _pg_bindir(override)
        candidate = override or (shutil.which(self.default) if "/" not in self.default else self.default)
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
        return None

    def missing_reason(self) -> str:
        """Say what is missing and how to get it."""
        where = os.environ.get(self.env) or self.default
        return f"{self.name} not found at {where} (Debian package {self.package!r}; or set {self.env})"


def _pg_bindir(override: str | None) -> Path | None:
    """Return a PostgreSQL bin directory holding initdb and postgres: the override, else Debian's newest."""
    if override is not None:
        candidates = [Path(override)]
    else:
        found = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for candidate in candidates:
        if all(os.access(candidate / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return candidate
    return None


CHROMIUM = Part("chromium", "chromium", "BUTLER_CHROMIUM", "/usr/bin/chromium")
PROMTOOL = Part("promtool", "prometheus", "BUTLER_PROMTOOL", "promtool")
POSTGRESQL = Part("postgresql", "postgresql", "BUTLER_PG_BINDIR", "/usr/lib/postgresql/*/bin")
PARTS = (CHROMIUM, PROMTOOL, POSTGRESQL)


def in_ci() -> bool:
    """Return whether this is a CI run (CI=true), where a missing part fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None and os.environ.get("BUTLER_NO_APT") != "1"


def install(parts: tuple[Part, ...] = PARTS) -> list[Part]:
    """Install the missing parts' packages with apt-get when possible; return what is still missing."""
    missing = [part for part in parts if part.find() is None]
    if missing and _can_apt():
        packages = sorted({part.package for part in missing})
        print(f"==> apt-get install {' '.join(packages)} (for {', '.join(p.name for p in missing)})", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        ):
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"!! {' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}", flush=True)
                break
        missing = [part for part in parts if part.find() is None]
    return missing


def main(argv: list[str] | None = None) -> int:
    """``install``: install what is missing and report; exit 1 under CI=true when something still is."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python tools/parts.py install", file=sys.stderr)
        return 2
    missing = install()
    for part in missing:
        consequence = "CI=true: the run fails" if in_ci() else "its tests will be skipped"
        print(f"!! {part.missing_reason()}; {consequence}", flush=True)
    return 1 if missing and in_ci() else 0


if __name__ == "__main__":
    sys.exit(main())
