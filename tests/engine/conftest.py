"""Fixtures of the engine tests: summarisers and a StatsD client that are closed after each test,
and the rig: the real services of one test and engines built on them."""

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
from tools.fake_openai import FakeOpenAI
from tools.services import StatsdSink

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
