"""The ``tutor-scoring`` command: generate drops, run the pipeline, manage the store."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXIT_USAGE = 2
T = TypeVar("T")


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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _days(text: str) -> int:
    value = text.removesuffix("d")
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a number of days like 1d or 7d: {text!r}")
    return int(value)


class _WithDefaults(argparse.HelpFormatter):
    """Help that ends each option's text with its default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and action.option_strings and action.default not in (None, argparse.SUPPRESS):
            return f"{text} (default: %(default)s)"
        return text


def _sample_options(
    parser: argparse.ArgumentParser, *, tutors: int, days: int, sessions_per_day: int
) -> None:
    """The size and seed of a generated data set (``generate``, ``demo``), with defaults."""
    parser.add_argument("--tutors", type=_positive, default=tutors, help="tutors")
    parser.add_argument("--days", type=_positive, default=days, help="days of sessions")
    parser.add_argument(
        "--sessions-per-day", type=_positive, default=sessions_per_day, help="sessions a day"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed: same seed, same drops")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tutor-scoring``."""
    parser = argparse.ArgumentParser(
        prog="tutor-scoring",
        description="Flags tutors who are becoming unreliable (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="write realistic synthetic landing drops",
        formatter_class=_WithDefaults,
    )
    gen.add_argument("--out", type=Path, required=True, help="folder to write the drops into")
    _sample_options(gen, tutors=100, days=120, sessions_per_day=300)
    gen.add_argument(
        "--end", type=_parse_date, default=None, help="day after the last session (default: today)"
    )
    gen.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="file format",
    )
    gen.add_argument(
        "--drops-per-day",
        type=_positive,
        default=4,
        help="files a day per entity",
    )
    gen.add_argument(
        "--defects",
        type=float,
        default=0.0,
        help="fraction of defective rows",
    )
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

    demo = sub.add_parser(
        "demo",
        help="generate a sample data set and run the pipeline on it",
        formatter_class=_WithDefaults,
    )
    _sample_options(demo, tutors=60, days=100, sessions_per_day=150)

    tutors = sub.add_parser("tutors", help="current scores from the serving store")
    tutors.add_argument("--risk", choices=("high", "ok", "insufficient_data"), default=None)
    tutors.add_argument(
        "--tier",
        choices=("high", "watch", "ok", "insufficient_data"),
        default=None,
        help="only tutors of this risk tier (watch: early warning)",
    )
    tutors.add_argument("--sort-by", default="reschedule_rate_30d", help="any score column")
    tutors.add_argument("--order", choices=("asc", "desc"), default="desc")
    tutors.add_argument("--limit", type=_not_negative, default=50)
    tutors.add_argument("--offset", type=_not_negative, default=0)
    tutors.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    tutor = sub.add_parser("tutor", help="one tutor: scores, statistics, trend, reschedules")
    tutor.add_argument("tutor_id")
    tutor.add_argument("--history-days", type=_positive, default=30)
    tutor.add_argument("--json", action="store_true", help="one JSON object")

    backtest = sub.add_parser("backtest", help="replay daily snapshots and score each risk rule")
    backtest.add_argument("--from", dest="start", type=_parse_date, required=True)
    backtest.add_argument("--to", dest="end", type=_parse_date, required=True)
    backtest.add_argument("--every", type=_days, default=1, help="e.g. 1d (default) or 7d")
    backtest.add_argument("--labels", type=Path, default=None, help="a ground_truth.csv")
    backtest.add_argument("--json", action="store_true")

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

    if args.as_of is not None and args.as_of > datetime.now(UTC):
        # It would be published as the current snapshot, of sessions that have not happened.
        raise ValueError(f"--as-of {args.as_of.isoformat()} is in the future")
    summary = run_pipeline(as_of=args.as_of, history_days=args.history_days)
    print(summary.render())
    return 0 if summary.success else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.defs.jobs import run_pipeline
    from tutor_scoring_dagster.generate import generate_drops
    from tutor_scoring_dagster.scoring import floor_to_hour
    from tutor_scoring_dagster.store.errors import safe_url

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
            "  (the sample's sessions are made up at once, not live: the latency above, and\n"
            "   its check when it fails, are about the age of the newest sample session when\n"
            "   the demo ran; drop-to-email is measured in benchmarks/README.md)"
        )
        print(
            "\nWhere to look:\n"
            f"  warehouse (DuckDB):   {settings.warehouse}\n"
            f"  serving store:        {safe_url(settings.database_url)}\n"
            f"  emails (outbox):      {settings.outbox_dir}\n"
            f"  archived drops:       {settings.archive_dir}\n"
            f"  dashboard:            {settings.site_dir / 'index.html'}\n"
            "  Dagster UI:           ./dev dagster dev -w workspace.yaml"
        )
    return 0 if summary.success else 1


def cmd_db(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from tutor_scoring_dagster.store import migrate
    from tutor_scoring_dagster.store.errors import SchemaAheadError, safe_url

    if args.action == "downgrade" and not args.revision:
        print("tutor-scoring db downgrade needs a revision (or 'base')", file=sys.stderr)
        return EXIT_USAGE
    with _store_engine(may_create=args.action == "upgrade") as engine:  # upgrade makes the store
        if args.action != "current":
            # A store migrated by newer code: this code has no script to move it either way.
            problem = migrate.readable_problem(engine)
            if isinstance(problem, SchemaAheadError):
                raise StoreUnavailable(str(problem))
        try:
            if args.action == "upgrade":
                migrate.upgrade(engine, args.revision or "head")
            elif args.action == "downgrade":
                migrate.downgrade(engine, args.revision)
        except CommandError as exc:  # e.g. a revision this code does not know
            raise ValueError(f"db {args.action}: {' '.join(str(exc).split())}") from None
        print(
            f"store {safe_url(engine.url)} at revision "
            f"{migrate.current_revision(engine) or 'none'} (code head {migrate.head_revision()})"
        )
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


TABLE_COLUMNS = (
    ("tutor_id", "tutor"),
    ("name", "name"),
    ("risk_status", "risk"),
    ("risk_tier", "tier"),
    ("reschedule_rate_7d", "resched 7d"),
    ("reschedule_rate_30d", "resched 30d"),
    ("reschedule_rate_90d", "resched 90d"),
    ("total_sessions_30d", "sessions 30d"),
    ("no_show_rate_30d", "no-show 30d"),
    ("reschedule_rate_30d_change_7d", "30d vs 7d ago"),
)


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name.endswith("change_7d"):
        return f"{value * 100:+.1f} pts"
    if "_rate_" in name:
        return f"{value * 100:.1f}%"
    return str(value)


def _json_default(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@contextmanager
def _store_engine(*, may_create: bool = False) -> Iterator[Engine]:
    """The serving store's engine, disposed after. A missing SQLite store (unless
    ``may_create``) and the store's own errors become :class:`StoreUnavailable`, one line
    saying why; an empty SQLite file that a failed first use made is removed."""
    import sqlalchemy as sa

    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.store.errors import explain, missing_sqlite_file
    from tutor_scoring_dagster.store.publish import create_store_engine

    url = load_settings().database_url
    missing = missing_sqlite_file(url)
    if missing is not None and not may_create:
        raise StoreUnavailable(missing)
    engine = None
    try:
        engine = create_store_engine(url)
        yield engine
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(explain(exc, url).message) from None
    finally:
        if engine is not None:
            engine.dispose()
        if missing is not None:
            created = Path(str(sa.make_url(url).database))
            if created.exists() and created.stat().st_size == 0:
                created.unlink()


def _store_call(fn: Callable[[Engine], T]) -> T:
    """Run a store read; its problems become one line (and exit 1) instead of a trace."""
    from tutor_scoring_dagster.store import migrate

    with _store_engine() as engine:
        # Read the store only at this code's migration: an older store lacks columns, and a
        # newer one may mean something else by them.
        problem = migrate.readable_problem(engine)
        if problem is not None:
            raise StoreUnavailable(str(problem))
        return fn(engine)


class StoreUnavailable(Exception):
    """The serving store could not answer; the message says why."""


def cmd_tutors(args: argparse.Namespace) -> int:
    import json

    from tutor_scoring_dagster.store.reads import list_tutors

    page = _store_call(
        lambda engine: list_tutors(
            engine,
            risk_status=args.risk,
            risk_tier=args.tier,
            sort_by=args.sort_by,
            order=args.order,
            limit=args.limit,
            offset=args.offset,
        )
    )
    if args.json:
        for row in page.tutors:
            print(json.dumps(row, default=_json_default))
        return 0
    rows = [[_cell(n, r.get(n)) for n, _ in TABLE_COLUMNS] for r in page.tutors]
    headers = [h for _, h in TABLE_COLUMNS]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    shown = f"{page.offset + 1}-{page.offset + len(page.tutors)}" if page.tutors else "none"
    print(f"({shown} of {page.total} tutors)")
    return 0


def cmd_tutor(args: argparse.Namespace) -> int:
    import json

    from tutor_scoring_dagster.store.reads import tutor_detail, tutor_history

    def read(engine: Any) -> tuple[Any, Any]:
        detail = tutor_detail(engine, args.tutor_id)
        # History up to the snapshot people are looking at, not up to the wall clock.
        until = detail.scores["as_of"] if detail.scores else None
        history = tutor_history(engine, args.tutor_id, days=args.history_days, until=until)
        return detail, history

    detail, history = _store_call(read)
    if args.json:
        print(
            json.dumps(
                {
                    "tutor": detail.tutor,
                    "scores": detail.scores,
                    "statistics": detail.statistics,
                    "trend": history.trend,
                    "reschedules": history.reschedules,
                },
                default=_json_default,
            )
        )
        return 0
    t, s = detail.tutor, detail.scores
    print(f"{t.get('name') or '(no name)'} ({t['tutor_id']})  {t.get('email') or ''}")
    if s is None:
        print("  no current scores (no session scheduled before the snapshot)")
    else:
        print(
            f"  risk: {s['risk_status']}  (threshold {s['risk_threshold']:.0%}, "
            f"min {s['min_sessions']} sessions, as of {_json_default(s['as_of'])})"
        )
        tier = s.get("risk_tier") or "-"
        if tier in ("high", "watch"):
            from tutor_scoring_dagster.assessment import flagged_since

            print(
                f"  tier: {tier} {flagged_since(s)}, P(rate > threshold) "
                f"{_cell('x_rate_', s.get('risk_probability'))}"
                + (", newly flagged" if s.get("newly_flagged") else "")
            )
            print(f"    why: {s.get('top_drivers') or '-'}")
            print(f"    action: {s.get('recommended_action') or '-'}")
        else:
            print(f"  tier: {tier.replace('_', ' ')}")
        for w in (7, 30, 90):
            print(
                f"  {w:>2}d: reschedules {s[f'tutor_reschedules_{w}d']}/"
                f"{s[f'total_sessions_{w}d']} = {_cell('x_rate_', s[f'reschedule_rate_{w}d'])}"
                f" (>= {_cell('x_rate_', s[f'reschedule_rate_{w}d_lower95'])}),"
                f" no-shows {s[f'no_shows_{w}d']} = {_cell('x_rate_', s[f'no_show_rate_{w}d'])}"
            )
    st = detail.statistics
    print(
        f"  sessions in the store: {st.get('sessions')}  by status: {st.get('sessions_by_status')}"
    )
    if history.trend:
        points = ", ".join(
            f"{p['score_date']}: {_cell('x_rate_', p.get('reschedule_rate_30d'))}"
            for p in history.trend[-10:]
        )
        print(f"  30-day rate, last days: {points}")
    print(f"  reschedules in the last {args.history_days} days: {len(history.reschedules)}")
    for r in history.reschedules:
        notice = r.get("hours_before_session")
        print(
            f"    {_json_default(r.get('cancelled_at'))[:16]}  {r.get('initiator'):<7}  "
            f"{(f'{notice:.0f} h notice' if notice is not None else '-'):<14}  "
            f"{r.get('reason_code') or '-'}: {r.get('reason') or ''}"
        )
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from tutor_scoring_dagster import warehouse
    from tutor_scoring_dagster.backtest import run_backtest
    from tutor_scoring_dagster.config import load_settings

    if args.labels is not None and not args.labels.is_file():
        raise ValueError(f"no labels file at {args.labels}")
    settings = load_settings()
    path = settings.warehouse
    if not path.exists():
        raise LookupError(f"no warehouse at {path}: run the pipeline first")
    with warehouse.connect(path, read_only=True, memory_limit=settings.warehouse_memory) as con:
        results = run_backtest(con, args.start, args.end, every_days=args.every, labels=args.labels)
    if results.daily.height == 0:
        raise LookupError(
            f"nothing to replay from {args.start} to {args.end}: no tutor in the warehouse has a "
            "session by then (pick dates the landing drops cover)"
        )
    print(results.to_json() if args.json else results.to_markdown())
    return 0


COMMANDS: dict[str, Any] = {
    "backtest": cmd_backtest,
    "tutors": cmd_tutors,
    "tutor": cmd_tutor,
    "health": cmd_health,
    "generate": cmd_generate,
    "run": cmd_run,
    "demo": cmd_demo,
    "db": cmd_db,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tutor-scoring`` console script."""
    # Piped into `head`: stop quietly, like any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    # Dagster's beta/preview notices are for developers of this project, not its users.
    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")
    logging.basicConfig(
        level=os.environ.get("TUTOR_SCORING_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(COMMANDS[args.command](args))
    except ValueError as exc:  # bad values and configuration: one line, no traceback
        print(f"tutor-scoring: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:  # e.g. an unknown tutor id
        print(f"tutor-scoring: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"tutor-scoring: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
