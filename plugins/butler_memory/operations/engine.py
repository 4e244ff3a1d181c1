"""The engine's front: the parts one task needs, and the per-user operations on them.

Built once per task (``connections.build_engine``), by the CLI, the Butler's client and tests. It
sits above the operations it offers (compression, rollback, re-fold, forget), which never import it
back: they take the parts as ``fold.rebuild.Parts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from pymongo.database import Database

from butler_memory.core.ids import check_user_id
from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import compress_user
from butler_memory.fold.metrics import Metrics, NullMetrics
from butler_memory.freshness.fresh import daily_scan
from butler_memory.llm.budget import TokenBudget
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.audit import audit_key
from butler_memory.operations.forget import forget_events, forget_user_or_events
from butler_memory.operations.refold import refold_user
from butler_memory.operations.rollback import rollback_user
from butler_memory.storage.events import Backlog
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore


@dataclass(frozen=True)
class Engine:
    """The parts one compression needs, built once per task (see ``connections.build_engine``)."""

    settings: Settings
    store: MemoryStore
    locks: UserLocks
    summarizer: Summarizer
    metrics: Metrics = field(default_factory=NullMetrics)
    budget: TokenBudget | None = None
    """The daily token budget, when one is set."""

    def close(self) -> None:
        """Close every client the parts hold (MongoDB, Redis, LLM, StatsD)."""
        for part in (self.store, self.locks, self.summarizer, self.metrics):
            part.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def scan(
        self, *, limit: int | None = None, user_ids: Sequence[str] | None = None, dry_run: bool = False
    ) -> list[Backlog]:
        """Return users over the threshold, largest backlog first, at most ``limit`` (a dry run creates
        no indexes). The scan is the daily run's given-users one (``fresh.daily_scan`` without its
        record), and so is the gauge: a real scan sends backlog_users, the users taken and those left
        past the limit together; a dry run sends nothing, as a preview is not a run. A given id that is
        not a user id raises InvalidUserIdError before anything is read."""
        if not dry_run:  # a preview writes nothing: it must run with read-only credentials
            self.store.ensure_indexes()
        given = None if user_ids is None else [check_user_id(user_id) for user_id in user_ids]
        result = daily_scan(self.store, self.settings, limit or self.settings.scan_limit, given)
        if not dry_run:
            self.metrics.gauge(m.BACKLOG_USERS, result.over)
        return result.backlog

    compress = compress_user
    """Compress one user: ``compression.compress_user`` on these parts."""

    rollback = rollback_user
    """Undo one run for one user and emit the rollback metrics: ``rollback.rollback_user`` on these parts."""

    refold = refold_user
    """Rebuild one user's summary from the archive and emit the re-fold metrics: ``refold.refold_user`` on these parts."""

    forget = forget_user_or_events
    """Forget one user, or some of their events: ``forget.forget_user_or_events`` on these parts."""


def erase_events(
    user_id: str,
    *,
    db: Database[Any],
    redis_client: redis.Redis,
    summarizer: Summarizer,
    secret: str | bytes,
    event_ids: Sequence[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Forget some of a user's events: the call for the Butler's own deletion flow (no Airflow).

    ``summarizer`` rebuilds the summary (e.g. ``OpenAISummarizer(LLMConfig(...))``, the same model
    the compression uses). Returns the result as a dict (counts, versions; no content).
    (``erasure.erase_user`` is its twin for the whole user, which needs no summariser.) Neither event
    ids nor a range is a ``ForgetInputError``, never the whole user: this call forgets events only.
    """
    settings = settings or Settings.from_env()
    budget = TokenBudget.when_set(redis_client, settings)  # a forget's rebuild counts on the day's budget
    engine = Engine(settings, MemoryStore(db, settings), UserLocks(redis_client, settings), summarizer, budget=budget)
    key = audit_key(secret)
    return forget_events(user_id, event_ids, since, until, engine=engine, secret=key, requested_by="butler").to_dict()
