"""Consistency, proven: another process reads ``memory(user_id)`` in a tight loop while the user is
compressed, killed mid-way and re-run (an event arriving during the re-run, timed before every
other), rolled back (killed, re-run), re-folded and forgotten (killed, re-run). Every read must hold each live event exactly once, in the summary or in the raw
list; a forgotten event never once the forget returned.

The fake LLM answers with a ledger (``chain_responder``), so a summary's words are the ids of the
events it covers. The kills come from ``kill_worker.py`` (SIGKILL at a checkpoint); after each, the
test waits for the reader to read the state the kill left several times before it goes on, and
the re-runs (in this process) wait at each of their checkpoints for the reader to read that state.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from pymongo.database import Database

from butler_memory.operations import forget
from butler_memory.storage.profiles import FORGET_FIELD, PENDING_FIELD, ROLLBACK_FIELD
from tests.children import start_child
from tests.engine.conftest import KillRig
from tests.engine.erasure_helpers import SECRET
from tests.engine.helpers import START, chain_responder, insert_events, profile_of
from tests.engine.test_kill_matrix import SETTINGS, USER
from tools.services import MongoService

Doc = dict[str, Any]
READER = Path(__file__).with_name("client_reader.py")
ALL = {f"{USER}-e{i:03d}" for i in range(36)}
ARRIVING = f"{USER}-e036"
"""Written during a compression, timed before everything: in every read that starts after it was written."""
FORGOTTEN = {f"{USER}-e002", f"{USER}-e035"}
"""One folded into the summary long ago (archived), one still raw."""
READS_PER_STATE = 15
READS_PER_STEP = 2
"""Reads at each step boundary of a re-run (few: the lock's TTL is 1 s and is extended only at the LLM call)."""


class Reader:
    """The reading process and its output."""

    def __init__(self, tmp_path: Path, mongo_service: MongoService, db: Database[Doc]) -> None:
        self.out, self.stop = tmp_path / "reads.jsonl", tmp_path / "stop"
        self.arrived, self.forgot = tmp_path / "arrived", tmp_path / "forgot"
        self.out.touch()
        config = {
            "mongo_uri": mongo_service.uri,
            "db": db.name,
            "user_id": USER,
            "settings": SETTINGS.as_dict(),
            "out": str(self.out),
            "stop": str(self.stop),
            "arrived": str(self.arrived),
            "forgot": str(self.forgot),
        }
        self.process = start_child(READER, config)

    def count(self) -> int:
        """Return how many reads are done."""
        return self.out.read_bytes().count(b"\n")

    def wait(self, n: int = READS_PER_STATE) -> None:
        """Wait until the reader finished ``n`` more reads (it reads the state the test left meanwhile)."""
        target = self.count() + n
        deadline = time.monotonic() + 120
        while self.count() < target:
            assert self.process.poll() is None, f"the reader died with {self.process.returncode}"
            assert time.monotonic() < deadline, "the reader stopped reading"
            time.sleep(0.01)

    def step(self, name: str) -> None:
        """A checkpoint of the in-process operations: let the reader read each intermediate state."""
        self.wait(READS_PER_STEP)

    def finish(self) -> list[Doc]:
        """Stop the reader and return its reads."""
        self.stop.touch()
        assert self.process.wait(timeout=60) == 0
        return [json.loads(line) for line in self.out.read_text(encoding="utf-8").splitlines()]


def kill(rig: KillRig, step: str, occurrence: int, **extra: Any) -> None:
    """Run an operation in a child that SIGKILLs itself at ``step``; wait for its lock to expire."""
    rig.kill((step, occurrence), SETTINGS, USER, **extra)
    rig.wait_for_lock_expiry(SETTINGS, USER)


def check(read: Doc) -> None:
    """Every live event once; a forgotten one never after the forget returned."""
    assert "error" not in read, read
    summarised, raw = read["summary"], read["raw"]
    both = set(summarised) & set(raw)
    assert not both, f"v{read['version']}: in the summary and the raw list: {sorted(both)}"
    assert len(set(summarised)) == len(summarised) and len(set(raw)) == len(raw), f"listed twice: {read}"
    seen = set(summarised) | set(raw)
    live = ALL | ({ARRIVING} if read["arrived"] else set())
    missing = live - FORGOTTEN - seen
    assert not missing, f"v{read['version']}: in neither the summary nor the raw list: {sorted(missing)}"
    assert seen <= ALL | {ARRIVING}, f"unknown ids: {sorted(seen - ALL - {ARRIVING})}"
    if read["forgot"]:
        assert not seen & FORGOTTEN, f"v{read['version']}: forgotten yet returned: {sorted(seen & FORGOTTEN)}"


def test_every_read_sees_each_live_event_exactly_once(tmp_path: Path, kill_rig: KillRig) -> None:
    mongo_db = kill_rig.db
    kill_rig.llm.set_responder(chain_responder)
    engine = kill_rig.engine(SETTINGS, timeout=SETTINGS.llm_timeout_seconds)
    insert_events(mongo_db, USER, 20)
    assert engine.compress(USER, run_id="r0").summary_version == 3
    # A late write timed before the watermark, then 15 new events.
    insert_events(mongo_db, USER, 1, first=20, start=START - timedelta(days=1))
    insert_events(mongo_db, USER, 15, first=21, start=START + timedelta(days=1))
    reader = Reader(tmp_path, kill_rig.mongo_service, mongo_db)
    try:
        reader.wait()
        # Compressed, killed after its second commit (v5 committed, its events not deleted), re-run.
        kill(kill_rig, "committed", 2)
        assert profile_of(mongo_db, USER)[PENDING_FIELD]["version"] == 5
        reader.wait()

        def arrive(step: str) -> None:
            reader.step(step)
            if step == "summarized" and not reader.arrived.exists():  # mid-compression, an old timestamp
                insert_events(mongo_db, USER, 1, first=36, start=START - timedelta(days=2))
                reader.arrived.touch()

        assert engine.compress(USER, run_id="r1", checkpoint=arrive).summary_version == 7
        reader.wait()
        # Rolled back, killed with the events back in user_memory and the summary not yet restored, re-run.
        kill(kill_rig, "restored", 1, task="rollback", rollback="r1")
        assert profile_of(mongo_db, USER)[ROLLBACK_FIELD]["expected_version"] == 7
        reader.wait()
        assert engine.rollback(USER, "r1", rollback_id="undo-r1", checkpoint=reader.step).to_version == 8
        reader.wait()
        assert engine.refold(USER, run_id="refold", checkpoint=reader.step).to_version == 9
        reader.wait()
        # Forgotten, killed with the events deleted and the summary not yet rebuilt, re-run.
        ids = sorted(FORGOTTEN)
        kill(kill_rig, "deleted", 1, task="forget_events", secret=SECRET.decode(), event_ids=ids)
        assert profile_of(mongo_db, USER)[FORGET_FIELD] is not None
        reader.wait()
        done = forget.forget_events(USER, engine=engine, secret=SECRET, event_ids=ids, checkpoint=reader.step)
        assert done.status == forget.FORGOTTEN
        reader.forgot.touch()
        reader.wait()
    finally:
        reads = reader.finish()
    for read in reads:
        check(read)
    versions = {read["version"] for read in reads}
    assert {3, 5, 7, 8, 9, 10} <= versions, f"the reader should have read every state, read {sorted(versions)}"
    assert sum(read["forgot"] for read in reads) >= READS_PER_STATE
    assert any(read["arrived"] and ARRIVING in read["raw"] for read in reads), "the arrival was read"
    assert any(set(FORGOTTEN) & set(read["summary"] + read["raw"]) for read in reads), "before the forget"
