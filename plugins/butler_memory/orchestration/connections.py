"""Build the engine's parts from Airflow connections (or the environment).

Connections are read through Airflow's hooks, so the same ``AIRFLOW_CONN_*`` variables, secrets
backends and UI-managed connections work for the DAG and for the CLI. Airflow is imported lazily:
importing this module is cheap.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from butler_memory.core.settings import Settings, SettingsError
from butler_memory.fold.metrics import Metrics, NullMetrics, StatsdConfig, StatsdMetrics
from butler_memory.llm.budget import TokenBudget
from butler_memory.llm.offline import OfflineSummarizer
from butler_memory.llm.openai_summarizer import LLMConfig, OpenAISummarizer
from butler_memory.llm.summarizer import Summarizer
from butler_memory.llm.tokens import AUTO, TOKENIZERS
from butler_memory.operations.engine import Engine
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.store import MemoryStore

log = logging.getLogger(__name__)


VARIABLE_NAME = "butler_memory"
"""Airflow Variable holding a JSON object of settings (optional)."""
PARAM_SETTINGS = ("threshold", "keep_last_n", "users_per_task", "llm_mode")
"""Params that override settings of the same name when not null."""


def resolve_settings(params: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults, BUTLER_MEMORY_* env, the ``butler_memory`` Variable and the run's params.

    The one way settings are resolved: the DAG's tasks, the CLI (its options are the params) and
    the UI all call this, so all of them take the same lock keys, collections and fields.
    """
    from airflow.sdk import Variable

    params = params or {}
    settings = Settings.from_env(os.environ if env is None else env)
    raw = Variable.get(VARIABLE_NAME, default=None)
    if raw:
        settings = Settings.from_json(raw, base=settings, source=f"Airflow Variable {VARIABLE_NAME!r}")
    overrides = {name: params[name] for name in PARAM_SETTINGS if params.get(name) is not None}
    if params.get("limit") is not None:
        overrides["scan_limit"] = params["limit"]
    return settings.replace(**overrides) if overrides else settings


def _connection(conn_id: str) -> Any | None:
    """Return an Airflow connection, None when it is not defined anywhere.

    Any other failure to read it (the API server or a secrets backend answering with an error) is a
    SettingsError: a connection that exists but cannot be read must never look like a missing one.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    if not conn_id:
        return None
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    except Exception as exc:
        raise SettingsError(f"connection {conn_id!r} could not be read ({type(exc).__name__})") from None


def mongo_store(settings: Settings) -> MemoryStore:
    """Open the Butler database through ``MongoHook``."""
    from airflow.providers.mongo.hooks.mongo import MongoHook

    hook = MongoHook(mongo_conn_id=settings.mongo_conn_id)
    db_name = settings.mongo_db or hook.connection.schema or "butler"
    return MemoryStore(hook.get_conn()[db_name], settings)


def user_locks(settings: Settings) -> UserLocks:
    """Open the lock Redis through ``RedisHook``."""
    from airflow.providers.redis.hooks.redis import RedisHook

    client = RedisHook(redis_conn_id=settings.redis_conn_id).get_conn()
    # RedisHook offers no timeouts; the pool opens connections lazily, so these apply to all of them.
    client.connection_pool.connection_kwargs.update(
        socket_timeout=settings.redis_timeout_seconds, socket_connect_timeout=settings.redis_timeout_seconds
    )
    return UserLocks(client, settings)


def llm_config(settings: Settings, env: Mapping[str, str] | None = None) -> LLMConfig | None:
    """Read the LLM endpoint from the connection (host = base URL, password = key, extra = model and
    options), else from OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL; None when neither exists.

    The environment is used only when it names the endpoint (OPENAI_BASE_URL): an OPENAI_API_KEY
    alone never sends conversations anywhere, least of all to the public OpenAI endpoint by default.
    A connection without a password gets OPENAI_API_KEY only when it points where that key goes
    (``_environment_key``).
    """
    env = os.environ if env is None else env
    conn = _connection(settings.llm_conn_id)
    if conn is not None:
        extra = conn.extra_dejson or {}
        model = extra.get("model")
        if not isinstance(model, str) or not model:
            raise SettingsError(
                f'connection {settings.llm_conn_id!r}: extra must name the model, e.g. {{"model": ...}}'
            )
        base_url = _base_url(conn.host, conn.port, extra.get("path"))
        if base_url is None:
            raise SettingsError(
                f"connection {settings.llm_conn_id!r} has no host: set it to the endpoint's base URL "
                "(https://api.openai.com/v1 for OpenAI itself)"
            )
        return _checked(
            settings,
            f"connection {settings.llm_conn_id!r}",
            base_url=base_url,
            api_key=conn.password or _environment_key(settings, base_url, env) or "not-needed",
            model=model,
            extra=extra,
        )
    if env.get("OPENAI_BASE_URL"):
        return _checked(
            settings,
            "OPENAI_BASE_URL",
            base_url=env["OPENAI_BASE_URL"],
            api_key=env.get("OPENAI_API_KEY") or "not-needed",
            model=env.get("OPENAI_MODEL") or "gpt-4o-mini",
            extra={},
        )
    if env.get("OPENAI_API_KEY"):
        log.warning("OPENAI_API_KEY is set without OPENAI_BASE_URL or connection %r: ignored", settings.llm_conn_id)
    return None


OPENAI_PUBLIC_URL = "https://api.openai.com/v1"
"""Where the openai client sends OPENAI_API_KEY when OPENAI_BASE_URL is not set."""


def _environment_key(settings: Settings, base_url: str, env: Mapping[str, str]) -> str | None:
    """Return OPENAI_API_KEY for a connection without a password, only when the connection points
    where that key is meant to go: OPENAI_BASE_URL when set, else the public OpenAI API.

    A key for OpenAI must never travel to another host (a local server, perhaps plain http) just
    because the connection that names that host has no password.
    """
    key = env.get("OPENAI_API_KEY")
    if not key:
        return None
    if _origin(base_url) == _origin(env.get("OPENAI_BASE_URL") or OPENAI_PUBLIC_URL):
        return key
    log.warning(
        "connection %r has no password and points elsewhere than OPENAI_BASE_URL or api.openai.com: "
        "OPENAI_API_KEY is not sent to it",
        settings.llm_conn_id,
    )
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    """Return (scheme, host, port) of a URL, the port made explicit: what decides where a key goes."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: matches nothing
        return (scheme, "", -1)
    return (scheme, (parts.hostname or "").lower(), port or {"https": 443, "http": 80}.get(scheme))


LLM_EXTRAS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "path": str,
    "timeout": (int, float),
    "max_retries": int,
    "extra_body": dict,
    "tokenizer": str,
    "context_tokens": int,
    "prompt_tokens_tolerance": (int, float),
    "verify_prompt_tokens": bool,
}
"""The LLM connection's extra fields and their JSON types (docs/configuration.md)."""


def _checked(
    settings: Settings, source: str, *, base_url: str, api_key: str, model: str, extra: Mapping[str, Any]
) -> LLMConfig:
    """Build the LLMConfig, checking every extra's type and range against the settings (lock TTL)."""
    for name, value in extra.items():
        kind = LLM_EXTRAS.get(name)
        if kind is None:
            raise SettingsError(f"{source}: unknown extra {name!r} (known: {', '.join(sorted(LLM_EXTRAS))})")
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise SettingsError(f"{source}: extra {name!r} has the wrong type ({type(value).__name__})")
    tokenizer = extra.get("tokenizer", AUTO)
    if tokenizer not in TOKENIZERS:
        raise SettingsError(f"{source}: extra tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    context = extra.get("context_tokens")
    if context is not None and context <= 2 * settings.summary_max_tokens + 1000:
        raise SettingsError(
            f"{source}: extra context_tokens ({context}) leaves no room for a prompt beside the reply "
            f"({2 * settings.summary_max_tokens} tokens)"
        )
    tolerance = extra.get("prompt_tokens_tolerance")
    if tolerance is not None and not 0 <= tolerance < 1:
        raise SettingsError(f"{source}: extra prompt_tokens_tolerance ({tolerance}) must be in [0, 1)")
    config = LLMConfig(
        base_url=base_url,
        api_key=api_key,
        model=model,
        timeout_seconds=float(extra.get("timeout", settings.llm_timeout_seconds)),
        max_retries=int(extra.get("max_retries", settings.llm_max_retries)),
        extra_body=extra.get("extra_body"),
        tokenizer=tokenizer,
        context_tokens=context,
        prompt_tokens_tolerance=None if tolerance is None else float(tolerance),
        verify_prompt_tokens=bool(extra.get("verify_prompt_tokens", True)),
    )
    if config.max_retries < 0:
        raise SettingsError(f"{source}: extra max_retries must be >= 0, got {config.max_retries}")
    if not math.isfinite(config.timeout_seconds):  # NaN passes every comparison below
        raise SettingsError(f"{source}: extra timeout must be a finite number, got {config.timeout_seconds!r}")
    if config.timeout_seconds <= 0 or config.timeout_seconds * 2 >= settings.lock_ttl_seconds:
        raise SettingsError(
            f"{source}: extra timeout ({config.timeout_seconds}) must be positive and under half of "
            f"lock_ttl_seconds ({settings.lock_ttl_seconds}), like llm_timeout_seconds"
        )
    return config


def _base_url(host: str | None, port: int | None, path: str | None) -> str | None:
    if not host:
        return None
    if host.startswith(("http://", "https://")):
        return host
    netloc = f"{host}:{port}" if port else host
    return f"https://{netloc}{path or '/v1'}"


def build_summarizer(settings: Settings) -> Summarizer:
    """Pick the summariser the settings ask for; never fall back silently.

    ``offline`` is the extractive summariser. ``openai`` needs the LLM connection (or OPENAI_BASE_URL).
    ``auto`` is ``openai`` whenever an LLM connection id is configured or OPENAI_BASE_URL is set,
    and ``offline`` only when neither is (``llm_conn_id`` set to ""): a configured connection that
    is missing or unreadable fails the run instead of silently switching summarisers.
    """
    if settings.summarizer == "offline" or (
        settings.summarizer == "auto" and not settings.llm_conn_id and not os.environ.get("OPENAI_BASE_URL")
    ):
        log.info("summariser: offline extractive")
        return OfflineSummarizer()
    config = llm_config(settings)
    if config is None:
        raise SettingsError(
            f"summarizer is {settings.summarizer!r} but LLM connection {settings.llm_conn_id!r} is not defined "
            "(nor OPENAI_BASE_URL); define it, or set summarizer to 'offline' for the extractive summariser"
        )
    log.info("summariser: OpenAI-compatible endpoint, model %s", config.model)
    return OpenAISummarizer(config)


def statsd_metrics(settings: Settings, env: Mapping[str, str] | None = None) -> Metrics:
    """Return a StatsD client from the connection or STATSD_HOST/STATSD_PORT; a no-op when neither exists
    (or when the connection cannot be read: metrics are no reason to stop a compression)."""
    env = os.environ if env is None else env
    try:
        conn = _connection(settings.statsd_conn_id)
    except SettingsError as exc:
        log.warning("statsd disabled: %s", exc)
        conn = None
    config: StatsdConfig | None = None
    if conn is not None and conn.host:
        config = StatsdConfig(conn.host, int(conn.port or 8125), (conn.extra_dejson or {}).get("prefix") or None)
    elif env.get("STATSD_HOST"):
        config = StatsdConfig(env["STATSD_HOST"], int(env.get("STATSD_PORT", "8125")), env.get("STATSD_PREFIX"))
    if config is None:
        return NullMetrics()
    try:
        return StatsdMetrics(config)
    except OSError as exc:  # e.g. the host name does not resolve: metrics off, compression on
        log.warning("statsd disabled: %s", type(exc).__name__)
        return NullMetrics()


def erasure_secret(settings: Settings, env: Mapping[str, str] | None = None, *, required: bool = True) -> bytes | None:
    """Return the key of erasure audit references: BUTLER_MEMORY_ERASURE_SECRET, else the password of
    the ``erasure_secret_conn_id`` connection; a SettingsError when neither is set (None when not
    ``required``: a dry run names nobody, it only uses the secret to recognise earlier erasures)."""
    from butler_memory.operations import audit

    env = os.environ if env is None else env
    conn = None if env.get(audit.SECRET_ENV) else _connection(settings.erasure_secret_conn_id)
    try:
        return audit.erasure_secret(env, connection_password=conn.password if conn is not None else None)
    except SettingsError:
        if required:
            raise
        return None


def build_engine(settings: Settings, *, metrics: Metrics | None = None) -> Engine:
    """Connect every part the engine needs."""
    locks = user_locks(settings)
    return Engine(
        settings=settings,
        store=mongo_store(settings),
        locks=locks,
        summarizer=build_summarizer(settings),
        metrics=metrics if metrics is not None else statsd_metrics(settings),
        budget=TokenBudget.when_set(locks.client, settings),
    )
