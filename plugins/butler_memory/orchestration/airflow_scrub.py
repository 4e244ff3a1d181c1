"""Take the ids an erasure named out of Airflow's metadata DB once its ``memory_erasure`` run finished.

A task cannot do it: the Task SDK offers no way to change a run's conf and blocks the ORM in task
processes. So the ``butler_memory_erasure_scrub`` plugin registers :func:`on_dag_run_success` and
:func:`on_dag_run_failed` as listeners: Airflow calls them where a run's state changes (the
scheduler, ``dag.test()``, the API server when someone marks a run), which reaches the metadata DB.
They scrub the run's conf on the run object at once, and the rest once that session has committed,
in a session of their own (see :func:`scrub_finished_erasure`); a failure is logged, never raised.

* Every finished ``memory_erasure`` run: the user id and event ids of its conf become ``[erased]``
  there, in the XComs, rendered fields and task labels of every finished ``memory_erasure`` run
  (earlier dry runs of the same id too) and in the event log rows of the DAG (a trigger's audit row
  holds the conf it was given).
* A whole user erased (result ``erased`` or ``already_erased``): their id also goes from every
  finished run of every ``memory_*`` DAG: conf (``user_ids``), XComs (scan lists, results),
  rendered fields, mapped task labels (``rendered_map_index``) and the event log.

Runs still going are left alone (a running compression's scan list must keep its length); an
erasure run after they finished takes the id out of them too. Task log files are not rewritten:
docs/erasure.md says which remain and how to remove them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.listeners import hookimpl

from butler_memory.operations.audit import ALREADY_ERASED
from butler_memory.operations.erasure import ERASED, id_pattern

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

ERASURE_DAG_ID = "memory_erasure"
ERASURE_TASK_ID = "forget"
OUR_DAGS = "memory_"
"""Every butler-memory DAG id starts with this; nothing outside them is touched."""
MARK = "[erased]"


@hookimpl
def on_dag_run_success(dag_run: DagRun, msg: str) -> None:
    """Scrub a finished erasure run."""
    scrub_finished_erasure(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: DagRun, msg: str) -> None:
    """Scrub a finished erasure run (a failed one names the id as well)."""
    scrub_finished_erasure(dag_run)


def scrub_finished_erasure(dag_run: DagRun) -> None:
    """Scrub a finished ``memory_erasure`` run's ids once the session that finished it has committed.

    The scheduler forbids commits inside its loop (they would break its HA row locks) and holds the
    run's row locked until it commits, so the work waits for that commit (``after_commit`` of the
    session the state change happens in: the run's own, else the thread's scoped session, which is
    the caller's) and then runs in a session of its own. Meanwhile the run object itself gets the
    scrubbed conf, so whatever writes it back (the scheduler's commit, ``dag.test()``) writes that.
    A scrub that fails is logged (no id) and never reaches the caller; it is retried by the next
    erasure run naming the same user.
    """
    from airflow import settings
    from sqlalchemy import event
    from sqlalchemy.orm import object_session

    if dag_run.dag_id != ERASURE_DAG_ID:
        return
    conf = dict(dag_run.conf or {})
    user_id = conf.get("user_id")
    if not isinstance(user_id, str) or not user_id or user_id == MARK:
        return
    event_ids = [e for e in conf.get("event_ids") or [] if isinstance(e, str) and e]
    dag_run.conf = redact(conf, [id_pattern(form) for form in _stored_forms([user_id, *event_ids])])
    scoped = settings.Session
    session = object_session(dag_run) or (scoped() if scoped is not None else None)
    if session is None:  # no ORM in this process: nothing can have changed the run here
        return
    run_id, run_pk = dag_run.run_id, dag_run.id
    event.listen(session, "after_commit", lambda _: _scrub_after_commit(run_pk, run_id, user_id, event_ids), once=True)


def _scrub_after_commit(run_pk: int, run_id: str, user_id: str, event_ids: list[str]) -> None:
    """Scrub in a session of its own; log the outcome by counts, never by id."""
    from airflow import settings

    factory = settings.NonScopedSession
    if factory is None:
        return
    try:
        session = factory()
        try:
            whole_user = _erased_whole_user(session, run_pk)
            changed = _scrub(session, [user_id, *event_ids], dag_ids=[ERASURE_DAG_ID], run_pk=run_pk)
            if whole_user:
                for table, n in _scrub(session, [user_id], dag_ids=None, run_pk=run_pk).items():
                    changed[table] = changed.get(table, 0) + n
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
    except Exception as exc:  # the caller's run is finished and committed: never fail it for this
        log.error("memory_erasure run %s: scrubbing the metadata DB failed (%s)", run_id, type(exc).__name__)
        return
    log.info(
        "memory_erasure run %s: %d id(s) taken out of the metadata DB%s; rows changed: %s",
        run_id,
        1 + len(event_ids),
        " (whole user: from every memory_* DAG)" if whole_user else "",
        changed or "none",
    )


def _erased_whole_user(session: Session, run_pk: int) -> bool:
    """Return whether the run's result says a whole user was erased (now or before)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    value = session.scalar(
        select(XComModel.value).where(
            XComModel.dag_run_id == run_pk, XComModel.task_id == ERASURE_TASK_ID, XComModel.key == "return_value"
        )
    )
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict) and value.get("kind") == "user" and value.get("status") in (ERASED, ALREADY_ERASED)


def _scrub(session: Session, ids: Sequence[str], *, dag_ids: Sequence[str] | None, run_pk: int) -> dict[str, int]:
    """Replace ``ids`` by ``[erased]`` in finished runs of ``dag_ids`` (None: every memory_* DAG) and in run ``run_pk``."""
    from airflow.models.dagrun import DagRun
    from airflow.models.log import Log
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.models.xcom import XComModel
    from airflow.utils.state import DagRunState
    from sqlalchemy import Text, cast, or_, select, tuple_

    patterns = [id_pattern(form) for form in _stored_forms(ids)]
    likes = [_like(form) for form in _stored_forms(ids)]

    def mentions(column: Any) -> Any:
        return or_(*(cast(column, Text).like(like, escape="\\") for like in likes))

    def ours(column: Any) -> Any:
        return column.in_(dag_ids) if dag_ids is not None else column.startswith(OUR_DAGS, autoescape=True)

    # The run itself by id: dag.test() never writes a run's final state to the DB.
    finished = select(DagRun.dag_id, DagRun.run_id).where(
        ours(DagRun.dag_id), or_(DagRun.state.in_([DagRunState.SUCCESS, DagRunState.FAILED]), DagRun.id == run_pk)
    )
    finished_ids = finished.with_only_columns(DagRun.id)
    changed: dict[str, int] = {}

    def rewrite(table: str, rows: Iterable[Any], attr: str) -> None:
        for row in rows:
            old = getattr(row, attr)
            new = redact(old, patterns)
            if new != old:
                setattr(row, attr, new)
                changed[table] = changed.get(table, 0) + 1

    rewrite(
        "dag_run", session.scalars(select(DagRun).where(DagRun.id.in_(finished_ids), mentions(DagRun.conf))), "conf"
    )
    rewrite(
        "xcom",
        session.scalars(select(XComModel).where(XComModel.dag_run_id.in_(finished_ids), mentions(XComModel.value))),
        "value",
    )
    rtif = RenderedTaskInstanceFields
    rewrite(
        "rendered_task_instance_fields",
        session.scalars(
            select(rtif).where(tuple_(rtif.dag_id, rtif.run_id).in_(finished), mentions(rtif.rendered_fields))
        ),
        "rendered_fields",
    )
    # TaskInstance maps the column to ``_rendered_map_index`` (``rendered_map_index`` is a read-only hybrid).
    for model, attr, table in (
        (TaskInstance, "_rendered_map_index", "task_instance"),
        (TaskInstanceHistory, "rendered_map_index", "task_instance_history"),
    ):
        column = getattr(model, attr)
        rows = session.scalars(select(model).where(tuple_(model.dag_id, model.run_id).in_(finished), mentions(column)))
        rewrite(table, rows, attr)
    rewrite("log", session.scalars(select(Log).where(ours(Log.dag_id), mentions(Log.extra))), "extra")
    session.flush()
    return changed


def _stored_forms(ids: Sequence[str]) -> list[str]:
    """Return each id as it is written in a column: plain, and escaped as JSON text stores it."""
    forms: list[str] = []
    for value in ids:
        for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
            if form not in forms:
                forms.append(form)
    return forms


def _like(text: str) -> str:
    """Return a LIKE pattern (escape character backslash) matching ``text`` anywhere."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def redact(value: Any, patterns: Sequence[re.Pattern[str]]) -> Any:
    """Return ``value`` with every match of ``patterns`` in its strings (keys too) replaced by ``[erased]``.

    The patterns are :func:`~butler_memory.operations.erasure.id_pattern`'s: a string that is the id
    goes whole, and in a longer one only the id bounded as ids are (another user's ``tg:alice`` stays).
    """
    if isinstance(value, str):
        for pattern in patterns:
            value = pattern.sub(MARK, value)
        return value
    if isinstance(value, dict):
        return {redact(k, patterns): redact(v, patterns) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item, patterns) for item in value]
    return value
