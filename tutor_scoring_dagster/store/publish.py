"""Scores -> serving store: idempotent, transactional, set-based publishing.

Each publish is one transaction holding the store's write lock (``migrate.locked_transaction``),
so concurrent publishes take turns and a failed one leaves the store as it was. Every frame is
first loaded into a temporary staging table (Postgres: ``COPY``; SQLite: ``executemany``); then
one ``INSERT .. SELECT .. ON CONFLICT DO UPDATE .. WHERE <row changed>`` per table writes only
new and changed rows, and one anti-join ``DELETE`` per table removes the rows the input no longer
has. A re-run with the same input writes nothing and leaves ``updated_at`` /
``last_calculated_at`` alone.

On Postgres, a big frame whose table holds no row in the scope it replaces (a first publish, a
backfill of new days) skips the stage: it is copied straight into its table, where the merge
would have inserted every row anyway. Into an empty table, its foreign keys and secondary
indexes are dropped for the copy and made again after it, in the same transaction (one
set-based check and one sorted index build instead of a lookup and an index insert per row).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Final, TypeAlias

import polars as pl
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.migrate import ensure_current, locked_transaction

CHUNK_ROWS: Final = 5_000
"""Rows per ``executemany`` batch (SQLite)."""
COPY_CHUNK_ROWS: Final = 200_000
"""Rows rendered to CSV at a time for ``COPY`` (bounds memory on big backfills)."""
CONNECT_TIMEOUT_SECONDS: Final = 10
PUBLISH_MEMORY: Final = "256MB"
"""Postgres ``temp_buffers`` and ``work_mem`` of a publish: staged rows and hash joins stay in
memory (the server's defaults, 8MB and 4MB, spill a million-row publish to disk)."""
STAMPS: Final = frozenset({"updated_at", "last_calculated_at"})
DIRECT_COPY_MIN_ROWS: Final = 100_000
"""Rows from which a frame replacing nothing is copied straight into its table (Postgres)."""

Columns: TypeAlias = sa.ColumnCollection[str, sa.ColumnElement[Any]]


@dataclass
class PublishStats:
    """Per table: rows offered (``staged``), written (inserted or changed) and deleted."""

    staged: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def create_store_engine(url: str) -> Engine:
    """An engine for the serving store: Postgres gives up connecting after a few seconds rather
    than hanging; SQLite files get their folder, foreign keys on, and a wait for the lock."""
    sa_url = sa.make_url(url)
    connect_args: dict[str, Any] = {}
    if sa_url.get_backend_name() == "postgresql" and "connect_timeout" not in sa_url.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
        # If the folder cannot be made, SQLite's own error says so when the store is opened.
        with suppress(OSError):
            Path(str(sa_url.database)).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "postgresql":

        @sa.event.listens_for(engine, "connect")
        def _postgres_session(dbapi_conn: Any, _record: Any) -> None:
            # Staging tables live in temp buffers, which a session can size only before its
            # first temporary table; the default 8MB sends a big publish to disk.
            with dbapi_conn.cursor() as cursor:
                cursor.execute(f"SET temp_buffers = '{PUBLISH_MEMORY}'")
            dbapi_conn.commit()

    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA busy_timeout = 30000")
            cursor.close()

    return engine


def horizon_start(scores: pl.DataFrame, days: int, *, now: datetime) -> datetime | None:
    """The earliest scheduled time of the sessions the store keeps (``SERVING_HORIZON_DAYS``):
    ``days`` before the snapshot's as-of instant (``now`` for an empty snapshot); None for
    ``days = 0``, which keeps every session."""
    if days < 0:
        raise ValueError(f"SERVING_HORIZON_DAYS must be 0 (all) or more, got {days}")
    if days == 0:
        return None
    as_of = scores.get_column("as_of").max() if scores.height else None
    return (as_of if isinstance(as_of, datetime) else now) - timedelta(days=days)


def publish_current(
    engine: Engine,
    *,
    tutors: pl.DataFrame,
    sessions: pl.DataFrame,
    reschedules: pl.DataFrame,
    scores: pl.DataFrame,
    horizon_start: datetime | None,
    now: datetime,
    auto_upgrade: bool = True,
) -> PublishStats:
    """Publish tutors, the sessions and reschedules of the serving horizon, and the current
    score snapshot, in one transaction.

    Afterwards the store holds exactly the ``sessions`` scheduled at or after ``horizon_start``
    (None: all of them) and their ``reschedules``, and exactly the tutors of ``scores`` in
    ``tutor_scores``; ``tutors`` are added or updated, never removed (history refers to them).
    ``scores`` must be one snapshot (one ``as_of``).
    """
    as_of_values = scores.get_column("as_of").unique().to_list() if scores.height else []
    if len(as_of_values) > 1:
        raise ValueError(f"the current snapshot must have one as_of, got {len(as_of_values)}")
    if horizon_start is not None:
        sessions = sessions.filter(pl.col("scheduled_time") >= horizon_start)
    session_rows = _to_table(sessions, t.sessions)
    frames = {
        t.tutors: _to_table(tutors, t.tutors),
        t.sessions: session_rows,
        t.reschedules: _to_table(
            reschedules.join(session_rows.select("session_id"), on="session_id", how="semi"),
            t.reschedules,
        ),
        t.tutor_scores: _to_table(scores, t.tutor_scores),
    }
    return _publish(
        engine,
        frames,
        # Children before parents, so that no foreign key is broken on the way.
        mirror=[(t.tutor_scores, None), (t.reschedules, None), (t.sessions, None)],
        now=now,
        auto_upgrade=auto_upgrade,
    )


def publish_history(
    engine: Engine,
    scores: pl.DataFrame,
    first_day: date,
    last_day: date,
    *,
    now: datetime,
    tutors: pl.DataFrame | None = None,
    auto_upgrade: bool = True,
) -> PublishStats:
    """Replace the stored daily snapshots of ``first_day..last_day`` with ``scores`` (the
    snapshots as of the end of each day), adding or updating ``tutors`` first if given."""
    frame = scores.with_columns(
        (pl.col("as_of").dt.date() - pl.duration(days=1)).cast(pl.Date).alias("score_date")
    )
    outside = frame.filter(~pl.col("score_date").is_between(first_day, last_day))
    if outside.height:
        raise ValueError(
            f"{outside.height} score rows fall outside the days {first_day}..{last_day} being "
            f"replaced, e.g. {outside['score_date'][0]}"
        )
    frames = {} if tutors is None else {t.tutors: _to_table(tutors, t.tutors)}
    frames[t.tutor_score_history] = _to_table(frame, t.tutor_score_history)
    in_range = t.tutor_score_history.c.score_date.between(first_day, last_day)
    return _publish(
        engine,
        frames,
        mirror=[(t.tutor_score_history, in_range)],
        now=now,
        auto_upgrade=auto_upgrade,
    )


def _publish(
    engine: Engine,
    frames: dict[sa.Table, pl.DataFrame],
    *,
    mirror: list[tuple[sa.Table, sa.ColumnElement[bool] | None]],
    now: datetime,
    auto_upgrade: bool,
) -> PublishStats:
    """Upsert each frame into its table, in order; then, for each ``(table, scope)`` of
    ``mirror``, delete the rows in ``scope`` (None: the whole table) that its frame lacks."""
    for table, frame in frames.items():
        _check_unique_keys(table, frame)
    started = time.perf_counter()
    ensure_current(engine, auto_upgrade=auto_upgrade)
    stats = PublishStats()
    scopes = dict(mirror)
    with locked_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL work_mem = '{PUBLISH_MEMORY}'")
        # Decided under the lock, before anything is written: what each frame replaces.
        direct = {
            table: empty
            for table, frame in frames.items()
            if (empty := _replaces_nothing(conn, table, frame, scopes.get(table))) is not None
        }
        stages = {
            table: _stage(conn, table, frame)
            for table, frame in frames.items()
            if table not in direct
        }
        for table, frame in frames.items():
            stats.staged[table.name] = frame.height
            if table in direct:
                stats.written[table.name] = _copy_direct(conn, table, frame, now, direct[table])
            else:
                stats.written[table.name] = _merge(conn, table, stages[table], now)
        for table, scope in mirror:
            stats.deleted[table.name] = (
                0 if table in direct else _delete_unstaged(conn, table, stages[table], scope)
            )
        for stage in stages.values():
            stage.drop(conn)
    stats.seconds = time.perf_counter() - started
    return stats


def _replaces_nothing(
    conn: Connection,
    table: sa.Table,
    frame: pl.DataFrame,
    scope: sa.ColumnElement[bool] | None,
) -> bool | None:
    """For a big frame on Postgres whose table holds no row in ``scope`` (None: anywhere):
    whether the whole table is empty. None when the frame must be staged and merged."""
    if conn.dialect.name != "postgresql" or frame.height < DIRECT_COPY_MIN_ROWS:
        return None
    anywhere = conn.execute(sa.select(sa.exists().select_from(table))).scalar()
    if not anywhere:
        return True
    if scope is None:
        return None
    inside = conn.execute(sa.select(sa.exists().where(scope).select_from(table))).scalar()
    return None if inside else False


def _copy_direct(
    conn: Connection, table: sa.Table, frame: pl.DataFrame, now: datetime, table_empty: bool
) -> int:
    """Copy ``frame``, stamped ``now``, straight into ``table`` (which holds none of its keys);
    into an empty table with its foreign keys and secondary indexes made after the copy."""
    stamp = next(c for c in table.columns if c.name in STAMPS)
    rows = frame.with_columns(pl.lit(now).alias(stamp.name))
    deferred_keys = list(table.foreign_key_constraints) if table_empty else []
    deferred_indexes = list(table.indexes) if table_empty else []
    for fk in deferred_keys:
        conn.execute(sa.schema.DropConstraint(fk))
    for index in deferred_indexes:
        conn.execute(sa.schema.DropIndex(index))
    _copy(conn, table, rows)
    for index in deferred_indexes:
        conn.execute(sa.schema.CreateIndex(index))
    for fk in deferred_keys:
        conn.execute(sa.schema.AddConstraint(fk))  # checks every row at once
    return frame.height


def _check_unique_keys(table: sa.Table, frame: pl.DataFrame) -> None:
    keys = [c.name for c in table.primary_key.columns]
    duplicated = frame.select(keys).is_duplicated()
    if duplicated.any():
        example = frame.filter(duplicated).row(0, named=True)
        raise ValueError(
            f"{duplicated.sum()} rows for {table.name} share their key with another row, e.g. "
            f"{ {k: example[k] for k in keys} }"
        )


def _stage(conn: Connection, table: sa.Table, frame: pl.DataFrame) -> sa.Table:
    """A temporary table with ``frame``'s columns, typed as in ``table``, holding its rows."""
    # SQLite looks rows up in the stage by key (Postgres hash-joins, and loads faster without).
    keyed = conn.dialect.name == "sqlite"
    stage = sa.Table(
        f"stage_{table.name}",
        sa.MetaData(),
        *(
            sa.Column(name, table.c[name].type, primary_key=keyed and table.c[name].primary_key)
            for name in frame.columns
        ),
        prefixes=["TEMPORARY"],
    )
    stage.create(conn)
    if frame.height == 0:
        return stage
    if conn.dialect.name == "postgresql":
        _copy(conn, stage, frame)
        # Autovacuum never analyzes temporary tables; the planner needs their size (and the
        # keys' statistics are enough to choose the joins).
        quote = conn.dialect.identifier_preparer.quote
        keys = ", ".join(quote(c.name) for c in table.primary_key.columns)
        conn.exec_driver_sql(f"ANALYZE {quote(stage.name)} ({keys})")
    else:
        for offset in range(0, frame.height, CHUNK_ROWS):
            conn.execute(stage.insert(), frame.slice(offset, CHUNK_ROWS).to_dicts())
    return stage


def _copy(conn: Connection, stage: sa.Table, frame: pl.DataFrame) -> None:
    """Bulk-load ``frame`` into ``stage`` (a staging table, or a table being filled directly)
    with ``COPY .. FROM STDIN`` in CSV, in chunks."""
    quote = conn.dialect.identifier_preparer.quote
    statement = (
        f"COPY {quote(stage.name)} ({', '.join(quote(c) for c in frame.columns)}) "
        "FROM STDIN (FORMAT csv)"
    )
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for chunk in _csv_chunks(frame):
                copy.write(chunk)
    except psycopg.Error as exc:  # the driver's own error: give it SQLAlchemy's shape
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


def _csv_chunks(frame: pl.DataFrame) -> Iterator[bytes]:
    """``frame`` as CSV, a chunk at a time; Polars renders the next chunk (without the GIL)
    while the caller sends this one, and no further ahead, to bound memory."""
    offsets = iter(range(0, frame.height, COPY_CHUNK_ROWS))
    with ThreadPoolExecutor(max_workers=1) as renderer:
        ahead = [renderer.submit(_csv, frame, offset) for offset in islice(offsets, 1)]
        while ahead:
            chunk = ahead.pop().result()
            ahead += [renderer.submit(_csv, frame, offset) for offset in islice(offsets, 1)]
            yield chunk


def _csv(frame: pl.DataFrame, offset: int) -> bytes:
    """Rows ``offset..`` (a chunk) of ``frame`` as CSV the way COPY reads it: a null is an
    unquoted empty field, an empty string is quoted (``""``)."""
    buffer = io.BytesIO()
    frame.slice(offset, COPY_CHUNK_ROWS).write_csv(
        buffer, include_header=False, quote_style="necessary"
    )
    return buffer.getvalue()


def _merge(conn: Connection, table: sa.Table, stage: sa.Table, now: datetime) -> int:
    """Insert ``stage``'s new rows into ``table`` and update its changed ones, stamping them
    ``now``; return how many were written."""
    keys = [c.name for c in table.primary_key.columns]
    values = [c.name for c in stage.columns if c.name not in keys]
    stamp = next(c for c in table.columns if c.name in STAMPS)
    stored = table.alias("stored")
    # Only new and changed rows reach the upsert: one hash join finds them, where probing the
    # key index row by row would cost as much for unchanged rows as for changed ones.
    fresh = (
        sa.select(*stage.columns, sa.literal(now, stamp.type).label(stamp.name))
        .select_from(stage.outerjoin(stored, sa.and_(*(stored.c[k] == stage.c[k] for k in keys))))
        .where(stored.c[keys[0]].is_(None) | _differ(conn, stored.c, stage.c, values))
    )
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table).from_select([*stage.columns.keys(), stamp.name], fresh)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys,
        set_={c: stmt.excluded[c] for c in [*values, stamp.name]},
        where=_differ(conn, table.c, stmt.excluded, values),
    )
    # SQLAlchemy reads an INSERT's rowcount only when asked to.
    return max(conn.execute(stmt, execution_options={"preserve_rowcount": True}).rowcount, 0)


def _differ(
    conn: Connection, old: Columns, new: Columns, columns: list[str]
) -> sa.ColumnElement[bool]:
    """The row of ``old`` differs from that of ``new`` in some of ``columns`` (NULL = NULL)."""
    if conn.dialect.name == "postgresql":
        return sa.tuple_(*(old[c] for c in columns)).is_distinct_from(
            sa.tuple_(*(new[c] for c in columns))
        )
    # SQLite has no row-value IS DISTINCT FROM.
    return sa.or_(*(old[c].is_distinct_from(new[c]) for c in columns))


def _delete_unstaged(
    conn: Connection, table: sa.Table, stage: sa.Table, scope: sa.ColumnElement[bool] | None
) -> int:
    """Delete the rows of ``table`` (within ``scope``) whose key ``stage`` does not have."""
    keys = [c.name for c in table.primary_key.columns]
    staged = sa.select(sa.literal(1)).where(*(stage.c[k] == table.c[k] for k in keys))
    stmt = sa.delete(table).where(~sa.exists(staged))
    if scope is not None:
        stmt = stmt.where(scope)
    return max(conn.execute(stmt).rowcount, 0)


def _to_table(frame: pl.DataFrame, table: sa.Table) -> pl.DataFrame:
    """The columns of ``frame`` that ``table`` stores (renaming the export's ``updated_at``)."""
    if "updated_at" in frame.columns and "source_updated_at" in table.c:
        frame = frame.rename({"updated_at": "source_updated_at"})
    return frame.select(
        [c.name for c in table.columns if c.name in frame.columns and c.name not in STAMPS]
    )
