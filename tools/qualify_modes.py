"""Run ``qualify`` against every mode of the fake OpenAI server and the offline summariser.

Prints one Markdown row per mode (the table in docs/qualify.md) and, with ``--full``, each mode's
whole report. The shipped default settings; the fake server on 127.0.0.1, in this process, reached
over real HTTP by the real client, the connection's default tokenizer ("auto"). Standalone:
``python tools/qualify_modes.py [--full]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from butler_memory.core.settings import Settings  # noqa: E402
from butler_memory.core.units import duration  # noqa: E402
from butler_memory.llm.offline import OfflineSummarizer  # noqa: E402
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer  # noqa: E402
from butler_memory.llm.summarizer import Summarizer  # noqa: E402
from butler_memory.operations import qualify  # noqa: E402
from butler_memory.safety import guards  # noqa: E402
from tools.fake_openai import FakeOpenAI  # noqa: E402

OLLAMA_WINDOW = 768
"""Context of the Ollama-like mode: the short users' prompts fit, the long history's do not (cut to
under half, which the truncation check sees even with an unknown model's tokenizer, docs/qualify.md)."""


def _cut_off(fake: FakeOpenAI) -> None:
    """Faithful replies, each cut off at max_tokens."""
    fake.set_responder("faithful")
    fake.set_finish_reason("length")


def _ollama_like(fake: FakeOpenAI) -> None:
    """Faithful replies from a short context that silently truncates the prompt."""
    fake.set_responder("faithful")
    fake.set_context_window(OLLAMA_WINDOW)


MODES: dict[str, tuple[str, Callable[[FakeOpenAI], None]]] = {
    "faithful": ("a good model", lambda f: f.set_responder("faithful")),
    "length": ("every reply cut off at max_tokens", _cut_off),
    "ollama": (f"Ollama-like, {OLLAMA_WINDOW}-token context, silently truncating", _ollama_like),
    "drop_fact": ("drops a fact of the summary", lambda f: f.set_responder("drop_fact")),
    "new_only": ("ignores the previous summary", lambda f: f.set_responder("new_only")),
    "wrong_language": ("answers in another language", lambda f: f.set_responder("wrong_language")),
    "default": ("a content-free one-liner (Russian)", lambda f: f.set_responder("default")),
}


def row(mode: str, about: str, report: dict[str, object]) -> str:
    """Return one Markdown row of the results table."""
    r = report
    rejections = r["guard_rejections"]
    assert isinstance(rejections, dict)
    latency = r["latency_p95_seconds"]
    return (
        f"| {mode} | {about} | **{str(r['verdict']).upper()}** | {r['facts_kept']}/{r['facts']} | "
        f"{r['corrections_applied']}/{r['corrections']} | {r['language_kept']}/{r['users']} | "
        f"{' / '.join(str(rejections[g]) for g in guards.GUARDS)} | {r['false_alarms']} | {r['cut_off']} | "
        f"{r['truncated']} | {r['users_failed']} | {r['llm_calls']} | "
        f"{duration(latency if isinstance(latency, float) else None)} | {r['prompt_tokens']} + {r['completion_tokens']} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the results table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="also print each mode's whole report")
    args = parser.parse_args(argv)
    settings = Settings()
    rows, reports = [], []
    with FakeOpenAI() as fake:
        for mode, (about, configure) in MODES.items():
            fake.reset()
            configure(fake)
            summarizer: Summarizer = OpenAISummarizer(
                LLMConfig(base_url=fake.base_url, api_key="k", model="test-model")
            )
            try:
                report = qualify.qualify(settings, summarizer)
            finally:
                summarizer.close()
            rows.append(row(mode, about, report))
            reports.append((mode, report))
    report = qualify.qualify(settings, OfflineSummarizer())
    rows.append(row("offline", "the offline extractive summariser", report))
    reports.append(("offline", report))
    print(
        f"| mode | plays | verdict | facts kept | corrections | language kept | rejected ({' / '.join(guards.GUARDS)}) | "
        "false alarms | cut off | truncated | users failed | LLM calls | latency p95 | tokens |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.full:
        for mode, report in reports:
            print(f"\n### {mode}\n\n{qualify.to_markdown(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
