"""
# memory_refold

Rebuild users' summaries from the archive with today's summariser (manual trigger only), after a
model upgrade or a prompt fix. **refold_user** runs once per given user (labelled with the user
id, under the user's lock): it starts from the oldest kept summary version whose events are all
still archived, folds those archived events again, and commits the result as a **new** version
(kind `refold`). Raw events in `user_memory` stay raw. A user refused (nothing archived to start
from) or rejected by a guard fails its task; nothing is written for them.

* Start with `dry_run` on (the default): each task logs where it would start and how many events.
* At most `max_map_length` users per run (one `refold_user` each); the CLI takes any number.
* Worse than before? Roll it back with `memory_rollback` (its `run_id` is this run's id).

Same engine as `python -m butler_memory refold`. Docs: `docs/operations/runbook.md` (a model upgrade).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.configuration import conf
from airflow.sdk import dag, get_current_context, task

from butler_memory.orchestration.dag_defaults import manual_dag
from butler_memory.orchestration.params import REFOLD, form

LLM_POOL = os.environ.get("BUTLER_MEMORY_LLM_POOL", "llm_api")
MAX_MAP_LENGTH = conf.getint("core", "max_map_length")
USER_IDS = {
    "maxItems": MAX_MAP_LENGTH,
    "description": f"The users to re-fold (one per line), at most {MAX_MAP_LENGTH} (max_map_length: "
    "refold_user runs once per user). More: python -m butler_memory refold, or several runs.",
}
"""The form's bound on user_ids: Airflow maps refold_user at most max_map_length times."""


@task
def users() -> list[str]:
    """Return the user ids to re-fold (the param, validated at trigger time)."""
    from butler_memory.orchestration import rollback_tasks

    return rollback_tasks.refold_users(get_current_context()["params"])


@task(
    multiple_outputs=False,
    pool=LLM_POOL,
    map_index_template="{{ refolded_user_id }}",
    execution_timeout=timedelta(minutes=30),
)
def refold_user(user_id: str) -> dict:
    """Re-fold one user's summary from the archive."""
    from butler_memory.orchestration import rollback_tasks

    context = get_current_context()
    context["refolded_user_id"] = user_id  # type: ignore[typeddict-unknown-key]
    return rollback_tasks.refold(user_id, context["params"], context["ti"], context["run_id"])


@dag(
    schedule=None,
    **manual_dag(
        "memory_refold",
        tags=["butler", "memory", "llm"],
        doc_md=__doc__,
        params=form(REFOLD, user_ids=USER_IDS),
        admin=True,
    ),
)
def memory_refold() -> None:
    """Re-fold each given user in a mapped task."""
    refold_user.expand(user_id=users())


memory_refold_dag = memory_refold()

if __name__ == "__main__":
    memory_refold_dag.test()
