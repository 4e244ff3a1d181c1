"""Kill matrix: SIGKILL a compression at every step boundary, re-run, and compare with a clean run.

Each case runs ``compress_user`` in a child process (``kill_worker.py``) that kills itself with
SIGKILL at a checkpoint, so nothing after the kill runs: no ``finally``, no lock release. The data:
20 events, keep 5, chunks of 5, so a clean run folds three chunks (versions 1, 2, 3). The fake LLM
answers with a ledger (the previous summary plus the ids of the events it was shown), so the final
summary lists every event each committed fold covered: a lost or twice-summarised event shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pymongo
import pytest
from pymongo.database import Database

from butler_memory.fold.compression import COMPRESSED, SKIPPED_BELOW_THRESHOLD, SKIPPED_LOCKED, STEPS
from butler_memory.storage.archive import ARCHIVE_FIELDS
from butler_memory.storage.profiles import PENDING_FIELD
from tests.engine.conftest import KillRig
from tests.engine.helpers import (
    Doc,
    chain_responder,
    history_of,
    insert_events,
    ledger,
    make_engine,
    openai_summarizer,
    profile_of,
    small_settings,
    snapshot,
    summary_version,
    texts_seen,
    watermark,
)
from tests.engine.kill_harness import Kill
from tools.fake_openai import FakeOpenAI
from tools.services import RedisService

USER = "u1"
EVENTS, KEEP, CHUNK = 20, 5, 5
CHUNKS = (EVENTS - KEEP) // CHUNK
# A short lock TTL so a killed run's lock expires within the test; the LLM timeout must stay under half.
SETTINGS = small_settings(
    threshold=10, keep_last_n=KEEP, max_events_per_chunk=CHUNK, lock_ttl_seconds=1, llm_timeout_seconds=0.45
)
BOOKKEEPING = ARCHIVE_FIELDS  # our fields on an archived event

CASES: dict[str, list[Kill]] = {
    # A normal run killed at each step; chunk steps in the first and the second chunk.
    **{step: [(step, 1)] for step in ("locked", "selected")},
    **{f"{step}-{n}": [(step, n)] for step in ("summarized", "recorded", "committed", "archived") for n in (1, 2)},
    **{f"{step}-{n}": [(step, n)] for step, n in (("deleted", 2), ("cleared", 2), ("deleted", 3))},
    # A recovery run (finishing the pending fold of chunk 2) killed at its own steps.
    **{f"recovery-{step}": [("committed", 2), (step, 1)] for step in ("locked", "pending_archived", "pending_deleted")},
    **{f"recovery-{step}": [("archived", 1), (step, 1)] for step in ("summarized", "recorded")},
}


QUARANTINE_CASES: dict[str, list[Kill]] = {
    # A run moving a bad event (in the second chunk's range) to the quarantine, killed mid-move.
    "quarantined": [("quarantined", 1)],
    "quarantine_removed": [("quarantine_removed", 1)],
}
BAD = "u1-e007"


def test_the_matrix_covers_every_step() -> None:
    killed = {step for kills in [*CASES.values(), *QUARANTINE_CASES.values()] for step, _ in kills}
    assert killed == set(STEPS), f"steps without a kill case: {set(STEPS) - killed}; unknown: {killed - set(STEPS)}"


def ids(events: list[Doc]) -> list[str]:
    """Return the ``_id``s of events."""
    return [ev["_id"] for ev in events]


def expected_after_kill(kill: Kill, version_before: int, pending_before: bool) -> tuple[int, bool]:
    """Return the summary version and whether a pending fold exists right after a kill at ``kill``."""
    step, n = kill
    if step == "locked":
        return version_before, pending_before
    if step in ("selected", "summarized", "recorded"):
        return version_before + n - 1, False
    if step in ("committed", "archived", "deleted"):
        return version_before + n, True
    if step == "cleared":
        return version_before + n, False
    return version_before, True  # pending_archived / pending_deleted: the pending fold is not cleared yet


def _comparable(entry: Doc) -> Doc:
    """Return a history entry without what differs between runs (run id and times)."""
    return {k: v for k, v in entry.items() if k not in ("run_id", "created_at")}


def check_history(db: Database[Doc], profile: Doc, archive: dict[str, Doc], clean: list[Doc]) -> None:
    """Exactly one entry per committed version, each covering exactly the events archived with it."""
    history = history_of(db, USER)
    assert [e["version"] for e in history] == list(range(1, profile["memory_summary_version"] + 1)), (
        f"history versions {[e['version'] for e in history]} differ from the committed ones"
    )
    assert history[-1]["text"] == profile["memory_summary"], "the current version's history text differs"
    for entry in history:
        assert entry["kind"] == "fold" and entry["base_version"] == entry["version"] - 1, entry["version"]
        covered = sorted((d["created_at"], i) for i, d in archive.items() if d["summary_version"] == entry["version"])
        covers = entry["covers"]
        assert covers["count"] == len(covered), f"v{entry['version']} covers {covers['count']}, archived {covered}"
        assert (covers["first"]["created_at"], covers["first"]["event_id"]) == covered[0]
        assert (covers["last"]["created_at"], covers["last"]["event_id"]) == covered[-1]
    assert [_comparable(e) for e in history] == clean, "the history differs from a clean run's"


@pytest.fixture(scope="module")
def clean_run(
    mongo_client: pymongo.MongoClient[Doc], redis_service: RedisService, fake_llm: FakeOpenAI
) -> Iterator[Doc]:
    """Return the final state of one uninterrupted run on the same data."""
    db = mongo_client["kill_matrix_clean_run"]
    client = redis_service.client()
    summarizer = openai_summarizer(fake_llm.base_url, timeout=SETTINGS.llm_timeout_seconds)
    fake_llm.reset()
    fake_llm.set_responder(chain_responder)
    try:
        insert_events(db, USER, EVENTS)
        result = make_engine(db, client, SETTINGS, summarizer).compress(USER)
        assert result.status == COMPRESSED and result.chunks == CHUNKS, result
        state = snapshot(db, USER)
        yield {
            "remaining": sorted(state["events"]),
            "archive": {i: doc["summary_version"] for i, doc in state["archive"].items()},
            "version": summary_version(db, USER),
            "summary": state["profile"]["memory_summary"],
            "requests": len(fake_llm.chat_requests),
            "history": [_comparable(entry) for entry in state["history"]],
        }
    finally:
        fake_llm.reset()
        summarizer.close()
        client.close()
        mongo_client.drop_database(db.name)


@pytest.mark.parametrize("kills", list(CASES.values()), ids=list(CASES))
def test_kill_then_rerun_ends_like_a_clean_run(kills: list[Kill], clean_run: Doc, kill_rig: KillRig) -> None:
    mongo_db, llm = kill_rig.db, kill_rig.llm
    llm.set_responder(chain_responder)
    original = insert_events(mongo_db, USER, EVENTS)
    by_id = {ev["_id"]: ev for ev in original}
    folded, kept = original[: EVENTS - KEEP], original[EVENTS - KEEP :]
    engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)

    resummarised: list[Doc] = []
    for kill in kills:
        version_before = summary_version(mongo_db, USER)
        pending_before = (profile_of(mongo_db, USER) or {}).get(PENDING_FIELD) is not None
        if kill[0] in ("summarized", "recorded"):
            # Chunks fold oldest first, CHUNK events each: the killed call was showing chunk v + n.
            start = (version_before + kill[1] - 1) * CHUNK
            resummarised += folded[start : start + CHUNK]
        kill_rig.kill(kill, SETTINGS, USER)
        version, pending = expected_after_kill(kill, version_before, pending_before)
        profile = profile_of(mongo_db, USER) or {}
        assert summary_version(mongo_db, USER) == version, f"after a kill at {kill}: {profile}"
        assert (profile.get(PENDING_FIELD) is not None) == pending, f"after a kill at {kill}: {profile}"
        # The dead process's lock still blocks everyone until its TTL runs out.
        before = snapshot(mongo_db, USER)
        assert engine.compress(USER).status == SKIPPED_LOCKED, f"the lock of a run killed at {kill} did not block"
        assert snapshot(mongo_db, USER) == before, "a run blocked by the lock changed the database"
        kill_rig.wait_for_lock_expiry(SETTINGS, USER)

    result = engine.compress(USER, run_id="rerun")

    assert result.status in (COMPRESSED, SKIPPED_BELOW_THRESHOLD), result
    state = snapshot(mongo_db, USER)
    remaining, archive, profile = state["events"], state["archive"], state["profile"]
    assert profile is not None and profile[PENDING_FIELD] is None, f"a pending fold was left behind: {profile}"
    # No event lost: each is still in user_memory or archived (unchanged) and covered by the watermark.
    assert sorted(remaining) == ids(kept), "exactly the newest events must remain"
    for event_id in remaining:
        assert remaining[event_id] == by_id[event_id], f"kept event {event_id} was modified"
    assert sorted(archive) == ids(folded), "exactly the folded events must be archived"
    mark = watermark(mongo_db, USER)
    assert mark is not None
    for event_id, doc in archive.items():
        assert {k: v for k, v in doc.items() if k not in BOOKKEEPING} == by_id[event_id], f"{event_id} changed"
        assert (doc["created_at"], event_id) <= mark, f"archived {event_id} is past the watermark {mark}"
    assert all((ev["created_at"], ev["_id"]) > mark for ev in kept), "a kept event is under the watermark"
    # Summarised exactly once: the ledger lists each folded event once, in order.
    assert ledger(profile["memory_summary"]) == ids(folded), "an event was lost from, or repeated in, the summary"
    # The LLM saw each folded event once, except a chunk whose summary died before its commit.
    seen = Counter(texts_seen(llm.chat_requests))
    expected = Counter(ev["content"] for ev in folded)
    expected.update(ev["content"] for ev in resummarised)
    assert seen == expected, f"LLM calls per event differ from one per commit: {dict(seen - expected)}"
    assert not {ev["content"] for ev in kept} & set(seen), "a kept event reached the LLM"
    # Same final state as the clean run.
    assert sorted(remaining) == clean_run["remaining"]
    assert {i: doc["summary_version"] for i, doc in archive.items()} == clean_run["archive"], (
        "events were folded into different chunks or versions than in a clean run"
    )
    assert profile["memory_summary_version"] == clean_run["version"] == CHUNKS
    assert profile["memory_summary"] == clean_run["summary"]
    check_history(mongo_db, profile, archive, clean_run["history"])


@pytest.mark.parametrize("kills", list(QUARANTINE_CASES.values()), ids=list(QUARANTINE_CASES))
def test_kill_while_quarantining_then_rerun_moves_the_bad_event_once_and_folds_the_rest(
    kills: list[Kill], kill_rig: KillRig
) -> None:
    mongo_db = kill_rig.db
    kill_rig.llm.set_responder(chain_responder)
    original = insert_events(mongo_db, USER, EVENTS)
    mongo_db["user_memory"].update_one({"_id": BAD}, {"$set": {"content": {"not": "text"}}})
    bad = mongo_db["user_memory"].find_one({"_id": BAD})
    folded = [ev for ev in original[: EVENTS - KEEP] if ev["_id"] != BAD]
    kept = original[EVENTS - KEEP :]
    engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)

    for kill in kills:
        kill_rig.kill(kill, SETTINGS, USER)
        assert mongo_db["user_memory_quarantine"].count_documents({"_id": BAD}) == 1, "copied before the delete"
        kill_rig.wait_for_lock_expiry(SETTINGS, USER)

    result = engine.compress(USER, run_id="rerun")

    assert result.status == COMPRESSED, result
    state = snapshot(mongo_db, USER)
    assert sorted(state["events"]) == ids(kept), "exactly the newest events must remain"
    (record,) = mongo_db["user_memory_quarantine"].find({"user_id": USER})
    assert record["_id"] == BAD and record["event"] == bad and record["field"] == "content", record
    archive = state["archive"]
    assert sorted(archive) == ids(folded), "every other folded event is archived, the bad one is not"
    profile = state["profile"]
    assert profile is not None and profile[PENDING_FIELD] is None
    assert ledger(profile["memory_summary"]) == ids(folded), "an event was lost from, or repeated in, the summary"
