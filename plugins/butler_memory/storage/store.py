"""MongoDB access: scan, load, summary commit, archive, delete, run documents.

Works on a pymongo ``Database`` (from ``MongoHook`` in Airflow, see ``connections.py``). Every
write is idempotent so that a re-run after a kill at any point ends in the same state.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, DeleteOne, ReplaceOne, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, PyMongoError, WTimeoutError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from butler_memory.core.errors import ConcurrentUpdateError, InvalidEventError, InvalidProfileError, StoreError
from butler_memory.core.settings import Settings
from butler_memory.llm.prompt import known_language
from butler_memory.storage.history import SummaryHistory

log = logging.getLogger(__name__)
# pymongo's command log (DEBUG on this logger) prints commands and replies, i.e. users' conversations:
# a task or CLI run at DEBUG would copy them into its logs. Quieted unless its level was set on purpose.
_PYMONGO_COMMAND_LOG = logging.getLogger("pymongo.command")

# Bookkeeping fields this package adds to the Butler's profile document.
VERSION_FIELD = "memory_summary_version"
THROUGH_FIELD = "memory_compressed_through"
"""{"created_at": ..., "event_id": ...}: the (created_at, _id) key of the last summarised event."""
COMPRESSED_AT_FIELD = "memory_compressed_at"
PENDING_FIELD = "memory_pending_fold"
"""{"version": v, "ids": [...], "run_id": ...}: events a committed summary covers, not yet deleted."""
TARGET_FIELD = "memory_fold_target"
"""{"created_at": ..., "event_id": ...}: the last key of a run's fold list while chunks of it remain to
fold; a run killed between chunks leaves it set, so the re-run folds the rest even when the user
is no longer over the threshold (as the clean run would have)."""
ROLLBACK_FIELD = "memory_rollback"
"""The intent of a rollback in progress (see rollback.py): recorded before anything moves, so a
re-run (of the rollback or of a compression) finishes it; removed when it is done."""
ERASING_FIELD = "memory_erasing"
"""The id of an unfinished erasure of this user (see erasure.py): compressions refuse the user."""
FORGET_FIELD = "memory_forget"
"""The intent of an unfinished forget of some events (see forget.py): compressions refuse the user."""
OUR_PROFILE_FIELDS = (
    VERSION_FIELD,
    THROUGH_FIELD,
    COMPRESSED_AT_FIELD,
    PENDING_FIELD,
    TARGET_FIELD,
    FORGET_FIELD,
    ROLLBACK_FIELD,
)
"""Every profile field this package writes besides the summary (a user erasure removes them all)."""

ARCHIVE_FIELDS = frozenset({"run_id", "summary_version", "summary_versions", "archived_at"})
"""Fields ``archive()`` adds to an event; a restored event is stored without them."""

RUN_USERS_FIELD = "user_ids"
"""Every user id a run document names (its users' rows): indexed, so an erasure reads only those."""
RUNS_TTL_INDEX = "finished_at_ttl"

_INDEX_CONFLICT_CODES = {85, 86}  # IndexOptionsConflict, IndexKeySpecsConflict
_ONE_MS = timedelta(milliseconds=1)
"""The resolution of BSON dates."""


@dataclass(frozen=True)
class Backlog:
    """A user over the threshold and how many events they have."""

    user_id: str
    events: int


@dataclass(frozen=True)
class WriterKey:
    """An entry of the ``(created_at, user_id)`` index: where the catch-up scan stands."""

    created_at: datetime
    user_id: Any


@dataclass(frozen=True)
class PendingFold:
    """Events covered by a committed summary whose archive/delete had not finished."""

    version: int
    ids: list[Any]
    digests: list[str] | None = None
    """One :func:`event_digest` per id, of the event as summarised (None in folds of older versions)."""


@dataclass(frozen=True)
class EventKey:
    """An event's position in a user's history: ordered by (created_at, _id)."""

    created_at: datetime
    id: Any


@dataclass(frozen=True)
class Profile:
    """The parts of a user's profile the engine reads."""

    user_id: str
    summary: str = ""
    version: int = 0
    language: str | None = None
    """The profile's language as a known ISO 639-1 code (``prompt.known_language``), else None."""
    language_unknown: bool = False
    """The profile names a language that is not a known code: the configured default is used."""
    pending: PendingFold | None = None
    fold_target: EventKey | None = None
    through: EventKey | None = None
    compressed_at: datetime | None = None
    rollback: dict[str, Any] | None = None
    """A rollback's intent left by an interrupted rollback (see rollback.py)."""
    erasing: bool = False
    """An erasure of the user, or of some of their events, is unfinished."""


class MemoryStore:
    """Read and write one Butler database."""

    def __init__(self, db: Database, settings: Settings) -> None:
        if _PYMONGO_COMMAND_LOG.level == logging.NOTSET:
            _PYMONGO_COMMAND_LOG.setLevel(logging.INFO)
        # Durability must not depend on server defaults: with w:1 a failover can roll back a summary
        # commit after its events' deletes landed. Majority writes on every collection reached through
        # this store (events, profiles, archive, history, runs, state, the erasure audit log), and
        # majority reads of the profile (the summary version and pending fold we build on).
        durable = write_concern(settings)
        db = db.with_options(write_concern=durable)
        self.db = db
        self.settings = settings
        self.events = db.get_collection(settings.events_collection, write_concern=durable)
        self.profiles = db.get_collection(
            settings.profiles_collection,
            write_concern=durable,
            read_concern=ReadConcern(settings.mongo_read_concern),
        )
        self.archive_coll = db.get_collection(settings.archive_collection, write_concern=durable)
        self.quarantine = db.get_collection(settings.quarantine_collection, write_concern=durable)
        # The fold reads events so that invalid UTF-8 (which MongoDB stores unchecked) becomes lone
        # surrogates the fold can name and quarantine, instead of an InvalidBSON failing the whole read.
        self._events_lenient = self.events.with_options(codec_options=lenient(self.events.codec_options))
        self._events_raw = self.events.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
        self.runs = db[settings.runs_collection]
        self.history = SummaryHistory(db, settings)
        self.state = db[settings.state_collection]
        self.catchup_runs = db[settings.catchup_runs_collection]
        self.run_users = db.get_collection(settings.run_users_collection, write_concern=durable)

    def close(self) -> None:
        """Close the MongoDB client this store's database belongs to."""
        self.db.client.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- indexes -------------------------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """Create the indexes the scan and per-user reads rely on; safe to call on every run."""
        self._ensure(self.events, [("user_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)])
        self._ensure(self.profiles, [("user_id", ASCENDING)])
        self.history.ensure_indexes()
        self._ensure(self.quarantine, [("user_id", ASCENDING), ("created_at", ASCENDING)])
        # Run documents: found by run id, by the users they name (an erasure reads only those), and
        # kept runs_retention_days after the run finished.
        for runs in (self.runs, self.catchup_runs):
            self._ensure(runs, [("run_id", ASCENDING)], unique=True)
            self._ensure(runs, [(RUN_USERS_FIELD, ASCENDING)])
            self._ensure_ttl(runs, "finished_at", RUNS_TTL_INDEX, self.settings.runs_retention_days)
        self._ensure(
            self.run_users, [("dag_id", ASCENDING), ("run_id", ASCENDING), ("user_id", ASCENDING)], unique=True
        )
        self._ensure(self.run_users, [("user_id", ASCENDING)])  # erasure finds a user's rows without a scan
        self._ensure_ttl(self.run_users, "written_at", "written_at_ttl", self.settings.run_users_retention_days)
        # The catch-up scan's "who wrote since T": a covered index range over the new events only.
        self._ensure(self.events, [("created_at", ASCENDING), ("user_id", ASCENDING)])
        if self.settings.archive_enabled:
            self._ensure(self.archive_coll, [("user_id", ASCENDING), ("created_at", ASCENDING)])
            self._ensure_ttl(self.archive_coll, "archived_at", "archived_at_ttl", self.settings.archive_retention_days)

    def _ensure_ttl(self, coll: Any, field: str, name: str, days: int) -> None:
        """Create the TTL index ``name`` on ``field``, or update its retention in place when it changed."""
        ttl = days * 86400
        try:
            coll.create_index([(field, ASCENDING)], name=name, expireAfterSeconds=ttl)
        except OperationFailure as exc:
            if exc.code not in _INDEX_CONFLICT_CODES:
                raise
            self.db.command("collMod", coll.name, index={"name": name, "expireAfterSeconds": ttl})

    @staticmethod
    def _ensure(coll: Any, keys: list[tuple[str, int]], unique: bool = False) -> None:
        try:
            coll.create_index(keys, unique=unique)
        except OperationFailure as exc:
            # An equivalent index under another name already exists (the Butler's own): fine.
            if exc.code not in _INDEX_CONFLICT_CODES:
                raise

    # -- scan ----------------------------------------------------------------------------------

    def scan(self, threshold: int, limit: int, user_ids: Sequence[str] | None = None) -> list[Backlog]:
        """Return users with more than ``threshold`` events, largest backlog first, at most ``limit``.

        Only string user ids are users: events under another ``user_id`` type (a number, an
        ObjectId, none at all) are left out before the ``$limit``, so they never take a place in the
        run, and their count is logged (types and counts only) for the Butler to fix.
        """
        pipeline: list[dict[str, Any]] = []
        if user_ids is not None:
            pipeline.append({"$match": {"user_id": {"$in": list(user_ids)}}})
        pipeline += [
            {"$group": {"_id": "$user_id", "n": {"$sum": 1}}},
            {"$match": {"n": {"$gt": threshold}}},
            {
                "$facet": {
                    "users": [
                        {"$match": {"_id": {"$type": "string"}}},
                        {"$sort": {"n": DESCENDING, "_id": ASCENDING}},
                        {"$limit": limit},
                    ],
                    "invalid": [
                        {"$match": {"_id": {"$not": {"$type": "string"}}}},
                        {"$group": {"_id": {"$type": "$_id"}, "ids": {"$sum": 1}, "events": {"$sum": "$n"}}},
                    ],
                }
            },
        ]
        (found,) = self.events.aggregate(pipeline, allowDiskUse=True)
        invalid = found["invalid"]
        if invalid:
            log.warning(
                "scan: left out %d user id(s) that are not strings (%s), %d events over the threshold: "
                "fix user_id in the Butler's %s",
                sum(int(row["ids"]) for row in invalid),
                ", ".join(sorted(str(row["_id"]) for row in invalid)),
                sum(int(row["events"]) for row in invalid),
                self.events.name,
            )
        return [Backlog(user_id=row["_id"], events=int(row["n"])) for row in found["users"]]

    def writers_since(self, since: datetime, after: WriterKey | None, limit: int) -> tuple[list[WriterKey], bool]:
        """Return the ``(created_at, user_id)`` keys of up to ``limit`` events created at or after
        ``since``, in that order, strictly after ``after`` (a page of the catch-up scan), and whether
        the page reached the newest event.

        Covered by the ``(created_at, user_id)`` index, never more than ``limit`` entries read: a page
        costs the same however many events were written since. Equal keys (one user's events in the
        same millisecond) are one entry, so a bulk import cannot hold a page in place. Resuming after
        ``after`` is two plain range queries (the rest of its millisecond, then later ones), not an
        ``$or``, which the embedded SecantusDB answers with a collection scan.
        """
        projection = {"_id": 0, "created_at": 1, "user_id": 1}
        order = [("created_at", ASCENDING), ("user_id", ASCENDING)]
        queries: list[dict[str, Any]] = [{"created_at": {"$gte": since}}]
        if after is not None:
            # After an event without a user id, "$gt": null would match nothing: take the rest of the
            # millisecond's users whatever they are (they all sort after null).
            rest = {"$gt": after.user_id} if after.user_id is not None else {"$ne": None}
            queries = [{"created_at": after.created_at, "user_id": rest}]
            queries.append({"created_at": {"$gt": after.created_at}})
        keys: list[WriterKey] = []
        read = 0
        for query in queries:
            if read >= limit:
                break
            for doc in self.events.find(query, projection).sort(order).limit(limit - read):
                read += 1
                key = WriterKey(doc["created_at"], doc.get("user_id"))
                if not keys or keys[-1] != key:
                    keys.append(key)
        return keys, read < limit

    def backlog_of(self, user_ids: Sequence[str], threshold: int) -> list[Backlog]:
        """Count the given users' events (one ``$group`` per 1,000 users, on the user_id index) and
        return those over ``threshold``, largest backlog first. Non-string ids are left out."""
        found = []
        wanted = [u for u in dict.fromkeys(user_ids) if isinstance(u, str)]
        for batch in _batches(wanted, 1000):
            pipeline: list[dict[str, Any]] = [
                {"$match": {"user_id": {"$in": batch}}},
                {"$group": {"_id": "$user_id", "n": {"$sum": 1}}},
                {"$match": {"n": {"$gt": threshold}}},
            ]
            found += [Backlog(row["_id"], int(row["n"])) for row in self.events.aggregate(pipeline)]
        found.sort(key=lambda b: (-b.events, b.user_id))
        return found

    def count_over_threshold(self, threshold: int) -> int:
        """Count the users over ``threshold`` (a full ``$group``: the daily run's figure of who is left);
        string user ids only, as the scan."""
        pipeline: list[dict[str, Any]] = [
            {"$group": {"_id": "$user_id", "n": {"$sum": 1}}},
            {"$match": {"n": {"$gt": threshold}, "_id": {"$type": "string"}}},
            {"$count": "users"},
        ]
        rows = list(self.events.aggregate(pipeline, allowDiskUse=True))
        return int(rows[0]["users"]) if rows else 0

    def nth_event_time(self, user_id: str, n: int) -> datetime | None:
        """Return ``created_at`` of the user's ``n``-th event counting from 0, oldest first, or None:
        with ``n`` = threshold, the event that took the user over the threshold (one indexed read)."""
        docs = list(
            self.events.find({"user_id": user_id}, {"_id": 0, "created_at": 1})
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .skip(n)
            .limit(1)
        )
        created = docs[0].get("created_at") if docs else None
        if not isinstance(created, datetime):
            return None
        return created if created.tzinfo is not None else created.replace(tzinfo=UTC)

    def count_events(self, user_id: str) -> int:
        """Count one user's events."""
        return self.events.count_documents({"user_id": user_id})

    # -- profile -------------------------------------------------------------------------------

    def load_profile(self, user_id: str, *, create: bool = True) -> Profile:
        """Return the user's profile, validated; create an empty one first when asked."""
        if create:
            self.profiles.update_one({"user_id": user_id}, {"$setOnInsert": {"user_id": user_id}}, upsert=True)
        doc = self.profiles.find_one({"user_id": user_id}) or {}
        return parse_profile(user_id, doc, self.settings)

    def commit_summary(
        self,
        user_id: str,
        *,
        expected_version: int,
        summary: str,
        through: EventKey,
        ids: list[Any],
        run_id: str,
        now: datetime,
        target: EventKey | None = None,
        digests: list[str] | None = None,
    ) -> int:
        """Store a new summary, watermark, pending fold and fold target (None after the last chunk)
        in one guarded update; return the new version.

        ``digests`` (one per id, :func:`event_digest` of the event as summarised) let a re-run that
        finishes this fold delete only events still as they were summarised."""
        fields = {
            THROUGH_FIELD: {"created_at": through.created_at, "event_id": through.id},
            COMPRESSED_AT_FIELD: now,
            PENDING_FIELD: {
                "version": expected_version + 1,
                "ids": ids,
                "run_id": run_id,
                **({} if digests is None else {"digests": digests}),
            },
            TARGET_FIELD: None if target is None else {"created_at": target.created_at, "event_id": target.id},
        }
        return self._commit(user_id, expected_version, summary, fields, during="compression")

    def clear_pending(self, user_id: str, version: int) -> None:
        """Mark the fold of ``version`` finished, whatever the summary version is now.

        Matched on the pending fold's own version only: another writer (the bot's inline
        compression) may have stored a newer summary meanwhile without knowing our field, and a
        pending fold whose events are archived and deleted must never block every later commit.
        """
        self.profiles.update_one(
            {"user_id": user_id, f"{PENDING_FIELD}.version": version},
            {"$set": {PENDING_FIELD: None}},
        )

    def clear_fold_target(self, user_id: str, version: int) -> None:
        """Forget an unfinished run's fold target (nothing of it is left to fold)."""
        self.profiles.update_one({"user_id": user_id, VERSION_FIELD: version}, {"$set": {TARGET_FIELD: None}})

    # -- rollback ------------------------------------------------------------------------------

    def begin_rollback(self, user_id: str, *, expected_version: int, intent: Mapping[str, Any]) -> None:
        """Record a rollback's intent, guarded by the version it starts from (nothing else pending)."""
        guard = {"user_id": user_id, VERSION_FIELD: expected_version, PENDING_FIELD: None, ROLLBACK_FIELD: None}
        if not expected_version:
            guard[VERSION_FIELD] = {"$in": [0, None]}
        res = self.profiles.update_one(guard, {"$set": {ROLLBACK_FIELD: dict(intent)}})
        if res.matched_count != 1:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: profile changed before the rollback started (expected summary version "
                f"{expected_version}); nothing was written, a re-run starts from the new state",
                user_id=user_id,
            )

    def commit_rollback(
        self,
        user_id: str,
        *,
        expected_version: int,
        new_version: int,
        summary: str,
        through: Mapping[str, Any] | None,
        compressed_at: datetime | None,
    ) -> None:
        """Store the restored summary and bookkeeping as ``new_version``, guarded by the old version
        and the rollback's intent."""
        if new_version != expected_version + 1:
            raise ValueError(f"a rollback commits the next version, v{expected_version + 1}, not v{new_version}")
        fields = {
            THROUGH_FIELD: None if through is None else dict(through),
            COMPRESSED_AT_FIELD: compressed_at,
            PENDING_FIELD: None,
            TARGET_FIELD: None,
        }
        intent = {f"{ROLLBACK_FIELD}.version": new_version}
        self._commit(user_id, expected_version, summary, fields, during="the rollback", guard=intent)

    def commit_refold(self, user_id: str, *, expected_version: int, summary: str, now: datetime) -> int:
        """Store a re-folded summary as the next version (the watermark stays: it covers the same
        events), guarded by the old version and nothing in progress; return the new version."""
        return self._commit(user_id, expected_version, summary, {COMPRESSED_AT_FIELD: now}, during="the re-fold")

    def _commit(
        self,
        user_id: str,
        expected_version: int,
        summary: str,
        fields: Mapping[str, Any],
        *,
        during: str,
        guard: Mapping[str, Any] | None = None,
    ) -> int:
        """The one guarded commit of a new summary version, for every operation: store ``summary``
        and ``fields`` as version ``expected_version + 1`` in one ``update_one`` matched on the old
        version and ``guard`` (by default: no pending fold, no rollback in progress); return it.

        Raises ConcurrentUpdateError when the profile moved on: another writer committed first (the
        version fences it, whoever holds the Redis lock), nothing of the summary was changed.
        """
        match: dict[str, Any] = {"user_id": user_id, **(guard or {PENDING_FIELD: None, ROLLBACK_FIELD: None})}
        match[VERSION_FIELD] = expected_version if expected_version else {"$in": [0, None]}
        update = {"$set": {self.settings.summary_field: summary, VERSION_FIELD: expected_version + 1, **fields}}
        if self.profiles.update_one(match, update).matched_count != 1:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: profile changed during {during} (expected summary version "
                f"{expected_version}); this run committed no summary, a re-run starts from the new state",
                user_id=user_id,
            )
        return expected_version + 1

    def rollback_pending(self, user_id: str, version: int, rollback_id: str) -> bool:
        """Say whether this rollback's intent is still the profile's, with no erasure or forget begun."""
        match = {
            "user_id": user_id,
            f"{ROLLBACK_FIELD}.version": version,
            f"{ROLLBACK_FIELD}.rollback_id": rollback_id,
            ERASING_FIELD: None,
            FORGET_FIELD: None,
        }
        return self.profiles.count_documents(match, limit=1) == 1

    def clear_rollback(self, user_id: str, version: int) -> None:
        """Remove a finished rollback's intent."""
        self.profiles.update_one(
            {"user_id": user_id, VERSION_FIELD: version, f"{ROLLBACK_FIELD}.version": version},
            {"$unset": {ROLLBACK_FIELD: ""}},
        )

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
        for batch in _batches(ids, self.settings.delete_batch_size):
            found.update((id_key(doc["_id"]), doc) for doc in self.archive_coll.find(_ids_of_user(batch, user_id)))
        return [found[key] for key in map(id_key, ids) if key in found]

    def iter_archived(self, user_id: str, ids: Sequence[Any], group: int) -> Iterator[dict]:
        """Yield the archived events of ``ids`` in that order, ``group`` at a time: each group is one
        short read (``read_archived``), so nothing is held open while the caller works on one."""
        for batch in _batches(ids, group):
            yield from self.read_archived(user_id, batch)

    def restore(
        self, user_id: str, versions: Sequence[int], *, unarchive: bool, fence: Callable[[], None] | None = None
    ) -> int:
        """Put the archived events those versions folded back into user_memory, as they were
        (inserted by _id when absent, without our archive fields: an event the Butler has live is
        newer and stays); with ``unarchive``, then take those versions off their archive records,
        dropping a record no other version folded. Repeating it adds nothing. Return how many were
        restored.

        ``fence`` is called right before each batch is written and raises when this restore may no
        longer write (its lock lost, its intent finished by someone else): a batch read earlier is
        never written back after another holder moved on.
        """
        restored = 0
        for batch in _batches(self.archived_ids(user_id, versions), self.settings.delete_batch_size):
            docs = self.read_archived(user_id, batch)
            if fence is not None:
                fence()
            restored += self._restore_batch(user_id, docs, versions if unarchive else None)
        return restored

    def _restore_batch(self, user_id: str, docs: list[dict], unarchive: Sequence[int] | None) -> int:
        events = [{k: v for k, v in doc.items() if k not in ARCHIVE_FIELDS} for doc in docs]
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

    # -- events --------------------------------------------------------------------------------

    def fold_keys(
        self, user_id: str, keep_last_n: int, *, limit: int | None = None, misdated: list[Any] | None = None
    ) -> list[EventKey]:
        """Return the keys of all but the newest ``keep_last_n`` events, oldest first (validated).

        With ``limit``, a user with more than ``limit + keep_last_n`` events gets only the oldest
        ``limit`` keys: a huge user's keys are never all held in memory, and later runs fold the
        rest. The shorter list is cut from the first ``limit + keep_last_n`` keys in
        ``(created_at, _id)`` order, so at least ``keep_last_n`` events are newer than its end
        whatever their timestamps (a bulk import stamps thousands of events alike).

        An event whose ``created_at`` is missing or not a date raises InvalidEventError, or, with
        ``misdated``, has its ``_id`` appended there and is left out of the keys.
        """
        if limit is not None and self.count_events(user_id) > limit + keep_last_n:
            keys = self._keys(user_id, limit + keep_last_n, misdated)
            if len(keys) == limit + keep_last_n:
                return keys[:limit]
            if misdated:
                misdated.clear()  # read again below
        keys = self._keys(user_id, None, misdated)
        return keys[: max(len(keys) - keep_last_n, 0)]

    def _keys(self, user_id: str, limit: int | None, misdated: list[Any] | None) -> list[EventKey]:
        cursor = self.events.find({"user_id": user_id}, {"_id": 1, "created_at": 1}).sort(
            [("created_at", ASCENDING), ("_id", ASCENDING)]
        )
        if limit is not None:
            cursor = cursor.limit(limit)
        keys: list[EventKey] = []
        for doc in cursor.batch_size(5000):
            created_at = doc.get("created_at")
            if not isinstance(created_at, datetime):
                if misdated is not None:
                    misdated.append(doc["_id"])
                    continue
                problem = "is missing" if created_at is None else f"is a {type(created_at).__name__}, not a date"
                raise InvalidEventError(user_id, doc["_id"], "created_at", problem)
            keys.append(EventKey(created_at, doc["_id"]))
        return keys

    def iter_events(self, user_id: str, first: EventKey, last: EventKey, batch_size: int) -> Iterator[dict]:
        """Stream the user's events timed from ``first`` to ``last``, in ``(created_at, _id)`` order.

        A superset of the key range ``[first, last]``: events sharing a boundary timestamp come
        along whatever their ``_id``, so the caller keeps only the ``_id``s it selected. A plain
        ``created_at`` range is served from the ``(user_id, created_at, _id)`` index by every server;
        the exact key range needs ``$or``s, which the embedded SecantusDB answers with a collection
        scan (21 s for a 100-event user in a 1,000,000-event collection, see docs/benchmarks.md).
        The upper bound is ``< last + 1 ms``, equal to ``<= last`` for BSON dates (millisecond
        precision), because SecantusDB 0.7 leaves out the events equal to a ``$lte`` bound there.
        """
        query = {
            "user_id": user_id,
            "created_at": {"$gte": first.created_at, "$lt": last.created_at + _ONE_MS},
        }
        cursor = self.events.find(query).sort([("created_at", ASCENDING), ("_id", ASCENDING)])
        yield from cursor.batch_size(batch_size)

    def read_fold(self, user_id: str, keys: Sequence[EventKey]) -> list[dict]:
        """Return the events of these fold-list keys still in user_memory as listed, in the list's order.

        Read by explicit ``_id`` (``find_by_ids``): exactly the listed events, however many others
        share their timestamps (a time range re-read every event of a one-timestamp bulk import for
        each chunk). One short query per call: no cursor stays open across LLM calls, which can
        outlast the server's idle-cursor timeout (10 minutes) on a huge user. An event whose
        ``created_at`` changed since the keys were taken is left out: it stays for a later fold.
        Invalid UTF-8 is read as lone surrogates (``surrogateescape``): see ``undecodable_field``.
        """
        found = {
            id_key(ev["_id"]): ev
            for batch in _batches([key.id for key in keys], self.settings.delete_batch_size)
            for ev in self._events_lenient.find(_ids_of_user(batch, user_id))
        }
        events = []
        for key in keys:
            ev = found.get(id_key(key.id))
            if ev is not None and ev.get("created_at") == key.created_at:  # as read by fold_keys, same codec
                events.append(ev)
        return events

    def find_by_ids(self, user_id: str, ids: Sequence[Any]) -> list[dict]:
        """Return those of ``ids`` still in user_memory, in batches."""
        found: list[dict] = []
        for batch in _batches(ids, self.settings.delete_batch_size):
            found.extend(self.events.find(_ids_of_user(batch, user_id)))
        return found

    def archive(self, events: Sequence[Mapping[str, Any]], *, run_id: str, version: int, now: datetime) -> int:
        """Copy events into the archive, one record per ``_id``; return the count.

        The record holds the event as ``version`` folded it, and ``summary_versions`` lists every
        version that ever folded it (an event the Butler edited during a compression stays, and a
        later version folds it again): a forget must find them all. Repeating it adds nothing.
        """
        if not self.settings.archive_enabled or not events:
            return 0
        for batch in _batches(events, self.settings.delete_batch_size):
            ids = [ev["_id"] for ev in batch]
            earlier = {
                id_key(doc["_id"]): archived_versions(doc)
                for doc in self.archive_coll.find({"_id": {"$in": ids}}, {"summary_version": 1, "summary_versions": 1})
            }
            ops = []
            for ev in batch:
                versions = sorted({*earlier.get(id_key(ev["_id"]), []), version})
                record = {**ev, "run_id": run_id, "summary_version": max(versions), "summary_versions": versions}
                ops.append(ReplaceOne({"_id": ev["_id"]}, {**record, "archived_at": now}, upsert=True))
            self.archive_coll.bulk_write(ops, ordered=False)
        return len(events)

    def delete_unchanged(self, user_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        """Delete those of ``events`` still exactly as given (every field equal); return how many.

        An event the Butler edited or re-tagged after it was read (during the LLM call) no longer
        matches and stays: its newer version was not summarised. One ``DeleteOne`` per event whose
        filter is the whole document as read, ``_id`` first (the embedded server looks it up by id).
        """
        deleted = 0
        for batch in _batches(events, self.settings.delete_batch_size):
            ops = [DeleteOne({"_id": ev["_id"], **{k: v for k, v in ev.items() if k != "_id"}}) for ev in batch]
            deleted += self.events.bulk_write(ops, ordered=False).deleted_count
        return deleted

    def delete(self, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given events of one user in batches; return how many were deleted."""
        return self._delete_ids(self.events, user_id, ids)

    def _delete_ids(self, coll: Any, user_id: str, ids: Sequence[Any]) -> int:
        deleted = 0
        for batch in _batches(ids, self.settings.delete_batch_size):
            deleted += coll.delete_many(_ids_of_user(batch, user_id)).deleted_count
        return deleted

    def relabel_archived(self, user_id: str, ids: Sequence[Any], *, base: int, version: int) -> None:
        """Mark archived events as folded by ``version`` instead of the versions after ``base`` (a
        forget re-folded them into it and drops those versions)."""
        for batch in _batches(ids, self.settings.delete_batch_size):
            match = _ids_of_user(batch, user_id)
            self.archive_coll.update_many(match, {"$pull": {"summary_versions": {"$gt": base}}})
            self.archive_coll.update_many(
                match, {"$set": {"summary_version": version}, "$addToSet": {"summary_versions": version}}
            )

    def delete_archived(self, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given archived events of one user in batches; return how many were deleted."""
        return self._delete_ids(self.archive_coll, user_id, ids)

    # -- quarantine --------------------------------------------------------------------------------

    def quarantine_copy(
        self, user_id: str, event_id: Any, *, field: str, problem: str, run_id: str, now: datetime
    ) -> RawBSONDocument | None:
        """Copy one event, byte for byte, into the quarantine collection with why it cannot be folded
        (upsert by _id, so repeating it adds nothing); return the event as copied, None when it is gone.

        The event is kept whole under ``event`` (raw BSON: even invalid UTF-8 survives), beside
        ``user_id``, ``event_id`` and ``created_at`` for erasure and operators to find it by.
        """
        raw = self._events_raw.find_one(_ids_of_user([event_id], user_id))
        if raw is None:
            return None
        record: dict[str, Any] = {
            "_id": event_id,
            "user_id": user_id,
            "field": field,
            "problem": problem,
            "run_id": run_id,
            "quarantined_at": now,
            "event": raw,
        }
        for name in ("event_id", "created_at"):
            try:
                record[name] = raw.get(name)
            except BSONError:  # an undecodable value: the raw copy keeps it
                record[name] = None
        self.quarantine.replace_one({"_id": event_id}, record, upsert=True)
        return raw

    def delete_quarantined(self, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given quarantined events of one user in batches; return how many were deleted."""
        return self._delete_ids(self.quarantine, user_id, ids)

    def quarantine_remove(self, user_id: str, raw: RawBSONDocument) -> int:
        """Delete the event from user_memory if it is still exactly as copied; return how many (0 or 1).

        An event the Butler edited since the copy stays in user_memory and its stale copy is dropped:
        the quarantine never holds an event that user_memory holds too (a later run looks again).
        """
        deleted = self.events.delete_one(raw).deleted_count
        if not deleted:
            self.quarantine.delete_one({"_id": raw["_id"], "user_id": user_id})
        return deleted

    # -- runs ----------------------------------------------------------------------------------

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

    def recent_runs(self, limit: int = 30) -> list[dict]:
        """Return the newest run documents."""
        return list(self.runs.find({}, {"_id": 0}).sort([("started_at", DESCENDING)]).limit(limit))


def parse_profile(user_id: str, doc: Mapping[str, Any], settings: Settings) -> Profile:
    """Validate the fields the engine reads from a profile document."""
    summary = doc.get(settings.summary_field)
    if summary is None:
        summary = ""
    if not isinstance(summary, str):
        raise InvalidProfileError(user_id, settings.summary_field, f"is a {type(summary).__name__}, not a string")
    version = doc.get(VERSION_FIELD) or 0
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidProfileError(user_id, VERSION_FIELD, "is not a non-negative integer")
    raw_language = doc.get(settings.language_field)
    language = known_language(raw_language)  # an unknown one: the configured default, never the raw text
    pending = None
    raw = doc.get(PENDING_FIELD)
    if raw is not None:
        if not (isinstance(raw, dict) and isinstance(raw.get("ids"), list) and isinstance(raw.get("version"), int)):
            raise InvalidProfileError(user_id, PENDING_FIELD, "is not {version: int, ids: list}")
        digests = raw.get("digests")
        if digests is not None and not (isinstance(digests, list) and len(digests) == len(raw["ids"])):
            raise InvalidProfileError(user_id, PENDING_FIELD, "has digests that do not match its ids")
        pending = PendingFold(version=raw["version"], ids=raw["ids"], digests=digests)
    target = None
    raw = doc.get(TARGET_FIELD)
    if raw is not None:
        if not (isinstance(raw, dict) and isinstance(raw.get("created_at"), datetime) and "event_id" in raw):
            raise InvalidProfileError(user_id, TARGET_FIELD, "is not {created_at: date, event_id: ...}")
        target = EventKey(raw["created_at"], raw["event_id"])
    through = None
    raw = doc.get(THROUGH_FIELD)
    if raw is not None:
        if not (isinstance(raw, dict) and isinstance(raw.get("created_at"), datetime) and "event_id" in raw):
            raise InvalidProfileError(user_id, THROUGH_FIELD, "is not {created_at: date, event_id: ...}")
        through = EventKey(raw["created_at"], raw["event_id"])
    compressed_at = doc.get(COMPRESSED_AT_FIELD)
    if compressed_at is not None and not isinstance(compressed_at, datetime):
        raise InvalidProfileError(user_id, COMPRESSED_AT_FIELD, "is not a date")
    rollback = doc.get(ROLLBACK_FIELD)
    if rollback is not None and not (isinstance(rollback, dict) and isinstance(rollback.get("version"), int)):
        raise InvalidProfileError(user_id, ROLLBACK_FIELD, "is not {version: int, ...}")
    erasing = doc.get(ERASING_FIELD) is not None or doc.get(FORGET_FIELD) is not None
    return Profile(
        user_id=user_id,
        summary=summary,
        version=version,
        language=language,
        language_unknown=raw_language is not None and language is None,
        pending=pending,
        fold_target=target,
        through=through,
        compressed_at=compressed_at,
        rollback=rollback,
        erasing=erasing,
    )


def _ids_of_user(ids: list[Any], user_id: str) -> dict[str, Any]:
    """Return the filter for these ``_id``s of one user, ``_id`` first.

    MongoDB plans a filter the same whatever its key order, but the embedded SecantusDB server picks
    its access path from the first key: with ``user_id`` first it walks all the user's events for
    every batch (a 10,000-event user: 5 s per 160 ids, growing with the user's events), with ``_id``
    first it looks the ids up (0.03 s). ``user_id`` stays in the filter as a guard. See
    docs/benchmarks.md.
    """
    return {"_id": {"$in": ids}, "user_id": user_id}


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


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def write_concern(settings: Settings) -> WriteConcern:
    """Return the write concern of the summary commit, archive and delete (``mongo_write_concern``)."""
    w: int | str = int(settings.mongo_write_concern) if settings.mongo_write_concern.isdigit() else "majority"
    return WriteConcern(w=w, wtimeout=settings.mongo_write_timeout_ms)


def lenient(options: CodecOptions[Any]) -> CodecOptions[Any]:
    """Return ``options`` decoding invalid UTF-8 to lone surrogates (``surrogateescape``), not InvalidBSON."""
    return options.with_options(unicode_decode_error_handler="surrogateescape")


def undecodable_field(event: Mapping[str, Any]) -> str | None:
    """Return the first top-level field holding text that was not valid UTF-8, or None.

    Read with ``surrogateescape`` (``read_fold``), invalid bytes become lone surrogates
    (U+DC80..U+DCFF), which valid UTF-8 never decodes to.
    """
    for name, value in event.items():
        if _has_surrogates(value):
            return str(name)
    return None


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, Mapping):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_surrogates(v) for v in value)
    return False


def event_digest(event: Mapping[str, Any]) -> str:
    """Return a short fingerprint of an event exactly as read (its BSON bytes): equal iff unchanged."""
    return hashlib.blake2b(bson.encode(dict(event)), digest_size=12).hexdigest()


def id_key(value: Any) -> bytes:
    """Return a hashable, exact form of any ``_id`` (a compound document, an ObjectId, a number...)."""
    return bson.encode({"": value})


_RETRYABLE_MONGO = (ConnectionFailure, WTimeoutError)


def describe_mongo_error(exc: PyMongoError) -> str:
    """Name a pymongo error by its type, code and counts only.

    pymongo's messages quote the failed documents (a duplicate key's value, a bulk write's ops, a
    schema validator's failing fields): event content or a summary must never reach a log, XCom or
    the CLI that way.
    """
    parts = [type(exc).__name__]
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        codes = sorted({int(e.get("code", 0)) for e in details.get("writeErrors") or []})
        parts.append(
            f"{len(details.get('writeErrors') or [])} write error(s), codes {codes}, "
            f"{len(details.get('writeConcernErrors') or [])} write concern error(s)"
        )
    elif isinstance(exc, OperationFailure):
        code_name = (exc.details or {}).get("codeName")
        parts.append(
            f"code {exc.code}" + (f" {code_name}" if isinstance(code_name, str) and code_name.isidentifier() else "")
        )
    return ", ".join(parts)


def store_error(user_id: str, exc: PyMongoError, step: str = "compression") -> StoreError:
    """Return a StoreError describing ``exc`` by type, code and counts only (``describe_mongo_error``)."""
    error = StoreError(f"user {user_id!r}: MongoDB failed during {step}: {describe_mongo_error(exc)}", user_id=user_id)
    error.retryable = isinstance(exc, _RETRYABLE_MONGO)
    return error


@contextmanager
def sanitized_errors(user_id: str, step: str) -> Iterator[None]:
    """Re-raise a pymongo error from inside as ``store_error(user_id, exc, step)``, never the driver's text.

    Every per-user operation (compression, rollback, re-fold, forget, erasure) runs inside one, so a
    failed write that quotes a document (an event put back, a summary) cannot reach a log or XCom.
    """
    try:
        yield
    except PyMongoError as exc:
        raise store_error(user_id, exc, step) from None
    except BSONError as exc:
        # A document the driver cannot decode or encode (InvalidBSON: invalid UTF-8 outside what the
        # fold reads leniently; InvalidDocument): named by type only, its message may quote bytes.
        raise StoreError(
            f"user {user_id!r}: a MongoDB document could not be decoded during {step}: {type(exc).__name__}",
            user_id=user_id,
        ) from None
