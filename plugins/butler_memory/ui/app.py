"""The FastAPI app the plugin mounts (at ``/butler-memory``): HTML pages and the same data as JSON.

Every route requires an Airflow user with a permission of its own, ``GET`` on the custom view
``Butler Memory`` (the Butler's user ids are operators' data, not a DAG's), and read access to the
DAG whose runs it shows (``memory_compression``, ``memory_compression_catchup`` for catch-up runs,
both for the pages that show both). The app-wide dependency takes the user from Airflow's own
``get_user`` (the JWT in ``Authorization: Bearer`` or the UI's ``_token`` cookie) and asks the
configured auth manager. Anonymous requests get 401, users without the permission 403.

MongoDB and Redis are reached through the library with Airflow connections and the same settings
the DAG resolves (``BUTLER_MEMORY_*`` environment, the ``butler_memory`` Variable). Imported only by
the API server (through the plugin's ``fastapi_apps``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import pymongo
from airflow.api_fastapi.app import API_ROOT_PATH, get_auth_manager
from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowRuntimeError
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from butler_memory.core.settings import Settings, SettingsError
from butler_memory.orchestration import connections
from butler_memory.orchestration.connections import resolve_settings
from butler_memory.storage.store import MemoryStore
from butler_memory.ui import data, render

log = logging.getLogger(__name__)

MONGO_TIMEOUT_SECONDS = 5.0
"""Every MongoDB round trip of a request, server selection included, gives up after this long."""
DEFAULT_LIMIT = 25
MAX_LIMIT = 200
MAX_OFFSET = 1_000_000
"""Far beyond one run a day for centuries; keeps the skip a small integer MongoDB accepts."""
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Rows per page, 1 to 200.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Rows to skip, newest first.")]
Kind = Annotated[
    str, Query(max_length=16, description="daily (memory_compression) or catchup (memory_compression_catchup).")
]
CATCHUP_ROWS = 10
"""The history page lists this many of the newest catch-up runs that found someone due."""


RESOURCE_NAME = "Butler Memory"
"""The custom view the pages need ``GET`` on (FAB: ``can_read`` on this resource)."""
SIMPLE_MIN_ROLE = "OP"
"""SimpleAuthManager grants every custom view to every role from VIEWER up, whatever the method; the
pages also need this role there (the one that reads connections and variables: operators' data)."""


def _simple_role_allows(auth_manager: BaseAuthManager[Any], user: BaseUser) -> bool:
    """Return False for a SimpleAuthManager user below ``SIMPLE_MIN_ROLE``; True under any other manager."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import (
        SimpleAuthManager,
        SimpleAuthManagerRole,
    )

    if not isinstance(auth_manager, SimpleAuthManager):
        return True
    role = str(getattr(user, "role", None) or "").upper()
    if role not in SimpleAuthManagerRole.__members__:
        return False
    return bool(SimpleAuthManagerRole[role].order >= SimpleAuthManagerRole[SIMPLE_MIN_ROLE].order)


def _dags_shown(request: Request) -> list[str]:
    """Return the DAGs whose runs the requested route shows: by ``kind`` for one kind, else both."""
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    kind = request.query_params.get("kind", "daily")
    if path == "/api/chart":
        return [data.DAG_ID]
    if path.startswith(("/api/runs", "/runs/")) and kind in data.DAG_IDS:
        return [data.DAG_IDS[kind]]
    return list(data.DAG_IDS.values())  # the index and user pages show both kinds; a bad kind is a 422 later


def requires_memory_access(request: Request, user: GetUserDep) -> None:
    """Refuse (403) a user without ``GET`` on ``Butler Memory`` or read access to the DAGs the route shows."""
    auth_manager = get_auth_manager()
    allowed = auth_manager.is_authorized_custom_view(method="GET", resource_name=RESOURCE_NAME, user=user)
    if not (allowed and _simple_role_allows(auth_manager, user)):
        raise HTTPException(403, f"Forbidden: this Airflow user lacks the {RESOURCE_NAME} permission")
    for dag_id in _dags_shown(request):
        if not auth_manager.is_authorized_dag(method="GET", details=DagDetails(id=dag_id), user=user):
            raise HTTPException(403, f"Forbidden: this Airflow user may not read the {dag_id} DAG")


app = FastAPI(
    title="Butler memory compression",
    description="Run history and per-user status of the memory_compression DAG.",
    dependencies=[Depends(requires_memory_access)],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


class ServiceUnavailable(Exception):
    """MongoDB (or the settings needed to reach it) cannot serve this request; the message says why."""


# -- plumbing --------------------------------------------------------------------------------------


def _settings() -> Settings:
    """Resolve settings as the DAG does, minus run params."""
    try:
        return resolve_settings({})
    except SettingsError as exc:
        raise ServiceUnavailable(f"butler_memory settings are invalid: {exc}") from None


@contextmanager
def _store(settings: Settings) -> Iterator[MemoryStore]:
    """Open the Butler database through MongoHook; turn any MongoDB failure into ServiceUnavailable."""
    try:
        store = connections.mongo_store(settings)
    except (AirflowNotFoundException, AirflowRuntimeError):
        raise ServiceUnavailable(f"Airflow connection {settings.mongo_conn_id!r} is not defined") from None
    except PyMongoError as exc:
        raise ServiceUnavailable(
            f"MongoDB connection {settings.mongo_conn_id!r} is unusable ({type(exc).__name__})"
        ) from None
    try:
        with pymongo.timeout(MONGO_TIMEOUT_SECONDS):
            yield store
    except PyMongoError as exc:
        # Only the exception type: a server's error text can quote query values or documents.
        log.warning("memory compression page: MongoDB failed with %s", type(exc).__name__)
        raise ServiceUnavailable(
            f"MongoDB is unreachable or failed ({type(exc).__name__}); try again in a moment"
        ) from None
    finally:
        store.close()


def _lock(settings: Settings, user_id: str) -> dict[str, Any]:
    """Read the user's lock through RedisHook; Redis trouble is reported in the result, not raised."""
    try:
        locks = connections.user_locks(settings)
    except (AirflowNotFoundException, AirflowRuntimeError):
        return {
            "held": None,
            "ttl_seconds": None,
            "error": f"Airflow connection {settings.redis_conn_id!r} is not defined",
        }
    except RedisError as exc:
        return {"held": None, "ttl_seconds": None, "error": f"Redis unreachable ({type(exc).__name__})"}
    try:
        return data.lock_status(locks, user_id)
    finally:
        locks.close()


def _links(request: Request) -> render.Links:
    return render.Links(request.scope.get("root_path", ""), API_ROOT_PATH)


def _html(request: Request, build: Any, status_code: int = 200, **kwargs: Any) -> HTMLResponse:
    """Render a page with a fresh nonce and a Content-Security-Policy allowing nothing else."""
    nonce = secrets.token_urlsafe(16)
    content = build(links=_links(request), nonce=nonce, **kwargs)
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    )
    return HTMLResponse(content, status_code=status_code, headers={**NO_STORE, "Content-Security-Policy": csp})


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status_code, headers={**NO_STORE, **(headers or {})})


def _is_api(request: Request) -> bool:
    root = request.scope.get("root_path", "")
    return request.url.path.removeprefix(root).startswith("/api/")


def _error(request: Request, status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    if _is_api(request):
        return _json({"detail": message}, status_code, headers)
    login_url = None
    if status_code == 401:
        login_url = get_auth_manager().get_url_login(next_url=str(request.url))
    response = _html(request, render.error_page, status_code, code=status_code, message=message, login_url=login_url)
    response.headers.update(headers or {})
    return response


@app.exception_handler(StarletteHTTPException)
def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return _error(request, exc.status_code, str(exc.detail), dict(exc.headers or {}))


@app.exception_handler(RequestValidationError)
def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    # "limit: Input should be less than or equal to 200"; the rejected value itself is not echoed.
    problems = [f"{err['loc'][-1]}: {err['msg']}" for err in exc.errors()]
    return _error(request, 422, "; ".join(problems) or "invalid request")


@app.exception_handler(data.InputError)
def _invalid_input(request: Request, exc: data.InputError) -> Response:
    return _error(request, 422, str(exc))


@app.exception_handler(ServiceUnavailable)
def _unavailable(request: Request, exc: ServiceUnavailable) -> Response:
    return _error(request, 503, str(exc), {"Retry-After": "30"})


# -- reads shared by the pages and the JSON ----------------------------------------------------------


def _runs(limit: int, offset: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with _store(_settings()) as store:
        return data.list_runs(store, limit=limit, offset=offset), data.chart_runs(store)


def _catchup() -> tuple[dict[str, Any], dict[str, Any]]:
    with _store(_settings()) as store:
        return data.list_runs(store, limit=CATCHUP_ROWS, offset=0, kind="catchup"), data.catchup_status(store)


def _run(run_id: str, kind: str = "daily") -> dict[str, Any]:
    run_id = data.check_run_id(run_id)
    kind = data.check_kind(kind)
    with _store(_settings()) as store:
        detail = data.run_detail(store, run_id, kind)
    if detail is None:
        raise HTTPException(404, f"no run {run_id!r} in the run history")
    return detail


def _user(user_id: str) -> dict[str, Any]:
    user_id = data.check_user_id(user_id)
    settings = _settings()
    with _store(settings) as store:
        status = data.user_status(store, user_id)
    if status is None:
        raise HTTPException(404, f"no events, profile or run record for user {user_id!r}")
    return {**status, "lock": _lock(settings, user_id)}


# -- JSON --------------------------------------------------------------------------------------------


@app.get("/api/runs")
def api_runs(limit: Limit = DEFAULT_LIMIT, offset: Offset = 0, kind: Kind = "daily") -> JSONResponse:
    """One page of runs of one kind (daily or catchup), newest first; catchup adds its counters."""
    kind = data.check_kind(kind)
    if kind == "catchup":
        with _store(_settings()) as store:
            listing = data.list_runs(store, limit=limit, offset=offset, kind=kind)
            listing["status"] = data.catchup_status(store)
        return _json(listing)
    listing, _ = _runs(limit, offset)
    return _json(listing)


@app.get("/api/chart")
def api_chart() -> JSONResponse:
    """The newest runs the chart plots, oldest first."""
    with _store(_settings()) as store:
        runs = data.chart_runs(store)
    keep = ("run_id", "started_at", "status", "events_folded", "users_failed")
    return _json({"runs": [{k: r[k] for k in keep} for r in runs]})


@app.get("/api/runs/{run_id:path}")
def api_run(run_id: str, kind: Kind = "daily") -> JSONResponse:
    """One run with its failed users and every user's outcome."""
    detail = _run(run_id, kind)
    links = render.Links("", API_ROOT_PATH)
    for user in detail["users"]:  # failed_users holds the same dicts
        user["task_instance_url"] = links.task_instance(detail["run_id"], user["map_index"], detail["kind"])
    return _json(detail)


@app.get("/api/users/{user_id:path}")
def api_user(user_id: str) -> JSONResponse:
    """A user's live event count, summary version and length, last run and lock."""
    return _json(_user(user_id))


# -- HTML --------------------------------------------------------------------------------------------


@app.get("/", response_class=HTMLResponse)
def index(request: Request, limit: Limit = DEFAULT_LIMIT, offset: Offset = 0) -> HTMLResponse:
    """Run history: chart, table, user lookup."""
    listing, chart = _runs(limit, offset)
    catchup, status = _catchup()
    return _html(request, render.runs_page, listing=listing, chart=chart, catchup=catchup, catchup_status=status)


@app.get("/runs/{run_id:path}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, kind: Kind = "daily") -> HTMLResponse:
    """One run (``?kind=catchup`` for a catch-up run)."""
    return _html(request, render.run_page, detail=_run(run_id, kind))


@app.get("/users", response_class=HTMLResponse)
def user_page(request: Request, user_id: Annotated[str, Query(description="The Butler's user id.")]) -> HTMLResponse:
    """One user's status."""
    return _html(request, render.user_page, status=_user(user_id))
