"""Summary history: every committed version of a user's summary, append-only, in its own collection.

One document per ``(user_id, version)`` (unique index), written *before* the guarded profile
commit of that version: inserted, or an entry already there replaced only while the writer's
claim on the profile holds (``write_version``). The profile stays the source of truth: an entry whose
version the profile never reached (a kill between the two writes) is ignored by every reader here
(they take the profile's version as a bound) and overwritten by the re-run, or by the baseline of
the Butler's own commit of that version (its text is not the entry's). Versions only go up and
entries are never rewritten once the profile has reached them: a rollback, a re-fold or a forget
is a *new* version.

The entries hold personal data (the summary text): nothing here logs, and nothing a caller puts in
logs, XCom or metrics may carry ``text``. ``HistoryEntry.metadata()`` is the content-free view.

API (used by compression, rollback, refold and the forget helper)::

    history = store.history                      # a SummaryHistory on the same database
    history.write_version(entry, still_ours)     # insert, or replace while the writer's claim holds
    history.versions(user_id, through=v)         # entries 1..v, oldest first (text included)
    history.version(user_id, v)                  # one entry, None when missing (v0 is synthesised)
    history.committed_at(entry)                  # the profile's memory_compressed_at at that version
    history.holds(user_id, v, text)              # whether v's entry has exactly this text
    history.lineage(user_id, through=v)          # the chain of versions v's text descends from
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from butler_memory.core.errors import ConcurrentUpdateError
from butler_memory.core.settings import Settings
from butler_memory.storage.mongo import ensure_ttl

Claim = Callable[[], bool]
"""Whether a writer's claim on the profile still holds (its lease or intent, the profile still at the
version it builds on): what a write of its history entry over another one requires."""

WRITE_ATTEMPTS = 3
"""Tries of a history write whose entry another writer changed meanwhile (it writes at most once more)."""

FOLD = "fold"
ROLLBACK = "rollback"
REFOLD = "refold"
FORGET = "forget"
BASELINE = "baseline"
"""A version committed before history existed (or by the Butler itself): recorded from the profile
at our first commit on top of it, so it can be rolled back to."""
KINDS = (FOLD, ROLLBACK, REFOLD, FORGET, BASELINE)

TTL_INDEX = "created_at_ttl"


def prompt_version(system_prompt: str) -> str:
    """Return a short, stable id of a prompt template (changes whenever the template does)."""
    return "sha256:" + hashlib.sha256(system_prompt.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Key:
    """An event's (created_at, _id) key as stored in history entries and the profile watermark."""

    created_at: datetime
    event_id: Any

    def to_doc(self) -> dict[str, Any]:
        """Return the stored form ``{created_at, event_id}``."""
        return {"created_at": self.created_at, "event_id": self.event_id}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Key | None:
        """Read the stored form (None stays None)."""
        if not doc:
            return None
        return cls(doc["created_at"], doc["event_id"])


@dataclass(frozen=True)
class Covers:
    """The events a version folded in for the first time: first and last key and how many."""

    first: Key
    last: Key
    count: int

    def to_doc(self) -> dict[str, Any]:
        """Return the stored form."""
        return {"first": self.first.to_doc(), "last": self.last.to_doc(), "count": self.count}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Covers | None:
        """Read the stored form (None stays None)."""
        if not doc:
            return None
        first, last = Key.from_doc(doc["first"]), Key.from_doc(doc["last"])
        assert first is not None and last is not None
        return cls(first, last, int(doc["count"]))


@dataclass(frozen=True)
class HistoryEntry:
    """One committed (or about to be committed) version of a user's summary."""

    user_id: str
    version: int
    text: str
    kind: str
    run_id: str | None
    base_version: int
    """The version this one built on: ``version - 1`` for a fold and a re-fold; for a forget, the
    newest clean version its rebuild started from; for a rollback, the version whose text (and
    bookkeeping) it restored."""
    created_at: datetime | None
    """When it was written; also the profile's ``memory_compressed_at`` for this version unless the
    entry is a baseline or a rollback (see ``SummaryHistory.committed_at``)."""
    through: Key | None = None
    """The profile's watermark at this version."""
    covers: Covers | None = None
    """Events folded in by this version (None when it folded no new events, e.g. a rollback)."""
    summarizer: str | None = None
    model: str | None = None
    prompt_version: str | None = None
    guards: dict[str, str] = field(default_factory=dict)
    """Guard outcomes of this version: ``{guard_name: "pass" | "warn" | ...}``."""
    undoes: list[int] = field(default_factory=list)
    """For a rollback: the versions it undid (their events went back to user_memory)."""
    undone_runs: list[str] = field(default_factory=list)
    """For a rollback: the runs it undid, newest first."""
    refolded_from: int | None = None
    """For a re-fold: the kept version whose text it started from."""
    compressed_at: datetime | None = None
    """The profile's ``memory_compressed_at`` at this version when it is not ``created_at``: a
    baseline's is the profile's, a rollback's the restored version's; see
    ``SummaryHistory.committed_at``."""

    def to_doc(self) -> dict[str, Any]:
        """Return the stored document."""
        doc = asdict(self)
        doc["through"] = None if self.through is None else self.through.to_doc()
        doc["covers"] = None if self.covers is None else self.covers.to_doc()
        return doc

    def metadata(self) -> dict[str, Any]:
        """Return the entry without its text: fit for logs, XCom, reports and the UI."""
        doc = self.to_doc()
        doc["text_chars"] = len(doc.pop("text"))
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> HistoryEntry:
        """Read a stored document."""
        return cls(
            user_id=doc["user_id"],
            version=int(doc["version"]),
            text=doc.get("text") or "",
            kind=doc.get("kind") or FOLD,
            run_id=doc.get("run_id"),
            base_version=int(doc.get("base_version") or 0),
            created_at=doc.get("created_at"),
            through=Key.from_doc(doc.get("through")),
            covers=Covers.from_doc(doc.get("covers")),
            summarizer=doc.get("summarizer"),
            model=doc.get("model"),
            prompt_version=doc.get("prompt_version"),
            guards=dict(doc.get("guards") or {}),
            undoes=list(doc.get("undoes") or []),
            undone_runs=list(doc.get("undone_runs") or []),
            refolded_from=doc.get("refolded_from"),
            compressed_at=doc.get("compressed_at"),
        )


def empty_version(user_id: str) -> HistoryEntry:
    """Return version 0: the empty summary every user starts from."""
    return HistoryEntry(user_id, 0, "", BASELINE, None, 0, None)


def lineage_of(entries: Iterable[HistoryEntry], through: int) -> list[HistoryEntry]:
    """Return the chain of versions ``through``'s text descends from among ``entries``, newest first
    (``SummaryHistory.lineage`` on entries already read)."""
    by_version = {e.version: e for e in entries}
    chain: list[HistoryEntry] = []
    current: int | None = through
    while current is not None and current in by_version:
        entry = by_version[current]
        chain.append(entry)
        current = entry.base_version if entry.version > 0 and entry.base_version < entry.version else None
    return chain


class SummaryHistory:
    """Read and write the summary history collection (``history_collection``)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.coll = db[settings.history_collection]

    def ensure_indexes(self) -> None:
        """Create the unique (user_id, version) index and the retention TTL index; safe to repeat."""
        self.coll.create_index([("user_id", ASCENDING), ("version", ASCENDING)], unique=True)
        self.coll.create_index([("run_id", ASCENDING), ("user_id", ASCENDING)])
        ensure_ttl(self.db, self.coll, "created_at", TTL_INDEX, self.settings.history_retention_days)

    def write_version(self, entry: HistoryEntry, still_ours: Claim) -> None:
        """Store one version before the profile commit of it, as only its writer may.

        Only while ``still_ours()`` (the writer's claim on the profile, still at the version before:
        its lease or intent): inserted when the user has no entry of that version; an entry already
        there (a killed or stalled run's, or a Butler-committed version's stale one) replaced only
        if it did not change between the claim's check after reading it and the replace
        (``write_id``, new at every write). So a writer stalled past its lock's TTL never replaces
        the entry of the run that took the user, whose commit made it the version's, and writes no
        entry back after an erasure or a forget (but for one round trip). ConcurrentUpdateError when
        the claim is gone, or the entry kept changing under this writer.
        """
        if entry.kind not in KINDS:
            raise ValueError(f"history entry kind {entry.kind!r} is not one of {', '.join(KINDS)}")
        key = {"user_id": entry.user_id, "version": entry.version}
        for _ in range(WRITE_ATTEMPTS):
            if not still_ours():  # an insert too: after an erasure or a forget, no run replaces it
                break
            doc = {**entry.to_doc(), "write_id": uuid.uuid4().hex}
            try:  # inserted only where the user has no entry of that version (no unique index relied on)
                if self.coll.update_one(key, {"$setOnInsert": doc}, upsert=True).upserted_id is not None:
                    return
            except DuplicateKeyError:  # another writer's insert won the race
                pass
            seen = self.coll.find_one(key, {"write_id": 1})
            if seen is None:  # gone meanwhile (retention): insert it again
                continue
            if not still_ours():  # checked after the read: the entry replaced is one seen under the claim
                break
            if self.coll.replace_one({**key, "write_id": seen.get("write_id")}, doc).matched_count == 1:
                return
        raise ConcurrentUpdateError(
            f"user {entry.user_id!r}: the profile moved on before this run recorded v{entry.version} (another "
            "run took the user); this run committed nothing of that version",
            user_id=entry.user_id,
        )

    def version(self, user_id: str, version: int) -> HistoryEntry | None:
        """Return one version (text included); version 0 without an entry is the empty summary."""
        doc = self.coll.find_one({"user_id": user_id, "version": version}, {"_id": 0})
        if doc is not None:
            return HistoryEntry.from_doc(doc)
        return empty_version(user_id) if version == 0 else None

    def committed_at(self, entry: HistoryEntry) -> datetime | None:
        """Return the profile's ``memory_compressed_at`` at ``entry``'s version.

        A fold, re-fold or forget set it to its commit time (``created_at``); a baseline recorded
        the profile's and a rollback the restored version's (``compressed_at``). A rollback entry
        without one restored a version that had none, or was written before rollback entries held
        it (its ``created_at`` is the rollback's own time, which the profile never took): it is
        followed to the version it restored. When that one is gone (retention), the rollback's own
        time is the best left.
        """
        while entry.kind == ROLLBACK and entry.compressed_at is None:
            restored = self.version(entry.user_id, entry.base_version) if entry.base_version < entry.version else None
            if restored is None:
                return entry.created_at
            entry = restored
        return entry.compressed_at if entry.kind in (BASELINE, ROLLBACK) else entry.created_at

    def holds(self, user_id: str, version: int, text: str) -> bool:
        """Say whether a version's stored entry has exactly ``text`` (compared by the server: no text
        comes back). An entry of a killed run for a version the Butler then committed has not."""
        return self.coll.count_documents({"user_id": user_id, "version": version, "text": text}, limit=1) > 0

    def versions(self, user_id: str, *, through: int, text: bool = True) -> list[HistoryEntry]:
        """Return a user's versions up to ``through`` (the profile's version), oldest first."""
        projection: dict[str, int] = {"_id": 0} if text else {"_id": 0, "text": 0}
        cursor = self.coll.find({"user_id": user_id, "version": {"$lte": through}}, projection)
        return [HistoryEntry.from_doc(doc) for doc in cursor.sort([("version", ASCENDING)])]

    def lineage(self, user_id: str, *, through: int) -> list[HistoryEntry]:
        """Return the chain of versions ``through``'s text descends from, newest first, without text.

        A fold, re-fold or forget builds on the version before it; a rollback on the version it
        restored, so versions a rollback undid are not in the chain. Stops at version 0 or at the
        first entry missing (retention).
        """
        return lineage_of(self.versions(user_id, through=through, text=False), through)

    def run_names(self, pattern: str) -> list[str]:
        """Return the run names (keys, or older bare ids) of versions whose run matches a regular expression."""
        return sorted(r for r in self.coll.distinct("run_id", {"run_id": {"$regex": pattern}}) if isinstance(r, str))

    def users_of_run(self, run_id: str) -> list[str]:
        """Return the users a run wrote versions for."""
        return sorted(u for u in self.coll.distinct("user_id", {"run_id": run_id}) if isinstance(u, str))
