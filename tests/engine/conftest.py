"""Fixtures of the engine tests: summarisers and a StatsD client that are closed after each test,
the rig: the real services of one test and engines built on them, and the kill matrices' rig."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.fold.metrics import StatsdConfig, StatsdMetrics
from butler_memory.llm.openai_summarizer import OpenAISummarizer
from butler_memory.llm.summarizer import Summarizer
from butler_memory.operations.engine import Engine
from tests.engine.helpers import Doc, make_engine, openai_summarizer
from tests.engine.kill_harness import Kill, run_kill_worker, wait_for_lock_expiry
from tools.fake_openai import FakeOpenAI
from tools.services import MongoService, RedisService, StatsdSink

OpenAIFactory = Callable[..., OpenAISummarizer]


@pytest.fixture
def make_openai(llm: FakeOpenAI) -> Iterator[OpenAIFactory]:
    """Return a factory of OpenAISummarizers on the fake server; each is closed after the test."""
    made: list[OpenAISummarizer] = []

    def factory(*, max_retries: int = 0, timeout: float = 2.0, **config: Any) -> OpenAISummarizer:
        summarizer = openai_summarizer(llm.base_url, max_retries=max_retries, timeout=timeout, **config)
        made.append(summarizer)
        return summarizer

    yield factory
    for summarizer in made:
        summarizer.close()


@pytest.fixture
def statsd_metrics(statsd: StatsdSink) -> Iterator[StatsdMetrics]:
    """Return a StatsD client sending to the test's sink."""
    metrics = StatsdMetrics(StatsdConfig(statsd.host, statsd.port))
    yield metrics
    metrics.close()


@dataclass(frozen=True)
class Rig:
    """The real services of one engine test, each flushed for it: MongoDB, Redis, the fake OpenAI
    server and the StatsD sink, with a StatsD client sending to the sink."""

    db: Database[Doc]
    redis: redis.Redis
    llm: FakeOpenAI
    statsd: StatsdSink
    metrics: StatsdMetrics
    make_openai: OpenAIFactory

    def engine(self, settings: Settings, summarizer: Summarizer | None = None, **openai: Any) -> Engine:
        """Build an engine on the rig, sending its metrics to the sink; its summariser is the one given,
        else an OpenAISummarizer on the fake server (``openai``: its options, e.g. max_retries, timeout)."""
        return make_engine(self.db, self.redis, settings, summarizer or self.make_openai(**openai), self.metrics)


@pytest.fixture
def rig(
    mongo_db: Database[Doc],
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    statsd: StatsdSink,
    statsd_metrics: StatsdMetrics,
    make_openai: OpenAIFactory,
) -> Rig:
    """Return the test's rig (see ``Rig``)."""
    return Rig(mongo_db, redis_client, llm, statsd, statsd_metrics, make_openai)


@dataclass(frozen=True)
class KillRig(Rig):
    """The rig of a kill-matrix case: also the servers' addresses, for its child (kill_worker.py)."""

    mongo_service: MongoService
    redis_service: RedisService

    def kill(self, kill: Kill, settings: Settings, user_id: str, **task: Any) -> None:
        """Run one operation on the user in a child that SIGKILLs itself at ``kill``, and check that it died so
        (``task``: its name and keys, see kill_worker.py; a compression by default)."""
        config = {
            "mongo_uri": self.mongo_service.uri,
            "db": self.db.name,
            "redis_host": self.redis_service.host,
            "redis_port": self.redis_service.port,
            "llm_base_url": self.llm.base_url,
            "user_id": user_id,
            "run_id": f"killed-at-{kill[0]}-{kill[1]}",
            "settings": settings.as_dict(),
            **task,
        }
        child = run_kill_worker(config, kill)
        assert child.returncode == -9, (
            f"the child should have died by SIGKILL at {kill}, exited {child.returncode}:\n{child.stderr[-3000:]}"
        )

    def wait_for_lock_expiry(self, settings: Settings, user_id: str) -> None:
        """Wait until the dead child's lock on the user expires by its TTL."""
        wait_for_lock_expiry(self.redis, settings.lock_key(user_id), settings.lock_ttl_seconds)


@pytest.fixture
def kill_rig(rig: Rig, mongo_service: MongoService, redis_service: RedisService) -> KillRig:
    """Return the test's rig with the servers' addresses (see ``KillRig``)."""
    return KillRig(**vars(rig), mongo_service=mongo_service, redis_service=redis_service)
