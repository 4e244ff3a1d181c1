"""The batch mode's MongoDB collection (``batch_collection``): one ``fold`` document per (run, user),
frozen at prepare (the version it builds on, the events' ``_id``s and digests, the prompt's hash,
later the batch's reply), and one ``part`` document per batch (its lines, state and file ids).
Never content: the reply is a chat completion, dropped once its commit ended.

Used by ``operations.batch``; imports only ``core`` and ``storage``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from butler_memory.storage.mongo import ensure_index, ensure_ttl
from butler_memory.storage.store import MemoryStore

# A fold's mode: what the commit step does with the user.
BATCHED = "batch"
ONLINE = "online"
STALE = "stale"

# A part's state.
INTENT, SUBMITTED, COLLECTED, CLEANED = "intent", "submitted", "collected", "cleaned"


class BatchFolds:
    """The batch mode's collection: one ``fold`` document per (run, user), one ``part`` per batch."""

    def __init__(self, store: MemoryStore) -> None:
        self.settings = store.settings
        self.coll = store.db[store.settings.batch_collection]

    def ensure_indexes(self) -> None:
        """Create the lookup index and the retention TTL; safe on every run."""
        ensure_index(self.coll, [("run_key", 1), ("kind", 1), ("user_id", 1)])
        ensure_ttl(self.coll.database, self.coll, "written_at", "written_at_ttl", self.settings.batch_retention_days)

    def fold(self, run_key: str, user_id: str) -> dict[str, Any] | None:
        """Return one user's fold of a run, or None."""
        return self.coll.find_one({"_id": _fold_id(run_key, user_id)})

    def folds(self, run_key: str, mode: str | None = None) -> list[dict[str, Any]]:
        """Return the run's folds (without replies), by user id."""
        query: dict[str, Any] = {"run_key": run_key, "kind": "fold"}
        if mode is not None:
            query["mode"] = mode
        return list(self.coll.find(query, {"reply": 0}).sort([("user_id", 1)]))

    def add_fold(self, run_key: str, user_id: str, fold: dict[str, Any], now: datetime) -> None:
        """Record a user's fold once: a re-run of prepare never changes what may be submitted already."""
        doc = {"run_key": run_key, "kind": "fold", "user_id": user_id, "written_at": now, **fold}
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$setOnInsert": doc}, upsert=True)

    def mark_stale(self, run_key: str, user_id: str, reason: str) -> None:
        """Take a user out of the batch (its summary or events changed before the submit)."""
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$set": {"mode": STALE, "reason": reason}})

    def parts(self, run_key: str) -> list[dict[str, Any]]:
        """Return the run's parts (batches), in order."""
        return list(self.coll.find({"run_key": run_key, "kind": "part"}).sort([("part", 1)]))

    def add_part(self, run_key: str, part: int, custom_ids: list[str], now: datetime) -> dict[str, Any]:
        """Record a part's intent (its lines) before anything of it is uploaded."""
        doc = {
            "_id": f"{run_key}|part|{part}",
            "run_key": run_key,
            "kind": "part",
            "part": part,
            "custom_ids": custom_ids,
            "fold_hash": hashlib.sha256("\n".join(custom_ids).encode()).hexdigest()[:32],
            "state": INTENT,
            "written_at": now,
        }
        self.coll.update_one({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
        return dict(self.coll.find_one({"_id": doc["_id"]}) or doc)

    def set_part(self, part: dict[str, Any], **fields: Any) -> None:
        """Update a part's state and ids."""
        self.coll.update_one({"_id": part["_id"]}, {"$set": fields})
        part.update(fields)

    def set_reply(self, run_key: str, cid: str, *, reply: dict[str, Any] | None, error: str | None) -> bool:
        """Store one line's reply (the chat completion) or why there is none, once (a collect re-run
        after a kill reads the files again). Return whether it was stored now."""
        stored = self.coll.update_one(  # never on a stale fold: its commit skips it, the reply would only wait
            {
                "run_key": run_key,
                "kind": "fold",
                "custom_id": cid,
                "reply": None,
                "reply_error": None,
                "mode": {"$ne": STALE},
            },
            {"$set": {"reply": reply, "reply_error": error}},
        )
        return stored.modified_count == 1

    def forget_user(self, user_id: str) -> None:
        """Take a user out of every batch not committed yet and drop its replies: a forget of some of
        its events changed the user (its commit would be stale anyway), and a reply may hold their facts."""
        self.coll.update_many(
            {"kind": "fold", "user_id": user_id, "committed": {"$exists": False}},
            {"$set": {"mode": STALE, "reason": "forget", "reply": None}},
        )

    def drop_reply(self, run_key: str, user_id: str, status: str) -> None:
        """Forget a reply once its commit ended (it is in the summary and its history now, or stale)."""
        self.coll.update_one({"_id": _fold_id(run_key, user_id)}, {"$set": {"reply": None, "committed": status}})


def _fold_id(run_key: str, user_id: str) -> str:
    return f"{run_key}|fold|{user_id}"
