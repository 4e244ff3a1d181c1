"""Bodies of the memory_rollback and memory_refold DAGs' tasks: Airflow context in, engine calls,
small XComs out.

XCom carries user ids, versions, counts and statuses, never content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from butler_memory.core.errors import CompressionError, RollbackRefusedError
from butler_memory.core.runs import resolve_run, run_key
from butler_memory.fold.compression import FAILED, SKIPPED_LOCKED
from butler_memory.operations.intent import REFUSED
from butler_memory.operations.rollback import (
    RollbackResult,
    RunDecision,
    rollback_markdown,
    users_of_run,
)
from butler_memory.orchestration.connections import build_engine, resolve_settings
from butler_memory.orchestration.params import REFOLD, ROLLBACK
from butler_memory.orchestration.task_outcome import (
    FAILURE_XCOM_KEY,
    fail,
    max_map_length,
    params_checked,
    raised,
    settings_checked,
    xcom_rows,
)

log = logging.getLogger(__name__)

FINE = ("rolled_back", "dry_run", "not_changed")
DECISION_XCOM_KEY = "refused_run"
"""The plan's dry pass over every user, pushed when it refused the run as one (no user is rolled back)."""
HOW_PARTIAL = "trigger it again with partial on"


def plan(params: Mapping[str, Any], ti: Any, run_id: str) -> list[str]:
    """Return the users to roll back: the given ones, else every user the run wrote versions for.

    All of them or none (issue 23.1): unless ``partial``, every user is dry-run first, and when any
    would be refused the plan returns none, pushes that dry pass for the report and says so.
    rollback_user is mapped once per user: more users than Airflow's ``max_map_length`` fail the
    plan before any is dry-run (Airflow would refuse the list only after that pass), naming the CLI.
    """
    params_checked(params, ROLLBACK)
    with settings_checked():
        settings = resolve_settings({})
    with build_engine(settings) as engine:
        if not params.get("dry_run"):
            engine.locks.ping()  # no lock service, no rollback
            engine.store.ensure_indexes()
        target = _target(engine, params)
        users = users_of_run(engine.store, target, params.get("user_ids") or None)
        _check_map_length(target, users)
        if not params.get("partial"):
            try:
                decision = RunDecision([_rollback(engine, user, target, params, ti, run_id, True) for user in users])
            except CompressionError as exc:
                raise raised(exc) from None
            if not decision.applies:
                log.warning("rollback of run %s: %s", target, decision.refusal(HOW_PARTIAL))
                ti.xcom_push(key=DECISION_XCOM_KEY, value=[r.to_dict() for r in decision.results])
                return []
    log.info("rollback of run %s: %d user(s)", target, len(users))
    return users


def _check_map_length(target: str, users: list[str]) -> None:
    """Fail for good when the run has more users than one rollback_user instance each can take."""
    most = max_map_length()
    if len(users) > most:
        raise fail(
            f"{len(users)} users to roll back in run {target}, more than the {most} rollback_user instances Airflow "
            f"maps (max_map_length); nothing was rolled back. Roll it back with python -m butler_memory rollback "
            f"--run {target} (all users or none), or trigger this DAG with at most {most} user_ids at a time"
        )


def _target(engine: Any, params: Mapping[str, Any]) -> str:
    """Return the run key the history records for the ``run_id`` param; fail naming what was found."""
    try:
        return resolve_run(params["run_id"], engine.store.history.run_names)
    except RollbackRefusedError as exc:
        raise fail(str(exc)) from None


def _rollback(
    engine: Any, user_id: str, target: str, params: Mapping[str, Any], ti: Any, run_id: str, dry_run: bool
) -> RollbackResult:
    """Roll back (or dry-run) one user as the params ask."""
    return engine.rollback(
        user_id,
        target,
        rollback_id=run_key(ti.dag_id, run_id),
        cascade=bool(params.get("cascade")),
        allow_missing=bool(params.get("allow_missing_events")),
        dry_run=dry_run,
    )


def rollback(user_id: str, params: Mapping[str, Any], ti: Any, run_id: str) -> dict[str, Any]:
    """Roll back one user; a held lock or a transient error retries, a refusal fails at once."""
    params_checked(params, ROLLBACK)
    settings = resolve_settings({})
    target = params["run_id"]
    try:
        with build_engine(settings) as engine:
            target = _target(engine, params)
            result = _rollback(engine, user_id, target, params, ti, run_id, bool(params.get("dry_run")))
    except CompressionError as exc:
        ti.xcom_push(
            key=FAILURE_XCOM_KEY, value=RollbackResult(user_id, FAILED, run_id=target, message=str(exc)).to_dict()
        )
        raise raised(exc) from None
    log.info("user %s: %s (%s)", user_id, result.status, result.message)
    if result.status == SKIPPED_LOCKED:
        raise RuntimeError(f"user {user_id!r}: the lock is held (a compression is running); will retry")
    if result.status == REFUSED:
        ti.xcom_push(key=FAILURE_XCOM_KEY, value=result.to_dict())
        raise fail(result.message)
    return result.to_dict()


def report(params: Mapping[str, Any], ti: Any) -> dict[str, Any]:
    """Log every user's outcome as Markdown; fail when any user was refused or failed."""
    params_checked(params, ROLLBACK)
    users = ti.xcom_pull(task_ids="plan", key="return_value")
    if users is None:
        raise fail("plan did not produce a user list (it failed); nothing was rolled back")
    dry_pass = ti.xcom_pull(task_ids="plan", key=DECISION_XCOM_KEY)
    if dry_pass:  # the plan refused the run as one: nobody was rolled back
        decision = RunDecision([RollbackResult(**raw) for raw in dry_pass])
        refusal = decision.refusal(HOW_PARTIAL)
        log.info(
            "rollback report\n%s", rollback_markdown(params["run_id"], decision.results, dry_run=True, refusal=refusal)
        )
        raise fail(refusal)
    done = {r["user_id"]: r for r in xcom_rows(ti.xcom_pull(task_ids="rollback_user", key="return_value"))}
    failures = {f["user_id"]: f for f in xcom_rows(ti.xcom_pull(task_ids="rollback_user", key=FAILURE_XCOM_KEY))}
    results = []
    for user_id in users:
        raw = done.get(user_id) or failures.get(user_id)
        results.append(
            RollbackResult(**raw)
            if raw
            else RollbackResult(user_id, FAILED, run_id=params["run_id"], message="no result")
        )
    log.info("rollback report\n%s", rollback_markdown(params["run_id"], results, dry_run=bool(params.get("dry_run"))))
    bad = [r.user_id for r in results if r.status not in FINE]
    if bad:
        raise fail(f"{len(bad)} of {len(results)} user(s) not rolled back: {', '.join(bad[:20])}")
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    return {"run_id": params["run_id"], "users": len(results), "by_status": by_status}


def refold_users(params: Mapping[str, Any]) -> list[str]:
    """Return the user ids to re-fold: the param, validated at trigger time (at most max_map_length)."""
    params_checked(params, REFOLD)
    return list(params["user_ids"])


def refold(user_id: str, params: Mapping[str, Any], ti: Any, run_id: str) -> dict[str, Any]:
    """Re-fold one user from the archive; a held lock or a transient error retries, a refusal fails at once."""
    params_checked(params, REFOLD)
    settings = resolve_settings({})
    try:
        with build_engine(settings) as engine:
            result = engine.refold(user_id, run_id=run_key(ti.dag_id, run_id), dry_run=bool(params.get("dry_run")))
    except CompressionError as exc:
        raise raised(exc) from None
    log.info("user %s: %s (%s)", user_id, result.status, result.message)
    if result.status == SKIPPED_LOCKED:
        raise RuntimeError(f"user {user_id!r}: the lock is held (a compression is running); will retry")
    if result.status == REFUSED:
        raise fail(result.message)
    return result.to_dict()
