"""The preload plugin: Airflow's own plugin manager imports the task's libraries once per component.

Each case runs a fresh interpreter (this test process has imported everything long ago) that loads
plugins the way the scheduler does before it forks its LocalExecutor workers, then reports which
modules are loaded; a forked child must see them without importing anything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
HEAVY = (
    "openai",
    "openai.resources.chat.completions.completions",  # imported lazily, on the first call
    "httpcore2",  # imported lazily, when the first client is built
    "pymongo",
    "redis",
    "butler_memory.orchestration.dag_tasks",
    "statsd",
    "airflow.providers.standard.decorators.python",
    "lingua",  # the language guard's detector, built with its models
    "snowballstemmer",
)

PROBE = textwrap.dedent(
    """
    import json, os, sys
    before = {m: m in sys.modules for m in HEAVY}
    from airflow import plugins_manager
    from airflow.listeners.listener import get_listener_manager
    get_listener_manager()  # what the scheduler's job does first, before its executor forks workers
    after = {m: m in sys.modules for m in HEAVY}
    names = sorted(p.name for p in plugins_manager._get_plugins()[0])
    # What a task process forked from this one (as the LocalExecutor does) starts with.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        loaded = {m: m in sys.modules for m in HEAVY}
        summarizer = sys.modules.get("butler_memory.llm.openai_summarizer")
        loaded["tls context"] = summarizer is not None and summarizer._TLS_CONTEXT is not None
        language = sys.modules.get("butler_memory.safety.language")
        loaded["language detector"] = language is not None and language._build_detector.cache_info().currsize > 0
        os.write(write, json.dumps(loaded).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read, 65536))
    print(json.dumps({"before": before, "after": after, "child": child, "plugins": names}))
    """
)


def _probe(tmp_path: Path, **env: str) -> dict[str, dict[str, bool] | list[str]]:
    full_env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plugin_manager_preloads_task_libraries_and_forked_children_inherit_them(tmp_path: Path) -> None:
    seen = _probe(tmp_path)
    assert "butler_memory_preload" in seen["plugins"]
    assert not any(seen["before"].values()), seen["before"]  # the probe starts clean: a real change is seen
    assert all(seen["after"].values()), seen["after"]
    assert all(seen["child"].values()), seen["child"]


@pytest.mark.parametrize("value", ["false", "0", "off"])
def test_preload_can_be_turned_off(tmp_path: Path, value: str) -> None:
    seen = _probe(tmp_path, BUTLER_MEMORY_PRELOAD=value)
    assert "butler_memory_preload" in seen["plugins"]  # still a plugin, it just imports nothing
    assert not seen["after"]["openai"]
    assert not seen["after"]["butler_memory.orchestration.dag_tasks"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_failing_import_is_skipped_not_raised() -> None:
    sys.path.insert(0, str(PLUGINS))
    try:
        import butler_memory_preload as preload_plugin
    finally:
        sys.path.remove(str(PLUGINS))
    records = _Records()
    preload_plugin.log.addHandler(records)
    try:
        took = preload_plugin.preload(("json", "butler_memory_no_such_module"))
    finally:
        preload_plugin.log.removeHandler(records)
    assert list(took) == ["json"]
    assert records.messages == [
        "butler_memory preload: butler_memory_no_such_module not imported (ModuleNotFoundError)"
    ]
    assert preload_plugin.preload_enabled({"BUTLER_MEMORY_PRELOAD": "No"}) is False
    assert preload_plugin.preload_enabled({}) is True
    records.messages.clear()
    preload_plugin.log.addHandler(records)
    try:
        assert preload_plugin.preload_enabled({"BUTLER_MEMORY_PRELOAD": "maybe"}) is True
    finally:
        preload_plugin.log.removeHandler(records)
    assert records.messages == ["butler_memory preload: BUTLER_MEMORY_PRELOAD='maybe' is not true or false; preloading"]
