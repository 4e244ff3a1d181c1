"""A minimal Chrome DevTools Protocol client: headless Chromium, one page, cookies, DOM queries, screenshots.

Chromium's command line cannot set a cookie, and the memory compression page needs Airflow's
``_token`` cookie exactly as the Airflow UI sends it; driving the browser over the DevTools
protocol (``websockets``, already installed with Airflow) does that without any auth shortcut.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

START_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0


class CDPError(RuntimeError):
    """Chromium did not start, or a DevTools command failed."""


class Page:
    """One browser tab driven over its DevTools websocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == call_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Return the first event named ``method`` (already received or still to come)."""
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return dict(self.events.pop(index))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("method") == method:
                return dict(message)
            self.events.append(message)
        raise CDPError(f"no {method} event within {timeout:.0f}s")

    def navigate(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        self.events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def chromium(profile_dir: Path, executable: Path, *, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """Run headless Chromium in its own process group on a loopback DevTools port; yield its first tab."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    log_path = profile_dir / "chromium.log"
    command = [
        str(executable),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",  # Chromium picks a port and writes it to DevToolsActivePort
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        port = _devtools_port(profile_dir, proc, log_path)
        targets = _get_json(f"http://127.0.0.1:{port}/json/list")
        page_target = next(t for t in targets if t.get("type") == "page")
        with connect(
            page_target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=COMMAND_TIMEOUT
        ) as ws:
            page = Page(ws)
            page.send("Page.enable")
            page.send("Network.enable")
            yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _devtools_port(profile_dir: Path, proc: subprocess.Popen[bytes], log_path: Path) -> int:
    active = profile_dir / "DevToolsActivePort"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CDPError(
                f"chromium exited with code {proc.returncode}: {log_path.read_text(errors='replace')[-3000:]}"
            )
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(active.read_text().splitlines()[0])
        time.sleep(0.1)
    raise CDPError(
        f"chromium wrote no DevTools port within {START_TIMEOUT:.0f}s: {log_path.read_text(errors='replace')[-3000:]}"
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310  # loopback DevTools endpoint
        return json.load(response)
