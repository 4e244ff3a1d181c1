"""Headless Chromium for the UI tests: Debian's ``/usr/bin/chromium`` driven by Playwright for Python.

Playwright is only the driver: ``playwright install`` (which downloads its own browsers) is never
run; ``executable_path`` launches the system chromium (tools/parts.py finds it). Each test gets a
fresh browser context with Airflow's ``_token`` cookie, set exactly as the Airflow UI sets it, so
the pages are reached through Airflow's own auth without any shortcut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000
"""Per action and per expectation: the API server on a loaded 2-core machine can take seconds a page."""


@contextlib.contextmanager
def chromium(executable: Path) -> Iterator[Browser]:
    """Launch headless chromium from ``executable`` for the ``with`` block."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def page_with_token(browser: Browser, base_url: str, token: str) -> Iterator[Page]:
    """Yield a page in a fresh context whose ``_token`` cookie is ``token`` (as the Airflow UI keeps it)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        context.set_default_timeout(TIMEOUT_MS)
        context.add_cookies(
            [{"name": "_token", "value": token, "url": f"{base_url}/", "httpOnly": True, "sameSite": "Lax"}]
        )
        yield context.new_page()
    finally:
        context.close()
