"""A stand-in for what a task body reads of Airflow's task instance, to run task bodies in-process.

XComs are kept in a dict the run's tasks share; a mapped task's pull returns one value per instance.
"""

from __future__ import annotations

from typing import Any

MAPPED = ("compress_user", "rollback_user", "refold_user")


class TaskInstanceStub:
    """The task instance of ``task_id`` in ``dag_id``'s run; XComs in ``xcoms``, shared by its tasks."""

    map_index = 0

    def __init__(self, xcoms: dict[tuple[str, str], list[Any]], task_id: str, dag_id: str) -> None:
        self.xcoms = xcoms
        self.task_id = task_id
        self.dag_id = dag_id

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms.setdefault((self.task_id, key), []).append(value)

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        values = self.xcoms.get((task_ids, key))
        if values is None:
            return None
        return values if task_ids in MAPPED else values[-1]
