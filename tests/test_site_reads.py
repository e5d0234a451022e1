"""The dashboard's reads of the serving store (``store/site_reads.py``): the same frames, of the
same types, from SQLite and from a throwaway Postgres database, also for text that needs quoting,
null against empty text and sub-second instants; and ``read_site_data`` reading Postgres over
several connections at once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta

import polars as pl
import pytest
import sqlalchemy as sa
import test_store_frames as f
from sqlalchemy.engine import Connection

from tutor_scoring_dagster.site import read_site_data, reschedule_tables
from tutor_scoring_dagster.store import site_reads
from tutor_scoring_dagster.store.publish import (
    create_store_engine,
    publish_current,
    publish_history,
)

N_TUTORS = 12
FIRST_DAY = f.AS_OF.date() - timedelta(days=20)
SINCE = datetime.combine(FIRST_DAY, datetime.min.time(), f.AS_OF.tzinfo)
REASONS = [None, "", 'sick, "really"\nback soon', "é <x> & 'y' \\N", "NULL"]
"""Text a reader could get wrong: null and empty, CSV and COPY specials, markup, a literal."""

READS: dict[str, Callable[[Connection], pl.DataFrame]] = {
    "snapshot": site_reads.current_snapshot,
    "drivers": site_reads.current_drivers,
    "history": lambda conn: site_reads.score_history(conn, FIRST_DAY),
    "sessions": lambda conn: site_reads.daily_sessions(conn, SINCE),
    "reschedules": lambda conn: site_reads.reschedules_since(conn, SINCE),
}


def store_data() -> dict[str, pl.DataFrame]:
    """A small store's tables, with null and empty names, odd reasons and sub-second times."""
    tutors = f.tutors(N_TUTORS).with_columns(
        name=pl.when(pl.col("tutor_id") == "T00001")
        .then(None)
        .when(pl.col("tutor_id") == "T00002")
        .then(pl.lit(""))
        .otherwise(pl.col("name") + ' "Ö", <b>'),
    )
    sessions = f.sessions(900, N_TUTORS, days=40).with_columns(
        pl.col("scheduled_time") + pl.duration(microseconds=123_457)
    )
    moved = f.reschedules(sessions).with_row_index("i")
    reschedules = moved.with_columns(
        reason=pl.col("i").map_elements(lambda i: REASONS[i % len(REASONS)], pl.String),
        new_time=pl.when(pl.col("i") % 4 == 0).then(None).otherwise(pl.col("new_time")),
        hours_before_session=pl.when(pl.col("i") % 5 == 0).then(None).otherwise(pl.col("i") / 7),
    ).drop("i")
    return {
        "tutors": tutors,
        "sessions": sessions,
        "reschedules": reschedules,
        "scores": f.scores(N_TUTORS),
    }


@pytest.fixture(scope="module")
def engines(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, sa.Engine]]:
    """The same store published to SQLite and to a throwaway Postgres database (read only)."""
    admin: sa.Engine = request.getfixturevalue("pg_admin")
    name = f"tutor_scoring_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    urls = {
        "sqlite": f"sqlite:///{tmp_path_factory.mktemp('site_reads') / 'store.sqlite'}",
        "postgres": admin.url.set(database=name).render_as_string(hide_password=False),
    }
    data = store_data()
    engines = {kind: create_store_engine(url) for kind, url in urls.items()}
    for engine in engines.values():
        publish_current(
            engine,
            **data,
            horizon_start=None,
            now=f.AS_OF,
            risk_drivers=f.drivers(data["scores"]),
        )
        publish_history(
            engine, f.history(N_TUTORS, FIRST_DAY, 20), FIRST_DAY, f.AS_OF.date(), now=f.AS_OF
        )
    yield engines
    for engine in engines.values():
        engine.dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def read(engine: sa.Engine, what: str) -> pl.DataFrame:
    with engine.connect() as conn:
        frame = READS[what](conn)
    return frame.sort(frame.columns, nulls_last=True)


@pytest.mark.parametrize("what", sorted(READS))
def test_sqlite_and_postgres_give_the_same_frame(engines: dict[str, sa.Engine], what: str) -> None:
    sqlite, postgres = (read(engines[kind], what) for kind in ("sqlite", "postgres"))
    assert postgres.height > 0
    assert postgres.schema == sqlite.schema
    for name, dtype in postgres.schema.items():
        if isinstance(dtype, pl.Datetime):
            assert dtype == site_reads.UTC_TIME, name
    assert postgres.equals(sqlite)


def test_text_nulls_and_instants_come_back_exactly(engines: dict[str, sa.Engine]) -> None:
    published = store_data()
    frame = read(engines["postgres"], "reschedules")
    reasons = frame.get_column("reason").to_list()
    assert set(reasons) == set(REASONS)
    assert reasons.count(None) > 0 and reasons.count("") > 0  # null is not empty text
    assert frame.get_column("new_time").null_count() > 0
    moved = published["reschedules"].filter(pl.col("cancelled_at") >= SINCE)
    assert frame.get_column("cancelled_at").sort().equals(moved.get_column("cancelled_at").sort())
    names = read(engines["postgres"], "snapshot").select("tutor_id", "name").rows_by_key("tutor_id")
    assert names["T00001"] == [(None,)] and names["T00002"] == [("",)]
    assert names["T00003"] == [('Tutor T00003 "Ö", <b>',)]


def test_dates_are_utc_days(engines: dict[str, sa.Engine]) -> None:
    history = read(engines["postgres"], "history")
    assert history.schema["score_date"] == pl.Date
    assert history.get_column("score_date").min() == FIRST_DAY
    sessions = read(engines["postgres"], "sessions")
    days = (
        store_data()["sessions"]
        .filter(pl.col("scheduled_time") >= SINCE)
        .group_by(pl.col("tutor_id"), pl.col("scheduled_time").dt.date().alias("day"))
        .agg(pl.len().cast(pl.Int64).alias("sessions"))
    )
    assert sessions.equals(days.sort(sessions.columns))


def test_postgres_session_settings_do_not_outlive_the_read(engines: dict[str, sa.Engine]) -> None:
    with engines["postgres"].connect() as conn:
        conn.exec_driver_sql("SET TIME ZONE 'America/New_York'")
        conn.commit()
        frame = site_reads.reschedules_since(conn, SINCE)
        conn.rollback()
        assert conn.exec_driver_sql("SHOW TIME ZONE").scalar() == "America/New_York"
        conn.exec_driver_sql("RESET TIME ZONE")
        conn.commit()
    assert frame.sort(frame.columns, nulls_last=True).equals(read(engines["sqlite"], "reschedules"))


def test_a_failing_postgres_read_raises_sqlalchemys_error(pg_url: str) -> None:
    engine = create_store_engine(pg_url)  # an empty database: no tables
    with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="tutor_score"):
        site_reads.score_history(conn, date(2026, 1, 1))
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_read_site_data_matches_the_reads_one_by_one(
    engines: dict[str, sa.Engine], kind: str
) -> None:
    data = read_site_data(engines[kind], chart_days=20)
    last_day = FIRST_DAY + timedelta(days=19)  # the newest history day
    assert (data.first_day, data.last_day) == (FIRST_DAY, last_day)
    got = {
        "snapshot": data.scores,
        "drivers": data.drivers,
        "history": data.history,
        "sessions": data.sessions,
        "reschedules": data.reschedules,
    }
    for what, frame in got.items():
        expected = read(engines[kind], what)
        if what == "sessions":  # the chart ends with the history
            expected = expected.filter(pl.col("day") <= last_day)
        assert frame.sort(frame.columns, nulls_last=True).equals(expected), what


def test_reschedules_made_at_the_same_instant_keep_one_order() -> None:
    at = f.AS_OF - timedelta(days=1)
    frame = pl.DataFrame(
        {
            "tutor_id": ["A"] * 3,
            "session_id": ["S2", "S1", "S3"],
            "cancelled_at": [at, at, at - timedelta(hours=1)],
            "original_time": [at + timedelta(hours=h) for h in (5, 9, 7)],
            "new_time": [None] * 3,
            "initiator": ["tutor", "student", "tutor"],
            "reason": ["two", "one", "three"],
            "reason_code": [None] * 3,
            "hours_before_session": [5.0, 9.0, 8.0],
        },
        schema_overrides={"new_time": site_reads.UTC_TIME},
    )
    tables = [reschedule_tables(frame, 10), reschedule_tables(frame.reverse(), 10)]
    assert tables[0].equals(tables[1])
    rows = tables[0].item(0, "reschedule_rows").split("\n")
    # Newest first; at the same instant, in the order of the sessions' ids.
    for row, reason in zip(rows, ("one", "two", "three"), strict=True):
        assert f"<td>{reason}</td>" in row


def test_read_site_data_sees_one_snapshot_while_a_publish_commits(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish committing between the snapshot's read and the parallel reads (a landing run
    every few minutes) changes nothing the site reads: all of it comes from one snapshot."""
    engine = create_store_engine(pg_url)
    data = store_data()
    publish_current(
        engine, **data, horizon_start=None, now=f.AS_OF, risk_drivers=f.drivers(data["scores"])
    )
    history = f.history(N_TUTORS, FIRST_DAY, 20)
    publish_history(engine, history, FIRST_DAY, f.AS_OF.date(), now=f.AS_OF)
    before = read_site_data(engine, chart_days=20)
    real = site_reads.newest_history_day

    def then_a_publish_commits(conn: Connection) -> date | None:
        newest = real(conn)
        with engine.begin() as other:  # another run's transaction, committed meanwhile
            other.execute(sa.text("DELETE FROM tutor_score_history"))
            other.execute(sa.text("DELETE FROM tutor_risk_drivers"))
        return newest

    monkeypatch.setattr(site_reads, "newest_history_day", then_a_publish_commits)
    during = read_site_data(engine, chart_days=20)
    monkeypatch.undo()
    after = read_site_data(engine, chart_days=20)
    engine.dispose()
    assert during.history.height == before.history.height > 0
    assert during.drivers.equals(before.drivers) and before.drivers.height > 0
    assert after.history.height == 0  # the delete did commit
