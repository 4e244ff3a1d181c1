"""Build the engine's parts from Airflow connections (or the environment).

Connections are read through Airflow's hooks, so the same ``AIRFLOW_CONN_*`` variables, secrets
backends and UI-managed connections work for the DAG and for the CLI. Airflow is imported lazily:
importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from butler_memory.budget import TokenBudget
from butler_memory.compression import Engine
from butler_memory.locks import UserLocks
from butler_memory.metrics import Metrics, NullMetrics, StatsdConfig, StatsdMetrics
from butler_memory.offline import OfflineSummarizer
from butler_memory.openai_summarizer import LLMConfig, OpenAISummarizer
from butler_memory.settings import Settings, SettingsError
from butler_memory.store import MemoryStore
from butler_memory.summarizer import Summarizer

log = logging.getLogger(__name__)


def _connection(conn_id: str) -> Any | None:
    """Return an Airflow connection, or None when it is not defined anywhere."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException, AirflowRuntimeError

    try:
        return BaseHook.get_connection(conn_id)
    except (AirflowNotFoundException, AirflowRuntimeError):
        return None


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
    options), else from OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL; None when neither exists."""
    env = os.environ if env is None else env
    conn = _connection(settings.llm_conn_id)
    if conn is not None:
        extra = conn.extra_dejson or {}
        model = extra.get("model")
        if not isinstance(model, str) or not model:
            raise SettingsError(
                f'connection {settings.llm_conn_id!r}: extra must name the model, e.g. {{"model": ...}}'
            )
        return LLMConfig(
            base_url=_base_url(conn.host, conn.port, extra.get("path")),
            api_key=conn.password or env.get("OPENAI_API_KEY") or "not-needed",
            model=model,
            timeout_seconds=float(extra.get("timeout", settings.llm_timeout_seconds)),
            max_retries=int(extra.get("max_retries", settings.llm_max_retries)),
            extra_body=extra.get("extra_body"),
        )
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        return LLMConfig(
            base_url=env.get("OPENAI_BASE_URL") or None,
            api_key=env.get("OPENAI_API_KEY") or "not-needed",
            model=env.get("OPENAI_MODEL") or "gpt-4o-mini",
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
        )
    return None


def _base_url(host: str | None, port: int | None, path: str | None) -> str | None:
    if not host:
        return None
    if host.startswith(("http://", "https://")):
        return host
    netloc = f"{host}:{port}" if port else host
    return f"https://{netloc}{path or '/v1'}"


def build_summarizer(settings: Settings) -> Summarizer:
    """Pick the summariser the settings ask for."""
    if settings.summarizer == "offline":
        return OfflineSummarizer()
    config = llm_config(settings)
    if config is None:
        if settings.summarizer == "openai":
            raise SettingsError(
                f"summarizer is 'openai' but neither connection {settings.llm_conn_id!r} nor "
                "OPENAI_API_KEY/OPENAI_BASE_URL is set"
            )
        log.info("no LLM connection %r: using the offline extractive summariser", settings.llm_conn_id)
        return OfflineSummarizer()
    log.info("summariser: OpenAI-compatible endpoint, model %s", config.model)
    return OpenAISummarizer(config)


def statsd_metrics(settings: Settings, env: Mapping[str, str] | None = None) -> Metrics:
    """Return a StatsD client from the connection or STATSD_HOST/STATSD_PORT; a no-op when neither exists."""
    env = os.environ if env is None else env
    conn = _connection(settings.statsd_conn_id)
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
    from butler_memory import erasure

    env = os.environ if env is None else env
    conn = None if env.get(erasure.SECRET_ENV) else _connection(settings.erasure_secret_conn_id)
    try:
        return erasure.erasure_secret(env, connection_password=conn.password if conn is not None else None)
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
        budget=TokenBudget(locks.client, settings) if settings.daily_token_budget > 0 else None,
    )
