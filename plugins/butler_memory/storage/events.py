"""The Butler's events (``user_memory``) and the quarantine: the scans of who is due, a user's fold
keys and reads, the deletes after a fold, the copy of an event that cannot be folded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson.decimal128 import Decimal128
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING, DeleteOne

from butler_memory.core.errors import InvalidEventError
from butler_memory.core.ids import MAX_USER_ID_CHARS, valid_user_id
from butler_memory.storage.mongo import Collections, batches, event_digest, id_key, ids_of_user

log = logging.getLogger(__name__)

ONE_MS = timedelta(milliseconds=1)
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
class EventKey:
    """An event's position in a user's history: ordered by (created_at, _id)."""

    created_at: datetime
    id: Any


COUNT_BATCH = 10
"""Users counted by one ``$group`` of ``backlog_of``. Small on purpose: the embedded SecantusDB tests
every document against the whole ``$in`` list, so one document costs as many comparisons as the
batch has users (1M events, 286 users who wrote: 2.50 s in one batch, 0.62 s by 50, 0.34 s by 10,
0.38 s one user at a time; docs/benchmarks.md §11). MongoDB answers an ``$in`` with index point
lookups; 10 users a round trip costs it one round trip per 10 users who wrote."""


SCAN_SLACK = 64
"""Rows the scan's ``$limit`` takes beyond its limit, for string ids that are not user ids (left out after it)."""


class EventsMixin(Collections):
    """Scan, read and delete events; quarantine those that cannot be folded."""

    def scan(self, threshold: int, limit: int, user_ids: Sequence[str] | None = None) -> list[Backlog]:
        """Return users with more than ``threshold`` events, largest backlog first, at most ``limit``.

        Only string user ids are users: events under another ``user_id`` type (a number, an
        ObjectId, none at all) are left out before the ``$limit``, so they never take a place in the
        run, and their count is logged (types and counts only) for the Butler to fix. So is a string
        that is not a user id (``valid_user_id``: over 200 characters, whitespace, control
        characters), which the forget CLI and the erasure DAG could not erase: the rule has no
        server-side equivalent, so the ``$limit`` takes ``SCAN_SLACK`` more and such ids are left out
        after it (again with a larger ``$limit`` in the rare case more were in the way): they never
        take a place, the scan returns ``limit`` users when that many are over the threshold (the full
        reconciliation reads "fewer than asked" as "every one"), and their count is logged with the
        ids' lengths only.
        """
        take = limit + SCAN_SLACK
        while True:
            found = self._scan_once(threshold, take, user_ids)
            users = [row for row in found["users"] if valid_user_id(row["_id"])]
            if len(users) >= limit or len(found["users"]) < take:
                break
            take += len(found["users"]) - len(users)
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
        if len(users) < len(found["users"]):
            unusable = [row for row in found["users"] if not valid_user_id(row["_id"])]
            log.warning(
                "scan: left out %d user id(s) that are not user ids (lengths %s: over %d characters, "
                "whitespace or control characters), %d events over the threshold: fix user_id in the Butler's %s",
                len(unusable),
                ", ".join(str(len(row["_id"])) for row in unusable),
                MAX_USER_ID_CHARS,
                sum(int(row["n"]) for row in unusable),
                self.events.name,
            )
        return [Backlog(user_id=row["_id"], events=int(row["n"])) for row in users[:limit]]

    def _scan_once(self, threshold: int, limit: int, user_ids: Sequence[str] | None) -> dict[str, Any]:
        """One ``$group`` of the scan: the string ids over the threshold (at most ``limit``, largest
        backlog first), and the other ids' types and counts."""
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
        return dict(found)

    def writers_since(
        self, since: datetime, after: WriterKey | None, limit: int, until: datetime | None = None
    ) -> tuple[list[WriterKey], int]:
        """Return the ``(created_at, user_id)`` keys of up to ``limit`` events created at or after
        ``since`` (and before ``until``, when given), in that order, strictly after ``after`` (a page
        of the catch-up scan), and how many index entries the page read: fewer than ``limit`` when it
        reached the newest event (or ``until``).

        Covered by the ``(created_at, user_id)`` index, never more than ``limit`` entries read: on
        MongoDB a page costs the same however many events were written since (a server that gathers
        every match before the limit needs ``until``: ``freshness.fresh.FIRST_WINDOW``). Equal keys (one user's events in the
        same millisecond) are one entry, so a bulk import cannot hold a page in place. Resuming after
        ``after`` is two plain range queries (the rest of its millisecond, then later ones), not an
        ``$or``, which the embedded SecantusDB answers with a collection scan.
        """
        projection = {"_id": 0, "created_at": 1, "user_id": 1}
        order = [("created_at", ASCENDING), ("user_id", ASCENDING)]
        before = {} if until is None else {"$lt": until}
        queries: list[dict[str, Any]] = [{"created_at": {"$gte": since, **before}}]
        if after is not None:
            queries = [{"created_at": after.created_at, "user_id": _rest_of_millisecond(after.user_id)}]
            queries.append({"created_at": {"$gt": after.created_at, **before}})
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
        return keys, read

    def backlog_of(self, user_ids: Sequence[str], threshold: int) -> list[Backlog]:
        """Count the given users' events (one ``$group`` per ``COUNT_BATCH`` users, on the user_id
        index) and return those over ``threshold``, largest backlog first. Ids that are not user ids
        (``valid_user_id``, as the scan) are left out."""
        found = []
        wanted = [u for u in dict.fromkeys(user_ids) if valid_user_id(u)]
        for batch in batches(wanted, COUNT_BATCH):
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
            "created_at": {"$gte": first.created_at, "$lt": last.created_at + ONE_MS},
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
            for batch in batches([key.id for key in keys], self.settings.delete_batch_size)
            for ev in self._events_lenient.find(ids_of_user(batch, user_id))
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
        for batch in batches(ids, self.settings.delete_batch_size):
            found.extend(self.events.find(ids_of_user(batch, user_id)))
        return found

    def delete_unchanged(self, user_id: str, events: Sequence[Mapping[str, Any]]) -> int:
        """Delete those of ``events`` still exactly as given (the whole document equal); return how many.

        An event the Butler edited, re-tagged, or gave or stripped of a field after it was read
        (during the LLM call) no longer matches and stays: its newer version was not summarised.
        Per batch: the events are read again by ``_id`` and compared whole, as stored
        (``event_digest``: every field, in order), then each one still equal is deleted by a
        ``DeleteOne`` filtered by ``unchanged``, which an edit landing in between still stops.
        """
        deleted = 0
        for batch in batches(events, self.settings.delete_batch_size):
            found = self._events_lenient.find(ids_of_user([ev["_id"] for ev in batch], user_id))
            now = {id_key(ev["_id"]): _digest(ev) for ev in found}
            ops = [
                DeleteOne(unchanged(ev["_id"], ev)) for ev in batch if now.get(id_key(ev["_id"])) == event_digest(ev)
            ]
            if ops:
                deleted += self.events.bulk_write(ops, ordered=False).deleted_count
        return deleted

    def delete(self, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given events of one user in batches; return how many were deleted."""
        return self._delete_ids(self.events, user_id, ids)

    def quarantine_copy(
        self, user_id: str, event_id: Any, *, field: str, problem: str, run_id: str, now: datetime
    ) -> RawBSONDocument | None:
        """Copy one event, byte for byte, into the quarantine collection with why it cannot be folded
        (upsert by _id, so repeating it adds nothing); return the event as copied, None when it is gone.

        The event is kept whole under ``event`` (raw BSON: even invalid UTF-8 survives), beside
        ``user_id``, ``event_id`` and ``created_at`` for erasure and operators to find it by.
        """
        raw = self._events_raw.find_one(ids_of_user([event_id], user_id))
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

    def quarantine_remove(self, user_id: str, event_id: Any, raw: RawBSONDocument) -> int:
        """Delete event ``event_id`` from user_memory if it is still exactly as copied (``raw``, filtered
        by ``whole``); return how many (0 or 1).

        An event the Butler edited since the copy stays in user_memory and its stale copy is dropped:
        the quarantine never holds an event that user_memory holds too (a later run looks again).
        The ``_id`` is the caller's: reading it from ``raw`` decodes the whole copy, and a quarantined
        event may hold bytes that do not decode.
        """
        deleted = self.events.delete_one(whole(event_id, raw)).deleted_count
        if not deleted:
            self.quarantine.delete_one({"_id": event_id, "user_id": user_id})
        return deleted


def unchanged(event_id: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the filter of event ``event_id`` still as ``event`` (as read).

    Its fields, each compared by ``$eq`` (a value is data, never an operator), when every top-level
    name is plain: the embedded server then looks the event up by ``_id`` (``_id`` first), where any
    top-level ``$`` key makes it scan the whole collection for every delete (0.15 s an event at
    15,000 events, growing with the collection). A name with a dot (``meta.source``, valid since
    MongoDB 5.0) would be read there as a path and one starting with ``$`` as an operator (an empty
    one is no path at all), so such an event is matched whole instead (``whole``). Either is one server-side match-and-delete: an edit of
    a field the event has is either before it (no match, the newer version stays) or after it (the
    edit finds nothing). A field added in between is seen only by ``whole``; ``delete_unchanged``
    compares the whole event right before, so that window is the one round trip between the two.
    """
    if all(isinstance(name, str) and name and "." not in name and not name.startswith("$") for name in event):
        return {"_id": event_id, **{k: {"$eq": v} for k, v in event.items() if k != "_id"}}
    return whole(event_id, event)


def _digest(event: Mapping[str, Any]) -> str | None:
    """``event_digest`` of an event as stored now; None when it no longer encodes (the Butler wrote
    invalid UTF-8 into it since it was summarised: read leniently, that is a change too)."""
    try:
        return event_digest(event)
    except UnicodeEncodeError:
        return None


def whole(event_id: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the filter of event ``event_id`` stored exactly as ``event``: the stored document and
    ``event`` compared whole, as one value (``$expr``, ``$$ROOT`` against ``$literal``), whatever
    its field names; a field added or removed is a difference too. On the embedded server it scans
    the collection: for the rare event ``unchanged`` cannot filter by its fields."""
    return {"_id": event_id, "$expr": {"$eq": ["$$ROOT", {"$literal": event}]}}


def undecodable_field(event: Mapping[str, Any]) -> str | None:
    """Return the first top-level field whose name or text was not valid UTF-8, or None.

    Read with ``surrogateescape`` (``read_fold``), invalid bytes become lone surrogates
    (U+DC80..U+DCFF), which valid UTF-8 never decodes to. MongoDB stores field names unchecked too:
    a name of invalid bytes is returned escaped (``\\udcff``), as the error, the log and the
    quarantine record can encode it; left in, the event's digest at the commit would fail every run.
    """
    for name, value in event.items():
        if _has_surrogates(name):
            return str(name).encode("utf-8", "backslashreplace").decode()
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


def _rest_of_millisecond(after: Any) -> dict[str, Any]:
    """The ``user_id`` condition for the rest of a millisecond after the key ``after`` (only string ids
    are users). MongoDB compares within one BSON type, so ``$gt`` a number or null matches no string:
    null and numbers sort before every string, so all of the millisecond's strings are still to come."""
    sorts_before_strings = after is None or (
        isinstance(after, int | float | Decimal128) and not isinstance(after, bool)
    )
    return {"$type": "string"} if sorts_before_strings else {"$gt": after}
