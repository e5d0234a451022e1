"""A serving store out of reach fails a publish with one line that says what is wrong and what
to do, never the password, and is retried only where waiting may help."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import test_store_frames as f

from tutor_scoring_dagster.defs.publish.assets import store_errors_explained
from tutor_scoring_dagster.store import migrate
from tutor_scoring_dagster.store.errors import explain
from tutor_scoring_dagster.store.publish import create_store_engine, publish_current

PASSWORD = "s3cret-Pa55"


def publish_to(url: str) -> dg.Failure:
    """The failure that publishing to ``url`` raises in the publish assets."""
    engine = create_store_engine(url)
    sessions = f.sessions(10, 2)
    try:
        with pytest.raises(dg.Failure) as caught, store_errors_explained(url):
            publish_current(
                engine,
                tutors=f.tutors(2),
                sessions=sessions,
                reschedules=f.reschedules(sessions),
                scores=f.scores(2),
                horizon_start=None,
                now=datetime.now(UTC),
            )
    finally:
        engine.dispose()
    failure = caught.value
    assert failure.description and "\n" not in failure.description
    assert PASSWORD not in failure.description
    assert failure.__cause__ is None and failure.__suppress_context__  # no chained trace
    return failure


def pg_url(pg_admin: sa.Engine, **parts: object) -> str:
    return pg_admin.url.set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def test_an_unreachable_server_is_retried_with_backoff(pg_admin: sa.Engine) -> None:
    started = time.monotonic()
    failure = publish_to(pg_url(pg_admin, port=1, password=PASSWORD))
    assert time.monotonic() - started < 15  # no hanging, no retry loop of our own
    assert failure.description.startswith("cannot reach the serving store at ")
    assert "check that the server is running" in failure.description
    assert "retries this step with backoff" in failure.description
    assert failure.allow_retries


def test_bad_credentials_are_not_retried(pg_admin: sa.Engine) -> None:
    failure = publish_to(pg_url(pg_admin, username="no_such_role", password=PASSWORD))
    assert "refused the credentials; check the user and password in DATABASE_URL" in (
        failure.description or ""
    )
    assert not failure.allow_retries
    # The local server trusts every password; the server's words for a wrong one:
    wrong = sa.exc.OperationalError(
        "connect", {}, Exception('FATAL:  password authentication failed for user "scores"')
    )
    problem = explain(wrong, f"postgresql+psycopg://scores:{PASSWORD}@db:5432/scores")
    assert problem.message.startswith("the serving store at postgresql+psycopg://scores:***@db")
    assert "refused the credentials" in problem.message and not problem.retryable


def test_a_missing_database_says_to_create_it(pg_admin: sa.Engine) -> None:
    failure = publish_to(pg_url(pg_admin, database="tutor_scoring_no_such_db", password=PASSWORD))
    assert "the database named in DATABASE_URL does not exist on" in (failure.description or "")
    assert "create it (createdb)" in (failure.description or "")
    assert not failure.allow_retries


def test_an_unopenable_sqlite_file_says_so() -> None:
    failure = publish_to("sqlite:////proc/no/such/folder/scores.sqlite")
    assert "cannot open the SQLite file of sqlite:////proc/no/such/folder/scores.sqlite" in (
        failure.description or ""
    )
    assert not failure.allow_retries


def test_a_schema_ahead_of_the_code_fails_with_its_one_line(pg_url: str) -> None:
    engine = create_store_engine(pg_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_future'"))
    finally:
        engine.dispose()
    failure = publish_to(pg_url)
    assert "is at migration 0099_future, which this code does not know" in (
        failure.description or ""
    )
    assert not failure.allow_retries


def _older_schema_problems(url: str) -> list[str]:
    """What explain() says of reading and of writing a column that ``url``'s store lacks."""
    engine = sa.create_engine(url)
    problems = []
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE tutor_scores (tutor_id TEXT)"))
        for statement in (
            "SELECT risk_tier FROM tutor_scores",
            "INSERT INTO tutor_scores (tutor_id, risk_tier) VALUES ('A', 'ok')",
        ):
            with pytest.raises(sa.exc.DBAPIError) as caught, engine.connect() as conn:
                conn.execute(sa.text(statement))
            problem = explain(caught.value, url)
            assert not problem.retryable
            problems.append(problem.message)
    finally:
        engine.dispose()
    return problems


def test_a_missing_column_is_an_older_schema_not_an_unreachable_server(tmp_path: Path) -> None:
    """SQLite reports a column a store at an older migration lacks as an OperationalError,
    which is otherwise how an unreachable server shows."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    for message in _older_schema_problems(url):
        assert message.startswith(f"the serving store at {url} lacks a column this code reads")
        assert message.endswith("run `tutor-scoring db upgrade`")
        assert "server" not in message


def test_a_missing_column_on_postgres_is_an_older_schema_not_a_missing_table(pg_url: str) -> None:
    """Postgres words a write's missing column 'column x of relation y does not exist'."""
    for message in _older_schema_problems(pg_url):
        assert "lacks a column this code reads" in message, message
        assert message.endswith("run `tutor-scoring db upgrade`")
