"""Health of every part an operator depends on, as one list of checks (``tutor-scoring health``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import duckdb
import sqlalchemy as sa

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.delivery import sender_from_settings
from tutor_scoring_dagster.ingest import list_landing
from tutor_scoring_dagster.reports import ReportSettings
from tutor_scoring_dagster.scoring import as_utc
from tutor_scoring_dagster.store import migrate
from tutor_scoring_dagster.store.errors import explain, missing_sqlite_file, safe_url
from tutor_scoring_dagster.store.publish import create_store_engine
from tutor_scoring_dagster.store.tables import tutor_scores

FRESHNESS_TARGET: Final = timedelta(hours=1)


@dataclass(frozen=True)
class Check:
    """One part's health: ``ok``, and one line saying what was found or what to do."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return asdict(self)


def check_landing(settings: Settings) -> Check:
    """The landing folder exists and is writable; how many files wait in it."""
    folder = settings.landing_dir
    if not folder.is_dir():
        return Check("landing", False, f"{folder} does not exist (TUTOR_SCORING_LANDING_DIR)")
    if not os.access(folder, os.W_OK):
        return Check("landing", False, f"{folder} is not writable: ingest cannot move files")
    waiting = len(list_landing(folder))
    quarantined = (
        len(list(settings.quarantine_dir.glob("*.reason.txt")))
        if settings.quarantine_dir.is_dir()
        else 0
    )
    return Check(
        "landing", True, f"{folder}: {waiting} file(s) waiting, {quarantined} in quarantine"
    )


def check_warehouse(settings: Settings) -> Check:
    """The warehouse opens and holds the raw tables."""
    path = settings.warehouse
    if not path.exists():
        return Check("warehouse", False, f"{path} does not exist yet: run the pipeline once")
    try:
        with warehouse.connect(
            path, read_only=True, wait_s=5, memory_limit=settings.warehouse_memory
        ) as con:
            row = warehouse.fetch_one(con, "SELECT count(*), max(loaded_at) FROM loaded_files")
            sessions = warehouse.fetch_one(con, "SELECT count(*) FROM sessions")
    except (duckdb.Error, warehouse.WarehouseLockedError) as exc:
        return Check("warehouse", False, f"{path}: {' '.join(str(exc).split())[:200]}")
    assert row is not None and sessions is not None
    return Check(
        "warehouse",
        True,
        f"{path}: {row[0]} files loaded (last {_when(row[1])}), {sessions[0]} sessions",
    )


def _when(instant: object) -> str:
    if not isinstance(instant, datetime):
        return "never"
    return f"{as_utc(instant):%Y-%m-%d %H:%M} UTC"


def _store_unusable(detail: str) -> list[Check]:
    """The store's check failed: the snapshot's (always listed) was not read."""
    return [
        Check("serving_store", False, detail),
        Check("snapshot", False, "not read: the serving store is not usable (above)"),
    ]


def check_store(settings: Settings, now: datetime) -> list[Check]:
    """The serving store answers, is migrated to this code's head, and its snapshot is fresh."""
    url = settings.database_url
    missing = missing_sqlite_file(url)
    if missing is not None:
        return _store_unusable(missing)
    engine = create_store_engine(url)
    try:
        current = migrate.current_revision(engine)
        problem = migrate.schema_problem(current, url)
        if problem is not None:
            return _store_unusable(str(problem))
        store = Check("serving_store", True, f"{safe_url(url)} at migration {current}")
        with engine.connect() as conn:
            as_of = conn.execute(sa.select(sa.func.max(tutor_scores.c.as_of))).scalar()
    except sa.exc.SQLAlchemyError as exc:
        return _store_unusable(explain(exc, url).message)
    finally:
        engine.dispose()
    if as_of is None:
        return [store, Check("snapshot", False, "no current snapshot published yet")]
    age = now - as_utc(as_of)
    fresh = age <= FRESHNESS_TARGET
    detail = (
        f"current snapshot as of {as_utc(as_of):%Y-%m-%d %H:%M} UTC is "
        f"{age.total_seconds() / 60:.0f} min old (target: under 60 min)"
    )
    return [store, Check("snapshot", fresh, detail)]


def check_email(settings: Settings) -> Check:
    """The email backend is configured well enough to build a sender."""
    try:
        sender = sender_from_settings(settings)
        ReportSettings.from_env()  # what the runs that send reports read, and fail on
    except ValueError as exc:
        return Check("email", False, str(exc))
    if not settings.admin_emails:
        return Check("email", False, "ADMIN_EMAIL is empty: reports have no recipient")
    where = {
        "outbox": f"writes .eml files to {settings.outbox_dir}",
        "smtp": f"sends through {settings.smtp_host}:{settings.smtp_port}",
        "sendgrid": f"sends through SendGrid at {settings.sendgrid_host}",
    }.get(sender.name, sender.name)
    return Check(
        "email", True, f"{settings.email_service} {where} to {', '.join(settings.admin_emails)}"
    )


def run_checks(
    settings: Settings,
    *,
    dagster_check: Callable[[], Check] | None = None,
    now: datetime | None = None,
) -> list[Check]:
    """Every check, in the order of the data flow."""
    now = now or datetime.now(UTC)
    checks = [check_landing(settings), check_warehouse(settings)]
    checks += check_store(settings, now)
    if dagster_check is not None:
        checks.append(dagster_check())
    checks.append(check_email(settings))
    return checks
