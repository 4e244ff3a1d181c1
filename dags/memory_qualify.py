"""
# memory_qualify

Qualify a model before trusting it (manual trigger only). **qualify** sends the configured LLM
connection (`openai_default`, or the offline summariser when that is configured) a fixed, built-in
set of synthetic users: planted facts in Russian, English, German and Spanish, short and long
histories, corrections. Each goes through the real prompt, validation and guards, chunk by chunk,
as a compression would; **nothing is written** to the Butler's data. The log holds the report (fact
retention, guard rejections and false alarms, language kept, cut-off and truncated replies,
latency and tokens per user); the run fails when the model does not meet the thresholds (the
params) or the endpoint cannot be used.

Run it before switching models, endpoints or prompts. Same as `python -m butler_memory qualify`.
Docs: `docs/qualify.md`, `docs/operations/runbook.md` (a model upgrade).
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from butler_memory.orchestration.dag_defaults import manual_dag
from butler_memory.orchestration.params import QUALIFY, form

LLM_POOL = os.environ.get("BUTLER_MEMORY_LLM_POOL", "llm_api")


@task(multiple_outputs=False, pool=LLM_POOL, execution_timeout=timedelta(minutes=30))
def qualify() -> dict:
    """Run the synthetic users through the summariser and judge it."""
    from butler_memory.orchestration import qualify_tasks

    return qualify_tasks.run(get_current_context()["params"])


@dag(
    schedule=None,
    **manual_dag("memory_qualify", tags=["butler", "memory", "llm"], doc_md=__doc__, params=form(QUALIFY), admin=False),
)
def memory_qualify() -> None:
    """One task: qualify the summariser."""
    qualify()


memory_qualify_dag = memory_qualify()

if __name__ == "__main__":
    memory_qualify_dag.test()
