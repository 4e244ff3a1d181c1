"""``MemoryStore``: one Butler database, its collections' operations in one object.

Each collection's reads and writes live in their own module (``events``, ``profiles``, ``archive``,
``run_docs``), as mixins over the typed ``mongo.Collections``; this one puts them together and
creates the indexes they rely on. Works on a pymongo ``Database`` (from ``MongoHook`` in Airflow,
see ``connections.py``). Every write is idempotent so that a re-run after a kill at any point ends
in the same state.
"""

from __future__ import annotations

from pymongo import ASCENDING
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.storage.archive import ArchiveMixin
from butler_memory.storage.events import EventsMixin
from butler_memory.storage.history import SummaryHistory
from butler_memory.storage.mongo import ensure_index, ensure_ttl
from butler_memory.storage.profiles import ProfilesMixin
from butler_memory.storage.run_docs import RUN_USERS_FIELD, RUNS_TTL_INDEX, RunDocsMixin


class MemoryStore(EventsMixin, ProfilesMixin, ArchiveMixin, RunDocsMixin):
    """Read and write one Butler database."""

    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__(db, settings)
        self.history = SummaryHistory(self.db, settings)

    def close(self) -> None:
        """Close the MongoDB client this store's database belongs to."""
        self.db.client.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ensure_indexes(self) -> None:
        """Create the indexes the scan and per-user reads rely on; safe to call on every run."""
        ensure_index(self.events, [("user_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)])
        ensure_index(self.profiles, [("user_id", ASCENDING)])
        self.history.ensure_indexes()
        ensure_index(self.quarantine, [("user_id", ASCENDING), ("created_at", ASCENDING)])
        # Run documents: found by run id, by the users they name (an erasure reads only those), and
        # kept runs_retention_days after the run finished.
        for runs in (self.runs, self.catchup_runs):
            ensure_index(runs, [("run_id", ASCENDING)], unique=True)
            ensure_index(runs, [(RUN_USERS_FIELD, ASCENDING)])
            ensure_ttl(self.db, runs, "finished_at", RUNS_TTL_INDEX, self.settings.runs_retention_days)
        ensure_index(
            self.run_users, [("dag_id", ASCENDING), ("run_id", ASCENDING), ("user_id", ASCENDING)], unique=True
        )
        ensure_index(self.run_users, [("user_id", ASCENDING)])  # erasure finds a user's rows without a scan
        ensure_ttl(self.db, self.run_users, "written_at", "written_at_ttl", self.settings.run_users_retention_days)
        # The catch-up scan's "who wrote since T": a covered index range over the new events only.
        ensure_index(self.events, [("created_at", ASCENDING), ("user_id", ASCENDING)])
        if self.settings.archive_enabled:
            ensure_index(self.archive_coll, [("user_id", ASCENDING), ("created_at", ASCENDING)])
            ensure_ttl(
                self.db,
                self.archive_coll,
                "archived_at",
                "archived_at_ttl",
                self.settings.archive_retention_days,
            )
