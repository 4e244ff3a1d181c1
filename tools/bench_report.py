"""The report of ``make bench`` (tools/bench.py): the summary table's rows from results.json and
the SVG charts (drawn by tools/bench_svg.py) in ``docs/img/``. A phase that timed out gets a row
saying so; the figures that needed it are left out instead of failing the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO)]

from tools import bench_guards  # noqa: E402
from tools import bench_svg as svg  # noqa: E402
from tools.bench_airflow import TASKS_CPU  # noqa: E402
from tools.bench_harness import shown, timed_out, timed_out_phases  # noqa: E402

IMG_DIR = REPO / "docs" / "img"
TARGET_FRACTION = 0.7
"""Throughput target: this fraction of pool_slots / latency."""

Row = tuple[str, str, str, str]
"""(figure, value, target, verdict)"""


def measured(record: Any) -> Any:
    """Return a run's record, or None when it is missing or timed out (its row is left out)."""
    return None if record is None or timed_out(record) else record


def row(figure: str, value: str, target: str = "", verdict: str = "") -> Row:
    """Return one summary row; most figures have no target."""
    return (figure, value, target, verdict)


def _rows_throughput(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Rows of figure 1: both times, the speed-up and the fraction of pool_slots / latency."""
    rows: list[Row] = []
    limit = args.pool_slots / args.latency if args.latency else float("inf")
    seq = results.get("sequential", {}).get("llm_latency")
    a = results.get("airflow", {}).get("llm_latency")
    seq = None if timed_out(seq) else seq
    a = None if timed_out(a) else a
    if seq:
        rows.append(
            row(
                f"sequential loop, {args.users} users, LLM {args.latency:g} s",
                f"{seq['seconds']:.1f} s ({seq['users_per_second']:.2f} users/s)",
            )
        )
    if not a:
        return rows
    rows.append(
        row(
            f"Airflow DAG run, {args.users} users, LLM {args.latency:g} s",
            f"{a['run_seconds']:.1f} s ({a['users_per_second']:.2f} users/s)",
        )
    )
    if seq:
        results["speedup"] = round(seq["seconds"] / a["run_seconds"], 2)
        rows.append(
            ("speed-up (sequential time / Airflow time)", f"{results['speedup']:.2f}x", f"up to {args.pool_slots}x", "")
        )
    frac = a["users_per_second"] / limit
    results["fraction_of_limit"] = round(frac, 3)
    verdict = "met" if frac >= TARGET_FRACTION else "MISSED"
    rows.append((f"Airflow throughput / limit {limit:g} users/s", f"{frac:.1%}", f">= {TARGET_FRACTION:.0%}", verdict))
    base = measured(results.get("airflow", {}).get("baseline", {}).get("llm_latency"))
    if base:
        results["improvement_over_baseline"] = round(a["users_per_second"] / base["users_per_second"], 2)
        rows.append(
            (
                "  before: Airflow defaults, parallelism = pool, no preload",
                f"{base['run_seconds']:.1f} s ({base['users_per_second']:.2f} users/s, "
                f"{base['users_per_second'] / limit:.1%})",
                "",
                f"now {results['improvement_over_baseline']:.2f}x",
            )
        )
    noop = measured(results.get("airflow", {}).get("noop_llm_latency"))
    if noop:
        results["fraction_of_floor"] = round(a["users_per_second"] / noop["users_per_second"], 3)
        rows.append(
            (
                f"  Airflow floor: no-op mapped task sleeping {args.latency:g} s",
                f"{noop['run_seconds']:.1f} s ({noop['users_per_second']:.2f} users/s, "
                f"{noop['users_per_second'] / limit:.1%})",
                "",
                f"ours {results['fraction_of_floor']:.0%} of it",
            )
        )
    for run in results.get("airflow", {}).get("latency_sweep", []):
        sweep_limit = args.pool_slots / run["latency"]
        rows.append(
            (
                f"  LLM {run['latency']:g} s: Airflow / limit {sweep_limit:g} users/s",
                f"{run['users_per_second']:.2f} users/s, {run['users_per_second'] / sweep_limit:.1%}",
                f">= {TARGET_FRACTION:.0%}",
                "met" if run["users_per_second"] >= TARGET_FRACTION * sweep_limit else "missed",
            )
        )
    rows.append(row("  compress phase only (first start..last end)", f"{a['compress_users_per_second']:.2f} users/s"))
    rows.append(
        row(
            "  task duration / engine time (medians)",
            f"{a['task_duration_median']:.2f} s / {a['engine_seconds_median']:.2f} s",
        )
    )
    rows.append(
        (
            "  average running tasks (sum of durations / span)",
            f"{a['average_concurrency']:.1f}",
            f"{args.pool_slots}",
            "",
        )
    )
    rows.append(
        row("  CPU busy / of it not the bench's", f"{a['cpu_busy_fraction']:.0%} / {a['other_load_fraction']:.0%}")
    )
    rows.extend(_rows_cpu(results, args))
    return rows


def _rows_cpu(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """CPU seconds per compressed user by component, the headline (what a deployment pays) against
    Airflow's floor, and the same run on SQLite."""
    af = results.get("airflow", {})
    a, noop = measured(af.get("llm_latency")), measured(af.get("noop_llm_latency"))
    if not a:
        return []
    rows: list[Row] = []
    if noop:
        ratio = a["deployment_cpu_seconds_per_user"] / noop["deployment_cpu_seconds_per_user"]
        results["deployment_cpu_ratio_to_floor"] = round(ratio, 2)
        rows.append(
            (
                "CPU s per user a deployment pays (Airflow + tasks) / Airflow's floor (no-op DAG)",
                f"{a['deployment_cpu_seconds_per_user']:.2f} / {noop['deployment_cpu_seconds_per_user']:.2f}",
                "",
                f"{ratio:.2f}x the floor",
            )
        )
    engine = results.get("sequential", {}).get("llm_latency", {}).get("engine_cpu_seconds_per_user")
    floor = noop["cpu_seconds_per_user_by_component"] if noop else {}
    for name, value in a["cpu_seconds_per_user_by_component"].items():
        rows.append((f"  {name}", f"{value:.3f}", "", f"floor {floor[name]:.3f}" if name in floor else ""))
        if name == TASKS_CPU and engine is not None:
            rows.append(row("    of it our engine (its CPU alone in the sequential loop)", f"{engine:.3f}"))
    rows.append(row("  stand-ins and the bench's trigger together", f"{a['stand_in_cpu_seconds_per_user']:.3f}"))
    lite = measured(af.get("sqlite", {}).get("llm_latency"))
    if lite:
        rows.append(
            (
                f"metadata DB: PostgreSQL / SQLite, {args.users} users, LLM {args.latency:g} s",
                f"{a['run_seconds']:.1f} s / {lite['run_seconds']:.1f} s "
                f"({a['users_per_second']:.2f} / {lite['users_per_second']:.2f} users/s)",
                "",
                f"SQLite {lite['run_seconds'] / a['run_seconds']:.2f}x the time",
            )
        )
        rows.append(
            row(
                "  CPU s per user a deployment pays: PostgreSQL / SQLite",
                f"{a['deployment_cpu_seconds_per_user']:.2f} / {lite['deployment_cpu_seconds_per_user']:.2f}",
            )
        )
    return rows


def _rows_overhead(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Rows of figure 5: Airflow's cost per mapped task with an instant LLM."""
    rows: list[Row] = []
    af, seq = results.get("airflow", {}), results.get("sequential", {})
    if "instant_llm" in af:
        a = af["instant_llm"]
        rows.append(
            row(
                f"Airflow, instant LLM: run seconds per user ({args.users} users)",
                f"{a['run_seconds'] / a['users']:.3f} s",
            )
        )
        rows.append(
            row(
                "  task duration - engine time (medians, 8 tasks on 2 cores)",
                f"{a['airflow_overhead_per_task_median']:.2f} s",
            )
        )
    if "single_user" in af:
        a = af["single_user"]
        rows.append(row("  one task alone: duration - engine time", f"{a['airflow_overhead_per_task_median']:.2f} s"))
        rows.append(row("  one task alone: queued -> running", f"{a['queue_wait_median']:.2f} s"))
    if "threaded_llm_latency" in seq:
        t = seq["threaded_llm_latency"]
        limit = args.pool_slots / args.latency
        rows.append(
            row(
                f"what-if: engine in {t['workers']} threads, one process, LLM {args.latency:g} s",
                f"{t['seconds']:.1f} s ({t['users_per_second']:.2f} users/s, {t['users_per_second'] / limit:.0%} of limit)",
            )
        )
    if "instant_llm" in seq:
        s = seq["instant_llm"]
        rows.append(row("sequential loop, instant LLM: seconds per user", f"{s['seconds'] / max(s['users'], 1):.3f} s"))
    return rows


def _rows_per_user(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Rows of figures 2, 3 and 4, and the store fix's before/after."""
    rows: list[Row] = []
    users = results.get("per_user", {}).get("users", {})
    for n, u in users.items():
        commands = ", ".join(f"{k} {v}" for k, v in sorted(u["commands"].items()))
        rows.append(
            (
                f"MongoDB commands, {int(n):,}-event user",
                f"{u['round_trips']} ({commands})",
                "const + O(chunks)",
                f"{u['result']['chunks']} chunk(s)",
            )
        )
    for n, u in users.items():
        pr = u["prompts"]
        rows.append(
            row(
                f"prompt chars / event chars, {int(n):,}-event user",
                f"{pr['prompt_to_event_chars']:.2f} ({pr['prompt_chars_per_event']:.0f} chars, ~{pr['prompt_tokens_per_event']:.0f} tokens per event)",
            )
        )
    for n, u in users.items():
        rows.append(
            row(
                f"peak RSS over baseline, {int(n):,}-event user",
                f"{u['peak_delta_kb'] / 1024:.1f} MiB (compress {u['seconds']:.1f} s)",
            )
        )
    fo = results.get("filter_order")
    if fo:
        rows.append(
            row(
                f"store fix, 160 _ids of a {fo['user_events']:,}-event user",
                f"{fo['user_id_first_seconds']:.2f} s -> {fo['id_first_seconds']:.3f} s",
            )
        )
    return rows


def _rows_scan(results: dict[str, Any]) -> list[Row]:
    """Rows of figure 6."""
    rows: list[Row] = []
    for pt in results.get("scan", {}).get("points", []):
        rows.append(
            (
                f"scan at {pt['events']:,} events",
                f"{pt['scan_seconds']:.2f} s; one user: keys {pt['user_fold_keys_seconds'] * 1000:.0f} ms, "
                f"events {pt['user_iter_events_seconds'] * 1000:.0f} ms (before the fix "
                f"{pt['user_iter_events_before_fix_seconds'] * 1000:.0f} ms)",
                "",
                "",
            )
        )
    rows.extend(("  note", note, "", "") for note in results.get("scan", {}).get("notes", []))
    return rows


def summarise(results: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    """Return the summary rows: (figure, value, target, verdict); a phase that timed out gets a row
    saying so, and the figures that needed it are left out instead of failing the report."""
    rows: list[Row] = [
        (f"phase {name}", f"timed out after {info['seconds']:.0f} s", "", "NOT MEASURED")
        for name, info in timed_out_phases(results)
    ]
    for part in (
        lambda: _rows_throughput(results, args),
        lambda: _rows_overhead(results, args),
        lambda: _rows_per_user(results, args),
        lambda: _rows_scan(results),
        lambda: (
            bench_guards.rows(results["guards"]) if "guards" in results and not timed_out(results["guards"]) else []
        ),
    ):
        try:
            rows += part()
        except (KeyError, TypeError, ZeroDivisionError):
            continue  # its phase timed out (listed above)
    return rows


def print_table(rows: list[Row]) -> None:
    """Print the summary rows as an aligned table."""
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    print()
    print("=" * (sum(widths) + 9))
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print("=" * (sum(widths) + 9))


def write_charts(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Write the SVG charts into ``--img-dir`` (docs/img) and return their paths."""
    args.img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    seq, af = results.get("sequential", {}), results.get("airflow", {})
    limit = args.pool_slots / args.latency
    if "llm_latency" in seq and "llm_latency" in af:
        bars = [
            svg.Bar(f"sequential loop, LLM {args.latency:g} s", seq["llm_latency"]["users_per_second"], svg.GREY),
            svg.Bar(f"Airflow run, LLM {args.latency:g} s", af["llm_latency"]["users_per_second"], svg.BLUE),
            svg.Bar("Airflow compress phase only", af["llm_latency"]["compress_users_per_second"], svg.BLUE),
        ]
        if measured(af.get("baseline", {}).get("llm_latency")):
            bars.append(
                svg.Bar(
                    "before: Airflow defaults, no preload",
                    af["baseline"]["llm_latency"]["users_per_second"],
                    svg.GREY,
                )
            )
        if measured(af.get("noop_llm_latency")):
            bars.append(
                svg.Bar(
                    f"Airflow floor: no-op task, sleep {args.latency:g} s",
                    af["noop_llm_latency"]["users_per_second"],
                    svg.PURPLE,
                )
            )
        bars += [
            svg.Bar("Airflow run, instant LLM", af["instant_llm"]["users_per_second"], svg.ORANGE),
            svg.Bar("sequential loop, instant LLM", seq["instant_llm"]["users_per_second"], svg.GREY),
            svg.Bar(
                f"what-if: engine, {args.pool_slots} threads, LLM {args.latency:g} s",
                seq["threaded_llm_latency"]["users_per_second"],
                svg.PURPLE,
            ),
            svg.Bar(f"limit: {args.pool_slots} slots / {args.latency:g} s", limit, svg.GREEN),
        ]
        chart = svg.bar_chart(
            f"Throughput, {args.users} users over the threshold (one LLM call each)",
            f"users per second; 2 cores, LocalExecutor, pool llm_api = {args.pool_slots} slots; {results['date'][:10]}",
            bars,
            "users per second",
            [svg.RefLine(limit * TARGET_FRACTION, f"target {TARGET_FRACTION:.0%} of limit")],
        )
        path = args.img_dir / "bench-throughput.svg"
        path.write_text(chart)
        written.append(shown(path))
    points = results.get("scan", {}).get("points", [])
    if points:
        chart = svg.line_chart(
            "Scan time as the event collection grows (embedded SecantusDB)",
            f"scan: $group over every event (COLLSCAN); one user: 100 events via the index; {results['date'][:10]}, 2 cores",
            [
                svg.Series("scan ($group)", [(p["events"], p["scan_seconds"]) for p in points], svg.BLUE),
                svg.Series(
                    "one user's events, before the store fix",
                    [(p["events"], p["user_iter_events_before_fix_seconds"]) for p in points],
                    svg.RED,
                ),
                svg.Series("one user's keys", [(p["events"], p["user_fold_keys_seconds"]) for p in points], svg.ORANGE),
                svg.Series(
                    "one user's events", [(p["events"], p["user_iter_events_seconds"]) for p in points], svg.GREEN
                ),
            ],
            "events in user_memory (log scale)",
            "seconds (log scale)",
        )
        path = args.img_dir / "bench-scan.svg"
        path.write_text(chart)
        written.append(shown(path))
    return written
