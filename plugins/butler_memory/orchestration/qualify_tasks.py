"""Body of the memory_qualify DAG's task: params in, the qualification, a content-free XCom out."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from butler_memory.operations import qualify
from butler_memory.orchestration.connections import build_summarizer, resolve_settings
from butler_memory.orchestration.params import QUALIFY
from butler_memory.orchestration.task_outcome import fail, params_checked, settings_checked

log = logging.getLogger(__name__)


def run(params: Mapping[str, Any]) -> dict[str, Any]:
    """Qualify the configured summariser; fail the task (no retry) when it fails or cannot be reached."""
    params_checked(params, QUALIFY)
    with settings_checked():
        thresholds = qualify.Thresholds.from_mapping(params)
        settings = resolve_settings({})
        summarizer = build_summarizer(settings)
    try:
        report = qualify.qualify(settings, summarizer, thresholds, endpoint=qualify.endpoint_name(settings, summarizer))
    except qualify.EndpointError as exc:
        raise fail(str(exc)) from None
    finally:
        summarizer.close()
    log.info("qualification report\n%s", qualify.to_markdown(report))
    if report["verdict"] != qualify.PASS:
        raise fail(f"the summariser does not qualify: {'; '.join(report['reasons'])}")
    return report
