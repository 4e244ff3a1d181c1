"""Run keys (butler_memory.core.runs): naming a run by DAG, and resolving what an operator typed."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import pytest

from butler_memory.core.errors import RollbackRefusedError
from butler_memory.core.runs import matching, resolve_run, run_key, split_run_key

RID = "scheduled__2026-03-01T00:00:00+00:00"


def history(*names: str) -> Callable[[str], Sequence[str]]:
    """Return a stand-in for HistoryStore.run_names over these recorded run names (pure logic)."""
    return lambda pattern: [name for name in names if re.search(pattern, name)]


def test_a_key_names_the_dag_and_splits_back() -> None:
    assert run_key("memory_compression", RID) == f"memory_compression/{RID}"
    assert split_run_key(f"memory_compression/{RID}") == ("memory_compression", RID)
    assert split_run_key("cli__2026-03-01T00:00:00") == (None, "cli__2026-03-01T00:00:00")


def test_the_pattern_matches_the_name_and_any_dags_run_of_that_id_only() -> None:
    pattern = matching(RID)
    assert re.search(pattern, RID) and re.search(pattern, f"memory_compression_catchup/{RID}")
    assert not re.search(pattern, f"x/{RID}x") and not re.search(pattern, f"a/b/{RID}")
    assert not re.search(matching("manual__1.5"), "manual__125"), "the run id is matched literally"


@pytest.mark.parametrize(
    ("name", "recorded", "resolved"),
    [
        (f"memory_compression/{RID}", [f"memory_compression/{RID}", f"memory_compression_catchup/{RID}"], None),
        (RID, [f"memory_compression/{RID}"], f"memory_compression/{RID}"),
        (RID, [RID], RID),  # written before run keys
        (f"memory_compression/{RID}", [RID], RID),
        ("cli-run-1", ["cli-run-1"], "cli-run-1"),
    ],
)
def test_a_run_resolves_to_how_the_history_names_it(name: str, recorded: list[str], resolved: str | None) -> None:
    assert resolve_run(name, history(*recorded)) == (resolved or name)


@pytest.mark.parametrize(
    ("name", "recorded", "message"),
    [
        (
            RID,
            [f"memory_compression/{RID}", f"memory_compression_catchup/{RID}"],
            f"run '{RID}' names runs of several DAGs (memory_compression, memory_compression_catchup): "
            f"pass DAG_ID/RUN_ID, e.g. 'memory_compression/{RID}'",
        ),
        (
            f"memory_refold/{RID}",
            [f"memory_compression/{RID}"],
            f"run 'memory_refold/{RID}': DAG 'memory_refold' has no run '{RID}' in the summary history; that run "
            f"id is one of memory_compression ('memory_compression/{RID}')",
        ),
        ("manual__nope", [f"memory_compression/{RID}"], "run 'manual__nope' is not in the summary history"),
    ],
)
def test_an_unknown_ambiguous_or_other_dags_run_is_refused_saying_so(
    name: str, recorded: list[str], message: str
) -> None:
    with pytest.raises(RollbackRefusedError) as caught:
        resolve_run(name, history(*recorded))
    assert str(caught.value).startswith(message), str(caught.value)
