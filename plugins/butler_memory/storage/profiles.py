"""The profile (``user_profiles``): the summary and our bookkeeping fields beside the Butler's own,
read as a validated ``Profile`` and written only through the one guarded commit and its markers
(pending fold, fold target, a rollback's intent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from butler_memory.core.errors import ConcurrentUpdateError, InvalidProfileError
from butler_memory.core.settings import Settings
from butler_memory.llm.prompt import known_language
from butler_memory.storage.events import EventKey
from butler_memory.storage.mongo import Collections

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
LEASE_FIELD = "memory_lease"
"""The id of the compression that last took the user, set under its lock when it loads the profile;
its commits require it unchanged. A forget begun, an erasure done or another run that took the
user meanwhile removes or replaces it, so a run stalled past its lock's TTL commits nothing
over them, even when they left the summary version as it was (a forget of live events) or removed
it (an erasure: the stale run's version 0 would match again)."""
OUR_PROFILE_FIELDS = (
    VERSION_FIELD,
    THROUGH_FIELD,
    COMPRESSED_AT_FIELD,
    PENDING_FIELD,
    TARGET_FIELD,
    FORGET_FIELD,
    ROLLBACK_FIELD,
    LEASE_FIELD,
)
"""Every profile field this package writes besides the summary (a user erasure removes them all)."""


@dataclass(frozen=True)
class PendingFold:
    """Events covered by a committed summary whose archive/delete had not finished."""

    version: int
    ids: list[Any]
    digests: list[str] | None = None
    """One :func:`event_digest` per id, of the event as summarised (None in folds of older versions)."""


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


class ProfilesMixin(Collections):
    """Load a user's profile and commit new summary versions, guarded by the version they build on."""

    def load_profile(self, user_id: str, *, create: bool = True, lease: str | None = None) -> Profile:
        """Return the user's profile, validated; create an empty one first when asked (``create``, or
        a ``lease``: a compression taking the user records it in the same write, see ``LEASE_FIELD``)."""
        if create or lease is not None:
            update: dict[str, Any] = {"$setOnInsert": {"user_id": user_id}}
            if lease is not None:
                update["$set"] = {LEASE_FIELD: lease}
            self.profiles.update_one({"user_id": user_id}, update, upsert=True)
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
        lease: str | None = None,
        forget_id: str | None = None,
    ) -> int:
        """Store a new summary, watermark, pending fold and fold target (None after the last chunk)
        in one guarded update; return the new version.

        ``digests`` (one per id, :func:`event_digest` of the event as summarised) let a re-run that
        finishes this fold delete only events still as they were summarised.

        Guarded, besides the version, by no pending fold, rollback or erasure, and by the committer's
        own claim: a compression's ``lease`` still the profile's with no forget begun, or a forget's
        rebuild by its intent (``forget_id``). Exactly one of the two is given."""
        guard = _claim(lease=lease, forget_id=forget_id)
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
        return self._commit(user_id, expected_version, summary, fields, during="compression", guard=guard)

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

    def begin_intent(
        self, user_id: str, name: str, intent: Mapping[str, Any], *, expected_version: int, during: str
    ) -> None:
        """Record an operation's intent in the profile field ``name`` (``ROLLBACK_FIELD``,
        ``FORGET_FIELD``), guarded by the version it starts from and no such intent set; a rollback's
        also by no pending fold. A forget's also removes the compression lease in the same write: a
        compression stalled past its lock's TTL cannot commit after it, even once it is done and the
        version is as it was (a rollback always commits a new version, which fences it)."""
        guard = {"user_id": user_id, name: None, VERSION_FIELD: expected_version or {"$in": [0, None]}}
        update: dict[str, Any] = {"$set": {name: dict(intent)}}
        if name == ROLLBACK_FIELD:
            guard[PENDING_FIELD] = None
        else:
            update["$unset"] = {LEASE_FIELD: ""}
        if self.profiles.update_one(guard, update).matched_count != 1:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: profile changed before {during} started (expected summary version "
                f"{expected_version}); nothing was written, a re-run starts from the new state",
                user_id=user_id,
            )

    def intent_of(self, user_id: str, name: str) -> dict[str, Any] | None:
        """Return the intent in the profile field ``name``, None when there is none."""
        intent = (self.profiles.find_one({"user_id": user_id}, {name: 1}) or {}).get(name)
        return intent if isinstance(intent, dict) else None

    def update_forget(self, user_id: str, intent_id: str, changes: Mapping[str, Any]) -> None:
        """Change fields of this forget's intent (still the profile's)."""
        match = {"user_id": user_id, f"{FORGET_FIELD}.id": intent_id}
        self.profiles.update_one(match, {"$set": {f"{FORGET_FIELD}.{k}": v for k, v in changes.items()}})

    def clear_forget(self, user_id: str, intent_id: str) -> None:
        """Remove a finished forget's intent."""
        self.profiles.update_one({"user_id": user_id, f"{FORGET_FIELD}.id": intent_id}, {"$set": {FORGET_FIELD: None}})

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

    def commit_refold(self, user_id: str, *, expected_version: int, summary: str, now: datetime, lease: str) -> int:
        """Store a re-folded summary as the next version (the watermark stays: it covers the same
        events), guarded by the old version, nothing in progress and the re-fold's ``lease``
        (``take_lease``); return the new version."""
        fields = {COMPRESSED_AT_FIELD: now}
        return self._commit(user_id, expected_version, summary, fields, during="the re-fold", guard=_claim(lease=lease))

    def take_lease(self, user_id: str, version: int, lease: str) -> None:
        """Record ``lease`` as the operation that took the user at ``version`` (``LEASE_FIELD``), for
        an operation that loaded the profile without one (a re-fold); ConcurrentUpdateError when the
        profile moved on or something is in progress meanwhile."""
        match = {"user_id": user_id, **_at(version), **_IDLE, FORGET_FIELD: None}
        if self.profiles.update_one(match, {"$set": {LEASE_FIELD: lease}}).matched_count != 1:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: profile changed before the re-fold started (expected summary version "
                f"{version}); nothing was written, a re-run starts from the new state",
                user_id=user_id,
            )

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
        match.update(_at(expected_version))
        update = {"$set": {self.settings.summary_field: summary, VERSION_FIELD: expected_version + 1, **fields}}
        if self.profiles.update_one(match, update).matched_count != 1:
            raise ConcurrentUpdateError(
                f"user {user_id!r}: profile changed during {during} (expected summary version "
                f"{expected_version}); this run committed no summary, a re-run starts from the new state",
                user_id=user_id,
            )
        return expected_version + 1

    def fold_pending(self, user_id: str, version: int) -> bool:
        """Say whether the fold of ``version`` is still the profile's pending fold, with no erasure or forget begun."""
        return self._still(user_id, {f"{PENDING_FIELD}.version": version})

    def rollback_pending(self, user_id: str, version: int, rollback_id: str) -> bool:
        """Say whether this rollback's intent is still the profile's, with no erasure or forget begun."""
        return self._still(
            user_id, {f"{ROLLBACK_FIELD}.version": version, f"{ROLLBACK_FIELD}.rollback_id": rollback_id}
        )

    def still_at(self, user_id: str, version: int, *, lease: str | None = None, forget_id: str | None = None) -> bool:
        """Say whether the profile is still at ``version`` under this claim (``lease`` or ``forget_id``,
        nothing else in progress): what the claim's guarded commit will require, checked before its
        history entry replaces one already there (one count)."""
        match = {"user_id": user_id, **_at(version), **_claim(lease=lease, forget_id=forget_id)}
        return self.profiles.count_documents(match, limit=1) == 1

    def _still(self, user_id: str, fields: Mapping[str, Any]) -> bool:
        """Say whether the profile still has ``fields``, with no erasure or forget begun (one count)."""
        match = {"user_id": user_id, **fields, ERASING_FIELD: None, FORGET_FIELD: None}
        return self.profiles.count_documents(match, limit=1) == 1

    def clear_rollback(self, user_id: str, version: int) -> None:
        """Remove a finished rollback's intent."""
        self.profiles.update_one(
            {"user_id": user_id, VERSION_FIELD: version, f"{ROLLBACK_FIELD}.version": version},
            {"$unset": {ROLLBACK_FIELD: ""}},
        )


def _at(version: int) -> dict[str, Any]:
    """The match of a profile at ``version`` (version 0: also a profile that never had one)."""
    return {VERSION_FIELD: version if version else {"$in": [0, None]}}


def _claim(*, lease: str | None, forget_id: str | None = None) -> dict[str, Any]:
    """The match of a profile with nothing in progress but the writer's own claim: a compression's
    or re-fold's ``lease`` still the profile's and no forget begun, or a forget's rebuild by its
    intent (``forget_id``); exactly one of the two."""
    if (lease is None) == (forget_id is None):
        raise ValueError("a claim is a lease or a forget's intent, exactly one")
    claim = {FORGET_FIELD: None, LEASE_FIELD: lease} if forget_id is None else {f"{FORGET_FIELD}.id": forget_id}
    return {**_IDLE, **claim}


_IDLE = {PENDING_FIELD: None, ROLLBACK_FIELD: None, ERASING_FIELD: None}
"""No pending fold, rollback or erasure in the profile."""


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
    target, through = _event_key(user_id, doc, TARGET_FIELD), _event_key(user_id, doc, THROUGH_FIELD)
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


def _event_key(user_id: str, doc: Mapping[str, Any], name: str) -> EventKey | None:
    """Return the ``{created_at, event_id}`` field ``name`` as an EventKey (None when unset), validated."""
    raw = doc.get(name)
    if raw is None:
        return None
    if not (isinstance(raw, dict) and isinstance(raw.get("created_at"), datetime) and "event_id" in raw):
        raise InvalidProfileError(user_id, name, "is not {created_at: date, event_id: ...}")
    return EventKey(raw["created_at"], raw["event_id"])
