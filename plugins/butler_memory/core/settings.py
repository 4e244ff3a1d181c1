"""One frozen settings object: thresholds, names, budgets, connection ids.

Values come, lowest precedence first, from the defaults below, environment variables named
``BUTLER_MEMORY_<FIELD>`` (upper case), an Airflow Variable ``butler_memory`` holding a JSON object
(read by the DAG at run time), and the DAG run's params. Every value is type-checked here, so a bad
setting fails with a message naming it instead of deep inside a compression.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "BUTLER_MEMORY_"

SUMMARIZERS = ("auto", "openai", "offline")
LLM_MODES = ("online", "batch")
BATCH_COMPLETION_WINDOWS = ("24h",)
GUARD_MODES = ("reject", "warn", "off")


MAX_INTEGER = 2**63 - 1
"""Largest integer a setting (or a param) may hold: BSON's int64, beyond which a query that carries
it fails with an OverflowError deep in a run (reported as if MongoDB were unreachable)."""

MAX_USERS_PER_TASK = 1000
"""Most users one compress_user task takes: a task's users run one after another within its
execution timeout, and a cleared task re-runs at most this many."""


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to know that is not code."""

    # What to compress.
    threshold: int = 50
    """Compress a user with more than this many events."""
    keep_last_n: int = 20
    """Newest events kept raw after compression."""

    # Connections (Airflow connection ids; the CLI reads the same AIRFLOW_CONN_* variables).
    mongo_conn_id: str = "mongo_default"
    mongo_db: str = ""
    """Database name; empty = the connection's schema, else "butler"."""
    redis_conn_id: str = "redis_default"
    llm_conn_id: str = "openai_default"
    statsd_conn_id: str = "statsd_default"

    # The Butler's schema: collections and fields are its to name.
    events_collection: str = "user_memory"
    profiles_collection: str = "user_profiles"
    archive_collection: str = "user_memory_archive"
    quarantine_collection: str = "user_memory_quarantine"
    """Events a compression could not fold (malformed, oversized, undecodable), moved out whole so
    they never block their user; an operator inspects and re-inserts them (runbook)."""
    runs_collection: str = "memory_compression_runs"
    history_collection: str = "user_memory_summaries"
    """Every committed version of every user's summary (see history.py); holds personal data."""
    erasures_collection: str = "memory_erasures"
    """One content-free audit record per erasure (see erasure.py and docs/erasure.md)."""
    summary_field: str = "memory_summary"
    language_field: str = "language"
    """Profile field holding the user's language code, when the Butler stores one."""

    # Summaries.
    summarizer: str = "auto"
    """"openai", "offline", or "auto" (openai when the LLM connection exists, else offline)."""
    summary_language: str = "ru"
    summary_max_tokens: int = 300
    prompt_budget_tokens: int = 6000
    """Events per LLM call are limited so one prompt stays within this many (estimated) tokens."""
    max_events_per_chunk: int = 1000
    max_event_chars: int = 12_000
    """An event longer than this is never folded nor truncated: it is moved to quarantine_collection."""
    llm_timeout_seconds: float = 60.0
    llm_max_retries: int = 2
    """Retries inside the openai client (429/5xx/timeouts) before the task itself fails and retries."""

    llm_mode: str = "online"
    """How the daily run calls the LLM: "online" (one chat call per chunk, in the compress_user
    tasks) or "batch" (one OpenAI Batch API job for the run, waited for in the triggerer: about half
    the price; butler_memory.operations.batch). The catch-up DAG is always online: it exists for freshness."""
    batch_collection: str = "memory_batch_folds"
    """The batch mode's frozen folds and submitted batches (ids, versions, hashes; the replies until
    committed), dropped batch_retention_days after they were written (TTL)."""
    batch_retention_days: int = 7
    batch_completion_window: str = "24h"
    """The Batch API's completion_window (OpenAI accepts "24h" only)."""
    batch_max_lines: int = 50_000
    """Most requests in one batch (OpenAI: 50,000); a run with more is split into several batches."""
    batch_max_bytes: int = 200_000_000
    """Largest input file of one batch in bytes (OpenAI: 200 MB); a larger run is split."""
    batch_poll_seconds: float = 60.0
    """How often the triggerer asks the server for the batches' state while the run waits."""

    # Guards between the summariser and the commit (guards.py): "reject", "warn" or "off".
    fact_guard: str = "reject"
    """The new summary keeps the previous one's numbers, dates, names and contacts (unless events mention them)."""
    language_guard: str = "reject"
    """The new summary is in the user's language (profile field, else summary_language)."""
    language_guard_min_share: float = 0.5
    """Least share of the summary's language-bearing letters that must be in the user's language."""
    injection_guard: str = "reject"
    """The new summary holds no instruction-like or fence-breaking sentence (injection.py)."""

    # Safety and housekeeping.
    lock_key_pattern: str = "butler:memory:lock:{user_id}"
    """Shared with the bot's inline compression: both must use the same key."""
    lock_ttl_seconds: int = 300
    redis_timeout_seconds: float = 5.0
    """Socket connect/read timeout for the lock Redis (RedisHook sets none: a silent host would hang)."""
    archive_enabled: bool = True
    archive_retention_days: int = 90
    history_retention_days: int = 90
    """Summary versions older than this are dropped (TTL on created_at); a run can be rolled back
    only while the version before it and its archived events are kept."""
    runs_retention_days: int = 90
    """Run documents (daily and catch-up) are dropped this many days after their run finished (TTL)."""
    delete_batch_size: int = 500
    """$in lists stay this short: large $in lists are slow on some servers and hold locks longer."""
    scan_limit: int = 1000
    """Most users one run compresses (largest backlog first); at most Airflow's max_map_length x
    users_per_task (the run maximum, checked by the scan)."""
    users_per_task: int = 200
    """Users one mapped compress_user task compresses, one after another (1: a task per user). Each
    user keeps its own lock, result, metrics and failure; a retry or clear re-runs only the users of
    the task that failed or never finished (their results are kept in run_users_collection).
    200 (docs/benchmarks.md §12, 10,000 users a run): 0.044 CPU-s of Airflow a user, the one measured
    k within the 0.05 target (50: 0.053, 20: 0.081, 1: 0.312), as Airflow's price per instance (task
    process, API server, the scheduler's loop over the run's instances) is paid per 200 users. Its
    prices: a run of fewer than pool slots x k users (1,600 at 8 slots) uses fewer slots, and a
    batch's users run in turn within one 60-minute execution timeout; small or latency-bound
    deployments set 10-50."""
    run_users_collection: str = "memory_compression_run_users"
    """One small document per (DAG, run, user): the user's outcome in that run, written as each user
    ends, so a retried or cleared batch task skips the users it already finished."""
    run_users_retention_days: int = 30
    """Per-user outcomes older than this are dropped (TTL); the run document keeps the counts."""
    max_fold_events: int = 100_000
    """Most events one run folds for one user (oldest first; later runs fold the rest), so a huge
    user's keys are never all held in memory."""

    # Durability (MongoDB).
    mongo_write_concern: str = "majority"
    """Write concern of the summary commit, archive and delete: "majority", or a number of nodes."""
    mongo_write_timeout_ms: int = 10_000
    """How long a write waits for its write concern before failing (retryably); never forever."""
    mongo_read_concern: str = "majority"
    """Read concern of the profile read: "majority" or "local"."""

    # Erasure (docs/erasure.md).
    erasure_lock_wait_seconds: int = 300
    """How long an erasure waits for a compression holding the user's lock; the default is the lock
    TTL, so even a killed holder's lock expires within it."""
    erasure_secret_conn_id: str = "butler_memory_erasure"  # noqa: S105 - a connection id
    """Connection whose password keys the audit references (BUTLER_MEMORY_ERASURE_SECRET wins)."""
    # Fresh all day: the catch-up DAG and the doorbell (docs/architecture.md, "Fresh all day").
    catchup_runs_collection: str = "memory_compression_catchup_runs"
    """Run documents of the catch-up DAG's runs that found someone due (idle runs store none)."""
    state_collection: str = "memory_compression_state"
    """Small state documents of the job (the catch-up scan's watermark and idle counter)."""
    catchup_margin_seconds: int = 300
    """The catch-up scan looks this far before its last scan, for events written late (clock skew, slow writes)."""
    doorbell_key: str = "butler:memory:doorbell"
    """Redis sorted set of users the Butler rang for (member user id, score the first ring's unix time)."""
    doorbell_channel: str = "butler:memory:doorbell:ring"
    """Redis pub/sub channel the doorbell publishes on; the catch-up DAG's asset watcher listens."""
    daily_token_budget: int = 0
    """LLM tokens (prompt + completion) all runs may spend per UTC day; 0 = no budget (butler_memory.llm.budget)."""
    token_budget_key_pattern: str = "butler:memory:tokens:{day}"  # noqa: S105 - a Redis key name
    """Redis key of the day's token count ({day} = the UTC date), on the lock Redis."""
    doorbell_drain_max: int = 10_000
    """Most doorbell entries one catch-up scan takes (oldest first); the rest wait for the next run."""
    catchup_scan_page_events: int = 5000
    """Events one page of the catch-up scan reads (on the (created_at, user_id) index); one count per page."""
    catchup_scan_max_events: int = 200_000
    """Most events one catch-up scan reads; past it the scan stops, and the next run goes on from there."""
    daily_full_scan_every_days: int = 7
    """The daily scan is the full $group over every event (the reconciliation) once this many days after
    the last complete one, and the first time; in between it counts only the users who wrote since its
    last scan or that it still owes a run (fresh.daily_scan). 1 = the full scan every day."""
    daily_scan_max_events: int = 5_000_000
    """Most events one incremental daily scan reads; past it the next daily run goes on from there."""
    daily_owed_key: str = "butler:memory:daily:owed"
    """Redis sorted set of the users the daily run found over the threshold and has not finished yet."""
    backoff_base_seconds: int = 900
    """After a user's n-th deterministic failure in a row, catch-up runs skip it for this times 2**(n-1)
    seconds (butler_memory.freshness.backoff); 0 = no back-off. The daily run and explicit user_ids still try it."""
    backoff_max_seconds: int = 86_400
    """The longest back-off."""
    backoff_key_pattern: str = "butler:memory:backoff:{user_id}"
    """Redis hash of a user's back-off (failures, until, error_type), on the lock Redis."""

    def __post_init__(self) -> None:
        _storable(self)
        _distinct_collections(self)
        _positive(self, "threshold", "keep_last_n", "summary_max_tokens", "prompt_budget_tokens")
        _positive(self, "max_events_per_chunk", "max_event_chars", "lock_ttl_seconds")
        _positive(self, "delete_batch_size", "scan_limit", "archive_retention_days", "history_retention_days")
        _positive(self, "runs_retention_days")
        _positive(self, "users_per_task", "run_users_retention_days")
        _at_most(self, "users_per_task", MAX_USERS_PER_TASK)
        _positive(self, "erasure_lock_wait_seconds")
        _positive(self, "max_fold_events", "mongo_write_timeout_ms")
        _check_durability(self)
        _positive(self, "catchup_margin_seconds", "doorbell_drain_max", "catchup_scan_page_events")
        _positive(self, "daily_full_scan_every_days")
        for name in ("catchup_scan_max_events", "daily_scan_max_events"):
            if getattr(self, name) < self.catchup_scan_page_events:
                raise SettingsError(
                    f"{name} ({getattr(self, name)}) must be at least "
                    f"catchup_scan_page_events ({self.catchup_scan_page_events})"
                )
        if self.daily_token_budget < 0:
            raise SettingsError(f"daily_token_budget must be >= 0 (0 = no budget), got {self.daily_token_budget}")
        _check_redis_keys(self)
        if self.keep_last_n > self.threshold:
            raise SettingsError(
                f"keep_last_n ({self.keep_last_n}) must not exceed threshold ({self.threshold}): "
                "a compressed user would be over the threshold again at once"
            )
        _check_batch(self)
        if self.summarizer not in SUMMARIZERS:
            raise SettingsError(f"summarizer {self.summarizer!r} is not one of {', '.join(SUMMARIZERS)}")
        for name in ("fact_guard", "language_guard", "injection_guard"):
            if getattr(self, name) not in GUARD_MODES:
                raise SettingsError(f"{name} {getattr(self, name)!r} is not one of {', '.join(GUARD_MODES)}")
        if not 0 < self.language_guard_min_share <= 1:
            raise SettingsError(f"language_guard_min_share must be in (0, 1], got {self.language_guard_min_share}")
        if self.llm_timeout_seconds <= 0 or self.llm_timeout_seconds * 2 >= self.lock_ttl_seconds:
            raise SettingsError(
                f"llm_timeout_seconds ({self.llm_timeout_seconds}) must be positive and under half of "
                f"lock_ttl_seconds ({self.lock_ttl_seconds}), so the lock cannot expire during a call"
            )
        if self.redis_timeout_seconds <= 0:
            raise SettingsError(f"redis_timeout_seconds must be positive, got {self.redis_timeout_seconds}")
        if self.llm_max_retries < 0:
            raise SettingsError(f"llm_max_retries must be >= 0, got {self.llm_max_retries}")
        # One event, the previous summary and the instructions must fit one prompt (3 chars a token).
        if (self.max_event_chars + self.summary_max_chars) // 3 + 400 > self.prompt_budget_tokens:
            raise SettingsError(
                f"prompt_budget_tokens ({self.prompt_budget_tokens}) is too small for one event of "
                f"max_event_chars ({self.max_event_chars}) plus the summary; raise it or lower max_event_chars"
            )
        if self.prompt_budget_tokens < 4 * self.summary_max_tokens:
            raise SettingsError(
                f"prompt_budget_tokens ({self.prompt_budget_tokens}) must be at least 4x "
                f"summary_max_tokens ({self.summary_max_tokens}): the previous summary rides in every prompt"
            )

    @property
    def summary_max_chars(self) -> int:
        """Longest summary accepted, in characters (about 6 characters a token, with headroom)."""
        return self.summary_max_tokens * 6

    def lock_key(self, user_id: str) -> str:
        """Return the Redis key of one user's compression lock."""
        return self.lock_key_pattern.format(user_id=user_id)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some values changed (validated like any other)."""
        return Settings.from_mapping(changes, base=self)

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as a plain dict (no secrets live here)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: Settings | None = None) -> Settings:
        """Build settings from a mapping of field names to values, refusing unknown names."""
        base = base or cls()
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
        current = dataclasses.asdict(base)
        for name, raw in values.items():
            current[name] = _coerce(name, raw, type(getattr(base, name)))
        return cls(**current)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, base: Settings | None = None) -> Settings:
        """Build settings from BUTLER_MEMORY_* environment variables."""
        env = os.environ if env is None else env
        values = {f.name: env[ENV_PREFIX + f.name.upper()] for f in fields(cls) if ENV_PREFIX + f.name.upper() in env}
        return cls.from_mapping(values, base=base)

    @classmethod
    def from_json(cls, text: str, *, base: Settings | None = None, source: str = "JSON") -> Settings:
        """Build settings from a JSON object (e.g. the Airflow Variable ``butler_memory``)."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{source} is not valid JSON: {exc.msg} at position {exc.pos}") from None
        except ValueError:  # an integer over Python's 4300-digit limit (its message quotes no value)
            raise SettingsError(f"{source} is not valid JSON: an integer of more than 4300 digits") from None
        if not isinstance(values, dict):
            raise SettingsError(f"{source} must be a JSON object, got {type(values).__name__}")
        return cls.from_mapping(values, base=base)


KEY_FIELDS = {"lock_key_pattern": "user_id", "backoff_key_pattern": "user_id", "token_budget_key_pattern": "day"}
"""Redis key patterns and the one field each is rendered with (``str.format``)."""


def _check_redis_keys(settings: Settings) -> None:
    """Refuse Redis key patterns that do not render or lack their field whole (``{user_id[0]}`` would
    give two users one lock), and a back-off whose bounds are inverted. Each pattern is rendered here
    with two values of its field, so a stray placeholder (``{shard}``, ``{}``) or brace fails now,
    naming the setting, instead of at the first lock deep inside a compression."""
    for name, field in KEY_FIELDS.items():
        pattern = getattr(settings, name)
        try:
            keys = {pattern.format(**{field: sample}) for sample in ("a", "b")}
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            raise SettingsError(
                f"{name} {pattern!r} cannot be rendered ({type(exc).__name__}: {exc}): its only "
                f"placeholder is '{{{field}}}' (write a literal brace as '{{{{' or '}}}}')"
            ) from None
        if "{" + field + "}" not in pattern or len(keys) < 2:  # "{{user_id}}" is one key for every user
            raise SettingsError(f"{name} {pattern!r} must contain '{{{field}}}'")
    if settings.backoff_base_seconds < 0 or settings.backoff_max_seconds < settings.backoff_base_seconds:
        raise SettingsError(
            f"backoff_base_seconds ({settings.backoff_base_seconds}) must be >= 0 (0 = off) and at most "
            f"backoff_max_seconds ({settings.backoff_max_seconds})"
        )


def _check_batch(settings: Settings) -> None:
    if settings.llm_mode not in LLM_MODES:
        raise SettingsError(f"llm_mode {settings.llm_mode!r} is not one of {', '.join(LLM_MODES)}")
    _positive(settings, "batch_retention_days", "batch_max_lines", "batch_max_bytes", "batch_poll_seconds")
    if settings.batch_completion_window not in BATCH_COMPLETION_WINDOWS:
        raise SettingsError(
            f"batch_completion_window {settings.batch_completion_window!r} is not one the Batch API accepts "
            f"({', '.join(BATCH_COMPLETION_WINDOWS)}: OpenAI's and Azure OpenAI's only window)"
        )


def _check_durability(settings: Settings) -> None:
    """Refuse write and read concerns that would let a delete outlive its summary commit."""
    concern = settings.mongo_write_concern
    nodes = _integer("mongo_write_concern", concern) if INTEGER_TEXT.fullmatch(concern) else None
    if not (concern == "majority" or (nodes is not None and 1 <= nodes <= MAX_INTEGER)):
        raise SettingsError(
            f"mongo_write_concern {concern[:40]!r} must be 'majority' or a number of nodes >= 1 "
            "(unacknowledged writes would let a delete land before its summary)"
        )
    if settings.mongo_read_concern not in ("majority", "local"):
        raise SettingsError(f"mongo_read_concern {settings.mongo_read_concern!r} must be 'majority' or 'local'")


def _storable(settings: Settings) -> None:
    """Refuse numbers that cannot be compared or stored: NaN and infinite floats (every comparison
    with NaN is False, so it would pass the range checks), and integers BSON cannot store (every
    integer setting may reach a query or a stored document)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{f.name} must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            _at_most(settings, f.name, MAX_INTEGER)


def _distinct_collections(settings: Settings) -> None:
    """Refuse two roles on one collection: the quarantine or the archive on the events collection, say,
    would replace a live event by its copy and the following delete would remove it (events lost)."""
    seen: dict[str, str] = {}
    for name in (f.name for f in fields(settings) if f.name.endswith("_collection")):
        if (collection := getattr(settings, name)) in seen:
            raise SettingsError(
                f"{seen[collection]} and {name} are both {collection!r}: each role needs its own collection"
            )
        seen[collection] = name


def _at_most(settings: Settings, name: str, most: int) -> None:
    value = getattr(settings, name)
    if value > most:
        # str() of an int past Python's 4300-digit limit raises ValueError: show its size instead.
        shown = value if value.bit_length() <= 256 else f"a {value.bit_length()}-bit integer"
        raise SettingsError(f"{name} ({shown}) must be at most {most}")


def _positive(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value <= 0:
            raise SettingsError(f"{name} must be a positive number, got {value!r}")


TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
FALSE_VALUES = frozenset({"0", "false", "no", "off"})
"""Spellings of a boolean in the environment (case-insensitive)."""
INTEGER_TEXT = re.compile(r"-?[0-9]+")
"""An integer in the environment: ASCII digits, one optional minus (``str.isdigit`` also takes "²",
and ``lstrip("-")`` took "--5": both then failed in ``int()`` with an error naming no setting)."""


def _integer(name: str, text: str) -> int:
    """Return the integer ``text`` (an ``INTEGER_TEXT``) spells: ``int()`` refuses text over Python's
    4300-digit limit with a ValueError naming no setting, a SettingsError naming ``name`` here."""
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"{name} ({len(text)} digits) must be at most {MAX_INTEGER}") from None


def _coerce(name: str, raw: Any, kind: type) -> Any:
    """Convert one raw value (often a string from the environment) to the field's type."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in TRUE_VALUES | FALSE_VALUES:
            return raw.strip().lower() in TRUE_VALUES
        raise SettingsError(f"{name} must be true or false, got {raw!r}")
    if kind is int:
        if isinstance(raw, bool):
            raise SettingsError(f"{name} must be an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str) and INTEGER_TEXT.fullmatch(raw.strip()):
            return _integer(name, raw.strip())
        raise SettingsError(f"{name} must be an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            try:
                return float(raw)
            except OverflowError:  # an int past float's range (a JSON Variable's 10**400)
                raise SettingsError(f"{name} must be a finite number, got an integer too large for one") from None
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise SettingsError(f"{name} must be a number, got {raw!r}")
    if not isinstance(raw, str):
        raise SettingsError(f"{name} must be a string, got {type(raw).__name__}")
    return raw
