"""Docs that must not drift from the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from butler_memory.core.settings import Settings
from butler_memory.fold.metrics import ALL_METRICS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented_with_its_default() -> None:
    text = (DOCS / "configuration.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*) \|", text, flags=re.M))
    for field in dataclasses.fields(Settings):
        assert field.name in rows, f"docs/configuration.md has no row for setting {field.name!r}"
        default = getattr(Settings(), field.name)
        shown = rows[field.name].strip().strip("`")
        if isinstance(default, bool):
            assert shown == str(default).lower(), f"{field.name}: docs say {shown!r}, code says {default!r}"
        elif isinstance(default, int | float):
            assert float(shown) == float(default), f"{field.name}: docs say {shown!r}, code says {default!r}"
        elif default:
            assert shown == default, f"{field.name}: docs say {shown!r}, code says {default!r}"


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    missing = [name for name in ALL_METRICS if name not in text]
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_the_runbook_and_deployment_guide_state_the_limit_params_real_maximum() -> None:
    """The form's ``limit`` goes up to max_map_length x users_per_task, not max_map_length (third review)."""
    docs = Path(__file__).resolve().parents[2] / "docs"
    stale = {
        "operations/runbook.md": "up to Airflow's `max_map_length`,\n1024 by default)",
        "deployment.md": "at most `max_map_length`, 1024)",
    }
    found = [name for name, text in stale.items() if text in (docs / name).read_text()]
    assert found == [], f"{found} give the limit's maximum as max_map_length (1024), not x users_per_task"
    for name in stale:
        assert re.search(r"`max_map_length` ×\s+`users_per_task`", (docs / name).read_text()), name
