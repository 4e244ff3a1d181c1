"""The memory compression plugin inside a real ``airflow api-server``, behind Airflow's own auth.

One API server serves the whole module (startup costs 15-30 s on 2 cores). It runs in a process
group of its own on a free loopback port, on the session's migrated PostgreSQL metadata DB, with
SimpleAuthManager users ``admin`` (ADMIN) and ``operator`` (OP), who may read the pages,
``viewer`` (VIEWER) and ``editor`` (USER), who may read and trigger DAGs but not the pages, and
``outsider`` (no role: SimpleAuthManager grants a user without a role nothing, so it is
authenticated and still refused), and AIRFLOW_CONN_* variables pointing at this module's MongoDB database, the
session's Redis, StatsD sink and fake LLM.

While the server starts, the memory_compression DAG runs once in this process with ``dag.test()``
over the same services and metadata DB: one user below the threshold, two compressed, one locked
by the bot, one the LLM rejects. Every event carries a canary, every summary the LLM writes
another one; neither may appear in any response. Older runs are added with ``build_report`` and
``save_run`` (the report task's own functions) so that paging and the 30-run chart have material.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pymongo
import pytest
from playwright.sync_api import Browser, Locator, Page, expect
from pymongo.database import Database

from butler_memory.core.settings import Settings
from butler_memory.fold.report import build_report
from butler_memory.storage.store import MemoryStore
from tests.plugin.browser import chromium, page_with_token
from tests.population import BELOW, BIG, BIGGER, BROKEN, COMPRESSION_DEFAULTS, LOCKED, POPULATION, seed_population
from tools.fake_openai import FakeOpenAI
from tools.services import PostgresService, RedisService, free_port
from tools.standalone import AirflowProcess, wait_healthy

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "memory_compression"
PREFIX = "/butler-memory"
CANARY = "CANARY-ui-5f2a-private-diary"
"""In every event's content."""
SUMMARY_CANARY = "SUMMARY-CANARY-ui-81c3"
"""In every summary the fake LLM writes and in the locked user's stored summary."""
FAIL_MARKER = "FAIL-MARKER-ui-0d7e"
"""In the broken user's content: the fake LLM answers 400 to it."""
LOCKED_SUMMARY = f"Сводка {SUMMARY_CANARY}: пользователь любит чай."
HOSTILE_USER = '<img src=x onerror="alert(1)">'
OLDER_RUNS = 34
PASSWORDS = {
    "admin": "admin-pw-ui",
    "operator": "operator-pw-ui",
    "viewer": "viewer-pw-ui",
    "editor": "editor-pw-ui",
    "outsider": "outsider-pw-ui",
}
ALLOWED, REFUSED = ("admin", "operator"), ("viewer", "editor", "outsider")
"""Who may read the pages: the Butler Memory permission (SimpleAuthManager: OP and up)."""
STARTUP_TIMEOUT = 180.0
PAGES = ["/", "/runs/{run_id}", f"/users?user_id={BIG}"]
APIS = ["/api/runs", "/api/chart", "/api/runs/{run_id}", f"/api/users/{BIG}"]
"""Every route of the app; ``{run_id}`` is the DAG run's id."""


@dataclass
class UI:
    """The running API server, its users' tokens and what the DAG run left behind."""

    base_url: str
    server: AirflowProcess
    tokens: dict[str, str]
    db: Database[dict[str, Any]]
    run_id: str
    older_run_ids: list[str]
    summaries: dict[str, str]
    profile_dir: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=60)

    def get(self, path: str, user: str | None = "admin", *, cookie: bool = False, **kwargs: Any) -> httpx.Response:
        """GET a path as ``user`` (None: anonymous), with the token as bearer header or as the UI's cookie."""
        headers = dict(kwargs.pop("headers", {}))
        if user is not None:
            token = self.tokens[user]
            headers["Cookie" if cookie else "Authorization"] = f"_token={token}" if cookie else f"Bearer {token}"
        return self.client.get(path, headers=headers, **kwargs)

    def ui(self, path: str, user: str | None = "admin", **kwargs: Any) -> httpx.Response:
        """GET a path of the plugin app."""
        return self.get(PREFIX + path.format(run_id=quote(self.run_id, safe="")), user, **kwargs)


def _json(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (
        f"GET {response.request.url}: expected {status}, got {response.status_code}: {response.text[:1500]}"
    )
    return response.json()


def _seed(db: Database[dict[str, Any]]) -> None:
    """Insert the population's events (each with the canary) and the locked user's existing summary."""
    seed_population(db, POPULATION, canary=CANARY, broken=BROKEN, fail_marker=FAIL_MARKER)
    db["user_profiles"].insert_one({"user_id": LOCKED, "memory_summary": LOCKED_SUMMARY, "memory_summary_version": 3})


def _run_dag() -> str:
    """Run memory_compression once in this process with dag.test(); return the run id."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    run = bag.dags[DAG_ID].test(run_conf={"users_per_task": 1})  # an instance per user: each row links its own
    assert run.state == "failed", f"the broken user should fail the run, got {run.state}"
    return str(run.run_id)


def _older_runs(store: MemoryStore) -> list[str]:
    """Store run documents older than the DAG run, every seventh with a failed user (and one hostile id)."""
    run_ids = []
    # Recent days: run documents expire runs_retention_days (90) after finished_at (a TTL index), and the
    # server's TTL monitor would otherwise delete older ones in the middle of these tests.
    start = (datetime.now(UTC) - timedelta(days=OLDER_RUNS + 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    for day in range(OLDER_RUNS):
        started = start + timedelta(days=day)
        scanned = ["o-1", "o-2", HOSTILE_USER] if day == 0 else ["o-1", "o-2"]
        results: list[dict[str, Any] | None] = [
            {"user_id": uid, "status": "compressed", "events_folded": 40 + day, "events_deleted": 40 + day}
            for uid in scanned
        ]
        if day % 7 == 3:
            results[1] = None  # no result: counted as failed
        run_id = f"scheduled__{started.isoformat()}"
        store.save_run(
            build_report(
                run_id=run_id,
                scanned=scanned,
                results=results,
                started_at=started,
                finished_at=started + timedelta(seconds=90),
            )
        )
        run_ids.append(run_id)
    return run_ids[::-1]  # newest first


def _token(base_url: str, user: str) -> str:
    response = httpx.post(f"{base_url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30)
    assert response.status_code == 201, f"POST /auth/token as {user}: {response.status_code} {response.text}"
    return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def ui(
    airflow_db: Any,
    postgres: PostgresService,
    tmp_path_factory: pytest.TempPathFactory,
    connection_env: Callable[..., dict[str, str]],
    mongo_client: pymongo.MongoClient[dict[str, Any]],
    redis_service: RedisService,
    fake_llm: FakeOpenAI,
) -> Iterator[UI]:
    """Start the API server, run the DAG meanwhile, yield; stop the server's process group after."""
    from airflow.models.pool import Pool

    tmp = tmp_path_factory.mktemp("ui")
    db = mongo_client[f"t_plugin_ui_{uuid.uuid4().hex[:8]}"]
    conns = connection_env(db=db.name)
    # For the 503 check: a MongoDB connection nobody listens on, chosen through the butler_memory Variable.
    conns["AIRFLOW_CONN_MONGO_UNREACHABLE"] = json.dumps(
        {"conn_type": "mongo", "host": "127.0.0.1", "port": free_port(), "extra": {"directConnection": True}}
    )
    passwords_file = tmp / "passwords.json"
    passwords_file.write_text(json.dumps(PASSWORDS))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in conns.items():
            mp.setenv(name, value)
        # The suite's Airflow settings (home, metadata DB, folders, secrets) minus unit-test mode, which
        # would load unit_tests.cfg into the server.
        env = {name: value for name, value in os.environ.items() if name != "AIRFLOW__CORE__UNIT_TEST_MODE"}
        env.update(
            {
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,operator:op,viewer:viewer,editor:user,outsider:",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            }
        )
        server = AirflowProcess("api-server", ["api-server"], env, tmp / "api-server.log").start()
        redis = redis_service.client()
        fake_llm.reset()
        # As a deployment has it (dag.test() does not enforce pools); dropped after: the session DB is shared.
        Pool.create_or_update_pool("llm_api", 8, "LLM calls of memory_compression", include_deferred=False)
        try:
            redis.flushall()
            redis.set(Settings().lock_key(LOCKED), "the-bot's-inline-compression", px=600_000)
            _seed(db)
            fake_llm.set_responder(lambda request: f"Summary {SUMMARY_CANARY}: the user discussed their plans.")
            fake_llm.fail_when_contains(FAIL_MARKER, 400)
            run_id = _run_dag()  # while the API server starts
            older = _older_runs(MemoryStore(db, Settings()))  # not closed: it shares the session's client
            summaries = {
                p["user_id"]: p["memory_summary"] for p in db["user_profiles"].find() if p.get("memory_summary")
            }
            wait_healthy(base_url, [server], components=("metadatabase",), timeout=STARTUP_TIMEOUT)
            tokens = {user: _token(base_url, user) for user in PASSWORDS}
            ui = UI(base_url, server, tokens, db, run_id, older, summaries, tmp / "chromium")
            yield ui
            ui.client.close()
        finally:
            server.stop()
            Pool.delete_pool("llm_api")
            fake_llm.reset()
            redis.flushall()
            redis.close()
            mongo_client.drop_database(db.name)


@pytest.fixture(autouse=True)
def server_log_on_failure(ui: UI, test_failed: Callable[[], bool]) -> Iterator[None]:
    """Print the end of the API server's log after a failed test (pytest shows it with the failure)."""
    yield
    if test_failed():
        print(f"\n----- airflow api-server log ({ui.server.log_path}) -----\n{ui.server.log_tail(8000)}")


def test_navigation_entry_and_app_are_listed_by_the_plugins_endpoint(ui: UI) -> None:
    plugins = _json(ui.get("/api/v2/plugins"))["plugins"]
    ours = [p for p in plugins if p["name"] == "butler_memory_ui"]
    assert len(ours) == 1, f"plugin butler_memory_ui not loaded; plugins: {[p['name'] for p in plugins]}"
    assert ours[0]["source"] == "$PLUGINS_FOLDER/butler_memory_ui.py"
    assert ours[0]["external_views"] == [
        {
            "name": "Memory compression",
            "href": f"{PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "butler-memory",
            "icon": None,
            "icon_dark_mode": None,
            "nav_top_level": False,
        }
    ]
    assert [(a["url_prefix"], a["app"]) for a in ours[0]["fastapi_apps"]] == [(PREFIX, "fastapi.applications.FastAPI")]
    errors = _json(ui.get("/api/v2/plugins/importErrors"))["import_errors"]
    assert not [e for e in errors if "butler" in e["source"]], errors


def test_runs_json_has_the_dag_runs_figures(ui: UI) -> None:
    body = _json(ui.ui("/api/runs"))
    assert (body["total"], body["limit"], body["offset"]) == (1 + OLDER_RUNS, 25, 0)
    newest = body["runs"][0]
    doc = ui.db["memory_compression_runs"].find_one({"run_id": ui.run_id})
    assert doc is not None
    assert newest == {
        "run_id": ui.run_id,
        "kind": "daily",
        "started_at": doc["started_at"].replace(tzinfo=UTC).isoformat(),
        "finished_at": doc["finished_at"].replace(tzinfo=UTC).isoformat(),
        "status": "failed",
        "dry_run": False,
        "users_found": 4,
        "users_compressed": 2,
        "users_dry_run": 0,
        "users_skipped_locked": 1,
        "users_skipped_below_threshold": 0,
        "users_skipped_budget": 0,
        "users_skipped_stale": 0,
        "users_skipped": 1,
        "users_failed": 1,
        "backlog_events": 60 + 75 + 55 + 65,
        "backlog_left": 0,
        "events_folded": (60 - 20) + (75 - 20),
        "events_deleted": (60 - 20) + (75 - 20),
        "prompt_tokens": doc["prompt_tokens"],
        "completion_tokens": doc["completion_tokens"],
        "llm_tokens": doc["prompt_tokens"] + doc["completion_tokens"],
        "seconds": doc["seconds"],
        "freshness_seconds_p95": doc["freshness_seconds_p95"],
        "freshness_seconds_max": doc["freshness_seconds_max"],
    }
    assert newest["freshness_seconds_max"] >= newest["freshness_seconds_p95"] > 0, newest
    assert newest["llm_tokens"] > 0 and newest["seconds"] > 0, newest
    assert [r["run_id"] for r in body["runs"][1:]] == ui.older_run_ids[:24]
    assert body["runs"][1]["status"] == "success"


def test_paging_and_chart(ui: UI) -> None:
    everything = [ui.run_id, *ui.older_run_ids]
    pages = [_json(ui.ui(f"/api/runs?limit=10&offset={offset}")) for offset in range(0, 40, 10)]
    assert [[r["run_id"] for r in page["runs"]] for page in pages] == [everything[i : i + 10] for i in range(0, 40, 10)]
    assert _json(ui.ui("/api/runs?limit=200&offset=35"))["runs"] == []
    assert len(_json(ui.ui("/api/runs?limit=200"))["runs"]) == 35

    chart = _json(ui.ui("/api/chart"))["runs"]
    assert [r["run_id"] for r in chart] == everything[:30][::-1], "the chart plots the newest 30 runs, oldest first"
    assert chart[-1] == {
        "run_id": ui.run_id,
        "started_at": chart[-1]["started_at"],
        "status": "failed",
        "events_folded": 95,
        "users_failed": 1,
    }
    # The DAG run's failed user, and older runs 10, 17, 24 and 31 (days 5 to 33 are in the chart).
    assert [r["users_failed"] for r in chart].count(1) == 5

    page = ui.ui("/?limit=10&offset=10")
    assert page.status_code == 200, page.text
    assert page.text.count("<rect ") == 60, "the chart draws two bars per run for 30 runs"
    assert page.text.count("<tr><td>") == 10
    assert "runs 11–20 of 35" in page.text
    assert "?limit=10&amp;offset=0" in page.text and "?limit=10&amp;offset=20" in page.text, "pager links"


def test_run_detail_links_each_failed_user_to_its_mapped_task_instance(ui: UI) -> None:
    detail = _json(ui.ui("/api/runs/{run_id}"))
    assert detail["run_id"] == ui.run_id
    assert [u["user_id"] for u in detail["failed_users"]] == [BROKEN]
    assert {u["user_id"]: u["status"] for u in detail["users"]} == {
        BIG: "compressed",
        BIGGER: "compressed",
        LOCKED: "skipped_locked",
        BROKEN: "failed",
    }
    broken = detail["failed_users"][0]
    assert broken["error_type"] == "LLMPermanentError", broken
    # The guards checked both compressed users' summaries: one outcome per guard and user, tallied.
    assert {u["user_id"]: sorted(u["guards"]) for u in detail["users"] if u["guards"]} == {
        BIG: ["facts", "injection", "language"],
        BIGGER: ["facts", "injection", "language"],
    }, detail["users"]
    assert {guard: sum(n.values()) for guard, n in detail["guard_outcomes"].items()} == {
        "facts": 2,
        "language": 2,
        "injection": 2,
    }
    # Each row's map index is that user's compress_user instance: ask Airflow itself.
    for user in detail["users"]:
        path = (
            f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(ui.run_id, safe='')}/taskInstances/compress_user/{user['map_index']}"
        )
        ti = _json(ui.get(path))
        assert ti["rendered_map_index"] == user["user_id"], (user, ti["rendered_map_index"])
        assert ti["state"] == ("failed" if user["user_id"] == BROKEN else "success"), ti["state"]
        assert user["task_instance_url"] == (
            f"/dags/{DAG_ID}/runs/{quote(ui.run_id, safe='')}/tasks/compress_user/mapped/{user['map_index']}"
        )

    page = ui.ui("/runs/{run_id}")
    assert page.status_code == 200, page.text
    assert 'id="guards"' in page.text and ">facts<" in page.text
    assert f'data-airflow-ui href="{broken["task_instance_url"]}"' in page.text
    assert "LLMPermanentError" in page.text


def test_user_lookup_shows_counts_versions_and_locks_without_the_summary(ui: UI) -> None:
    big = _json(ui.ui(f"/api/users/{BIG}"))
    assert big["events"] == 20
    assert (big["profile"], big["summary_version"], big["pending_fold"]) == (True, 1, False)
    assert big["summary_chars"] == len(ui.summaries[BIG]) > 0
    assert big["last_compressed_at"] is not None
    assert big["lock"] == {"held": False, "ttl_seconds": None, "error": None}
    assert big["last_run"]["run_id"] == ui.run_id and big["last_run"]["status"] == "compressed"
    [version] = big["versions"]  # one committed version, its metadata only
    assert (version["version"], version["kind"], version["run_id"], version["base_version"]) == (
        1,
        "fold",
        f"memory_compression/{ui.run_id}",  # runs are keyed by DAG in the history
        0,
    )
    assert version["events"] > 0 and version["text_chars"] == len(ui.summaries[BIG])
    assert "text" not in version and sorted(version["guards"]) == ["facts", "injection", "language"], version

    locked = _json(ui.ui(f"/api/users/{LOCKED}"))
    assert (locked["events"], locked["summary_version"]) == (55, 3)
    assert locked["summary_chars"] == len(LOCKED_SUMMARY)
    assert locked["last_compressed_at"] is None
    assert locked["lock"]["held"] is True and 0 < locked["lock"]["ttl_seconds"] <= 600, locked["lock"]
    assert locked["last_run"]["status"] == "skipped_locked"

    below = _json(ui.ui(f"/api/users/{BELOW}"))
    assert (below["events"], below["profile"], below["summary_version"], below["last_run"]) == (30, False, 0, None)

    page = ui.ui(f"/users?user_id={LOCKED}")
    assert page.status_code == 200, page.text
    assert "held, " in page.text and f"{len(LOCKED_SUMMARY)} characters" in page.text
    assert 'id="versions"' in ui.ui(f"/users?user_id={BIG}").text

    missing = ui.ui("/api/users/u-nobody")
    assert _json(missing, 404)["detail"] == "no events, profile or run record for user 'u-nobody'"


@pytest.mark.parametrize("path", PAGES + APIS)
def test_anonymous_is_401_and_a_user_without_the_butler_memory_permission_is_403(ui: UI, path: str) -> None:
    anonymous = ui.ui(path, None)
    assert anonymous.status_code == 401, anonymous.text
    for how in ({"cookie": False}, {"cookie": True}):
        for user in REFUSED:  # the Viewer role may read every DAG, and still not the Butler's user ids
            refused = ui.ui(path, user, **how)
            assert refused.status_code == 403, (user, how, refused.text[:500])
            assert "lacks the Butler Memory permission" in refused.text, (user, refused.text[:500])
            assert BIG not in refused.text, "a refusal names a user"
        for user in ALLOWED:
            allowed = ui.ui(path, user, **how)
            assert allowed.status_code == 200, (user, how, allowed.text[:500])
    # The Viewer still reads the DAG itself through Airflow's API: only our pages are closed to it.
    assert ui.get(f"/api/v2/dags/{DAG_ID}", "viewer").status_code == 200
    garbage = ui.ui(path, None, headers={"Authorization": "Bearer not-a-jwt"})
    assert garbage.status_code == 403, "Airflow answers an invalid token with 403"
    if not path.startswith("/api/"):
        assert "Log in to Airflow" in anonymous.text and "/auth/login" in anonymous.text


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/runs?limit=0", 422, "limit: Input should be greater than or equal to 1"),
        ("/api/runs?limit=201", 422, "limit: Input should be less than or equal to 200"),
        ("/api/runs?limit=ten", 422, "limit: Input should be a valid integer"),
        ("/api/runs?offset=-1", 422, "offset: Input should be greater than or equal to 0"),
        ("/api/runs?offset=99999999999999999999999", 422, "offset: Input should be less than or equal to"),
        ("/api/runs/manual__no-such-run", 404, "no run 'manual__no-such-run' in the run history"),
        ("/api/runs/" + "r" * 251, 422, "run_id must be at most 250 characters, got 251"),
        ("/api/runs/bad%09run", 422, "run_id must not contain control or invisible characters (found U+0009)"),
        # A newline in the path never reaches the plugin: Airflow's mount does not match it.
        ("/api/runs/bad%0Arun", 404, "Not Found"),
        ("/api/users/" + "u" * 201, 422, "user_id must be at most 200 characters, got 201"),
        ("/api/users/a%00b", 422, "user_id must not contain control or invisible characters (found U+0000)"),
        ("/api/users/a%1Bb", 422, "(found U+001B)"),
        ("/api/users/a%E2%80%8Bb", 422, "(found U+200B)"),
        ("/api/users/", 422, "user_id must not be empty"),
        ("/users", 422, "user_id: Field required"),
        ("/users?user_id=a%00b", 422, "(found U+0000)"),
        ("/users?user_id=a%0Ab", 422, "(found U+000A)"),
        ("/?limit=0", 422, "limit: Input should be greater than or equal to 1"),
        ("/runs/no-such-run", 404, "no run &#x27;no-such-run&#x27; in the run history"),
    ],
)
def test_bad_inputs_get_a_clear_4xx(ui: UI, path: str, status: int, message: str) -> None:
    response = ui.ui(path)
    assert response.status_code == status, response.text
    assert message in response.text
    if path.startswith("/api/"):
        assert response.headers["content-type"] == "application/json"
    else:
        assert response.headers["content-type"].startswith("text/html")
    if message != "Not Found":  # no route matched: there is nothing to authorize
        assert ui.ui(path, None).status_code == 401, "anonymous requests are refused before their input is read"


def test_no_event_content_or_summary_text_in_any_response(ui: UI) -> None:
    users = [*POPULATION, HOSTILE_USER]
    paths = [*PAGES, *APIS, *(f"/api/users/{quote(u, safe='')}" for u in users)]
    paths += [f"/users?user_id={quote(u, safe='')}" for u in users]
    paths += [f"/runs/{quote(r, safe='')}" for r in ui.older_run_ids[:2]]
    secrets = [CANARY, FAIL_MARKER, SUMMARY_CANARY, "Turn 1 of", *ui.summaries.values()]
    assert len(ui.summaries) == 3, f"BIG, BIGGER and LOCKED have summaries: {ui.summaries.keys()}"
    for path in paths:
        response = ui.ui(path)
        assert response.status_code in (200, 404), (path, response.status_code, response.text[:300])
        leaked = [s for s in secrets if s in response.text]
        assert not leaked, f"{path} leaked {leaked}"


def test_hostile_ids_are_escaped_in_pages(ui: UI) -> None:
    oldest = ui.older_run_ids[-1]
    page = ui.ui(f"/runs/{quote(oldest, safe='')}")
    assert page.status_code == 200, page.text
    assert HOSTILE_USER not in page.text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page.text
    user = ui.ui(f"/users?user_id={quote(HOSTILE_USER, safe='')}")
    assert user.status_code == 200 and HOSTILE_USER not in user.text
    csp = user.headers["content-security-policy"]
    assert "script-src 'nonce-" in csp and "default-src 'none'" in csp, csp


def test_mongodb_unreachable_or_undefined_is_503(ui: UI) -> None:
    def use_connection(conn_id: str) -> None:
        body = {"key": "butler_memory", "value": json.dumps({"mongo_conn_id": conn_id})}
        response = ui.client.post(
            "/api/v2/variables", json=body, headers={"Authorization": f"Bearer {ui.tokens['admin']}"}
        )
        assert response.status_code == 201, response.text

    try:
        use_connection("mongo_unreachable")
        started = time.monotonic()
        down = ui.ui("/api/runs")
        assert _json(down, 503)["detail"] == (
            "MongoDB is unreachable or failed (ServerSelectionTimeoutError); try again in a moment"
        )
        assert time.monotonic() - started < 30, "the page must give up on MongoDB within seconds"
        assert down.headers["retry-after"] == "30"
        assert "127.0.0.1" not in down.text, "no server address or driver text in the answer"

        ui.client.delete("/api/v2/variables/butler_memory", headers={"Authorization": f"Bearer {ui.tokens['admin']}"})
        use_connection("mongo_missing")
        undefined = ui.ui(f"/api/users/{BIG}")
        assert _json(undefined, 503)["detail"] == "Airflow connection 'mongo_missing' is not defined"
        html = ui.ui("/")
        assert html.status_code == 503 and "Airflow connection &#x27;mongo_missing&#x27; is not defined" in html.text
    finally:
        ui.client.delete("/api/v2/variables/butler_memory", headers={"Authorization": f"Bearer {ui.tokens['admin']}"})
    assert ui.ui("/api/runs").status_code == 200, "back to normal once the Variable is gone"


@pytest.fixture(scope="module")
def browser(chromium_path: Path) -> Iterator[Browser]:
    """Headless Debian chromium through Playwright, for the module."""
    with chromium(chromium_path) as launched:
        yield launched


def _dag_runs(ui: UI) -> dict[str, dict[str, Any]]:
    """Return the DAG's runs by id, through the REST API."""
    body = _json(ui.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100}))
    return {run["dag_run_id"]: run for run in body["dag_runs"]}


def test_page_renders_table_and_chart_in_headless_chromium(ui: UI, browser: Browser) -> None:
    with page_with_token(browser, ui.base_url, ui.tokens["operator"]) as page:
        page.goto(f"{ui.base_url}{PREFIX}/")
        expect(page.locator("#runs tbody tr")).to_have_count(25)
        expect(page.locator("#history-chart rect.bar")).to_have_count(30)
        expect(page.locator("#runs tbody tr").first.locator("td").nth(1)).to_have_text(ui.run_id)
        shot = ui.profile_dir / "memory-compression.png"
        page.screenshot(path=shot)
        assert shot.stat().st_size > 10_000


def test_browse_menu_opens_the_page_in_airflow_and_a_failed_user_leads_to_its_task_instance(
    ui: UI, browser: Browser
) -> None:
    broken_index = next(u["map_index"] for u in _json(ui.ui("/api/runs/{run_id}"))["failed_users"])
    with page_with_token(browser, ui.base_url, ui.tokens["operator"]) as page:
        page.goto(f"{ui.base_url}/")
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="Memory compression").click()
        frame = page.frame_locator("iframe")
        expect(frame.locator("#runs tbody tr")).to_have_count(25)
        # The newest run's id links to its page (inside the frame); its failed user links out of the frame.
        frame.get_by_role("link", name=ui.run_id, exact=True).first.click()
        frame.locator("#failed-users a[data-airflow-ui]").click()
        expected = f"/dags/{DAG_ID}/runs/{quote(ui.run_id, safe='')}/tasks/compress_user/mapped/{broken_index}"
        page.wait_for_url(lambda url: urlsplit(url).path == expected)
        # Airflow's own task instance page, labelled with the user id (the rendered map index).
        expect(page.locator("iframe")).to_have_count(0)
        expect(page.get_by_text(BROKEN).first).to_be_visible()
        page.screenshot(path=ui.profile_dir / "task-instance.png")


def test_catchup_runs_are_listed_apart_and_idle_ones_only_counted(ui: UI) -> None:
    # Recent: a run document older than runs_retention_days (90) is removed by its TTL index, which the
    # MongoDB server's TTL monitor may do between the insert and the reads below.
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    run_id = f"asset_triggered__{started.isoformat()}_catchup"
    doc = {
        "run_id": run_id,
        "kind": "catchup",
        "started_at": started,
        "finished_at": started,
        "seconds": 4.5,
        "users_found": 1,
        "users_compressed": 1,
        "backlog_left": 2,
        "freshness_seconds_p95": 75.0,
        "freshness_seconds_max": 75.0,
        "users": [{"user_id": "u-chatty", "status": "compressed", "events_folded": 40, "freshness_seconds": 75.0}],
    }
    ui.db["memory_compression_catchup_runs"].insert_one(dict(doc))
    ui.db["memory_compression_state"].insert_one(
        {"_id": "catchup", "runs": 1, "idle_runs": 287, "last_idle_at": started, "scanned_through": started}
    )
    try:
        daily = _json(ui.ui("/api/runs"))
        assert run_id not in [r["run_id"] for r in daily["runs"]], "a catch-up run crowds the daily history"
        catchup = _json(ui.ui("/api/runs?kind=catchup"))
        assert [r["run_id"] for r in catchup["runs"]] == [run_id]
        assert catchup["runs"][0]["backlog_left"] == 2 and catchup["status"]["idle_runs"] == 287
        _json(ui.ui("/api/runs?kind=weekly"), status=422)
        page = ui.ui("/").text
        assert 'id="catchup-runs"' in page and "287" in page and quote(run_id, safe="") in page
        assert "Freshness" in page and "p95 <b>" in page
        detail = _json(ui.ui(f"/api/runs/{quote(run_id, safe='')}?kind=catchup"))
        assert detail["kind"] == "catchup"
        assert detail["users"][0]["task_instance_url"].endswith(
            f"/dags/memory_compression_catchup/runs/{quote(run_id, safe='')}/tasks/compress_user/mapped/0"
        )
        assert "Catch-up run" in ui.ui(f"/runs/{quote(run_id, safe='')}?kind=catchup").text
    finally:
        ui.db["memory_compression_catchup_runs"].delete_many({})
        ui.db["memory_compression_state"].delete_many({})


def _open_trigger_form(page: Page, ui: UI) -> Locator:
    page.goto(f"{ui.base_url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Run Parameters")).to_be_visible()
    return dialog


def test_trigger_form_with_its_defaults_queues_a_run_with_the_params_defaults(ui: UI, browser: Browser) -> None:
    before = _dag_runs(ui)
    new: list[str] = []
    try:
        with page_with_token(browser, ui.base_url, ui.tokens["admin"]) as page:
            dialog = _open_trigger_form(page, ui)
            with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dagRuns")) as posted:
                dialog.get_by_role("button", name="Trigger", exact=True).click()
            assert posted.value.status == 200, posted.value.text()
            expect(dialog).to_be_hidden()
        runs = _dag_runs(ui)
        new = [run_id for run_id in runs if run_id not in before]
        assert len(new) == 1, f"one run triggered, got {new}"
        run = runs[new[0]]
        assert run["run_type"] == "manual" and run["state"] == "queued", run
        assert run["conf"] == COMPRESSION_DEFAULTS, run["conf"]
    finally:
        headers = {"Authorization": f"Bearer {ui.tokens['admin']}"}
        for run_id in new:
            ui.client.delete(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}", headers=headers)
        # The form's "Unpause on trigger" is on by default; the module's other tests expect the DAG as it was.
        ui.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": True}, headers=headers)


def test_trigger_form_refuses_a_bad_limit_and_queues_nothing(ui: UI, browser: Browser) -> None:
    before = _dag_runs(ui)
    with page_with_token(browser, ui.base_url, ui.tokens["admin"]) as page:
        dialog = _open_trigger_form(page, ui)
        dialog.locator("input[name=element_limit]").fill("1.5")
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/dagRuns")) as posted:
            dialog.get_by_role("button", name="Trigger", exact=True).click()
        assert posted.value.status == 400, posted.value.text()
        expect(dialog.get_by_text("Invalid input for param limit")).to_be_visible()
        expect(dialog).to_be_visible()
    assert _dag_runs(ui) == before, "a refused trigger queues nothing"
