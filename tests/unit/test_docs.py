"""Docs that must not drift from the code."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from butler_memory.core.settings import Settings
from butler_memory.fold.metrics import ALL_METRICS

DOCS = Path(__file__).resolve().parents[2] / "docs"
DAGS = DOCS.parent / "dags"


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


def _flat(path: Path) -> str:
    """Return a doc's text with its line breaks and runs of spaces as single spaces."""
    return " ".join(path.read_text().split())


def _task_timeouts() -> dict[str, set[int]]:
    """Return each DAG task's ``execution_timeout`` in minutes, by task name (over every DAG file)."""
    found: dict[str, set[int]] = {}
    for dag_file in DAGS.glob("*.py"):
        for node in ast.walk(ast.parse(dag_file.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for deco in node.decorator_list:
                for kw in deco.keywords if isinstance(deco, ast.Call) else []:
                    if kw.arg == "execution_timeout" and isinstance(kw.value, ast.Call):
                        minutes = [k.value for k in kw.value.keywords if k.arg == "minutes"]
                        assert len(minutes) == 1 and isinstance(minutes[0], ast.Constant), ast.unparse(kw.value)
                        found.setdefault(node.name, set()).add(int(minutes[0].value))
    return found


def test_documented_task_timeouts_are_the_dags() -> None:
    """Every "`task` times out after N minutes" in the docs is that task's execution_timeout (third review)."""
    timeouts = _task_timeouts()
    said = [
        (str(doc.relative_to(DOCS)), task, int(n))
        for doc in DOCS.rglob("*.md")
        for task, n in re.findall(r"`(\w+)` times out after (\d+) minutes", _flat(doc))
    ]
    assert said, "no doc states a task's timeout any more: this test checks nothing"
    wrong = [(doc, task, n, timeouts.get(task)) for doc, task, n in said if timeouts.get(task) != {n}]
    assert not wrong, f"docs state task timeouts the DAGs do not set (doc, task, minutes, DAGs' minutes): {wrong}"


def test_every_mention_of_the_default_k_is_users_per_task_s_default() -> None:
    """The docs' "default k" is Settings().users_per_task, wherever they name it (third review)."""
    default = Settings().users_per_task
    patterns = (r"default k = (\d+)", r"default k \((\d+)\)", r"k = (\d+),? \(?the default")
    said = [
        (str(doc.relative_to(DOCS)), int(k))
        for doc in DOCS.rglob("*.md")
        for p in patterns
        for k in re.findall(p, _flat(doc))
    ]
    assert said, "no doc names the default k any more: this test checks nothing"
    wrong = [(doc, k) for doc, k in said if k != default]
    assert not wrong, f"docs call another k than users_per_task's default ({default}) the default: {wrong}"


def test_configuration_lists_every_param_of_the_manual_dags() -> None:
    """docs/configuration.md's table of each manual DAG has a row for every one of its params (third review)."""
    from butler_memory.orchestration import params

    text = (DOCS / "configuration.md").read_text()
    for dag, options in (
        ("memory_rollback", params.ROLLBACK),
        ("memory_refold", params.REFOLD),
        ("memory_erasure", params.ERASURE),
        ("memory_qualify", params.QUALIFY),
    ):
        assert f"`{dag}` (manual only" in text, f"docs/configuration.md has no section for {dag}"
        section = text.split(f"`{dag}` (manual only", 1)[1].split("\n\n`", 1)[0].split("\n## ", 1)[0]
        rows = {
            name for cell in re.findall(r"^\| ([^|]*) \|", section, flags=re.M) for name in re.findall(r"`(\w+)`", cell)
        }
        missing = [o.name for o in options if o.name not in rows]
        assert not missing, f"docs/configuration.md's {dag} table has no row for param(s) {missing}"


def test_the_runbook_and_deployment_guide_state_the_limit_params_real_maximum() -> None:
    """The form's ``limit`` goes up to max_map_length x users_per_task, not max_map_length (third review)."""
    docs = DOCS
    stale = {
        "operations/runbook.md": "up to Airflow's `max_map_length`,\n1024 by default)",
        "deployment.md": "at most `max_map_length`, 1024)",
    }
    found = [name for name, text in stale.items() if text in (docs / name).read_text()]
    assert found == [], f"{found} give the limit's maximum as max_map_length (1024), not x users_per_task"
    for name in stale:
        assert re.search(r"`max_map_length` ×\s+`users_per_task`", (docs / name).read_text()), name
