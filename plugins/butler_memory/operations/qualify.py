"""Qualify a model before trusting it: ``python -m butler_memory qualify`` and the memory_qualify DAG.

A fixed, built-in set of synthetic users (``qualify_cases``: planted facts in Russian, English,
German and Spanish; short and long histories; corrections) goes through the real engine path, chunk by chunk:
``chunks.pack_chunks`` cuts the history as for a real user, ``rebuild.propose_summary``
builds the real prompt, calls the configured summariser and runs validation and the guards. The
result says what a compression would have committed, and nothing is written anywhere: no MongoDB,
no Redis, no metrics. Only ids, counts, sizes, durations and language codes are reported.

Per user: facts kept (the planted facts found in the last summary, by the fact guard's own
normalisation: stems, dates, numbers, phones), corrections applied (facts an event corrected that
are gone), language kept, guard outcomes, a false alarm (a guard rejected or warned about a reply
that kept every fact due and is in the user's language), cut-off and truncated replies, latency
and tokens. The verdict compares the totals with ``Thresholds``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from butler_memory.core.errors import (
    GuardRejected,
    InvalidSummaryError,
    LLMError,
    LLMPromptTooLongError,
    LLMPromptTruncatedError,
    LLMReplyCutOffError,
)
from butler_memory.core.settings import Settings, SettingsError
from butler_memory.core.units import duration
from butler_memory.fold.chunks import pack_chunks
from butler_memory.fold.rebuild import Folding, propose_summary, summarizer_identity
from butler_memory.llm.budget import Spent
from butler_memory.llm.summarizer import EventText, Summarizer, Summary
from butler_memory.operations.qualify_cases import CASES, Case
from butler_memory.safety import guards
from butler_memory.safety.facts import Fact, mentioned
from butler_memory.safety.language import language_share

log = logging.getLogger(__name__)

PASS, FAIL = "pass", "fail"

# A user's outcome: what a compression would have done with the replies.
ACCEPTED = "accepted"
REJECTED = "rejected"
"""A guard rejected a reply: a compression would fail the user (nothing committed)."""
CUT_OFF = "cut_off"
TRUNCATED = "truncated"
TOO_LONG = "too_long"
INVALID = "invalid"
"""Validation refused the reply (empty, oversized, a refusal, a placeholder)."""


class EndpointError(Exception):
    """The LLM endpoint could not be used at all (unreachable, not OpenAI-compatible, refusing the key).

    The message names the connection and the error type; never a prompt or a reply.
    """


@dataclass(frozen=True)
class Thresholds:
    """What a model must reach to pass; every figure is reported whatever the verdict."""

    min_fact_retention: float = 0.95
    """Share of all planted facts found in the users' last summaries."""
    min_language_kept: float = 1.0
    """Share of the users whose last summary is in their language (the language guard's measure)."""
    max_failed_users: int = 0
    """Users a compression would fail: a guard rejected, or the reply was cut off, truncated or invalid."""
    max_false_alarms: int = 0
    """Users a guard rejected or warned about although their reply kept every fact and the language."""
    max_latency_seconds: float = 30.0
    """The 95th percentile of one LLM call's latency."""

    def __post_init__(self) -> None:
        for name in ("min_fact_retention", "min_language_kept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise SettingsError(f"{name} must be a share between 0 and 1, got {value!r}")
        for name in ("max_failed_users", "max_false_alarms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"{name} must be a whole number >= 0, got {value!r}")
        value = self.max_latency_seconds
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise SettingsError(f"max_latency_seconds must be a positive number, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Thresholds:
        """Build thresholds from the given (non-null) values; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown threshold(s): {', '.join(unknown)}")
        return cls(**{name: value for name, value in values.items() if value is not None})


@dataclass
class CaseResult:
    """What the summariser did with one synthetic user: counts and outcomes only, no text."""

    user_id: str
    language: str
    about: str
    events: int
    status: str = ACCEPTED
    chunks: int = 0
    """Replies the engine accepted (one per prompt)."""
    llm_calls: int = 0
    facts: int = 0
    facts_kept: int = 0
    stale: int = 0
    corrections_applied: int = 0
    language_kept: bool | None = None
    """Whether the last summary is in the user's language; None when there was no reply to judge."""
    guards: dict[str, str] = field(default_factory=dict)
    false_alarm: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds of each LLM call that returned a reply."""
    seconds: float = 0.0
    error_type: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (fit for XCom)."""
        return asdict(self)


def _facts(text: str) -> set[Fact]:
    return mentioned(text)


def kept(fact: str, text: str) -> bool:
    """Return whether ``text`` mentions ``fact``, normalised as the fact guard does (stems, dates,
    numbers, phones)."""
    return _facts(fact) <= _facts(text)


def run_case(case: Case, settings: Settings, summarizer: Summarizer) -> CaseResult:
    """Fold one synthetic user's history chunk by chunk through the engine's own path; write nothing.

    An LLM error that is not about the reply (unreachable, HTTP errors, a malformed response) is
    raised: it says nothing about the model.
    """
    result = CaseResult(case.user_id, case.language, case.about, len(case.turns))
    started = time.monotonic()
    summary = case.previous
    read: list[str] = [case.previous]
    last: str | None = case.previous or None

    spent = Spent()  # every token, a refused reply's too (no budget: qualifying spends none of the day's)
    parts = Folding(settings, summarizer)  # no metrics: a qualification is not the job's traffic

    def on_reply(reply: Summary) -> None:
        nonlocal last
        last = reply.text
        result.latencies.append(round(reply.seconds, 3))

    try:
        # Late binding on purpose: each chunk's budget is taken with the summary it folds into.
        chunks = pack_chunks(case.user_id, case.events(), settings, summarizer, case.language, lambda: summary)
        for chunk in chunks:
            events = [EventText(ev["role"], ev["content"], ev["created_at"]) for ev in chunk]
            read.extend(ev.content for ev in events)
            result.llm_calls += 1
            summary, _ = propose_summary(
                parts, case.user_id, summary, events, case.language, worst=result.guards, spent=spent, on_reply=on_reply
            )
            last = summary
            result.chunks += 1
    except (GuardRejected, InvalidSummaryError, LLMReplyCutOffError, LLMPromptTruncatedError) as exc:
        result.status = _STATUS[type(exc)]
        result.error_type, result.error = type(exc).__name__, str(exc)
        if isinstance(exc, LLMReplyCutOffError | LLMPromptTruncatedError):
            last = None  # the engine never reads such a reply
    except LLMPromptTooLongError as exc:
        result.status, result.error_type, result.error = TOO_LONG, type(exc).__name__, str(exc)
        last = None
    result.prompt_tokens, result.completion_tokens = spent.prompt_tokens, spent.completion_tokens
    result.seconds = round(time.monotonic() - started, 3)
    _judge(case, result, last if last is not None else "", "\n".join(read), settings, has_reply=last is not None)
    return result


_STATUS: dict[type[Exception], str] = {
    GuardRejected: REJECTED,
    InvalidSummaryError: INVALID,
    LLMReplyCutOffError: CUT_OFF,
    LLMPromptTruncatedError: TRUNCATED,
}


def _judge(case: Case, result: CaseResult, text: str, read: str, settings: Settings, *, has_reply: bool) -> None:
    """Score the last summary (or the rejected reply) against the case's planted facts."""
    result.facts = len(case.facts)
    result.facts_kept = sum(1 for fact in case.facts if kept(fact, text))
    result.stale = len(case.stale)
    result.corrections_applied = sum(1 for fact in case.stale if not kept(fact, text)) if has_reply else 0
    if has_reply:
        share, _ = language_share(text, case.language)
        result.language_kept = share is None or share >= settings.language_guard_min_share
    due = [fact for fact in case.facts if kept(fact, read)]
    alarmed = any(outcome in (guards.WARN, guards.REJECT) for outcome in result.guards.values())
    result.false_alarm = alarmed and has_reply and bool(result.language_kept) and all(kept(fact, text) for fact in due)


def _p95(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(0.95 * len(ordered)) - 1))]


def qualify(
    settings: Settings,
    summarizer: Summarizer,
    thresholds: Thresholds | None = None,
    *,
    endpoint: str = "the LLM endpoint",
    cases: Sequence[Case] = CASES,
) -> dict[str, Any]:
    """Run every case through the summariser; return the report with its verdict (content-free).

    Raises EndpointError naming ``endpoint`` when the summariser cannot be used at all.
    """
    thresholds = thresholds or Thresholds()
    rows = []
    for case in cases:
        try:
            rows.append(run_case(case, settings, summarizer))
        except LLMError as exc:
            raise EndpointError(
                f"{endpoint} cannot be used: {type(exc).__name__} on synthetic user {case.user_id!r} "
                f"({_reason(exc)}); nothing was judged"
            ) from None
        log.info("qualify: %s %s", case.user_id, rows[-1].status)
    return build_report(rows, thresholds, summarizer)


def _reason(exc: LLMError) -> str:
    """Return the part of an LLM error after its user prefix (the message is content-free already)."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("user ") and ": " in text else text


def build_report(rows: Sequence[CaseResult], thresholds: Thresholds, summarizer: Summarizer) -> dict[str, Any]:
    """Fold the users' results into totals and a verdict against ``thresholds``."""
    facts = sum(r.facts for r in rows)
    facts_kept = sum(r.facts_kept for r in rows)
    retention = facts_kept / facts if facts else 1.0
    language_kept = sum(1 for r in rows if r.language_kept)
    language_share = language_kept / len(rows) if rows else 1.0
    failed = [r.user_id for r in rows if r.status != ACCEPTED]
    false_alarms = [r.user_id for r in rows if r.false_alarm]
    latency = _p95([s for r in rows for s in r.latencies])
    reasons = []
    if retention < thresholds.min_fact_retention:
        reasons.append(f"fact retention {retention:.0%} is under {thresholds.min_fact_retention:.0%}")
    if language_share < thresholds.min_language_kept:
        reasons.append(f"language kept for {language_share:.0%} of users, under {thresholds.min_language_kept:.0%}")
    if len(failed) > thresholds.max_failed_users:
        reasons.append(f"{len(failed)} user(s) would fail (most {thresholds.max_failed_users})")
    if len(false_alarms) > thresholds.max_false_alarms:
        reasons.append(f"{len(false_alarms)} false alarm(s) of the guards (most {thresholds.max_false_alarms})")
    if latency is not None and latency > thresholds.max_latency_seconds:
        reasons.append(f"latency p95 {duration(latency)} is over {duration(thresholds.max_latency_seconds)}")
    rejections = {g: sum(1 for r in rows if r.guards.get(g) == guards.REJECT) for g in guards.GUARDS}
    warnings = {g: sum(1 for r in rows if r.guards.get(g) == guards.WARN) for g in guards.GUARDS}
    return {
        **summarizer_identity(summarizer),
        "verdict": FAIL if reasons else PASS,
        "reasons": reasons,
        "thresholds": asdict(thresholds),
        "users": len(rows),
        "users_failed": len(failed),
        "failed_user_ids": failed,
        "facts": facts,
        "facts_kept": facts_kept,
        "fact_retention": round(retention, 4),
        "corrections": sum(r.stale for r in rows),
        "corrections_applied": sum(r.corrections_applied for r in rows),
        "language_kept": language_kept,
        "guard_rejections": rejections,
        "guard_warnings": warnings,
        "false_alarms": len(false_alarms),
        "false_alarm_user_ids": false_alarms,
        "cut_off": sum(1 for r in rows if r.status == CUT_OFF),
        "truncated": sum(1 for r in rows if r.status == TRUNCATED),
        "llm_calls": sum(r.llm_calls for r in rows),
        "latency_p95_seconds": latency,
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "cases": [r.to_dict() for r in rows],
    }


def to_markdown(report: Mapping[str, Any]) -> str:
    """Render a qualification report as Markdown: verdict, thresholds, totals, one row per user."""
    t = report["thresholds"]
    model = f", model `{report['model']}`" if report.get("model") else ""
    lines = [
        f"## Model qualification: **{report['verdict'].upper()}** (summariser {report['summarizer']}{model})",
        "",
        f"Thresholds: fact retention ≥ {t['min_fact_retention']:.0%}, language kept ≥ "
        f"{t['min_language_kept']:.0%}, failed users ≤ {t['max_failed_users']}, false alarms ≤ "
        f"{t['max_false_alarms']}, latency p95 ≤ {duration(t['max_latency_seconds'])}.",
        "",
        f"Facts kept **{report['facts_kept']}/{report['facts']}** ({report['fact_retention']:.0%}); corrections "
        f"applied {report['corrections_applied']}/{report['corrections']}; language kept "
        f"{report['language_kept']}/{report['users']}; guard rejections "
        + ", ".join(f"{g} {n}" for g, n in report["guard_rejections"].items())
        + f"; false alarms {report['false_alarms']}; cut off {report['cut_off']}; truncated "
        f"{report['truncated']}; {report['llm_calls']} LLM call(s), latency p95 "
        f"{duration(report['latency_p95_seconds'])}; tokens {report['prompt_tokens']} prompt + "
        f"{report['completion_tokens']} completion.",
    ]
    if report["reasons"]:
        lines += ["", "Fails because: " + "; ".join(report["reasons"]) + "."]
    lines += [
        "",
        "| user | language | events | prompts | outcome | facts kept | corrections | language kept | guards | "
        "false alarm | latency (max) | tokens |",
        "|---|---|---:|---:|---|---:|---:|---|---|---|---:|---:|",
    ]
    for c in report["cases"]:
        language = {True: "yes", False: "**no**", None: "–"}[c["language_kept"]]
        corrections = f"{c['corrections_applied']}/{c['stale']}" if c["stale"] else ""
        lines.append(
            f"| `{c['user_id']}` | {c['language']} | {c['events']} | {c['llm_calls']} | {c['status']} | "
            f"{c['facts_kept']}/{c['facts']} | {corrections} | {language} | "
            f"{', '.join(f'{g}: {o}' for g, o in c['guards'].items())} | {'**yes**' if c['false_alarm'] else ''} | "
            f"{duration(max(c['latencies'], default=None))} | {c['prompt_tokens']} + {c['completion_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def endpoint_name(settings: Settings, summarizer: Summarizer, env: Mapping[str, str] | None = None) -> str:
    """Name the LLM endpoint for an error: where it was configured and its host, never its key."""
    env = os.environ if env is None else env
    base_url = getattr(getattr(summarizer, "config", None), "base_url", None)
    if not isinstance(base_url, str):
        return f"summariser {summarizer.name!r}"
    host = urlsplit(base_url).netloc.rsplit("@", 1)[-1] or base_url
    source = "OPENAI_BASE_URL" if env.get("OPENAI_BASE_URL") == base_url else f"connection {settings.llm_conn_id!r}"
    return f"LLM {source} ({host})"
