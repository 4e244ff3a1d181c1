"""Let fixtures see their test's outcome, so the API server's log is printed only when a test failed."""

from __future__ import annotations

from collections.abc import Callable, Generator

import pytest

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the setup/call/teardown reports on the item."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def test_failed(request: pytest.FixtureRequest) -> Callable[[], bool]:
    """Return a function telling whether this test's setup or call has failed (ask it during teardown)."""
    return lambda: any(r.failed for r in request.node.stash.get(_REPORTS, {}).values())
