"""
# memory_rollback

Undo a `memory_compression` run (manual trigger only). For each user the run changed (or the
given `user_ids`): the summary and its bookkeeping return to the version before the run, as a
**new** version, and the events the run folded go back from `user_memory_archive` into
`user_memory`. **plan** lists the users, **rollback_user** runs once per user (labelled with the
user id, under the user's lock), **report** logs one line per user and fails the run when any
user was refused or failed.

* Start with `dry_run` on: the report lists users, versions and event counts; nothing is written.
* A later run that built on this one makes the user *refused* (the message names it) unless
  `cascade` is on; events no longer archived make it *refused* unless `allow_missing_events`.
* All users or none: **plan** dry-runs every user first; when any would be refused it rolls back
  none of them (no `rollback_user` runs) and the report says so and fails, in a dry run too. With
  `partial` on, the others are rolled back and the refused ones fail the run.
* Safe to re-run: a finished rollback reports `not_changed`; an interrupted one is finished.
* At most `max_map_length` users (one `rollback_user` each): a larger run fails at **plan**, before
  any user is dry-run; roll it back with `python -m butler_memory rollback`, or a few `user_ids` at a time.
* A conf key the DAG does not declare (a misspelt param) fails the run at once, naming it.

Same engine as `python -m butler_memory rollback`. Docs: `docs/operations/runbook.md` (a bad run).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from butler_memory.orchestration.dag_defaults import manual_dag
from butler_memory.orchestration.params import ROLLBACK, form


@task(execution_timeout=timedelta(minutes=15))
def plan() -> list[str]:
    """Return the ids of the users to roll back."""
    from butler_memory.orchestration import rollback_tasks

    context = get_current_context()
    return rollback_tasks.plan(context["params"], context["ti"], context["run_id"])


@task(multiple_outputs=False, map_index_template="{{ rolled_back_user_id }}", execution_timeout=timedelta(minutes=30))
def rollback_user(user_id: str) -> dict:
    """Roll one user back to the version before the run."""
    from butler_memory.orchestration import rollback_tasks

    context = get_current_context()
    context["rolled_back_user_id"] = user_id  # type: ignore[typeddict-unknown-key]
    return rollback_tasks.rollback(user_id, context["params"], context["ti"], context["run_id"])


@task(multiple_outputs=False, trigger_rule="all_done", retries=1, execution_timeout=timedelta(minutes=15))
def report() -> dict:
    """Log the rollback report; fail when any user was not rolled back."""
    from butler_memory.orchestration import rollback_tasks

    context = get_current_context()
    return rollback_tasks.report(context["params"], context["ti"])


@dag(
    schedule=None,
    **manual_dag(
        "memory_rollback", tags=["butler", "memory", "rollback"], doc_md=__doc__, params=form(ROLLBACK), admin=True
    ),
)
def memory_rollback() -> None:
    """Plan, roll back each user in a mapped task, report."""
    users = plan()
    results = rollback_user.expand(user_id=users)
    results >> report()


memory_rollback_dag = memory_rollback()

if __name__ == "__main__":
    memory_rollback_dag.test()
