"""The archive (``user_memory_archive``): raw events a summary version folded, with every version
that folded each; restored by rollback and forget, re-read by re-fold, relabelled when a forget
re-folds them into a new version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DeleteOne, ReplaceOne, UpdateOne

from butler_memory.storage.mongo import Collections, batches, id_key, ids_of_user

OWN_FIELDS = "event_own_fields"
"""The archive record's sub-document of the event's own fields named like ours (``ARCHIVE_FIELDS``):
the Butler owns its event schema, so an event may carry a ``run_id`` (say the agent run that wrote
it) that our ``run_id`` must not overwrite. ``as_event`` puts them back."""

ARCHIVE_FIELDS = frozenset({"run_id", "summary_version", "summary_versions", "archived_at", OWN_FIELDS})
"""Fields ``archive()`` adds to an event; the event is ``as_event`` of its record, without them."""


class ArchiveMixin(Collections):
    """Archive folded events, read and restore them by the versions that folded them."""

    def archive(self, events: Sequence[Mapping[str, Any]], *, run_id: str, version: int, now: datetime) -> int:
        """Copy events into the archive, one record per ``_id``; return the count.

        The record holds the event as ``version`` folded it, and ``summary_versions`` lists every
        version that ever folded it (an event the Butler edited during a compression stays, and a
        later version folds it again): a forget must find them all. Repeating it adds nothing.
        """
        if not self.settings.archive_enabled or not events:
            return 0
        for batch in batches(events, self.settings.delete_batch_size):
            ids = [ev["_id"] for ev in batch]
            earlier = {
                id_key(doc["_id"]): archived_versions(doc)
                for doc in self.archive_coll.find({"_id": {"$in": ids}}, {"summary_version": 1, "summary_versions": 1})
            }
            ops = []
            for ev in batch:
                versions = sorted({*earlier.get(id_key(ev["_id"]), []), version})
                ours = {"run_id": run_id, "summary_version": max(versions), "summary_versions": versions}
                ops.append(ReplaceOne({"_id": ev["_id"]}, _record(ev, {**ours, "archived_at": now}), upsert=True))
            self.archive_coll.bulk_write(ops, ordered=False)
        return len(events)

    def archived_counts(self, user_id: str, versions: Sequence[int]) -> dict[int, int]:
        """Return how many archived events of the user each of ``versions`` folded (an event folded by
        two versions counts for both)."""
        pipeline: list[dict[str, Any]] = [
            *_folded_by_any(user_id, versions),
            {"$unwind": "$versions"},
            {"$match": {"versions": {"$in": list(versions)}}},
            {"$group": {"_id": "$versions", "n": {"$sum": 1}}},
        ]
        return {int(row["_id"]): int(row["n"]) for row in self.archive_coll.aggregate(pipeline)}

    def archived_ids(self, user_id: str, versions: Sequence[int]) -> list[Any]:
        """Return the ``_id``s of the archived events any of ``versions`` folded, in ``(created_at, _id)``
        order, read at once (one aggregation; its cursor is exhausted before this returns)."""
        pipeline: list[dict[str, Any]] = [
            *_folded_by_any(user_id, versions),
            {"$sort": {"created_at": ASCENDING, "_id": ASCENDING}},
            {"$project": {"_id": 1}},
        ]
        return [row["_id"] for row in self.archive_coll.aggregate(pipeline)]

    def read_archived(self, user_id: str, ids: Sequence[Any]) -> list[dict]:
        """Return those of ``ids`` still archived, in the order of ``ids``, read at once in batches.

        No cursor stays open after it returns: a caller may spend minutes on an LLM call between two
        reads, longer than the server's idle-cursor timeout (10 minutes).
        """
        found: dict[bytes, dict] = {}
        for batch in batches(ids, self.settings.delete_batch_size):
            found.update((id_key(doc["_id"]), doc) for doc in self.archive_coll.find(ids_of_user(batch, user_id)))
        return [found[key] for key in map(id_key, ids) if key in found]

    def iter_archived(self, user_id: str, ids: Sequence[Any], group: int) -> Iterator[dict]:
        """Yield the archived events of ``ids`` in that order (``as_event``: as they were archived),
        ``group`` at a time: each group is one short read (``read_archived``), so nothing is held open
        while the caller works on one."""
        for batch in batches(ids, group):
            yield from map(as_event, self.read_archived(user_id, batch))

    def restore(
        self, user_id: str, versions: Sequence[int], *, unarchive: bool, fence: Callable[[], None] | None = None
    ) -> int:
        """Put the archived events those versions folded back into user_memory, as they were
        (inserted by _id when absent, as ``as_event`` of their records: an event the Butler has live
        is newer and stays); with ``unarchive``, then take those versions off their archive records,
        dropping a record no other version folded. Repeating it adds nothing. Return how many were
        restored.

        ``fence`` is called right before each batch is written and raises when this restore may no
        longer write (its lock lost, its intent finished by someone else): a batch read earlier is
        never written back after another holder moved on.
        """
        restored = 0
        for batch in batches(self.archived_ids(user_id, versions), self.settings.delete_batch_size):
            docs = self.read_archived(user_id, batch)
            if fence is not None:
                fence()
            restored += self._restore_batch(user_id, docs, versions if unarchive else None)
        return restored

    def _restore_batch(self, user_id: str, docs: list[dict], unarchive: Sequence[int] | None) -> int:
        events = [as_event(doc) for doc in docs]
        if not events:
            return 0
        self.events.bulk_write(
            [UpdateOne({"_id": ev["_id"]}, {"$setOnInsert": ev}, upsert=True) for ev in events], ordered=False
        )
        if unarchive is not None:  # only after the batch is back in user_memory
            ops: list[Any] = []
            for doc in docs:
                left = [v for v in archived_versions(doc) if v not in unarchive]
                if not left:
                    ops.append(DeleteOne({"_id": doc["_id"], "user_id": user_id}))
                else:  # an older version still in effect folded it too: "which versions saw E" stays known
                    update = {"$set": {"summary_versions": left, "summary_version": max(left)}}
                    ops.append(UpdateOne({"_id": doc["_id"], "user_id": user_id}, update))
            self.archive_coll.bulk_write(ops, ordered=False)
        return len(events)

    def relabel_archived(self, user_id: str, ids: Sequence[Any], *, base: int, version: int) -> None:
        """Mark archived events as folded by ``version`` instead of the versions after ``base`` (a
        forget re-folded them into it and drops those versions)."""
        for batch in batches(ids, self.settings.delete_batch_size):
            match = ids_of_user(batch, user_id)
            self.archive_coll.update_many(match, {"$pull": {"summary_versions": {"$gt": base}}})
            self.archive_coll.update_many(
                match, {"$set": {"summary_version": version}, "$addToSet": {"summary_versions": version}}
            )

    def delete_archived(self, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given archived events of one user in batches; return how many were deleted."""
        return self._delete_ids(self.archive_coll, user_id, ids)


def _record(event: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """Return the archive record of ``event`` with our fields ``ours``: the event's own fields of
    the names we use (``ARCHIVE_FIELDS``) are set aside under ``OWN_FIELDS``, never overwritten."""
    record = {k: v for k, v in event.items() if k not in ARCHIVE_FIELDS}
    own = {k: v for k, v in event.items() if k in ARCHIVE_FIELDS}
    return {**record, **({OWN_FIELDS: own} if own else {}), **ours}


def as_event(record: Mapping[str, Any]) -> dict[str, Any]:
    """Return the event an archive record holds, every field as it was archived: without our fields,
    with its own fields of those names back from ``OWN_FIELDS``, last in the document's order (a
    record archived before that sub-document existed has none: those were overwritten then)."""
    event = {k: v for k, v in record.items() if k not in ARCHIVE_FIELDS}
    own = record.get(OWN_FIELDS)
    return {**event, **own} if isinstance(own, Mapping) else event


def archived_versions(doc: Mapping[str, Any]) -> list[int]:
    """Return every version that folded an archive record: ``summary_versions``, or for a record
    archived before that list existed its one ``summary_version``."""
    versions = doc.get("summary_versions")
    if isinstance(versions, list):
        return [int(v) for v in versions]
    version = doc.get("summary_version")
    return [int(version)] if isinstance(version, int) else []


def archived_by(user_id: str, versions: Sequence[int]) -> dict[str, Any]:
    """Return the find filter of a user's archive records folded by any of ``versions`` (by
    ``summary_versions``, or ``summary_version`` for a record archived before that list existed)."""
    any_of = {"$in": list(versions)}
    return {"user_id": user_id, "$or": [{"summary_versions": any_of}, {"summary_version": any_of}]}


def _folded_by_any(user_id: str, versions: Sequence[int]) -> list[dict[str, Any]]:
    """Return the aggregation stages keeping a user's archive records folded by any of ``versions``,
    with a ``versions`` field (``archived_versions``: older records have only ``summary_version``)."""
    return [
        {"$match": {"user_id": user_id}},
        {
            "$project": {
                "created_at": 1,
                "versions": {"$ifNull": ["$summary_versions", ["$summary_version"]]},
            }
        },
        {"$match": {"versions": {"$in": list(versions)}}},
    ]
