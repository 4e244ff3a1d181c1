"""The page frame and the escaping primitives of the Memory compression pages: inline CSS, the one
nonce-tagged script, ``esc`` (every value from the database or the request goes through it), the
links to this app's pages and to the Airflow UI, and the one table builder. ``render`` builds the
pages from them.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from butler_memory.ui.data import DAG_IDS, task_instance_path

CSS = """
:root { color-scheme: light dark; --fg: #1a202c; --muted: #5f6b7a; --bg: #fff; --line: #e2e8f0;
  --bar: #3182ce; --fail: #e53e3e; --ok: #2f855a; --head: #f7fafc; }
@media (prefers-color-scheme: dark) { :root { --fg: #e2e8f0; --muted: #a0aec0; --bg: #1a202c;
  --line: #2d3748; --bar: #63b3ed; --fail: #fc8181; --ok: #68d391; --head: #2d3748; } }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); margin: 16px 24px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
a { color: var(--bar); } .muted { color: var(--muted); } nav { margin-bottom: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: var(--head); font-weight: 600; white-space: normal; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.wrap { white-space: normal; word-break: break-all; min-width: 8em; }
.failed { color: var(--fail); font-weight: 600; } .success { color: var(--ok); font-weight: 600; }
.pager { margin: 8px 0; display: flex; gap: 16px; align-items: center; }
.card { display: inline-block; border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 0 8px 8px 0; }
.card b { display: block; font-size: 18px; }
form.lookup input[type=text] { width: 280px; padding: 4px 6px; }
svg text { fill: var(--muted); font-size: 11px; } svg .bar { fill: var(--bar); } svg .fail { fill: var(--fail); }
svg .axis { stroke: var(--line); }
"""

# Inside the Airflow UI these pages run in a sandboxed iframe that may not navigate the top window.
# A link into the Airflow UI therefore hands its route to the parent's router (same origin: history
# API plus a popstate event, which is what the router listens to); if the parent is not reachable
# the link simply opens inside the frame.
SCRIPT = """
document.addEventListener("click", function (event) {
  var link = event.target.closest ? event.target.closest("a[data-airflow-ui]") : null;
  if (!link || window.top === window || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey) return;
  try {
    var top = window.top;
    if (top.location.origin !== window.location.origin) return;
    var state = top.history.state || {};
    top.history.pushState({usr: null, key: Math.random().toString(36).slice(2, 10), idx: (state.idx || 0) + 1}, "", link.href);
    top.dispatchEvent(new PopStateEvent("popstate", {state: top.history.state}));
    event.preventDefault();
  } catch (e) { /* not allowed: follow the link inside this frame */ }
});
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def when(iso_text: str | None) -> str:
    """Return an ISO timestamp as ``YYYY-MM-DD HH:MM:SS UTC``."""
    if not iso_text:
        return "–"
    return iso_text[:19].replace("T", " ") + " UTC"


def num(value: int) -> str:
    """Return an integer with thousands separators."""
    return f"{value:,}"


def nums(row: Mapping[str, Any], *keys: str) -> list[str]:
    """Return ``row``'s integers under ``keys``, each with thousands separators (cells in that order)."""
    return [num(row[key]) for key in keys]


class Links:
    """URLs of this app's pages (under its mount point) and of the Airflow UI."""

    def __init__(self, root: str, ui_base: str) -> None:
        self.root = root.rstrip("/")
        self.ui_base = ui_base if ui_base.endswith("/") else ui_base + "/"

    def index(self, **query: int) -> str:
        return f"{self.root}/" + (f"?{urlencode(query)}" if query else "")

    def run(self, run_id: str, kind: str = "daily") -> str:
        return f"{self.root}/runs/{quote(run_id, safe='')}" + ("?kind=catchup" if kind == "catchup" else "")

    def user(self, user_id: str) -> str:
        return f"{self.root}/users?{urlencode({'user_id': user_id})}"

    def api(self, path: str) -> str:
        return f"{self.root}/api/{path}"

    def dag_run(self, run_id: str, kind: str = "daily") -> str:
        return f"{self.ui_base}dags/{DAG_IDS[kind]}/runs/{quote(run_id, safe='')}"

    def task_instance(self, run_id: str, map_index: int, kind: str = "daily") -> str:
        return self.ui_base + task_instance_path(run_id, map_index, kind)


def page(title: str, body: str, *, nonce: str, links: Links) -> str:
    """Return a whole HTML document."""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><style nonce="{esc(nonce)}">{CSS}</style></head>\n<body>'
        f'<nav><a href="{esc(links.index())}">Memory compression</a></nav>\n'
        f"{body}\n"
        f'<script nonce="{esc(nonce)}">{SCRIPT}</script></body></html>\n'
    )


def data_table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[str]], *, empty: str, table_id: str) -> str:
    """Return a table; headers are (label, CSS class of the column) and each row holds escaped cell HTML."""

    def cls(name: str) -> str:
        return f' class="{name}"' if name else ""

    head = "".join(f"<th{cls(kind)}>{esc(label)}</th>" for label, kind in headers)
    body = [
        "<tr>" + "".join(f"<td{cls(kind)}>{cell}</td>" for cell, (_, kind) in zip(row, headers, strict=True)) + "</tr>"
        for row in rows
    ]
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="muted">{esc(empty)}</td></tr>')
    return f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def status_cell(status: str) -> str:
    return f'<span class="{esc(status)}">{esc(status)}</span>' if status in ("failed", "success") else esc(status)
