"""
# memory_erasure

Forget a user, or some of their events, everywhere butler-memory keeps them (manual trigger only).

* **Whole user** (only `user_id`): their archived events, every version of their summary, the
  summary and our bookkeeping fields in their profile, their rows and ids in run documents, their
  Redis keys (lock, doorbell record). Their `user_memory` events only with `include_events`.
* **Some events** (`event_ids`, the Butler's `event_id`s, or `since` + `until`): removed from
  `user_memory` and the archive; the summary is rebuilt without them as a new version, and every
  history version that saw them is deleted.
* `dry_run` (on by default) lists what would be removed and changes nothing.
* Bad input (unknown user, another user's event, an empty or inverted range, a time that is not
  ISO 8601, a conf key the DAG does not declare, such as `event_id` for `event_ids`) fails the run
  at once, having changed nothing. A compression holding the user's lock
  makes it wait, then retry. Safe to re-run: an interrupted erasure is finished, a finished one
  reports `already_erased`.
* Every erasure leaves a content-free audit record in `memory_erasures` (a keyed reference to the
  user; needs the `butler_memory_erasure` connection or `BUTLER_MEMORY_ERASURE_SECRET`).

Once the run finished, the `butler_memory_erasure_scrub` plugin replaces its user and event ids by
`[erased]` in Airflow's metadata DB (its conf, and for a whole user every memory_* DAG's rows): a
finished run cannot be cleared to run again, trigger a new one. The result XCom holds counts and the
audit id, no keyed reference. Only `MemoryAdmin` is granted this DAG. What stays in Airflow (task
log files of earlier runs): `docs/erasure.md`. Same engine as `python -m butler_memory forget`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from butler_memory.orchestration.dag_defaults import manual_dag
from butler_memory.orchestration.params import ERASURE, form


@task(multiple_outputs=False, execution_timeout=timedelta(minutes=30))
def forget() -> dict:
    """Forget the user, or the events, the params name."""
    from butler_memory.core.runs import run_key
    from butler_memory.orchestration import erasure_tasks

    context = get_current_context()
    return erasure_tasks.run(context["params"], run_key(context["ti"].dag_id, context["run_id"]))


@dag(
    schedule=None,
    **manual_dag(
        "memory_erasure", tags=["butler", "memory", "erasure"], doc_md=__doc__, params=form(ERASURE), admin=True
    ),
)
def memory_erasure() -> None:
    """One task: the erasure."""
    forget()


memory_erasure_dag = memory_erasure()

if __name__ == "__main__":
    memory_erasure_dag.test()
