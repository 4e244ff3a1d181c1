"""What the pages show, read through the library: run documents, per-user status, lock state.

Every function returns plain JSON-ready dicts built from an explicit list of fields, so nothing
the pages were not meant to show (a summary, an event, a field added later) can slip through.
Nothing here imports Airflow.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pymongo import DESCENDING
from redis.exceptions import RedisError

from butler_memory.fold.compression import FAILED
from butler_memory.orchestration.params import MAX_RUN_ID_CHARS, MAX_USER_ID_CHARS
from butler_memory.storage.locks import UserLocks
from butler_memory.storage.profiles import COMPRESSED_AT_FIELD, PENDING_FIELD, VERSION_FIELD
from butler_memory.storage.store import MemoryStore

DAG_ID = "memory_compression"
DAG_IDS = {"daily": DAG_ID, "catchup": "memory_compression_catchup"}
"""Run kind -> the DAG whose runs they are."""
CATCHUP_STATE = "catchup"
MAPPED_TASK_ID = "compress_user"
CHART_RUNS = 30
"""The chart shows the newest this many runs, whatever page of the table is open."""
MAX_ERROR_CHARS = 500
"""Error messages are content-free by design; the cap keeps one odd message from filling a page."""

NEWEST_FIRST = [("started_at", DESCENDING), ("run_id", DESCENDING)]
RUN_COUNT_FIELDS = (
    "users_found",
    "users_compressed",
    "users_dry_run",
    "users_skipped_locked",
    "users_skipped_below_threshold",
    "users_skipped_budget",
    "users_skipped_stale",
    "users_failed",
    "backlog_events",
    "backlog_left",
    "events_folded",
    "events_deleted",
    "prompt_tokens",
    "completion_tokens",
)
USER_COUNT_FIELDS = (
    "events_before",
    "events_folded",
    "events_deleted",
    "events_after",
    "summary_chars",
    "prompt_tokens",
    "completion_tokens",
)


MAX_VERSIONS = 50
"""The user page lists this many newest summary versions."""
VERSION_TEXT_FIELDS = ("kind", "run_id", "summarizer", "model", "prompt_version")
VERSION_INT_FIELDS = ("version", "base_version", "refolded_from")


class InputError(ValueError):
    """A request value the pages refuse; the message names the value and the rule."""


def check_id(value: str, *, name: str, max_chars: int) -> str:
    """Return ``value`` if it is a usable id: 1 to ``max_chars`` characters, none of them control characters."""
    if not value:
        raise InputError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise InputError(f"{name} must be at most {max_chars} characters, got {len(value)}")
    # Category C: control, format (invisible), surrogate, private-use and unassigned code points.
    bad = next((c for c in value if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        raise InputError(f"{name} must not contain control or invisible characters (found U+{ord(bad):04X})")
    return value


def check_user_id(value: str) -> str:
    """Validate a user id from a request."""
    return check_id(value, name="user_id", max_chars=MAX_USER_ID_CHARS)


def check_run_id(value: str) -> str:
    """Validate a DAG run id from a request."""
    return check_id(value, name="run_id", max_chars=MAX_RUN_ID_CHARS)


def iso(value: Any) -> str | None:
    """Return a stored timestamp as ISO 8601 in UTC (pymongo returns naive UTC datetimes), else None."""
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _count(value: Any) -> int:
    """Return a stored count as an int; anything else (missing, text, negative) counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return round(max(float(value), 0.0), 3)


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_kind(value: str) -> str:
    """Return a run kind ("daily" or "catchup"); raise InputError for anything else."""
    if value not in DAG_IDS:
        raise InputError(f"kind must be one of {', '.join(DAG_IDS)}")
    return value


def _runs_of(store: MemoryStore, kind: str) -> Any:
    return store.catchup_runs if kind == "catchup" else store.runs


def task_instance_path(run_id: str, map_index: int, kind: str = "daily") -> str:
    """Return the Airflow UI route of one mapped ``compress_user`` instance, relative to the UI root."""
    return f"dags/{DAG_IDS[kind]}/runs/{quote(run_id, safe='')}/tasks/{MAPPED_TASK_ID}/mapped/{map_index}"


def run_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Return one run's row: status, user and event counts, LLM tokens, duration."""
    counts = {name: _count(doc.get(name)) for name in RUN_COUNT_FIELDS}
    return {
        "run_id": str(doc.get("run_id", "")),
        "kind": "catchup" if doc.get("kind") == "catchup" else "daily",
        "started_at": iso(doc.get("started_at")),
        "finished_at": iso(doc.get("finished_at")),
        "status": "failed" if counts["users_failed"] else "success",
        "dry_run": bool(doc.get("dry_run")),
        **counts,
        "users_skipped": counts["users_skipped_locked"]
        + counts["users_skipped_below_threshold"]
        + counts["users_skipped_budget"]
        + counts["users_skipped_stale"],
        "llm_tokens": counts["prompt_tokens"] + counts["completion_tokens"],
        "seconds": _seconds(doc.get("seconds")),
        "freshness_seconds_p95": _lag(doc.get("freshness_seconds_p95")),
        "freshness_seconds_max": _lag(doc.get("freshness_seconds_max")),
    }


def guard_outcomes(value: Any) -> dict[str, str]:
    """Return stored guard outcomes ``{guard: outcome}`` as short strings; anything else is dropped."""
    if not isinstance(value, Mapping):
        return {}
    return {
        str(name)[:40]: str(outcome)[:20]
        for name, outcome in value.items()
        if isinstance(name, str) and isinstance(outcome, str)
    }


def _lag(value: Any) -> float | None:
    """A freshness figure, or None when the run compressed nobody (or the document predates it)."""
    return None if value is None else _seconds(value)


def freshness_line(runs: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Return the freshness of the newest run (of those given, newest first) that compressed someone."""
    for run in runs:
        if run.get("freshness_seconds_max") is not None:
            return {
                "run_id": run["run_id"],
                "kind": run["kind"],
                "p95": run["freshness_seconds_p95"],
                "max": run["freshness_seconds_max"],
            }
    return None


def user_row(row: Mapping[str, Any], map_index: int) -> dict[str, Any]:
    """Return one user's outcome in a run, with the map index of its ``compress_user`` instance."""
    return {
        "user_id": str(row.get("user_id", "")),
        "guards": guard_outcomes(row.get("guards")),
        "map_index": map_index,
        "status": str(row.get("status", "")),
        **{name: _count(row.get(name)) for name in USER_COUNT_FIELDS},
        "seconds": _seconds(row.get("seconds")),
        "error_type": _text(row.get("error_type"), 100),
        "error": _text(row.get("error"), MAX_ERROR_CHARS),
    }


def _map_index(row: Mapping[str, Any], position: int) -> int:
    index = row.get("map_index")
    return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else position


def list_runs(store: MemoryStore, *, limit: int, offset: int, kind: str = "daily") -> dict[str, Any]:
    """Return one page of run rows of one kind, newest first, and the total number of those runs."""
    runs = _runs_of(store, kind)
    cursor = runs.find({}, {"_id": 0, "users": 0}).sort(NEWEST_FIRST).skip(offset).limit(limit)
    return {
        "kind": kind,
        "runs": [run_summary(doc) for doc in cursor],
        "total": runs.count_documents({}),
        "limit": limit,
        "offset": offset,
    }


def chart_runs(store: MemoryStore, n: int = CHART_RUNS) -> list[dict[str, Any]]:
    """Return the newest ``n`` daily runs, oldest first: what the chart plots left to right."""
    cursor = store.runs.find({}, {"_id": 0, "users": 0}).sort(NEWEST_FIRST).limit(n)
    return [run_summary(doc) for doc in cursor][::-1]


def catchup_status(store: MemoryStore) -> dict[str, Any]:
    """Return the catch-up DAG's counters: runs that found someone, idle runs, when it last ran and scanned."""
    state = store.load_state(CATCHUP_STATE)
    return {
        "runs": _count(state.get("runs")),
        "idle_runs": _count(state.get("idle_runs")),
        "last_run_at": iso(state.get("last_run_at")),
        "last_idle_at": iso(state.get("last_idle_at")),
        "scanned_through": iso(state.get("scanned_through")),
    }


def run_detail(store: MemoryStore, run_id: str, kind: str = "daily") -> dict[str, Any] | None:
    """Return a run's row, its failed users and every user's outcome; None when no such run was stored.

    Each row names the map index of the ``compress_user`` instance that compressed the user (a batch
    of ``users_per_task`` users); rows of older runs, without it, are in scan order, one per instance.
    """
    doc = _runs_of(store, kind).find_one({"run_id": run_id}, {"_id": 0})
    if doc is None:
        return None
    raw_users = doc.get("users")
    users = [
        user_row(u, _map_index(u, i))
        for i, u in enumerate(raw_users if isinstance(raw_users, list) else [])
        if isinstance(u, Mapping)
    ]
    tally: dict[str, dict[str, int]] = {}
    for u in users:
        for guard, outcome in u["guards"].items():
            tally.setdefault(guard, {}).setdefault(outcome, 0)
            tally[guard][outcome] += 1
    return {
        **run_summary(doc),
        "guard_outcomes": tally,
        "failed_users": [u for u in users if u["status"] == FAILED],
        "users": users,
    }


def _key_time(value: Any) -> str | None:
    return iso(value.get("created_at")) if isinstance(value, Mapping) else None


def user_versions(store: MemoryStore, user_id: str, limit: int = MAX_VERSIONS) -> list[dict[str, Any]]:
    """Return a user's newest summary versions, newest first: metadata only.

    The text's length is computed inside MongoDB: the text never leaves the database.
    """
    rows = store.history.coll.aggregate(
        [
            {"$match": {"user_id": user_id}},
            {"$sort": {"version": DESCENDING}},
            {"$limit": limit},
            {
                "$project": {
                    "_id": 0,
                    **{name: 1 for name in (*VERSION_TEXT_FIELDS, *VERSION_INT_FIELDS)},
                    "created_at": 1,
                    "covers": 1,
                    "guards": 1,
                    "undone_runs": 1,
                    "text_chars": {"$cond": [{"$eq": [{"$type": "$text"}, "string"]}, {"$strLenCP": "$text"}, 0]},
                }
            },
        ]
    )
    versions = []
    for row in rows:
        covers = row.get("covers") if isinstance(row.get("covers"), Mapping) else None
        undone = row.get("undone_runs")
        versions.append(
            {
                **{name: _text(row.get(name), MAX_RUN_ID_CHARS) for name in VERSION_TEXT_FIELDS},
                **{name: None if row.get(name) is None else _count(row.get(name)) for name in VERSION_INT_FIELDS},
                "created_at": iso(row.get("created_at")),
                "events": _count(covers.get("count")) if covers else 0,
                "first_event_at": _key_time(covers.get("first")) if covers else None,
                "last_event_at": _key_time(covers.get("last")) if covers else None,
                "guards": guard_outcomes(row.get("guards")),
                "undone_runs": [_text(r, MAX_RUN_ID_CHARS) for r in undone if isinstance(r, str)]
                if isinstance(undone, list)
                else [],
                "text_chars": _count(row.get("text_chars")),
            }
        )
    return versions


def user_status(store: MemoryStore, user_id: str) -> dict[str, Any] | None:
    """Return a user's live event count, summary bookkeeping and last run; None when nothing is known.

    The summary's length is computed inside MongoDB: its text never leaves the database.
    """
    summary = "$" + store.settings.summary_field
    pending = "$" + PENDING_FIELD
    rows = list(
        store.profiles.aggregate(
            [
                {"$match": {"user_id": user_id}},
                {"$limit": 1},
                {
                    "$project": {
                        "_id": 0,
                        "version": "$" + VERSION_FIELD,
                        "compressed_at": "$" + COMPRESSED_AT_FIELD,
                        "summary_chars": {
                            "$cond": [{"$eq": [{"$type": summary}, "string"]}, {"$strLenCP": summary}, 0]
                        },
                        "pending": {"$ne": [{"$ifNull": [pending, None]}, None]},
                    }
                },
            ]
        )
    )
    profile = rows[0] if rows else None
    events = store.count_events(user_id)
    last = store.runs.find_one(
        {"users.user_id": user_id}, {"_id": 0, "run_id": 1, "started_at": 1, "users": 1}, sort=NEWEST_FIRST
    )
    versions = user_versions(store, user_id)
    if profile is None and events == 0 and last is None and not versions:
        return None
    return {
        "versions": versions,
        "user_id": user_id,
        "events": events,
        "profile": profile is not None,
        "summary_version": _count((profile or {}).get("version")),
        "summary_chars": _count((profile or {}).get("summary_chars")),
        "last_compressed_at": iso((profile or {}).get("compressed_at")),
        "pending_fold": bool((profile or {}).get("pending")),
        "last_run": _last_run(last, user_id) if last is not None else None,
    }


def _last_run(doc: Mapping[str, Any], user_id: str) -> dict[str, Any] | None:
    users = doc.get("users")
    for index, row in enumerate(users if isinstance(users, list) else []):
        if isinstance(row, Mapping) and row.get("user_id") == user_id:
            outcome = user_row(row, index)
            return {
                "run_id": str(doc.get("run_id", "")),
                "started_at": iso(doc.get("started_at")),
                **{k: outcome[k] for k in ("map_index", "status", "events_folded", "error_type")},
            }
    return None


def lock_status(locks: UserLocks, user_id: str) -> dict[str, Any]:
    """Return whether the user's compression lock is held now and its TTL; an error note when Redis fails."""
    try:
        ttl = locks.holder_ttl(user_id)
    except RedisError as exc:
        return {"held": None, "ttl_seconds": None, "error": f"Redis unreachable ({type(exc).__name__})"}
    return {"held": ttl is not None, "ttl_seconds": None if ttl is None else round(ttl, 1), "error": None}
