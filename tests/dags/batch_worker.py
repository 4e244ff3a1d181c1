"""Run one batch of the compress_user task body in this process; optionally SIGKILL it between users.

Usage: ``python tests/dags/batch_worker.py '<json>'`` with keys ``user_ids``, ``run_id``, ``params``
and ``kill_after`` (how many users' outcomes are stored before the kill; -1: no kill). Connections
come from the environment (AIRFLOW_CONN_*), as in a task. Prints the rows as JSON on success; exits
1 when the task body failed (a failed user), -9 (SIGKILL) at the kill.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from butler_memory.orchestration import dag_tasks
from butler_memory.storage.store import MemoryStore


class TaskInstance:
    """What the task body reads of Airflow's task instance: its ids, and XCom pushes kept in memory."""

    dag_id = "memory_compression"
    task_id = "compress_user"
    map_index = 0

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    kill_after: int = config["kill_after"]
    stored = 0
    save = MemoryStore.save_user_outcome
    compress_one = dag_tasks._compress_one

    def saving(self: MemoryStore, *args: Any, **kwargs: Any) -> None:
        nonlocal stored
        save(self, *args, **kwargs)
        stored += 1
        if stored == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def compressing(*args: Any, **kwargs: Any) -> Any:
        if kill_after == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return compress_one(*args, **kwargs)

    MemoryStore.save_user_outcome = saving  # type: ignore[method-assign]
    dag_tasks._compress_one = compressing
    try:
        rows = dag_tasks.compress(config["user_ids"], config["params"], TaskInstance(), config["run_id"])
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("ROWS " + json.dumps(rows, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
