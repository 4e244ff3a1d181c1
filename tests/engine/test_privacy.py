"""Privacy canary: conversation content never reaches logs, results, reports, errors or metrics.

It may (and must) reach the LLM request and the summary stored in MongoDB; nothing else.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from butler_memory.core.errors import CompressionError
from butler_memory.fold import metrics as m
from butler_memory.fold.compression import failed_result
from butler_memory.fold.report import build_report, emit_run_metrics, to_markdown
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.operations.engine import Engine
from tests.engine.conftest import Rig
from tests.engine.helpers import Doc, insert_events, profile_of, small_settings
from tools.fake_openai import error_body

CANARY = f"CANARY-{uuid.uuid4().hex}"


def secret(user_id: str, i: int) -> str:
    """Return event content carrying the canary inside sentences the offline summariser keeps."""
    return f"Меня зовут Анна, мой код {CANARY}. My daughter's name is Mia, born 12 March ({i})."


def canary_responder(request: Doc) -> str:
    """Answer with a summary that repeats the canary (as a real summary of the content would)."""
    return f"- Пользователь Анна, код {CANARY}."


def test_content_stays_out_of_logs_results_reports_errors_and_metrics(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, third-party clients included
    mongo_db, llm = rig.db, rig.llm
    settings = small_settings()
    with_llm = rig.engine(settings)
    offline = rig.engine(settings, OfflineSummarizer())
    llm.set_responder(canary_responder)
    started = datetime.now(UTC)
    results: list[Doc] = []
    errors: list[CompressionError] = []

    def run(engine: Engine, user_id: str, prepare: Callable[[], None] | None = None) -> None:
        insert_events(mongo_db, user_id, 14, content=secret)
        if prepare is not None:
            prepare()
        try:
            results.append(engine.compress(user_id, run_id="privacy").to_dict())
        except CompressionError as exc:
            errors.append(exc)
            results.append(failed_result(user_id, exc).to_dict())

    run(with_llm, "u-openai")
    run(offline, "u-offline")
    body = error_body(400, f"Invalid content near '{CANARY}'")
    run(with_llm, "u-http-400", lambda: llm.push_status(400, body))
    run(with_llm, "u-refusal", lambda: llm.push_reply(f"I'm sorry, I can't summarise {CANARY}."))
    run(with_llm, "u-over-long", lambda: llm.push_reply(f"- {CANARY}." * 100))
    run(with_llm, "u-placeholder", lambda: llm.push_reply("N/A"))
    huge = {"$set": {"content": f"{CANARY} " * (settings.max_event_chars // 20)}}
    run(with_llm, "u-huge-event", lambda: mongo_db["user_memory"].update_one({"_id": "u-huge-event-e001"}, huge))
    report = build_report(
        run_id="privacy",
        scanned=[r["user_id"] for r in results],
        results=results,
        started_at=started,
        finished_at=datetime.now(UTC),
        backlog={r["user_id"]: 14 for r in results},
    )
    emit_run_metrics(report, rig.metrics)
    lines = rig.statsd.wait_for(lambda ls: any(line.startswith(m.RUNS_TOTAL) for line in ls))

    # The canary did flow where it belongs, so its absence elsewhere means something.
    assert [type(e).__name__ for e in errors] == ["LLMPermanentError"] + ["InvalidSummaryError"] * 3, errors
    assert results[-1]["events_quarantined"] == 1, "the huge event is quarantined (its content kept there only)"
    assert all(CANARY in json.dumps(r, ensure_ascii=False) for r in llm.chat_requests), "the LLM must see content"
    assert CANARY in profile_of(mongo_db, "u-openai")["memory_summary"]
    assert CANARY in profile_of(mongo_db, "u-offline")["memory_summary"]
    assert caplog.records, "nothing was logged at DEBUG: the capture is not working"
    places = {
        "log text": caplog.text,
        "log records": "\n".join(repr(vars(record)) for record in caplog.records),
        "results": json.dumps(results, ensure_ascii=False),
        "report": json.dumps(report, default=str, ensure_ascii=False),
        "markdown": to_markdown(report),
        "errors": "\n".join(f"{e}\n{e!r}\n{''.join(traceback.format_exception(e))}" for e in errors),
        "statsd": "\n".join(lines),
    }
    leaked = [place for place, text in places.items() if CANARY in text]
    assert not leaked, f"conversation content leaked into: {', '.join(leaked)}"
