"""
# memory_compression

Keeps every Butler user's memory small: once a day, **scan** finds users with more than
`threshold` events (default 50): those who wrote since its last scan or that an earlier run left
over, and every user on its full-reconciliation days (`daily_full_scan_every_days`); **compress_user** runs once per batch of
`users_per_task` users (default 200; dynamically mapped, each instance labelled with its first user id
and how many more, in pool `llm_api`) and folds, for each user, all but the newest `keep_last_n`
events (default 20) into the user's rolling summary, and **report** stores one document per run in
`memory_compression_runs`, emits StatsD metrics and fails the run when any user failed.

* Manual run: *Trigger DAG* shows a form: `dry_run`, `limit`, `user_ids`, `threshold`,
  `keep_last_n`, `users_per_task` (empty = the configured setting), `full_scan` (count every user:
  after restoring a backup).
* `llm_mode` `batch` (setting or param): **prepare_batch** freezes each user's fold, **submit_batch**
  sends them as one OpenAI Batch API job, **wait_for_batches** waits in the triggerer (no worker slot),
  and `compress_user` commits each user's reply (a user changed meanwhile: `skipped_stale`). In
  `online` mode (the default) those three tasks return at once.
* `users_per_task` users share one `compress_user` instance (labelled with the user id, or the
  first user id and how many more); each keeps its own lock, result and failure.
* A failed user: clear its `compress_user` instance **with downstream**, so `report` runs again;
  only the instance's users that failed or never finished are compressed again; the run then ends green.
* Safe to re-run at any point: nothing is deleted before a summary covering it is stored.

Docs: `docs/architecture.md`, `docs/configuration.md`, `docs/operations/runbook.md`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.configuration import conf
from airflow.sdk import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    AssetWatcher,
    CronTriggerTimetable,
    dag,
    get_current_context,
    task,
)

from butler_memory.core.settings import MAX_USERS_PER_TASK
from butler_memory.freshness.doorbell_trigger import DoorbellTrigger
from butler_memory.orchestration.batch_trigger import WaitForBatches
from butler_memory.orchestration.dag_defaults import DEFAULT_ARGS
from butler_memory.orchestration.params import COMPRESS, DAILY_COMPRESS, form

SCHEDULE = os.environ.get("BUTLER_MEMORY_SCHEDULE", "@daily")
"""A cron expression or preset; the run time is a setting, read from the environment at parse time."""
CATCHUP_SCHEDULE = os.environ.get("BUTLER_MEMORY_CATCHUP_SCHEDULE", "2-59/5 * * * *")
"""The catch-up DAG's cadence (cron), read from the environment at parse time. Every 5 minutes from
minute 2: never at the daily run's minute, so the two DAGs never name a scheduled run alike
(``scheduled__<time>``), which the summary history's run ids would confuse."""
DOORBELL_ASSET = Asset(
    name="butler_memory_doorbell",
    uri="redis://butler-memory/doorbell",
    watchers=[
        AssetWatcher(
            name="butler_memory_doorbell",
            trigger=DoorbellTrigger(
                redis_conn_id=os.environ.get("BUTLER_MEMORY_REDIS_CONN_ID", "redis_default"),
                key=os.environ.get("BUTLER_MEMORY_DOORBELL_KEY", "butler:memory:doorbell"),
                channel=os.environ.get("BUTLER_MEMORY_DOORBELL_CHANNEL", "butler:memory:doorbell:ring"),
            ),
        )
    ],
)
"""Rung by the Butler (butler_memory.freshness.doorbell); its watcher runs in the triggerer."""

CATCHUP_DOC = """
# memory_compression_catchup

Fresh memory all day: the same **scan -> compress_user (mapped) -> report** as `memory_compression`,
every few minutes (`BUTLER_MEMORY_CATCHUP_SCHEDULE`, default every 5 minutes) and at once when the
Butler rings the doorbell (`butler_memory.freshness.doorbell`; asset `butler_memory_doorbell`, watched in the
triggerer). Its scan counts only users with events since its last scan (minus a margin for late
writes) and the users the doorbell recorded, not the whole collection. A run with nobody due
stores no run document (it bumps an idle counter). Same lock, same report, same clear-and-rerun.
The daily `memory_compression` run (and its periodic full scan) stays the safety net.
"""
LLM_POOL = os.environ.get("BUTLER_MEMORY_LLM_POOL", "llm_api")
MAX_MAP_LENGTH = conf.getint("core", "max_map_length")
RUN_MAXIMUM = MAX_MAP_LENGTH * MAX_USERS_PER_TASK
"""Most users a run can take (at users_per_task's maximum); the scan checks limit against the run's own k."""


@task(execution_timeout=timedelta(minutes=15))
def scan(kind: str) -> list[list[str]]:
    """Return the ids of users over the threshold, largest backlog first, in batches of users_per_task."""
    from butler_memory.orchestration import dag_tasks

    context = get_current_context()
    return dag_tasks.scan(context["params"], context["ti"], kind=kind)


@task(
    multiple_outputs=False,
    pool=LLM_POOL,
    map_index_template="{{ compressed_users_label }}",
    execution_timeout=timedelta(minutes=60),
)
def compress_user(user_ids: list[str], kind: str) -> list[dict]:
    """Fold the older events of each user of one batch into their summary, one user after another
    (in batch mode: commit each user's batch reply)."""
    from butler_memory.orchestration import dag_tasks

    context = get_current_context()
    context["compressed_users_label"] = dag_tasks.batch_label(user_ids)  # type: ignore[typeddict-unknown-key]
    return dag_tasks.compress(user_ids, context["params"], context["ti"], context["run_id"], kind=kind)


@task(multiple_outputs=False, execution_timeout=timedelta(minutes=30))
def prepare_batch() -> dict:
    """Batch mode: freeze each scanned user's fold (ids, version, prompt hash); nothing in online mode."""
    from butler_memory.orchestration import dag_tasks

    context = get_current_context()
    return dag_tasks.batch_prepare(context["params"], context["ti"], context["run_id"])


@task(execution_timeout=timedelta(minutes=60))
def submit_batch() -> list[str]:
    """Batch mode: upload the JSONL and create the batches (idempotent); nothing in online mode."""
    from butler_memory.orchestration import dag_tasks

    context = get_current_context()
    return dag_tasks.batch_submit(context["params"], context["ti"], context["run_id"])


@task(multiple_outputs=False, trigger_rule="all_done", retries=1, execution_timeout=timedelta(minutes=15))
def report() -> dict:
    """Store and log the run report; fail when any user failed."""
    from butler_memory.orchestration import dag_tasks

    context = get_current_context()
    dag_run = context["dag_run"]
    return dag_tasks.report(context["params"], context["ti"], context["run_id"], dag_run.start_date)


LIMIT = {
    "maximum": RUN_MAXIMUM,
    "description": f"Most users in this run, largest backlog first: 1 to {MAX_MAP_LENGTH} x users_per_task "
    f"(at most {RUN_MAXIMUM:,}). Empty: the scan_limit setting.",
}
"""The run's bound on limit: Airflow's max_map_length batches of the most users a task takes."""


def compression_dag(dag_id: str, kind: str, schedule: Any, doc_md: str, params: dict[str, Any]) -> DAG:
    """Build one compression DAG: scan, compress each user in a mapped task, report (one shape for both)."""

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["butler", "memory", "llm"],
        doc_md=doc_md,
        params=params,
    )
    def compression() -> None:
        users = scan(kind)
        results = compress_user.partial(kind=kind).expand(user_ids=users)
        if kind == "daily":  # batch mode's steps; each returns at once in online mode
            wait = WaitForBatches(task_id="wait_for_batches", execution_timeout=None)
            users >> prepare_batch() >> submit_batch() >> wait >> results
        results >> report()

    return compression()


memory_compression_dag = compression_dag(
    "memory_compression", "daily", SCHEDULE, __doc__ or "", form(DAILY_COMPRESS, limit=LIMIT)
)
memory_compression_catchup_dag = compression_dag(
    "memory_compression_catchup",
    "catchup",
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(CATCHUP_SCHEDULE, timezone="UTC"), assets=[DOORBELL_ASSET]),
    CATCHUP_DOC,
    form(COMPRESS, limit=LIMIT),
)

if __name__ == "__main__":
    memory_compression_dag.test()
