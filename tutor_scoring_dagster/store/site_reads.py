"""Queries of the serving store behind the dashboard site: one statement each, for all tutors.

Every function returns a Polars frame with a fixed schema, also when the result is empty, and
timestamps in UTC whichever database answered. Both give timestamps and dates as text (SQLite
stores them so; Postgres is asked to), parsed a column at a time by Polars.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Final

import polars as pl
import psycopg
import sqlalchemy as sa
from psycopg.types.string import TextLoader
from sqlalchemy.engine import Connection

from tutor_scoring_dagster.schemas import WINDOWS_DAYS, score_row_schema
from tutor_scoring_dagster.store import tables as t

UTC_TIME: Final = pl.Datetime("us", "UTC")
HISTORY_RATES: Final = tuple(f"reschedule_rate_{w}d" for w in WINDOWS_DAYS)
TEXT_LOADED: Final = ("date", "timestamptz")
"""Postgres types read as their text and parsed by Polars, in the form READ_SETTINGS give."""
READ_SETTINGS: Final = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    # The default 4MB sends the per-tutor-and-day count of 180 days of sessions (~700k groups
    # at 10M sessions) to disk: ~1.6 s on the server instead of ~1 s.
    "work_mem": "64MB",
}
"""Postgres settings of a site read, for the rest of its transaction."""
INSTANT_TEXT: Final = {
    "sqlite": "%Y-%m-%d %H:%M:%S%.f",  # SQLAlchemy's text form of a UTC instant
    "postgresql": "%Y-%m-%d %H:%M:%S%.f%#z",  # with its offset, "+00"
}

RESCHEDULE_SCHEMA: Final = pl.Schema(
    {
        "tutor_id": pl.String(),
        "session_id": pl.String(),  # with cancelled_at, the key: a total order for the pages
        "cancelled_at": UTC_TIME,
        "original_time": UTC_TIME,
        "new_time": UTC_TIME,
        "initiator": pl.String(),
        "reason": pl.String(),
        "reason_code": pl.String(),
        "hours_before_session": pl.Float64(),
    }
)


def _read(conn: Connection, query: sa.Select[Any], schema: pl.Schema) -> pl.DataFrame:
    """``query``'s rows as a frame of exactly ``schema`` (its columns in the query's order)."""
    rows: Sequence[Any]
    if conn.dialect.name == "postgresql":
        rows = _postgres_rows(conn, query)
    else:
        result = conn.execute(query)
        try:
            # The driver's own rows, converted below column by column: building a SQLAlchemy
            # Row per row costs 2-3x the whole read at a million rows. SQLAlchemy still binds
            # the parameters and reports errors.
            rows = result.cursor.fetchall()
        finally:
            result.close()
    frame = pl.DataFrame(rows, schema=_driver_schema(conn, schema), orient="row")
    return frame.select(
        _typed(frame.get_column(name), want, conn.dialect.name) for name, want in schema.items()
    )


def _postgres_rows(conn: Connection, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """``query``'s rows from psycopg, its dates and timestamps left as ISO text in UTC (parsed
    a column at a time by :func:`_typed`: a Python datetime per value cost as much as the query).
    READ_SETTINGS stay set for the rest of ``conn``'s transaction."""
    conn.execute(sa.select(*(sa.func.set_config(k, v, True) for k, v in READ_SETTINGS.items())))
    compiled = query.compile(dialect=conn.dialect)
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor() as cursor:
            for kind in TEXT_LOADED:  # this cursor only: the pooled connection keeps its loaders
                cursor.adapters.register_loader(kind, TextLoader)
            cursor.execute(compiled.string, compiled.params)
            return cursor.fetchall()
    except psycopg.Error as exc:  # the driver's own error: give it SQLAlchemy's shape
        raise sa.exc.DBAPIError.instance(compiled.string, None, exc, psycopg.Error) from exc


def _driver_schema(conn: Connection, schema: pl.Schema) -> dict[str, pl.DataType | None]:
    """The types the driver returns ``schema``'s columns as (None: let Polars infer them);
    naming them spares Polars a pass over every row."""
    if conn.dialect.name == "postgresql":
        return {name: _postgres_type(want) for name, want in schema.items()}
    if conn.dialect.name == "sqlite":
        return {name: _sqlite_type(want) for name, want in schema.items()}
    return dict.fromkeys(schema)


def _postgres_type(want: pl.DataType) -> pl.DataType:
    if isinstance(want, pl.Datetime | pl.Date):
        return pl.String()  # TEXT_LOADED
    return want


def _sqlite_type(want: pl.DataType) -> pl.DataType:
    if isinstance(want, pl.Datetime | pl.Date):
        return pl.String()  # SQLAlchemy stores both as ISO text
    if want == pl.Boolean:
        return pl.Int64()  # 0 / 1
    return want


def _typed(values: pl.Series, want: pl.DataType, dialect: str) -> pl.Series:
    """``values`` as ``want``, from what SQLite (text, 0/1) or Postgres (text for dates and
    timestamps, else native) returns."""
    if isinstance(want, pl.Datetime):
        if values.dtype == pl.String:
            values = values.str.strptime(pl.Datetime("us"), INSTANT_TEXT[dialect])
        if isinstance(values.dtype, pl.Datetime):
            values = (
                values.dt.replace_time_zone("UTC")
                if values.dtype.time_zone is None
                else values.dt.convert_time_zone("UTC")
            )
    elif want == pl.Date and values.dtype == pl.String:
        values = values.str.to_date("%Y-%m-%d")
    return values.cast(want)


def _day_of(conn: Connection, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The UTC calendar day of a timestamp column, in this database's dialect."""
    if conn.dialect.name == "sqlite":
        return sa.func.date(column)  # timestamps are stored as UTC text
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.timezone("UTC", column), sa.Date)
    return sa.cast(column, sa.Date)


def current_snapshot(conn: Connection) -> pl.DataFrame:
    """The current scores, one row per tutor, with the tutor's ``name`` and ``is_active``."""
    s, tu = t.tutor_scores, t.tutors
    columns = [s.c[name] for name in score_row_schema()]
    query = sa.select(*columns, tu.c.name, tu.c.is_active).select_from(
        s.outerjoin(tu, tu.c.tutor_id == s.c.tutor_id)
    )
    schema = pl.Schema(
        {
            **{c.name: _polars_type(c) for c in columns},
            "name": pl.String(),
            "is_active": pl.Boolean(),
        }
    )
    return _read(conn, query, schema)


def current_drivers(conn: Connection) -> pl.DataFrame:
    """The drivers of the current snapshot's flagged tutors (``tutor_risk_drivers``), the
    strongest (highest lift) first within each tutor."""
    d = t.tutor_risk_drivers
    columns = [c for c in d.c if c.name != "updated_at"]
    query = sa.select(*columns).order_by(d.c.tutor_id, d.c.lift.desc().nulls_last(), d.c.driver)
    return _read(conn, query, pl.Schema({c.name: _polars_type(c) for c in columns}))


def score_history(conn: Connection, since: date) -> pl.DataFrame:
    """Daily reschedule rates of every tutor from ``since`` on."""
    h = t.tutor_score_history.c
    query = sa.select(h.tutor_id, h.score_date, *(h[r] for r in HISTORY_RATES)).where(
        h.score_date >= since
    )
    schema = pl.Schema(
        {
            "tutor_id": pl.String(),
            "score_date": pl.Date(),
            **{r: pl.Float64() for r in HISTORY_RATES},
        }
    )
    return _read(conn, query, schema)


def newest_history_day(conn: Connection) -> date | None:
    """The newest day of the stored score history."""
    return conn.execute(sa.select(sa.func.max(t.tutor_score_history.c.score_date))).scalar()


def daily_sessions(conn: Connection, since: datetime) -> pl.DataFrame:
    """Sessions per tutor per scheduled (UTC) day from ``since`` on, counted by the database."""
    s = t.sessions.c
    day = _day_of(conn, s.scheduled_time).label("day")
    query = (
        sa.select(s.tutor_id, day, sa.func.count().label("sessions"))
        .where(s.scheduled_time >= since)
        .group_by(s.tutor_id, day)
    )
    schema = pl.Schema({"tutor_id": pl.String(), "day": pl.Date(), "sessions": pl.Int64()})
    return _read(conn, query, schema)


def reschedules_since(conn: Connection, since: datetime) -> pl.DataFrame:
    """Every reschedule made (``cancelled_at``) from ``since`` on, with its session's tutor."""
    r, s = t.reschedules.c, t.sessions.c
    # A plain join: SQLite plans a per-tutor window function as a scan of all sessions.
    query = (
        sa.select(*(r[name] if name != "tutor_id" else s.tutor_id for name in RESCHEDULE_SCHEMA))
        .join_from(t.reschedules, t.sessions, r.session_id == s.session_id)
        .where(r.cancelled_at >= since)
    )
    return _read(conn, query, RESCHEDULE_SCHEMA)


def _polars_type(column: sa.ColumnElement[Any]) -> pl.DataType:
    kind = column.type
    if isinstance(kind, sa.DateTime):
        return UTC_TIME
    if isinstance(kind, sa.Boolean):
        return pl.Boolean()
    if isinstance(kind, sa.Integer):
        return pl.Int64()
    if isinstance(kind, sa.Float):
        return pl.Float64()
    return pl.String()
