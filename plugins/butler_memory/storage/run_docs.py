"""Run documents (one per DAG run), each user's outcome in a run, and the small state documents
(the catch-up scan's position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from butler_memory.storage.mongo import Collections

RUN_USERS_FIELD = "user_ids"
"""Every user id a run document names (its users' rows): indexed, so an erasure reads only those."""
RUNS_TTL_INDEX = "finished_at_ttl"


class RunDocsMixin(Collections):
    """Store and read run documents, per-user outcomes and state documents."""

    def save_run(self, doc: Mapping[str, Any]) -> None:
        """Store or replace the document of one DAG run (keyed by run_id; re-runs update it).

        Catch-up runs have a collection of their own: their run ids may equal the daily DAG's
        (both name scheduled runs after their logical date), and they would crowd the daily history.
        """
        coll = self.catchup_runs if doc.get("kind") == "catchup" else self.runs
        coll.replace_one({"run_id": doc["run_id"]}, dict(doc), upsert=True)

    def save_user_outcome(self, dag_id: str, run_id: str, row: Mapping[str, Any], *, now: datetime) -> None:
        """Store one user's outcome in one DAG run (the last attempt's wins): ids, counts and statuses only."""
        key = {"dag_id": dag_id, "run_id": run_id, "user_id": row["user_id"]}
        self.run_users.replace_one(key, {**key, "row": dict(row), "written_at": now}, upsert=True)

    def user_outcomes(self, dag_id: str, run_id: str, user_ids: Sequence[str] | None = None) -> dict[str, dict]:
        """Return {user id: outcome row} of one DAG run, for the given users (default: all of the run's)."""
        query: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id}
        if user_ids is not None:
            query["user_id"] = {"$in": list(user_ids)}
        return {doc["user_id"]: doc["row"] for doc in self.run_users.find(query, {"_id": 0, "user_id": 1, "row": 1})}

    def load_state(self, name: str) -> dict[str, Any]:
        """Return one state document (e.g. ``"catchup"``), empty when there is none yet."""
        return self.state.find_one({"_id": name}) or {}

    def save_state(self, name: str, *, set_fields: Mapping[str, Any], inc: Mapping[str, int] | None = None) -> None:
        """Set (and increment) fields of one state document, creating it when missing."""
        update: dict[str, Any] = {"$set": dict(set_fields)}
        if inc:
            update["$inc"] = dict(inc)
        self.state.update_one({"_id": name}, update, upsert=True)
