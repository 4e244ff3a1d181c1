"""Fixtures of the engine tests: summarisers and a StatsD client that are closed after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from butler_memory.fold.metrics import StatsdConfig, StatsdMetrics
from butler_memory.llm.openai_summarizer import OpenAISummarizer
from tests.engine.helpers import openai_summarizer
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
