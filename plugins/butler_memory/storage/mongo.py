"""The MongoDB plumbing every collection module shares: the typed base of the collections, write
concern, index creation, batching by ``_id``, and error texts that never quote a document.

Nothing here knows a collection's meaning; ``events``, ``profiles``, ``archive`` and ``run_docs``
build on it, and ``store.MemoryStore`` puts them together.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, PyMongoError, WTimeoutError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from butler_memory.core.errors import StoreError
from butler_memory.core.settings import Settings

# pymongo's command log (DEBUG on this logger) prints commands and replies, i.e. users' conversations:
# a task or CLI run at DEBUG would copy them into its logs. Quieted unless its level was set on purpose.
_PYMONGO_COMMAND_LOG = logging.getLogger("pymongo.command")

INDEX_CONFLICT_CODES = {85, 86}  # IndexOptionsConflict, IndexKeySpecsConflict


class Collections:
    """The collections of one Butler database, each with the write concern durability needs."""

    def __init__(self, db: Database, settings: Settings) -> None:
        if _PYMONGO_COMMAND_LOG.level == logging.NOTSET:
            _PYMONGO_COMMAND_LOG.setLevel(logging.INFO)
        # Durability must not depend on server defaults: with w:1 a failover can roll back a summary
        # commit after its events' deletes landed. Majority writes on every collection reached through
        # this store (events, profiles, archive, history, runs, state, the erasure audit log), and
        # majority reads of the profile (the summary version and pending fold we build on).
        durable = write_concern(settings)
        db = db.with_options(write_concern=durable)
        self.db: Database = db
        self.settings = settings
        self.events: Collection = db.get_collection(settings.events_collection, write_concern=durable)
        self.profiles: Collection = db.get_collection(
            settings.profiles_collection,
            write_concern=durable,
            read_concern=ReadConcern(settings.mongo_read_concern),
        )
        self.archive_coll: Collection = db.get_collection(settings.archive_collection, write_concern=durable)
        self.quarantine: Collection = db.get_collection(settings.quarantine_collection, write_concern=durable)
        # The fold reads events so that invalid UTF-8 (which MongoDB stores unchecked) becomes lone
        # surrogates the fold can name and quarantine, instead of an InvalidBSON failing the whole read.
        self._events_lenient = self.events.with_options(codec_options=lenient(self.events.codec_options))
        self._events_raw: Collection[RawBSONDocument] = self.events.with_options(
            codec_options=CodecOptions(document_class=RawBSONDocument)
        )
        self.runs: Collection = db[settings.runs_collection]
        self.state: Collection = db[settings.state_collection]
        self.catchup_runs: Collection = db[settings.catchup_runs_collection]
        self.run_users: Collection = db.get_collection(settings.run_users_collection, write_concern=durable)

    def _delete_ids(self, coll: Collection, user_id: str, ids: Sequence[Any]) -> int:
        """Delete the given documents of one user from ``coll`` in batches; return how many."""
        deleted = 0
        for batch in batches(ids, self.settings.delete_batch_size):
            deleted += coll.delete_many(ids_of_user(batch, user_id)).deleted_count
        return deleted


def ensure_index(coll: Collection, keys: list[tuple[str, int]], unique: bool = False) -> None:
    """Create an index; an equivalent one under another name (the Butler's own) is fine."""
    try:
        coll.create_index(keys, unique=unique)
    except OperationFailure as exc:
        if exc.code not in INDEX_CONFLICT_CODES:
            raise


def ensure_ttl(db: Database, coll: Collection, field: str, name: str, days: int) -> None:
    """Create the TTL index ``name`` on ``field``, or update its retention in place when it changed."""
    ttl = days * 86400
    try:
        coll.create_index([(field, ASCENDING)], name=name, expireAfterSeconds=ttl)
    except OperationFailure as exc:
        if exc.code not in INDEX_CONFLICT_CODES:
            raise
        db.command("collMod", coll.name, index={"name": name, "expireAfterSeconds": ttl})


def ids_of_user(ids: list[Any], user_id: str) -> dict[str, Any]:
    """Return the filter for these ``_id``s of one user, ``_id`` first.

    MongoDB plans a filter the same whatever its key order, but the embedded SecantusDB server picks
    its access path from the first key: with ``user_id`` first it walks all the user's events for
    every batch (a 10,000-event user: 5 s per 160 ids, growing with the user's events), with ``_id``
    first it looks the ids up (0.03 s). ``user_id`` stays in the filter as a guard. See
    docs/benchmarks.md.
    """
    return {"_id": {"$in": ids}, "user_id": user_id}


def batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """Yield ``items`` in lists of ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def write_concern(settings: Settings) -> WriteConcern:
    """Return the write concern of the summary commit, archive and delete (``mongo_write_concern``)."""
    # Settings admit only "majority" or ASCII digits (INTEGER_TEXT), so int() cannot fail here.
    w: int | str = "majority" if settings.mongo_write_concern == "majority" else int(settings.mongo_write_concern)
    return WriteConcern(w=w, wtimeout=settings.mongo_write_timeout_ms)


def lenient(options: CodecOptions[Any]) -> CodecOptions[Any]:
    """Return ``options`` decoding invalid UTF-8 to lone surrogates (``surrogateescape``), not InvalidBSON."""
    return options.with_options(unicode_decode_error_handler="surrogateescape")


_KEY_CODEC: CodecOptions[Any] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
"""How :func:`event_digest` and :func:`id_key` encode: bson's default cannot encode a native
``uuid.UUID``, which a client with ``uuidRepresentation="standard"`` (the Butler's, as pymongo
recommends) decodes a UUID ``_id`` to. Encoded back as binary subtype 4, it is the stored bytes,
the same bytes the job's default client reads as a subtype-4 ``Binary``: both compute the same
digest of the same stored event. A subtype-3 (legacy) UUID stays the ``Binary`` either decodes it
to, unless a client decodes it with a legacy representation (docs/butler-integration.md)."""


def event_digest(event: Mapping[str, Any]) -> str:
    """Return a short fingerprint of an event exactly as read (its BSON bytes): equal iff unchanged."""
    return hashlib.blake2b(bson.encode(dict(event), codec_options=_KEY_CODEC), digest_size=12).hexdigest()


def id_key(value: Any) -> bytes:
    """Return a hashable, exact form of any ``_id`` (a compound document, an ObjectId, a UUID, a number...)."""
    return bson.encode({"": value}, codec_options=_KEY_CODEC)


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
