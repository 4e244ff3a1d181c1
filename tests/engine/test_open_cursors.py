"""No server cursor stays open across an LLM call (issue 26.3).

A re-fold or a forget's rebuild can spend minutes per chunk on the LLM; a cursor held open across
those calls outlives the server's 10-minute idle-cursor timeout (``CursorNotFound``). The embedded
server has no such timeout, so the proof is independent of it: the client's own command monitoring
says which cursors are open at the moment each summarise call starts.
"""

from __future__ import annotations

from typing import Any

import pymongo
import redis
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.summarizer import Summary, SummaryRequest
from butler_memory.operations import forget
from butler_memory.operations.refold import REFOLDED
from tests.engine.erasure_helpers import SECRET
from tests.engine.helpers import CursorWatch, insert_events, make_engine, small_settings
from tools.services import MongoService

Doc = dict[str, Any]
EVENTS = 1105
"""More than one batch of the archive (1,000): a cursor read lazily would still be open."""
SETTINGS = small_settings(keep_last_n=5, max_events_per_chunk=100)


class Watched(OfflineSummarizer):
    """The offline summariser, noting how many cursors the watched client holds open at each call."""

    def __init__(self, watch: CursorWatch) -> None:
        super().__init__()
        self.watch = watch
        self.open_at_calls: list[int] = []

    def summarize(self, request: SummaryRequest) -> Summary:
        self.open_at_calls.append(len(self.watch.open))
        return super().summarize(request)


def watched_engine(mongo_service: MongoService, db: Database[Doc], client: redis.Redis) -> tuple[Any, Watched, Any]:
    """Fold EVENTS events of "u1" into the archive, then return an engine on a watched client of its own."""
    insert_events(db, "u1", EVENTS)
    assert make_engine(db, client, SETTINGS).compress("u1", run_id="r0").status == COMPRESSED
    watch = CursorWatch()
    own: pymongo.MongoClient[Doc] = mongo_service.client(event_listeners=[watch])
    summarizer = Watched(watch)
    return make_engine(own[db.name], client, SETTINGS, summarizer), summarizer, own


def test_a_refold_holds_no_cursor_open_across_its_llm_calls(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine, summarizer, own = watched_engine(mongo_service, mongo_db, redis_client)
    try:
        result = engine.refold("u1", run_id="rf")
    finally:
        own.close()
    assert result.status == REFOLDED and result.events == EVENTS - 5, result
    assert len(summarizer.open_at_calls) == result.chunks > 10
    assert summarizer.open_at_calls == [0] * result.chunks, "a cursor was open during an LLM call"


def test_a_forgets_rebuild_holds_no_cursor_open_across_its_llm_calls(
    mongo_service: MongoService, mongo_db: Database[Doc], redis_client: redis.Redis
) -> None:
    engine, summarizer, own = watched_engine(mongo_service, mongo_db, redis_client)
    try:
        result = forget.forget_events("u1", engine=engine, secret=SECRET, event_ids=["u1-e000"])
    finally:
        own.close()
    assert result.status == forget.FORGOTTEN and result.events_refolded == EVENTS - 6, result
    assert len(summarizer.open_at_calls) > 10
    assert summarizer.open_at_calls == [0] * len(summarizer.open_at_calls), "a cursor was open during an LLM call"
