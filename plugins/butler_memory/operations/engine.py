"""The engine's front: the parts one task needs, and the per-user operations on them.

Built once per task (``connections.build_engine``), by the CLI, the Butler's client and tests. It
sits above the operations it offers (compression, rollback, re-fold), which never import it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from butler_memory.core.settings import Settings
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import compress_user
from butler_memory.fold.metrics import Metrics, NullMetrics
from butler_memory.llm.budget import TokenBudget
from butler_memory.llm.summarizer import Summarizer
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
        """Return users over the threshold, largest backlog first (a dry run creates no indexes)."""
        if not dry_run:  # a preview writes nothing: it must run with read-only credentials
            self.store.ensure_indexes()
        backlog = self.store.scan(self.settings.threshold, limit or self.settings.scan_limit, user_ids)
        self.metrics.gauge(m.BACKLOG_USERS, len(backlog))
        return backlog

    compress = compress_user
    """Compress one user: ``compression.compress_user`` on these parts."""

    rollback = rollback_user
    """Undo one run for one user and emit the rollback metrics: ``rollback.rollback_user`` on these parts."""

    refold = refold_user
    """Rebuild one user's summary from the archive and emit the re-fold metrics: ``refold.refold_user`` on these parts."""
