"""Airflow's floor for ``make bench-scale``: memory_compression's batched shape (scan -> the three
batch-mode tasks, which pass through in online mode -> a mapped task per batch of ``users_per_task``
users in pool ``llm_api``, labelled by its first user and count -> report), whose mapped task only
sleeps, user after user, as long as each user's LLM call would.

What this DAG costs per user is the least any DAG of that shape costs on the same machine and Airflow
settings: the no-op floor the scale bench sets against each of its runs (docs/benchmarks.md §12).
"""

from __future__ import annotations

import time

from airflow.sdk import Param, dag, get_current_context, task

from butler_memory.core.settings import MAX_USERS_PER_TASK


@dag(
    dag_id="bench_noop_batched",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["bench"],
    params={
        "users": Param(200, type="integer", minimum=1),
        "users_per_task": Param(50, type="integer", minimum=1, maximum=MAX_USERS_PER_TASK),
        "sleep": Param(0.01, type="number", minimum=0),
    },
)
def bench_noop_batched() -> None:
    """scan -> prepare -> submit -> wait -> sleep per user of each batch -> report."""

    @task
    def scan() -> list[list[str]]:
        params = get_current_context()["params"]
        users, k = int(params["users"]), int(params["users_per_task"])
        ids = [f"noop-{i:07d}" for i in range(users)]
        return [ids[i : i + k] for i in range(0, users, k)]

    @task(multiple_outputs=False)
    def prepare_batch() -> dict[str, int]:
        return {}

    @task
    def submit_batch() -> list[str]:
        return []

    @task
    def wait_for_batches() -> None:
        return None

    @task(multiple_outputs=False, pool="llm_api", map_index_template="{{ compressed_users_label }}")
    def compress_user(user_ids: list[str]) -> list[dict[str, str]]:
        context = get_current_context()
        label = user_ids[0] if len(user_ids) == 1 else f"{user_ids[0]} +{len(user_ids) - 1}"
        context["compressed_users_label"] = label  # type: ignore[typeddict-unknown-key]
        sleep = float(context["params"]["sleep"])
        results = []
        for user_id in user_ids:
            time.sleep(sleep)
            results.append({"user_id": user_id, "status": "compressed"})
        return results

    @task(trigger_rule="all_done")
    def report() -> int:
        # Reads the mapped results from XCom, as memory_compression's report does.
        results = get_current_context()["ti"].xcom_pull(task_ids="compress_user") or []
        return sum(len(batch) for batch in results)

    users = scan()
    mapped = compress_user.expand(user_ids=users)
    users >> prepare_batch() >> submit_batch() >> wait_for_batches() >> mapped
    mapped >> report()


bench_noop_batched()
