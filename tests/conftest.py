"""Shared fixtures: an isolated TUTOR_SCORING_HOME per test and throwaway Postgres databases.

Postgres tests skip with a loud reason where no server answers, except when
TUTOR_SCORING_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tutor_scoring_dagster.config import Settings, load_settings
from tutor_scoring_dagster.defs.partitions import due_day

PG_ADMIN_URL = os.environ.get(
    "TUTOR_SCORING_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("TUTOR_SCORING_REQUIRE_POSTGRES") == "1"

ENV_VARS = (
    "TUTOR_SCORING_HOME",
    "TUTOR_SCORING_LANDING_DIR",
    "TUTOR_SCORING_ARCHIVE_DIR",
    "TUTOR_SCORING_QUARANTINE_DIR",
    "TUTOR_SCORING_WAREHOUSE",
    "DATABASE_URL",
    "EMAIL_SERVICE",
    "EMAIL_OUTBOX_DIR",
    "ADMIN_EMAIL",
    "RISK_THRESHOLD",
    "MIN_SESSIONS",
    "SERVING_HORIZON_DAYS",
    "SENDGRID_API_KEY",
    "DAGSTER_HOME",
    "DIGEST_WHEN_NOTHING_NEW",
    "TUTOR_ALERTS",
    "PER_SESSION_REPORTS",
    "SESSION_REPORT_BATCH_SIZE",
    "DIGEST_MAX_ROWS",
    "EMAIL_MAX_ATTEMPTS",
    "EMAIL_PENDING_LEASE_MINUTES",
    "REPORT_LATENCY_TARGET_MINUTES",
    "TUTOR_SCORING_SITE_DIR",
)


@pytest.fixture(autouse=True)
def _quiet_dagster_notices() -> None:
    warnings.filterwarnings("ignore", message=".*is currently in (beta|preview).*")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Every path the project writes, moved under a temporary TUTOR_SCORING_HOME."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUTOR_SCORING_HOME", str(tmp_path / "home"))
    return load_settings()


@pytest.fixture
def due_partition() -> date:
    """The daily partition due now (``due_day``); skips a test the 01:30 UTC deadline could
    pass during, which would change the day it expects."""
    now = datetime.now(UTC)
    if due_day(now + timedelta(minutes=5)) != due_day(now):
        pytest.skip("too close to the 01:30 UTC deadline to tell which day is due")
    return due_day(now)


def _pg_available() -> str | None:
    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # any driver error means: no usable server
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    """An engine on the local Postgres server's maintenance database."""
    problem = _pg_available()
    if problem is not None:
        message = f"POSTGRES NOT AVAILABLE at {PG_ADMIN_URL} ({problem})"
        if REQUIRE_POSTGRES:
            pytest.fail(message + "; .ci/run requires it", pytrace=False)
        pytest.skip(message + "; Postgres tests SKIPPED", allow_module_level=False)
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """The URL of a throwaway Postgres database, dropped after the test."""
    name = f"tutor_scoring_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)
    yield url
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A serving store URL: an SQLite file, and a throwaway Postgres database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return str(request.getfixturevalue("pg_url"))
