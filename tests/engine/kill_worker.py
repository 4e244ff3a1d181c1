"""Compress one user in this process and SIGKILL it at a chosen checkpoint (the kill matrix's child).

Usage: ``python tests/engine/kill_worker.py '<json>'`` with keys ``mongo_uri``, ``db``, ``redis_host``,
``redis_port``, ``llm_base_url``, ``user_id``, ``run_id``, ``settings`` (a Settings mapping),
``kill_step`` and ``kill_occurrence`` (1 = the first time the step is reached); optional ``task``:
``compress`` (the default), ``rollback``, ``forget_user`` (then ``secret``, ``events``,
``key_patterns`` and ``shared_keys`` to register, see tests/engine/test_erasure_kill_matrix.py) or
``forget_events`` (then ``secret`` and ``event_ids`` or ``since``/``until``, see
tests/engine/test_forget_kill_matrix.py) or ``batch`` (then ``user_ids``: a batch run's prepare,
submit, collect and commit of those users, ``run_id`` being its run key, see
tests/engine/test_batch_kill_matrix.py). Needs ``plugins/`` on PYTHONPATH. ``task`` ``rollback``
rolls back the run ``rollback`` names instead (``run_id`` names the rollback; ``cascade``
optional). Exits 0 when the step was never reached, so the parent can tell a missed kill from a
real one (a SIGKILL shows as return code -9).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pymongo
import redis

from butler_memory.core.settings import Settings
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer
from butler_memory.operations import erasure, forget
from butler_memory.operations.engine import Engine
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore


def _constant(value: str) -> Callable[[Settings], str]:
    return lambda settings: value


def main(argv: list[str]) -> int:
    """Run the compression described by argv[1]; die by SIGKILL at the chosen checkpoint."""
    config = json.loads(argv[1])
    settings = Settings.from_mapping(config["settings"])
    reached: Counter[str] = Counter()

    def checkpoint(step: str) -> None:
        reached[step] += 1
        print(f"checkpoint {step} #{reached[step]}", file=sys.stderr, flush=True)
        if step == config["kill_step"] and reached[step] == config["kill_occurrence"]:
            os.kill(os.getpid(), signal.SIGKILL)

    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(config["mongo_uri"])
    summarizer = OpenAISummarizer(
        LLMConfig(
            base_url=config["llm_base_url"],
            api_key="test-key",
            model="test-model",
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=0,
        )
    )
    engine = Engine(
        settings,
        MemoryStore(client[config["db"]], settings),
        UserLocks(redis.Redis(host=config["redis_host"], port=config["redis_port"]), settings),
        summarizer,
    )
    with engine:
        if config.get("task", "compress") == "forget_user":
            erasure.USER_KEY_PATTERNS += [_constant(p) for p in config.get("key_patterns", [])]
            erasure.SHARED_REDIS_MEMBERS += [_constant(k) for k in config.get("shared_keys", [])]
            done = erasure.forget_user(
                config["user_id"],
                settings=settings,
                store=engine.store,
                locks=engine.locks,
                secret=config["secret"].encode(),
                events=config.get("events", False),
                checkpoint=checkpoint,
            )
            print(json.dumps(done.to_dict()), flush=True)
            return 0
        if config.get("task") == "forget_events":
            forgotten = forget.forget_events(
                config["user_id"],
                engine=engine,
                secret=config["secret"].encode(),
                event_ids=config.get("event_ids"),
                since=config.get("since"),
                until=config.get("until"),
                checkpoint=checkpoint,
            )
            print(json.dumps(forgotten.to_dict()), flush=True)
            return 0
        if config.get("task") == "batch":
            print(json.dumps(_batch_run(engine, config, checkpoint)), flush=True)
            return 0
        if config.get("task") == "refold":
            result: Any = engine.refold(config["user_id"], run_id=config["run_id"], checkpoint=checkpoint)
        elif config.get("task") == "rollback":
            result = engine.rollback(
                config["user_id"],
                config["rollback"],
                rollback_id=config["run_id"],
                cascade=bool(config.get("cascade")),
                checkpoint=checkpoint,
            )
        else:
            result = engine.compress(config["user_id"], run_id=config["run_id"], checkpoint=checkpoint)
    print(json.dumps(result.to_dict()), flush=True)
    return 0


def _batch_run(engine: Engine, config: dict[str, Any], checkpoint: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run a batch run's steps for ``user_ids`` (the wait is the fake's: its batches end at once)."""
    import openai

    from butler_memory.operations import batch

    run_key, users = config["run_id"], config["user_ids"]
    with openai.OpenAI(base_url=config["llm_base_url"], api_key="test-key", max_retries=0) as client:
        batch.prepare(engine, run_key, users, checkpoint=checkpoint)
        batch.submit(engine, run_key, client, checkpoint=checkpoint)
        batch.collect(engine, run_key, client, checkpoint=checkpoint)
        return [batch.commit_user(engine, u, run_key=run_key, checkpoint=checkpoint).to_dict() for u in users]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
