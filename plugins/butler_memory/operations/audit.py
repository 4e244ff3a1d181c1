"""The erasure audit: the keyed references that name a user or an event without their ids, the
content-free audit collection, and the result every erasure and forget returns.

The audit record holds no user id and no content: the user is named by an HMAC-SHA256 of their id
keyed with a secret kept outside the database (:func:`subject_ref`), so the record cannot be turned
back into the id, yet an operator who is given the id can recompute the reference and prove the
erasure happened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection

from butler_memory.core.errors import ForgetInputError
from butler_memory.core.settings import SettingsError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import DRY_RUN
from butler_memory.storage.store import MemoryStore

SECRET_ENV = "BUTLER_MEMORY_ERASURE_SECRET"  # noqa: S105 - the name of a variable, not a secret
"""Environment variable holding the key of the audit references (else the connection's password)."""
MIN_SECRET_CHARS = 16

# Statuses of an erasure's or a forget's result besides their own (erased, forgotten).
ALREADY_ERASED = "already_erased"

# Audit record states.
STARTED = "started"
DONE = "done"

# -- the audit reference ------------------------------------------------------------------------


def erasure_secret(env: Mapping[str, str] | None = None, *, connection_password: str | None = None) -> bytes:
    """Return the key of the audit references: ``BUTLER_MEMORY_ERASURE_SECRET``, else the password of
    the ``erasure_secret_conn_id`` connection (read by the caller). Refuse a missing or short one."""
    env = os.environ if env is None else env
    secret = env.get(SECRET_ENV) or connection_password or ""
    if len(secret) < MIN_SECRET_CHARS:
        raise SettingsError(
            f"erasure needs a secret of at least {MIN_SECRET_CHARS} characters to name users in its audit "
            f"record: set {SECRET_ENV} or the password of the erasure_secret_conn_id connection "
            "(keep it: the same secret proves old erasures)"
        )
    return secret.encode("utf-8")


def subject_ref(secret: bytes, user_id: str) -> str:
    """Return the non-reversible reference of a user: HMAC-SHA256 of the id, keyed with ``secret``."""
    digest = hmac.new(secret, b"user:" + user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest}"


def event_ref(secret: bytes, user_id: str, event_id: object) -> str:
    """Return the non-reversible reference of one of a user's events (for audit records)."""
    message = f"event:{user_id}\x00{event_id!s}".encode()
    return "hmac-sha256:" + hmac.new(secret, message, hashlib.sha256).hexdigest()


# -- results ------------------------------------------------------------------------------------


@dataclass
class ErasureResult:
    """What an erasure did: ids of the audit record, counts and version numbers; never content."""

    status: str
    kind: str
    erasure_id: str | None = None
    subject: str | None = None
    """The audit reference of the user (None in a dry run without a secret)."""
    removed: dict[str, int] = field(default_factory=dict)
    """Counts per place, as found when the erasure started (a dry run: what it would remove)."""
    left: dict[str, int] = field(default_factory=dict)
    """Re-count at the end: what is still there (only user_memory, when events were not asked for)."""
    notes: list[str] = field(default_factory=list)
    """Plain sentences for the operator (no content)."""
    summary_version: int | None = None
    rebuilt_from_version: int | None = None
    versions_dropped: list[int] = field(default_factory=list)
    events_refolded: int = 0
    lost: dict[str, Any] = field(default_factory=dict)
    """Forgetting events: what older facts could not be kept (counts and version ranges)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (fit for XCom)."""
        return asdict(self)


# -- the audit collection -----------------------------------------------------------------------


class AuditLog:
    """The erasure audit collection (``erasures_collection``): one content-free record per erasure."""

    def __init__(self, store: MemoryStore) -> None:
        self.coll: Collection[dict[str, Any]] = store.db[store.settings.erasures_collection]

    def ensure_indexes(self) -> None:
        """Create the index the lookups by reference use; safe to repeat."""
        self.coll.create_index([("subject", ASCENDING), ("kind", ASCENDING), ("state", ASCENDING)])

    def started(self, subject: str, kind: str) -> dict[str, Any] | None:
        """Return the unfinished erasure of this kind for this subject, if any."""
        return self.coll.find_one({"subject": subject, "kind": kind, "state": STARTED})

    def last_done(self, subject: str, kind: str) -> dict[str, Any] | None:
        """Return the newest finished erasure of this kind for this subject, if any."""
        docs = self.coll.find({"subject": subject, "kind": kind, "state": DONE}).sort([("finished_at", -1)]).limit(1)
        return next(iter(docs), None)

    def start(self, doc: dict[str, Any]) -> None:
        """Record an intent (insert; its ``_id`` is fresh)."""
        self.coll.insert_one(doc)

    def step(self, erasure_id: str, step: str) -> None:
        """Note a finished step (repeating it adds nothing)."""
        self.coll.update_one({"_id": erasure_id}, {"$addToSet": {"steps_done": step}})

    def finish(self, erasure_id: str, changes: Mapping[str, Any]) -> None:
        """Mark the erasure done."""
        self.coll.update_one({"_id": erasure_id}, {"$set": {"state": DONE, **changes}})

    def erased_since(self, secret: bytes, user_ids: Iterable[str], since: datetime) -> set[str]:
        """Return those of ``user_ids`` whose erasure (started or done) was requested at or after ``since``.

        For writers that finish after a user's data was read (a run's report): erasure wins, so what
        they write must not name such a user. Looked up by reference; nothing here names anyone.
        The erasures requested since ``since`` are read and matched here, not the run's references
        sent to the server: one ``$in`` of 204,800 of them (the largest run) is over MongoDB's 16 MB.
        """
        refs = {subject_ref(secret, user_id): user_id for user_id in user_ids}
        if not refs:
            return set()
        query = {"kind": "user", "requested_at": {"$gte": since}}
        return {refs[doc["subject"]] for doc in self.coll.find(query, {"subject": 1}) if doc.get("subject") in refs}

    def by_subject(self, subject: str) -> list[dict[str, Any]]:
        """Return every record naming this reference, oldest first (for proving an erasure)."""
        return list(self.coll.find({"subject": subject}).sort([("requested_at", ASCENDING)]))


def save_run_naming_no_erased(
    store: MemoryStore,
    secret: bytes | None,
    document: Callable[[set[str]], dict[str, Any]],
    user_ids: Sequence[str],
    since: datetime,
) -> tuple[dict[str, Any], set[str]]:
    """Store a run's document naming none of ``user_ids`` erased since ``since``; return it and them.

    Erasure wins every race (docs/erasure.md): ``document(erased)`` builds the run document without
    those users, and their number is added to it as ``users_erased``. The audit is read before the
    save and again after it: an erasure that began meanwhile may have scrubbed the run documents
    before this one existed, so nothing would remove its names later; the document is then written
    again without them. Without a secret nobody can be recognised: the document is stored as built.
    Shared by the DAG's report and the command line's compress, so both keep the promise the same way.
    """
    audit = AuditLog(store)

    def erased_now() -> set[str]:
        return set() if secret is None else audit.erased_since(secret, user_ids, since)

    def built(erased: set[str]) -> dict[str, Any]:
        doc = document(erased)
        if erased:
            doc["users_erased"] = len(erased)  # a count: the document names none of them
        return doc

    erased = erased_now()
    doc = built(erased)
    store.save_run(doc)
    late = erased_now() - erased
    if late:
        erased |= late
        doc = built(erased)
        store.save_run(doc)
    return doc, erased


def audit_key(secret: str | bytes) -> bytes:
    """Return the key of the audit references as bytes; refuse a short one."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(key) < MIN_SECRET_CHARS:
        raise SettingsError(f"the erasure secret must be at least {MIN_SECRET_CHARS} characters")
    return key


def to_text(result: ErasureResult) -> str:
    """Render a result for a terminal: status, audit id, counts, notes (no content)."""
    lines = [
        f"{result.kind} erasure: {result.status}"
        + (f" (audit record {result.erasure_id})" if result.erasure_id else "")
    ]
    if result.removed:
        lines.append(("would remove: " if result.status == DRY_RUN else "removed: ") + counts_text(result.removed))
    if result.left:
        lines.append("left: " + counts_text(result.left))
    if result.summary_version is not None:
        lines.append(
            f"summary: v{result.summary_version}, rebuilt from v{result.rebuilt_from_version}, "
            f"{result.events_refolded} event(s) re-folded; history versions dropped: {result.versions_dropped or 'none'}"
        )
    if result.lost:
        lines.append("could not be kept: " + json.dumps(result.lost, default=str))
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def audit_records(store: MemoryStore, secret: bytes, user_id: str) -> list[dict[str, Any]]:
    """Return every erasure record of a user (found by recomputing their reference; nothing else
    links a record to a person)."""
    return AuditLog(store).by_subject(subject_ref(secret, user_id))


def observed_removal(
    metrics: m.Metrics,
    operation: str,
    user_id: object,
    run: Callable[[], ErasureResult],
    *,
    changed: str,
    dry_run: bool,
    places: Iterable[str] | None = None,
) -> ErasureResult:
    """Refuse a user id that is not a non-empty string, then run a forget or an erasure and emit its
    metrics (``metrics.observed``): the events it removed from ``places`` (all), bad input not a failure."""
    if not isinstance(user_id, str) or not user_id.strip():
        raise ForgetInputError(f"user id must be a non-empty string, got {user_id!r}")
    counted = None if places is None else frozenset(places)
    return m.observed(
        metrics,
        operation,
        run,
        changed=changed,
        events=lambda r: sum(n for place, n in r.removed.items() if counted is None or place in counted),
        dry_run=dry_run,
        input_errors=(ForgetInputError,),
    )
