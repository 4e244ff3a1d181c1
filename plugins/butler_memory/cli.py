"""The same engine without Airflow's scheduler: ``python -m butler_memory compress|forget|qualify ...``.

Reads the same ``AIRFLOW_CONN_*`` variables (and ``BUTLER_MEMORY_*`` settings) as the DAG. Exit
codes: 0 all users done or skipped, 1 some user failed (forget: it could not finish, e.g. the lock
stayed busy; run it again), 2 bad arguments or settings (forget: bad input, nothing changed), 3 a
service (MongoDB, Redis) is unreachable. ``qualify``: 0 the model passed, 1 it failed, 2 bad settings or
thresholds, 3 the LLM endpoint is unusable (unreachable, not OpenAI-compatible).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from pymongo.errors import ConnectionFailure, PyMongoError

from butler_memory.core.errors import (
    CompressionError,
    ForgetInputError,
    InvalidUserIdError,
    LockUnavailableError,
    RollbackRefusedError,
)
from butler_memory.core.settings import SettingsError
from butler_memory.fold.compression import FAILED, UserResult, failed_result
from butler_memory.fold.report import build_report, emit_run_metrics, to_markdown
from butler_memory.operations.qualify import Thresholds
from butler_memory.orchestration import params
from butler_memory.orchestration.params import add_options
from butler_memory.storage.mongo import describe_mongo_error

log = logging.getLogger("butler_memory.cli")

EXIT_OK, EXIT_FAILED_USERS, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


COMMANDS: dict[str, tuple[tuple[params.Option, ...], str, str | None]] = {
    "compress": (params.COMPRESS, "scan users over the threshold and compress them", None),
    "forget": (
        params.ERASURE,
        "forget a user, or some of their events, everywhere we keep them (docs/erasure.md)",
        "Without --event/--since/--until: the whole user (archive, summary and its history, our profile fields, "
        "run documents, Redis keys; their user_memory events only with --include-events). With them: those "
        "events, and the summary is rebuilt without them.",
    ),
    "rollback": (
        params.ROLLBACK,
        "undo a run: summaries back to the version before it, its events back to user_memory",
        "Undo a run for each user it changed (or the given users): the summary and its bookkeeping return to "
        "the version before the run, as a new version; the events it folded go back from the archive into "
        "user_memory.",
    ),
    "refold": (
        params.REFOLD,
        "rebuild a user's summary from the archive with today's summariser (a new version)",
        "Re-fold the archived events on top of the oldest kept version whose covered events are all still "
        "archived (after a model upgrade or a prompt fix). Raw events in user_memory stay raw.",
    ),
    "qualify": (
        params.QUALIFY,
        "try the configured summariser on built-in synthetic users; write nothing (docs/qualify.md)",
        "Fold a fixed set of synthetic users (planted facts in several languages, short and long histories, "
        "corrections) through the real prompt, validation and guards, and print fact retention, guard rejections "
        "and false alarms, language kept, cut-off and truncated replies, latency and tokens, with a verdict. "
        "Nothing is written to the Butler's data. Exit 0 pass, 1 fail, 2 bad settings, 3 endpoint unusable.",
    ),
}
"""Each command: its DAG's params (orchestration/params.py), its help, its description."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser: each command's options are its DAG's params, plus --json and -v."""
    parser = argparse.ArgumentParser(prog="python -m butler_memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (options, help_text, description) in COMMANDS.items():
        command = sub.add_parser(name, allow_abbrev=name != "forget", help=help_text, description=description)
        add_options(command, options, **(dataclasses.asdict(Thresholds()) if name == "qualify" else {}))
        if name == "compress":
            command.add_argument("--run-id", default=None, help="id of this run in memory_compression_runs")
        command.add_argument("--json", action="store_true", help="print the result as JSON")
        command.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    return parser


EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (SettingsError, EXIT_USAGE),
    (ForgetInputError, EXIT_USAGE),  # bad input: nothing was changed
    (RollbackRefusedError, EXIT_USAGE),  # e.g. a run the history does not know: nothing was changed
    (InvalidUserIdError, EXIT_USAGE),  # a --user the job cannot take: nothing was read
    (LockUnavailableError, EXIT_UNAVAILABLE),
)


def _error(err: TextIO, exc: Exception) -> int:
    """Say what failed and return its exit code (EXIT_CODES; anything else: the database is unreachable)."""
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            err.write(f"error: {exc}\n")
            return code
    return _unreachable(err, exc)


def _unreachable(err: TextIO, exc: Exception) -> int:
    """Say the Butler database failed and return EXIT_UNAVAILABLE; never a document the driver quoted."""
    if isinstance(exc, PyMongoError) and not isinstance(exc, ConnectionFailure):
        detail = describe_mongo_error(exc)
    else:  # unreachable hosts, a bad URI or connection: the text names servers, not documents
        detail = f"{type(exc).__name__}: {exc}"
    err.write(f"error: cannot reach the Butler database: {detail}\n")
    return EXIT_UNAVAILABLE


def _progress(out: TextIO, done: int, total: int, result: UserResult) -> None:
    if out.isatty():
        out.write(f"\r[{done}/{total}] {result.user_id}: {result.status:<24}")
        out.flush()
        if done == total:
            out.write("\n")


def run_compress(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Scan, compress each user in turn, print the report; return the exit code.

    The stored and printed report name nobody whose erasure was asked for during the run (erasure
    wins every race, as in the DAG's report: ``audit.save_run_naming_no_erased``).
    """
    from butler_memory.operations.audit import save_run_naming_no_erased
    from butler_memory.orchestration.connections import build_engine, erasure_secret, resolve_settings

    try:  # the options are the DAG's params: settings resolve exactly as in the DAG (env, Variable, params)
        settings = resolve_settings(params.values(args, params.COMPRESS))
        secret = None if args.dry_run else erasure_secret(settings, required=False)  # None: nobody recognised
    except SettingsError as exc:
        return _error(err, exc)
    started = datetime.now(UTC)
    run_id = args.run_id or f"cli__{started.strftime('%Y-%m-%dT%H:%M:%S')}"
    try:
        engine = build_engine(settings)
        if not args.dry_run:
            engine.locks.ping()
        backlog = engine.scan(limit=settings.scan_limit, user_ids=args.user_ids, dry_run=args.dry_run)
    except Exception as exc:  # MongoDB down, bad connection: say which, exit non-zero
        return _error(err, exc)
    try:
        results: list[dict[str, Any]] = []
        for done, item in enumerate(backlog, start=1):
            t0 = time.monotonic()
            try:
                result = engine.compress(item.user_id, run_id=run_id, dry_run=args.dry_run)
            except CompressionError as exc:
                result = failed_result(item.user_id, exc, time.monotonic() - t0)
                log.warning("user %s failed: %s", item.user_id, exc)
            results.append(result.to_dict())
            _progress(err, done, len(backlog), result)
        finished = datetime.now(UTC)

        def document(erased: set[str]) -> dict[str, Any]:
            return build_report(
                run_id=run_id,
                scanned=[b.user_id for b in backlog if b.user_id not in erased],
                results=[r for r in results if r["user_id"] not in erased],
                started_at=started,
                finished_at=finished,
                dry_run=args.dry_run,
                backlog={b.user_id: b.events for b in backlog if b.user_id not in erased},
            )

        report = document(set())
        if not args.dry_run:
            report, _erased = save_run_naming_no_erased(
                engine.store, secret, document, [b.user_id for b in backlog], started
            )
            emit_run_metrics(report, engine.metrics)
    finally:
        engine.close()
    if args.json:
        out.write(json.dumps(report, default=str, ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(to_markdown(report))
    return EXIT_FAILED_USERS if report["users_failed"] else EXIT_OK


def run_forget(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Forget a user or some of their events; print the result; return the exit code."""
    from butler_memory.operations import audit
    from butler_memory.orchestration.connections import build_engine, erasure_secret, resolve_settings
    from butler_memory.orchestration.erasure_tasks import forget

    try:
        settings = resolve_settings({})  # the DAG's settings: the same lock keys and collections
        secret = erasure_secret(settings, required=not args.dry_run)
        engine = build_engine(settings)
    except Exception as exc:  # MongoDB down, bad connection: say which, exit non-zero
        return _error(err, exc)
    try:
        result = forget(params.values(args, params.ERASURE), engine=engine, secret=secret, requested_by="cli")
    except (ForgetInputError, LockUnavailableError) as exc:
        return _error(err, exc)
    except CompressionError as exc:
        err.write(f"error: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED_USERS
    finally:
        engine.close()
    if args.json:
        out.write(json.dumps(result.to_dict(), default=str, indent=2) + "\n")
    else:
        out.write(audit.to_text(result))
    return EXIT_OK


ROLLBACK_OK = ("rolled_back", "dry_run", "not_changed")


def _each_user(
    err: TextIO,
    *,
    dry_run: bool,
    users: Callable[[Any], Sequence[str]],
    act: Callable[[Any, str], Any],
    failed: Callable[[str, CompressionError], Any],
) -> list[Any] | int:
    """Open the engine (a real run first pings the lock service and ensures the indexes), act on each
    user in turn, close it; return the results, or an exit code when a service or setting is bad."""
    from butler_memory.orchestration.connections import build_engine, resolve_settings

    try:
        engine = build_engine(resolve_settings({}))  # the DAG's settings: the same lock keys and collections
    except Exception as exc:  # MongoDB down, bad connection: say which, exit non-zero
        return _error(err, exc)
    try:
        try:
            if not dry_run:
                engine.locks.ping()
                engine.store.ensure_indexes()
            user_ids = list(dict.fromkeys(users(engine)))
        except Exception as exc:  # MongoDB down: say which, exit non-zero
            return _error(err, exc)
        results = []
        for user_id in user_ids:
            try:
                results.append(act(engine, user_id))
            except CompressionError as exc:
                log.warning("user %s failed: %s", user_id, exc)
                results.append(failed(user_id, exc))
        return results
    finally:
        engine.close()


def run_rollback(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Roll back one run for each user it changed; print one line per user; return the exit code."""
    from butler_memory.core.runs import resolve_run, split_run_key
    from butler_memory.operations.rollback import RollbackResult, RunDecision, rollback_markdown, users_of_run

    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    target: dict[str, str] = {}

    def users(engine: Any) -> Sequence[str]:
        # The run as the history names it (DAG_ID/RUN_ID; a bare id of one DAG, or of an older version, too).
        target["run"] = resolve_run(args.run_id, engine.store.history.run_names)
        target["id"] = f"rollback__{split_run_key(target['run'])[1]}__{started}"
        return users_of_run(engine.store, target["run"], args.user_ids)

    def each_user(dry_run: bool) -> list[Any] | int:
        return _each_user(
            err,
            dry_run=dry_run,
            users=users,
            act=lambda engine, user_id: engine.rollback(
                user_id,
                target["run"],
                rollback_id=target["id"],
                cascade=args.cascade,
                allow_missing=args.allow_missing_events,
                dry_run=dry_run,
            ),
            failed=lambda user_id, exc: RollbackResult(user_id, FAILED, run_id=args.run_id, message=str(exc)),
        )

    # One decision for the run: all users or none, unless --partial (a dry pass finds the refusals first).
    results = each_user(dry_run=args.dry_run or not args.partial)
    if isinstance(results, int):
        return results
    decision = RunDecision(results, partial=args.partial)
    refusal = decision.refusal("pass --partial")
    if refusal:
        err.write(refusal + "\n")
    elif not args.dry_run and not args.partial:
        results = each_user(dry_run=False)
        if isinstance(results, int):
            return results
    if args.json:
        out.write(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    else:
        out.write(rollback_markdown(args.run_id, results, dry_run=args.dry_run or bool(refusal), refusal=refusal))
    return EXIT_OK if all(r.status in ROLLBACK_OK for r in results) else EXIT_FAILED_USERS


def run_refold(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Re-fold each given user from the archive; print one line per user; return the exit code."""
    from butler_memory.operations.refold import RefoldResult, refold_markdown

    run_id = f"refold__{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%S')}"
    results = _each_user(
        err,
        dry_run=args.dry_run,
        users=lambda engine: args.user_ids,
        act=lambda engine, user_id: engine.refold(user_id, run_id=run_id, dry_run=args.dry_run),
        failed=lambda user_id, exc: RefoldResult(
            user_id, FAILED, run_id=run_id, message=f"{type(exc).__name__}: {exc}"
        ),
    )
    if isinstance(results, int):
        return results
    if args.json:
        out.write(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    else:
        out.write(refold_markdown(run_id, results, dry_run=args.dry_run))
    return EXIT_OK if all(r.status in ("refolded", "dry_run", "not_changed") for r in results) else EXIT_FAILED_USERS


def run_qualify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Qualify the configured summariser on the built-in synthetic users; print the report."""
    from butler_memory.operations import qualify
    from butler_memory.orchestration.connections import build_summarizer, resolve_settings

    try:
        thresholds = Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})
        settings = resolve_settings({})  # the DAG's settings: the same connection, prompt budget and guards
        summarizer = build_summarizer(settings)
    except SettingsError as exc:
        return _error(err, exc)
    try:
        report = qualify.qualify(settings, summarizer, thresholds, endpoint=qualify.endpoint_name(settings, summarizer))
    except qualify.EndpointError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_UNAVAILABLE
    finally:
        summarizer.close()
    if args.json:
        out.write(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    else:
        out.write(qualify.to_markdown(report))
    return EXIT_OK if report["verdict"] == qualify.PASS else EXIT_FAILED_USERS


def _configure_logging(verbose: bool, err: TextIO) -> None:
    """Log to ``err`` at WARNING (INFO with -v): stdout carries only the report (``--json | jq``).

    Importing Airflow (the hooks that read the connections need it) points the root logger at stdout
    at INFO; so import it first, with stdout pointed at ``err``, then replace its handlers with ours.
    """
    with contextlib.redirect_stdout(err):
        import airflow  # noqa: F401
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=err,
        force=True,
    )


RUNS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "compress": run_compress,
    "forget": run_forget,
    "rollback": run_rollback,
    "refold": run_refold,
    "qualify": run_qualify,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, err)
    return RUNS[args.command](args, out, err)  # argparse enforces one of COMMANDS
