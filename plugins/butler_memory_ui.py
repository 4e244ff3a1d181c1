"""Airflow plugin: a "Memory compression" page under Browse in the Airflow UI.

Mounts the FastAPI app of ``butler_memory.ui.app`` at ``/butler-memory`` (run history, run detail,
per-user status, and the same data as JSON under ``/butler-memory/api/``) and lists it in the UI's
navigation. Access needs ``GET`` on the custom view ``Butler Memory`` (docs/ui.md).

Every Airflow process imports this file (task processes too, for plugin macros), so the app, and
FastAPI with it, is imported only when the API server asks for ``fastapi_apps``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/butler-memory"
# The UI frames ``href`` as given: behind a path prefix ([api] base_url = https://host/airflow/) the
# page lives at /airflow/butler-memory/.
_ROOT = urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")


class ButlerMemoryUIPlugin(AirflowPlugin):
    """The memory compression pages: a FastAPI app and its navigation entry."""

    name = "butler_memory_ui"
    external_views = [  # noqa: RUF012  # the plugin manager's own attribute type
        {
            "name": "Memory compression",
            "href": f"{_ROOT}{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "butler-memory",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Return the app to mount, importing it on first use."""
        from butler_memory.ui.app import app

        return [{"app": app, "url_prefix": URL_PREFIX, "name": "Butler memory compression"}]
