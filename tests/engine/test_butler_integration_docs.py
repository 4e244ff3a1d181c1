"""The examples of docs/butler-integration.md run, in order, against the suite's real services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.database import Database

from butler_memory.core.settings import ENV_PREFIX, Settings
from butler_memory.fold.compression import COMPRESSED
from tests.engine.helpers import insert_events, profile_of
from tools.fake_openai import FakeOpenAI
from tools.services import MongoService, RedisService

Doc = dict[str, Any]
PAGE = Path(__file__).resolve().parents[2] / "docs" / "butler-integration.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SETTINGS = {"threshold": "10", "keep_last_n": "3", "summary_language": "en"}


def examples() -> list[str]:
    """Return the page's python blocks, in order."""
    return BLOCK.findall(PAGE.read_text(encoding="utf-8"))


def test_the_page_has_its_examples() -> None:
    assert len(examples()) == 4, "a python block was added or lost: update this test's checks"


def test_the_examples_run(
    monkeypatch: pytest.MonkeyPatch,
    mongo_service: MongoService,
    mongo_db: Database[Doc],
    redis_service: RedisService,
    redis_client: redis.Redis,
    llm: FakeOpenAI,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {
        "MONGO_URI": mongo_service.uri,
        "BUTLER_DB": mongo_db.name,
        "REDIS_URL": redis_service.url,
        "OPENAI_BASE_URL": llm.base_url,
        "OPENAI_API_KEY": "test-key",
        **{f"{ENV_PREFIX}{name.upper()}": value for name, value in SETTINGS.items()},
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    insert_events(mongo_db, "alice", 12)
    read, ring, inline, without_redis = examples()

    def run(code: str, index: int) -> None:
        exec(compile(code, f"{PAGE.name} example {index}", "exec"), {"__name__": "__main__"})  # noqa: S102

    run(read, 1)
    assert capsys.readouterr().out == "v0: a summary of 0 characters and 12 events\n"
    run(ring, 2)
    assert mongo_db["user_memory"].count_documents({"user_id": "alice"}) == 13
    assert redis_client.zscore(settings.doorbell_key, "alice") is not None, "13 events, threshold 10: recorded"
    run(inline, 3)
    status, folded, version = capsys.readouterr().out.split()
    assert (status, int(folded), int(version)) == (COMPRESSED, 10, 1)
    assert profile_of(mongo_db, "alice")["memory_summary"].startswith("Brief summary")
    assert len(llm.chat_requests) == 1
    run(without_redis, 4)
