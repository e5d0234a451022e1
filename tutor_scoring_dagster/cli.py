"""The ``tutor-scoring`` command: generate drops, run the pipeline, manage the store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def _parse_instant(text: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tutor-scoring``."""
    parser = argparse.ArgumentParser(
        prog="tutor-scoring",
        description="Flags tutors who are becoming unreliable (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write realistic synthetic landing drops")
    gen.add_argument("--out", type=Path, required=True, help="folder to write the drops into")
    gen.add_argument("--tutors", type=_positive, default=100)
    gen.add_argument("--days", type=_positive, default=120)
    gen.add_argument("--sessions-per-day", type=_positive, default=300)
    gen.add_argument("--seed", type=int, default=7)
    gen.add_argument("--end", type=_parse_date, default=None, help="day after the last session")
    gen.add_argument("--format", choices=("csv", "parquet"), default="csv")
    gen.add_argument("--drops-per-day", type=_positive, default=4)
    gen.add_argument("--defects", type=float, default=0.0, help="fraction of defective rows")
    gen.add_argument(
        "--ground-truth",
        type=Path,
        default=None,
        help="where to write ground_truth.csv (default: beside --out, so that a landing "
        "folder holds drops only)",
    )

    run = sub.add_parser("run", help="one in-process Dagster run of the whole pipeline")
    run.add_argument(
        "--as-of",
        type=_parse_instant,
        default=None,
        help="score as of this instant (default: the start of the current hour, UTC)",
    )
    run.add_argument(
        "--history-days",
        type=_positive,
        default=30,
        help="daily score partitions to (re)build, ending the day before --as-of (default 30)",
    )

    demo = sub.add_parser("demo", help="generate a sample data set and run the pipeline on it")
    demo.add_argument("--tutors", type=_positive, default=60)
    demo.add_argument("--days", type=_positive, default=100)
    demo.add_argument("--sessions-per-day", type=_positive, default=150)
    demo.add_argument("--seed", type=int, default=7)

    health = sub.add_parser("health", help="check every part the pipeline depends on")
    health.add_argument("--json", action="store_true", help="one JSON object per check")

    db = sub.add_parser("db", help="serving store migrations")
    db.add_argument("action", choices=("upgrade", "downgrade", "current"))
    db.add_argument("revision", nargs="?", default=None)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster.generate import generate_drops

    result = generate_drops(
        args.out,
        tutors=args.tutors,
        days=args.days,
        sessions_per_day=args.sessions_per_day,
        seed=args.seed,
        end=args.end,
        fmt=args.format,
        drops_per_day=args.drops_per_day,
        defects=args.defects,
        ground_truth_path=args.ground_truth or args.out.parent / "ground_truth.csv",
    )
    print(
        f"wrote {len(result.files)} files to {args.out}: {result.tutors} tutors, "
        f"{result.sessions} sessions, {result.reschedules} reschedules "
        f"(ground truth: {result.ground_truth})"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster.defs.jobs import run_pipeline

    summary = run_pipeline(as_of=args.as_of, history_days=args.history_days)
    print(summary.render())
    return 0 if summary.success else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.defs.jobs import run_pipeline
    from tutor_scoring_dagster.generate import generate_drops
    from tutor_scoring_dagster.scoring import floor_to_hour

    settings = load_settings()
    as_of = floor_to_hour(datetime.now(UTC))
    generated = generate_drops(
        settings.landing_dir,
        tutors=args.tutors,
        days=args.days,
        sessions_per_day=args.sessions_per_day,
        seed=args.seed,
        end=as_of.date() + timedelta(days=1),
        ground_truth_path=settings.home / "ground_truth.csv",
    )
    print(
        f"generated {len(generated.files)} drops in {settings.landing_dir}: {generated.tutors} "
        f"tutors, {generated.sessions} sessions"
    )
    summary = run_pipeline(as_of=as_of, history_days=args.days)
    print(summary.render())
    if summary.success:
        print(
            "\nWhere to look:\n"
            f"  warehouse (DuckDB):   {settings.warehouse}\n"
            f"  serving store:        {_redact(settings.database_url)}\n"
            f"  emails (outbox):      {settings.outbox_dir}\n"
            f"  archived drops:       {settings.archive_dir}\n"
            "  Dagster UI:           dagster dev -m tutor_scoring_dagster.definitions"
        )
    return 0 if summary.success else 1


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable DATABASE_URL>"


def cmd_db(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.store import migrate
    from tutor_scoring_dagster.store.publish import create_store_engine

    engine = create_store_engine(load_settings().database_url)
    try:
        if args.action == "upgrade":
            migrate.upgrade(engine, args.revision or "head")
        elif args.action == "downgrade":
            if not args.revision:
                print("tutor-scoring db downgrade needs a revision (or 'base')", file=sys.stderr)
                return EXIT_USAGE
            migrate.downgrade(engine, args.revision)
        print(
            f"store {_redact(str(engine.url))} at revision "
            f"{migrate.current_revision(engine) or 'none'} (code head {migrate.head_revision()})"
        )
    finally:
        engine.dispose()
    return 0


def _dagster_check() -> Any:
    from tutor_scoring_dagster.health import Check

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return Check(
            "dagster_instance",
            True,
            "DAGSTER_HOME not set: `tutor-scoring run` uses a throwaway instance; a deployment "
            "sets it (README, Deployment)",
        )
    try:
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            storage = type(instance.run_storage).__name__
            runs = instance.get_runs_count()
    except Exception as exc:  # any failure to open the instance is the finding
        return Check("dagster_instance", False, f"{home}: {' '.join(str(exc).split())[:300]}")
    return Check("dagster_instance", True, f"{home}: {storage}, {runs} runs recorded")


def cmd_health(args: argparse.Namespace) -> int:
    import json

    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.health import run_checks

    checks = run_checks(load_settings(), dagster_check=_dagster_check)
    if args.json:
        for check in checks:
            print(json.dumps(check.as_dict()))
    else:
        width = max(len(c.name) for c in checks)
        for check in checks:
            print(f"{'ok ' if check.ok else 'BAD'}  {check.name.ljust(width)}  {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


COMMANDS: dict[str, Any] = {
    "health": cmd_health,
    "generate": cmd_generate,
    "run": cmd_run,
    "demo": cmd_demo,
    "db": cmd_db,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tutor-scoring`` console script."""
    args = build_parser().parse_args(argv)
    # Dagster's beta/preview notices are for developers of this project, not its users.
    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
    logging.basicConfig(
        level=os.environ.get("TUTOR_SCORING_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(COMMANDS[args.command](args))
    except ValueError as exc:  # configuration errors: one line, no traceback
        print(f"tutor-scoring: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
