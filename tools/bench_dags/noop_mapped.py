"""Airflow's floor for ``make bench``: memory_compression's shape (scan -> mapped task per user in pool
``llm_api``, labelled by user id -> report), whose mapped task only sleeps as long as the LLM would.

What this DAG reaches is the most any DAG with one mapped task per user can reach on the same
machine and Airflow settings; the bench copies it next to the real DAG in its own DAGs folder.
"""

from __future__ import annotations

import time

from airflow.sdk import Param, dag, get_current_context, task


@dag(
    dag_id="bench_noop_mapped",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["bench"],
    params={"users": Param(200, type="integer", minimum=1), "sleep": Param(0.5, type="number", minimum=0)},
)
def bench_noop_mapped() -> None:
    """scan -> sleep per user -> report."""

    @task
    def scan() -> list[str]:
        users = int(get_current_context()["params"]["users"])
        return [f"noop-{i:05d}" for i in range(users)]

    @task(multiple_outputs=False, pool="llm_api", map_index_template="{{ compressed_user_id }}")
    def compress_user(user_id: str) -> dict[str, str]:
        context = get_current_context()
        context["compressed_user_id"] = user_id  # type: ignore[typeddict-unknown-key]
        time.sleep(float(context["params"]["sleep"]))
        return {"user_id": user_id, "status": "compressed"}

    @task(trigger_rule="all_done")
    def report() -> int:
        # Reads the mapped results from XCom, as memory_compression's report does.
        results = get_current_context()["ti"].xcom_pull(task_ids="compress_user") or []
        return sum(1 for _ in results)

    compress_user.expand(user_id=scan()) >> report()


bench_noop_mapped()
