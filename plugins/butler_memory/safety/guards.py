"""Guards between the summariser and the commit: a new summary must keep the old one's facts, be
in the user's language and carry no instructions.

The summariser proposes, the guards accept or reject, the commit writes. The guards are
deterministic and local (no second LLM call, no network):

- **facts**: the durable details of the previous summary (numbers, dates, proper nouns, e-mail
  addresses, phone numbers, URLs) must still be in the new summary, unless the folded events
  mention them themselves (a correction: "I moved from Kazan to Berlin" may drop Kazan). Words are
  compared by their Snowball stem (``snowballstemmer``, Russian or English by script), so an
  inflected Russian name ("Анна" → "Анной") still counts as kept.
- **language**: the summary's language-bearing words (proper nouns, numbers and URLs removed)
  are grouped by script and each group is classified with Lingua (``lingua-language-detector``,
  offline, restricted to the languages we write summaries in); the share of letters in the
  user's language must reach ``language_guard_min_share``.
- **injection**: no sentence of the summary reads as an instruction or breaks a fence
  (``injection.py``). The summariser never reads such sentences of the previous summary or the
  events (``injection.withheld``, applied before every LLM call), so only what a summariser wrote
  itself can fail here; a fold that had sentences withheld reports ``redact``. Flagged sentences of
  the previous summary protect no fact and are no quote for the language guard, so a later
  summary may drop them.

The facts are read by ``facts.py``, the language measured by ``language.py``; this module runs the
guards and decides. Each guard runs in a mode (``reject``, ``warn`` or ``off``). Outcomes and their details carry
counts, kinds and language codes only, never the text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from butler_memory.core.errors import GuardRejected
from butler_memory.core.settings import GUARD_MODES, Settings
from butler_memory.safety import injection
from butler_memory.safety.facts import missing_facts, stem
from butler_memory.safety.language import LANGUAGES, detector, language_share

FACTS = "facts"
LANGUAGE = "language"
INJECTION = "injection"
GUARDS = (FACTS, LANGUAGE, INJECTION)

REJECT = "reject"
WARN = "warn"
OFF = "off"
MODES = GUARD_MODES
"""How a guard acts on a failed check: fail the user (nothing committed), count and commit, or skip."""

PASSED = "pass"
REDACT = "redact"
"""The injection guard passed a summary whose input had instruction-like sentences withheld."""
OUTCOMES = (OFF, PASSED, REDACT, WARN, REJECT)
"""Outcomes, mildest first: a user's outcome over several chunks is the worst of its chunks."""


@dataclass(frozen=True)
class GuardResult:
    """One guard's verdict on one proposed summary: content-free."""

    guard: str
    outcome: str
    detail: str = ""


def check_summary(
    *, previous: str, events: Sequence[str], summary: str, language: str, settings: Settings
) -> list[GuardResult]:
    """Run every guard on a proposed summary (``previous`` + ``events`` → ``summary``)."""
    results = []
    mode = settings.fact_guard
    if mode == OFF:
        results.append(GuardResult(FACTS, OFF))
    else:
        missing = missing_facts(previous, events, summary)
        if missing:
            kinds = _kinds(Counter(kind for kind, _ in missing))
            results.append(
                GuardResult(FACTS, mode, f"{len(missing)} fact(s) of the previous summary missing ({kinds})")
            )
        else:
            results.append(GuardResult(FACTS, PASSED))
    mode = settings.language_guard
    if mode == OFF:
        results.append(GuardResult(LANGUAGE, OFF))
    else:
        share, detected = language_share(summary, language, [previous, *events])
        if share is None or share >= settings.language_guard_min_share:
            results.append(GuardResult(LANGUAGE, PASSED))
        else:
            results.append(
                GuardResult(
                    LANGUAGE,
                    mode,
                    f"{share:.0%} of the summary is in {language!r} (minimum "
                    f"{settings.language_guard_min_share:.0%}; mostly {detected or 'unknown'!r})",
                )
            )
    results.append(_injection(previous, events, summary, settings.injection_guard))
    return results


def _injection(previous: str, events: Sequence[str], summary: str, mode: str) -> GuardResult:
    if mode == OFF:
        return GuardResult(INJECTION, OFF)
    found = injection.kinds(summary)
    if found:
        return GuardResult(INJECTION, mode, f"{sum(found.values())} instruction-like sentence(s) ({_kinds(found)})")
    withheld: Counter[str] = Counter()
    for text in (previous, *events):
        withheld.update(injection.kinds(text))
    if withheld:
        return GuardResult(
            INJECTION,
            REDACT,
            f"{withheld.total()} instruction-like sentence(s) withheld from the summariser ({_kinds(withheld)})",
        )
    return GuardResult(INJECTION, PASSED)


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def enforce(user_id: str, results: Iterable[GuardResult]) -> None:
    """Raise GuardRejected naming the user and every rejecting guard (never the content)."""
    results = list(results)
    rejected = [r for r in results if r.outcome == REJECT]
    if rejected:
        reasons = "; ".join(f"{r.guard} guard: {r.detail}" for r in rejected)
        raise GuardRejected(
            f"user {user_id!r}: summary rejected by the {' and '.join(r.guard for r in rejected)} guard "
            f"({reasons}); it was not committed and none of its events deleted",
            user_id=user_id,
            guards=outcomes(results),
        )


def outcomes(results: Iterable[GuardResult]) -> dict[str, str]:
    """Return ``{guard: outcome}``."""
    return {r.guard: r.outcome for r in results}


def worst(a: str | None, b: str) -> str:
    """Return the worse of two outcomes (``reject`` > ``warn`` > ``redact`` > ``pass`` > ``off``)."""
    return b if a is None or OUTCOMES.index(b) > OUTCOMES.index(a) else a


def merge(into: dict[str, str], results: Iterable[GuardResult]) -> None:
    """Fold one chunk's outcomes into a user's: each guard keeps its worst outcome."""
    for r in results:
        into[r.guard] = worst(into.get(r.guard), r.outcome)


def warm_up() -> None:
    """Load the stemmers and the detector of our languages, without any I/O.

    Called by the ``butler_memory_preload`` Airflow plugin, so that task processes forked from an
    Airflow component start with them loaded.
    """
    stem("Анна")
    stem("Anna")
    detector(LANGUAGES[0])
