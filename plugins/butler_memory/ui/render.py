"""Server-side HTML for the pages: every value from the database or the request goes through ``esc``.

The pages are self-contained (inline CSS, one small nonce-tagged script, an inline SVG chart): no
CDN, no external request, so they work offline and under a strict Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from butler_memory.core.runs import split_run_key
from butler_memory.core.units import duration
from butler_memory.orchestration.params import MAX_USER_ID_CHARS
from butler_memory.ui.data import DAG_ID, DAG_IDS, freshness_line
from butler_memory.ui.html import Links, data_table, esc, num, nums, page, status_cell, when


def chart_svg(runs: Sequence[Mapping[str, Any]], links: Links) -> str:
    """Return an inline SVG: events folded per run (bars, top) and failed users per run (bars, bottom)."""
    width, left, right, top = 760, 56, 12, 14
    fold_h, gap, fail_h, bottom = 120, 26, 44, 22
    height = top + fold_h + gap + fail_h + bottom
    plot_w = width - left - right
    if not runs:
        return (
            f'<svg id="history-chart" role="img" aria-label="No runs yet" width="{width}" height="40" '
            f'viewBox="0 0 {width} 40"><text x="{left}" y="24">No runs stored yet.</text></svg>'
        )
    fold_max = max(max(int(r["events_folded"]) for r in runs), 1)
    fail_max = max(max(int(r["users_failed"]) for r in runs), 1)
    slot = plot_w / max(len(runs), 1)
    bar_w = max(min(slot * 0.7, 28.0), 2.0)
    fail_top = top + fold_h + gap
    parts = [
        f'<svg id="history-chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'aria-label="Events folded and failed users, last {len(runs)} runs">',
        f'<text x="{left}" y="{top - 3}">events folded (max {num(fold_max)})</text>',
        f'<text x="{left}" y="{fail_top - 3}">failed users (max {num(fail_max)})</text>',
        f'<line class="axis" x1="{left}" y1="{top + fold_h}" x2="{width - right}" y2="{top + fold_h}"/>',
        f'<line class="axis" x1="{left}" y1="{fail_top + fail_h}" x2="{width - right}" y2="{fail_top + fail_h}"/>',
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{num(fold_max)}</text>',
        f'<text x="{left - 6}" y="{top + fold_h}" text-anchor="end">0</text>',
        f'<text x="{left - 6}" y="{fail_top + 10}" text-anchor="end">{num(fail_max)}</text>',
        f'<text x="{left - 6}" y="{fail_top + fail_h}" text-anchor="end">0</text>',
    ]
    for i, run in enumerate(runs):
        x = left + i * slot + (slot - bar_w) / 2
        folded, failed = int(run["events_folded"]), int(run["users_failed"])
        fh = fold_h * folded / fold_max
        xh = fail_h * failed / fail_max
        tip = f"{run['run_id']} · {when(run['started_at'])}: {num(folded)} events folded, {num(failed)} failed users"
        parts.append(
            f'<a href="{esc(links.run(str(run["run_id"])))}"><title>{esc(tip)}</title>'
            f'<rect class="bar" x="{x:.1f}" y="{top + fold_h - fh:.1f}" width="{bar_w:.1f}" height="{fh:.1f}"/>'
            f'<rect class="fail" x="{x:.1f}" y="{fail_top + fail_h - xh:.1f}" width="{bar_w:.1f}" height="{xh:.1f}"/>'
            "</a>"
        )
    first, last = runs[0], runs[-1]
    parts.append(f'<text x="{left}" y="{height - 6}">{esc(when(first["started_at"])[:10])}</text>')
    parts.append(
        f'<text x="{width - right}" y="{height - 6}" text-anchor="end">{esc(when(last["started_at"])[:10])}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


RUN_HEADERS = (
    ("started", ""),
    ("run", "wrap"),
    ("status", ""),
    ("users found", "n"),
    ("compressed", "n"),
    ("skipped", "n"),
    ("failed", "n"),
    ("events folded", "n"),
    ("events deleted", "n"),
    ("LLM tokens", "n"),
    ("duration", "n"),
)


def _run_cells(run: Mapping[str, Any], links: Links) -> list[str]:
    return [
        esc(when(run["started_at"])),
        f'<a href="{esc(links.run(run["run_id"], run["kind"]))}">{esc(run["run_id"])}</a>',
        status_cell(run["status"]),
        *nums(run, "users_found", "users_compressed", "users_skipped", "users_failed"),
        *nums(run, "events_folded", "events_deleted", "llm_tokens"),
        esc(duration(run["seconds"])),
    ]


def lookup_form(links: Links, value: str = "") -> str:
    """Return the per-user lookup form."""
    return (
        f'<form class="lookup" method="get" action="{esc(links.root)}/users">'
        f'<label>User id <input type="text" name="user_id" value="{esc(value)}" required '
        f'maxlength="{MAX_USER_ID_CHARS}"></label> <button type="submit">Look up</button></form>'
    )


def freshness_html(runs: Sequence[Mapping[str, Any]], links: Links) -> str:
    """Return the line saying how fresh the newest run that compressed someone kept memory."""
    line = freshness_line(list(runs))
    if line is None:
        return ""
    return (
        '<p class="freshness">Freshness (an event taking a user over the threshold → their compression), '
        f'newest run that compressed someone (<a href="{esc(links.run(line["run_id"], line["kind"]))}">'
        f"{esc(line['run_id'])}</a>): p95 <b>{esc(duration(line['p95']))}</b>, "
        f"max <b>{esc(duration(line['max']))}</b>.</p>"
    )


def catchup_section(catchup: Mapping[str, Any], status: Mapping[str, Any], links: Links) -> str:
    """Return the catch-up DAG's part of the history: its counters, then its runs that found someone."""
    idle = num(status["idle_runs"])
    line = (
        f'<p class="muted" id="catchup-status">Runs of <code>{DAG_IDS["catchup"]}</code> that found someone due: '
        f"{num(status['runs'])}; idle runs (nobody due, not listed): {idle}"
        + (f", last {esc(when(status['last_idle_at']))}" if status["last_idle_at"] else "")
        + (f". Scanned through {esc(when(status['scanned_through']))}." if status["scanned_through"] else ".")
        + f' JSON: <a href="{esc(links.api("runs?kind=catchup"))}">{esc(links.api("runs?kind=catchup"))}</a></p>'
    )
    table = data_table(
        RUN_HEADERS,
        (_run_cells(r, links) for r in catchup["runs"]),
        empty="No catch-up run has found anyone due yet.",
        table_id="catchup-runs",
    )
    fresh = freshness_html(catchup["runs"], links)
    return f"<h2>Catch-up runs (newest {len(catchup['runs'])})</h2>{line}{fresh}{table}"


def runs_page(
    listing: Mapping[str, Any],
    chart: Sequence[Mapping[str, Any]],
    *,
    links: Links,
    nonce: str,
    catchup: Mapping[str, Any] | None = None,
    catchup_status: Mapping[str, Any] | None = None,
) -> str:
    """Return the run history: chart, one table page of daily runs, pager, the catch-up runs, user lookup."""
    runs, total = listing["runs"], int(listing["total"])
    limit, offset = int(listing["limit"]), int(listing["offset"])
    shown = f"runs {offset + 1}–{offset + len(runs)} of {num(total)}" if runs else f"no runs here ({num(total)} in all)"
    pager = [f'<span class="muted">{esc(shown)}</span>']
    if offset > 0:
        pager.append(f'<a href="{esc(links.index(limit=limit, offset=max(offset - limit, 0)))}">← newer</a>')
    if offset + len(runs) < total:
        pager.append(f'<a href="{esc(links.index(limit=limit, offset=offset + limit))}">older →</a>')
    body = (
        "<h1>Memory compression</h1>"
        f'<p class="muted">One row per run of the <code>{DAG_ID}</code> DAG, newest first. '
        f'JSON: <a href="{esc(links.api("runs"))}">{esc(links.api("runs"))}</a></p>'
        + freshness_html(runs, links)
        + f"<h2>Last {len(chart)} runs</h2>{chart_svg(chart, links)}"
        "<h2>Runs</h2>"
        f'<div class="pager">{"".join(pager)}</div>'
        + data_table(RUN_HEADERS, (_run_cells(r, links) for r in runs), empty="No runs stored yet.", table_id="runs")
        + (
            catchup_section(catchup, catchup_status, links)
            if catchup is not None and catchup_status is not None
            else ""
        )
        + f"<h2>User</h2>{lookup_form(links)}"
    )
    return page("Memory compression", body, nonce=nonce, links=links)


USER_HEADERS = (
    ("map index", "n"),
    ("user", "wrap"),
    ("status", ""),
    ("events before", "n"),
    ("folded", "n"),
    ("deleted", "n"),
    ("after", "n"),
    ("summary chars", "n"),
    ("LLM tokens", "n"),
    ("duration", "n"),
    ("guards", ""),
    ("task instance", ""),
)
VERSION_HEADERS = (
    ("version", "n"),
    ("kind", ""),
    ("committed", ""),
    ("run", "wrap"),
    ("built on", "n"),
    ("new events", "n"),
    ("events from … to", ""),
    ("summariser", ""),
    ("prompt", ""),
    ("guards", ""),
    ("chars", "n"),
)


def guards_text(outcomes: Mapping[str, str]) -> str:
    """Return guard outcomes as escaped "guard: outcome" pairs; failures stand out."""
    return ", ".join(
        f'{esc(g)}: <span class="{"failed" if o in ("reject", "warn") else ""}">{esc(o)}</span>'
        for g, o in sorted(outcomes.items())
    )


def versions_table(versions: Sequence[Mapping[str, Any]], links: Links) -> str:
    """Return a user's summary versions (metadata, never the text), newest first."""
    rows = []
    for v in versions:
        run = esc(v["run_id"] or "")
        dag_id, run_id = split_run_key(v["run_id"] or "")
        kind = next((k for k, d in DAG_IDS.items() if d == dag_id), "daily" if dag_id is None else None)
        if v["kind"] == "fold" and run_id and kind is not None:  # a compression run: its run page
            run = f'<a href="{esc(links.run(run_id, kind))}">{run}</a>'
        if v["undone_runs"]:
            run += f' <span class="muted">(undid {esc(", ".join(v["undone_runs"]))})</span>'
        span = ""
        if v["first_event_at"]:
            span = f"{esc(when(v['first_event_at']))} … {esc(when(v['last_event_at']))}"
        built_on = "" if v["base_version"] is None else num(v["base_version"])
        if v["refolded_from"] is not None:
            built_on += f" (from v{num(v['refolded_from'])})"
        rows.append(
            [
                num(v["version"]),
                esc(v["kind"]),
                esc(when(v["created_at"])),
                run,
                built_on,
                num(v["events"]),
                span,
                esc(" / ".join(x for x in (v["summarizer"], v["model"]) if x)),
                esc(v["prompt_version"] or ""),
                guards_text(v["guards"]),
                num(v["text_chars"]),
            ]
        )
    return data_table(VERSION_HEADERS, rows, empty="No summary version recorded yet.", table_id="versions")


def run_page(detail: Mapping[str, Any], *, links: Links, nonce: str) -> str:
    """Return one run: totals, failed users linked to their task instances, every user's outcome."""
    run_id, kind = detail["run_id"], detail["kind"]
    cards = [
        ("status", status_cell(detail["status"])),
        ("users found", num(detail["users_found"])),
        ("compressed", num(detail["users_compressed"])),
        ("skipped (locked)", num(detail["users_skipped_locked"])),
        ("skipped (below threshold)", num(detail["users_skipped_below_threshold"])),
        ("skipped (token budget)", num(detail["users_skipped_budget"])),
        ("skipped (stale batch reply)", num(detail["users_skipped_stale"])),
        ("failed", num(detail["users_failed"])),
        ("events folded", num(detail["events_folded"])),
        ("events deleted", num(detail["events_deleted"])),
        ("LLM tokens", f"{num(detail['prompt_tokens'])} + {num(detail['completion_tokens'])}"),
        ("duration", esc(duration(detail["seconds"]))),
        ("left for the next run", num(detail["backlog_left"])),
    ]
    failed_rows = [
        [
            f'<a href="{esc(links.user(u["user_id"]))}">{esc(u["user_id"])}</a>',
            esc(u["error_type"] or ""),
            esc(u["error"] or ""),
            _ti_link(links, run_id, u["map_index"], kind),
        ]
        for u in detail["failed_users"]
    ]
    failed_table = data_table(
        (("user", "wrap"), ("error type", ""), ("error", "wrap"), ("task instance", "")),
        failed_rows,
        empty="No user failed in this run.",
        table_id="failed-users",
    )
    user_rows = [
        [
            num(u["map_index"]),
            f'<a href="{esc(links.user(u["user_id"]))}">{esc(u["user_id"])}</a>',
            status_cell(u["status"]),
            *nums(u, "events_before", "events_folded", "events_deleted", "events_after", "summary_chars"),
            num(u["prompt_tokens"] + u["completion_tokens"]),
            duration(u["seconds"]),
            guards_text(u["guards"]),
            _ti_link(links, run_id, u["map_index"], kind),
        ]
        for u in detail["users"]
    ]
    guard_rows = [
        [esc(guard), *(num(counts.get(o, 0)) for o in ("pass", "redact", "warn", "reject", "off"))]
        for guard, counts in sorted(detail.get("guard_outcomes", {}).items())
    ]
    body = (
        f"<h1>{'Catch-up run' if kind == 'catchup' else 'Run'} {esc(run_id)}</h1>"
        f'<p class="muted">Started {esc(when(detail["started_at"]))}, finished {esc(when(detail["finished_at"]))}. '
        f'<a data-airflow-ui href="{esc(links.dag_run(run_id, kind))}">Open the DAG run in Airflow</a> · '
        f'JSON: <a href="{esc(links.api("runs/" + quote(run_id, safe="")))}">run</a></p>'
        + "".join(f'<div class="card">{esc(label)}<b>{value}</b></div>' for label, value in cards)
        + f"<h2>Failed users ({num(len(detail['failed_users']))})</h2>{failed_table}"
        + "<h2>Guard outcomes (users)</h2>"
        + data_table(
            (("guard", ""), ("pass", "n"), ("redact", "n"), ("warn", "n"), ("reject", "n"), ("off", "n")),
            guard_rows,
            empty="No guard outcome recorded in this run.",
            table_id="guards",
        )
        + f"<h2>Users ({num(len(detail['users']))})</h2>"
        + data_table(USER_HEADERS, user_rows, empty="The scan found no user over the threshold.", table_id="users")
    )
    return page(f"Run {run_id}", body, nonce=nonce, links=links)


def _ti_link(links: Links, run_id: str, map_index: int, kind: str = "daily") -> str:
    url = links.task_instance(run_id, map_index, kind)
    return f'<a data-airflow-ui href="{esc(url)}">compress_user [{map_index}]</a>'


def user_page(status: Mapping[str, Any], *, links: Links, nonce: str) -> str:
    """Return one user's status: events, summary bookkeeping (never the summary), lock, last run."""
    lock = status["lock"]
    if lock["held"] is None:
        lock_text = esc(lock["error"] or "unknown")
    elif lock["held"]:
        lock_text = f"held, {esc(lock['ttl_seconds'])} s left"
    else:
        lock_text = "not held"
    rows = [
        ("Events in memory now", num(status["events"])),
        ("Summary version", num(status["summary_version"])),
        ("Summary length", f"{num(status['summary_chars'])} characters"),
        ("Last compressed", esc(when(status["last_compressed_at"]))),
        ("Interrupted fold pending", "yes" if status["pending_fold"] else "no"),
        ("Compression lock", lock_text),
    ]
    last = status["last_run"]
    if last is not None:
        rows.append(
            (
                "Last run",
                f'<a href="{esc(links.run(last["run_id"]))}">{esc(last["run_id"])}</a>: {status_cell(last["status"])}'
                f", {num(last['events_folded'])} events folded"
                + (f" ({esc(last['error_type'])})" if last["error_type"] else "")
                + f" · {_ti_link(links, last['run_id'], last['map_index'])}",
            )
        )
    table = "".join(f"<tr><th>{esc(label)}</th><td>{value}</td></tr>" for label, value in rows)
    user_id = status["user_id"]
    body = (
        f"<h1>User {esc(user_id)}</h1>"
        f'<table id="user-status">{table}</table>'
        f'<p class="muted">JSON: <a href="{esc(links.api("users/" + quote(user_id, safe="")))}">user</a></p>'
        f"<h2>Summary versions ({num(len(status.get('versions', [])))} newest)</h2>"
        '<p class="muted">Every committed version is kept (the text is not shown here). Undo a run: '
        "<code>python -m butler_memory rollback --run RUN_ID --user ID --dry-run</code> or the "
        "<code>memory_rollback</code> DAG.</p>"
        f"{versions_table(status.get('versions', []), links)}"
        f"<h2>Another user</h2>{lookup_form(links, user_id)}"
    )
    return page(f"User {user_id}", body, nonce=nonce, links=links)


def error_page(code: int, message: str, *, links: Links, nonce: str, login_url: str | None = None) -> str:
    """Return an error page that says what went wrong (and where to log in, for a 401)."""
    body = f"<h1>{esc(code)}</h1><p>{esc(message)}</p>"
    if login_url:
        body += f'<p><a data-airflow-ui href="{esc(login_url)}">Log in to Airflow</a></p>'
    return page(f"{code}", body, nonce=nonce, links=links)
