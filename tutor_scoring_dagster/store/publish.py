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
would have inserted every row anyway. Into an empty table, its primary key, indexes and
foreign keys are dropped for the copy and made again after it, in the same transaction (one
sorted build and one set-based check instead of index inserts and a lookup per row); the rows
go in key order, so the primary key's build sorts sorted rows.

Postgres gets every frame in its binary ``COPY`` format where the columns allow (numbers,
booleans, dates, zone-aware timestamps, text: no text parsing on the server), encoded with
numpy and Arrow a chunk at a time, else in CSV.

``publish_current`` can also publish a delta: given the ``StoreMark`` the previous publish left
(row counts and newest ``updated_at`` of sessions and reschedules, and the horizon), only the
sessions and reschedules changed since are shipped and merged, and sessions that left the
horizon are deleted by range; when the store no longer matches the mark, it refuses
(``StaleMark``, nothing written) and the caller mirrors the whole horizon as before.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, Final, TypeAlias

import numpy as np
import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.ahead import one_ahead
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
BINARY_CHUNK_ROWS: Final = 250_000
"""Rows encoded at a time for a binary ``COPY``."""
RECORD_BLOCK_ROWS: Final = 2_048
"""Binary COPY rows packed at a time: a block of records (~1 MB at 40 columns) stays in the
CPU's cache while each of its fields is written."""
BINARY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
"""The binary COPY header: the signature, no flags, no header extension."""
BINARY_TRAILER: Final = b"\xff\xff"
PG_EPOCH_DAYS: Final = 10_957
"""2000-01-01 (Postgres's epoch for dates and timestamps) in days since 1970-01-01."""
PG_EPOCH_MICROS: Final = PG_EPOCH_DAYS * 86_400_000_000
BINARY_NUMBERS: Final[dict[str, pl.DataType]] = {
    "smallint": pl.Int16(),
    "integer": pl.Int32(),
    "bigint": pl.Int64(),
    "real": pl.Float32(),
    "double precision": pl.Float64(),
}
BINARY_FORMATS: Final[dict[pl.DataType, str]] = {
    pl.Int16(): ">i2",
    pl.Int32(): ">i4",
    pl.Int64(): ">i8",
    pl.Float32(): ">f4",
    pl.Float64(): ">f8",
    pl.UInt8(): "u1",
}
"""numpy's big-endian format of each physical column type of ``_binary_columns``."""
DIRECT_COPY_MIN_ROWS: Final = 100_000
"""Rows from which a frame replacing nothing is copied straight into its table (Postgres)."""
PART_ROWS: Final = 1_000_000
"""Rows a big publish holds at a time: the history's Parquet parts (of whole tutors) are
about this long, and a direct copy puts a frame in key order this many rows at a time."""

Columns: TypeAlias = sa.ColumnCollection[str, sa.ColumnElement[Any]]


@dataclass(frozen=True)
class FrameParts:
    """A frame published a part at a time, so memory holds one part, not the frame: parts
    hold consecutive, increasing ranges of their table's first key column (e.g. tutors), so
    no key is in two of them; each part is checked for that as it is read."""

    schema: pl.Schema
    height: int
    read: Callable[[], Iterator[pl.DataFrame]]
    keys_checked: bool = False

    @classmethod
    def whole(cls, frame: pl.DataFrame, *, keys_checked: bool = False) -> FrameParts:
        """``frame`` as one part."""
        return cls(frame.schema, frame.height, lambda: iter((frame,)), keys_checked)

    @classmethod
    def from_parquet(cls, paths: list[Path]) -> FrameParts:
        """The parts written to ``paths`` (e.g. by ``warehouse.export_parts``), read in order."""
        if not paths:
            raise ValueError("no parts: even an empty frame has one (for its columns)")
        height = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in paths)
        schema = pl.scan_parquet(paths[0]).collect_schema()
        return cls(schema, height, lambda: map(pl.read_parquet, paths))

    @property
    def columns(self) -> list[str]:
        return self.schema.names()

    def map(self, change: Callable[[pl.DataFrame], pl.DataFrame]) -> FrameParts:
        """These parts with ``change`` made to each one (it must keep every row)."""
        schema = change(pl.DataFrame(schema=self.schema)).schema
        return FrameParts(schema, self.height, lambda: map(change, self.read()))


@dataclass
class PublishStats:
    """Per table: rows offered (``staged``), written (inserted or changed) and deleted."""

    staged: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    mark: StoreMark | None = None
    """``publish_current``: what it left in the store, for the next (delta) publish."""
    delta: bool = False
    """``publish_current``: whether only the changed sessions and reschedules were published."""


@dataclass(frozen=True)
class StoreMark:
    """The sessions and reschedules a ``publish_current`` left in the store: their counts and
    newest ``updated_at`` (every publish stamps what it writes, so another writer, a restore
    or a failed publish changes them), and the serving horizon they cover. A delta publish
    builds on a mark only if the store still matches it."""

    sessions: int
    sessions_updated_at: str | None
    reschedules: int
    reschedules_updated_at: str | None
    horizon_start: str | None

    def differs(self, other: StoreMark) -> bool:
        """Whether the stores behind the two marks hold different sessions or reschedules."""
        return asdict(self) | {"horizon_start": None} != asdict(other) | {"horizon_start": None}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StoreMark:
        return cls(**json.loads(text))


class StaleMark(Exception):
    """A delta publish was refused (nothing written): the store is not as the mark says, or the
    horizon grew back; publish the whole horizon instead."""


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
                cursor.execute("SELECT set_config('temp_buffers', %s, false)", (PUBLISH_MEMORY,))
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
    changed_since: StoreMark | None = None,
    risk_drivers: pl.DataFrame | None = None,
) -> PublishStats:
    """Publish tutors, the sessions and reschedules of the serving horizon, and the current
    score snapshot (with ``risk_drivers``, its flagged tutors' drivers, when given: the store's
    ``tutor_risk_drivers`` then holds exactly those), in one transaction.

    Afterwards the store holds exactly the ``sessions`` scheduled at or after ``horizon_start``
    (None: all of them) and their ``reschedules``, and exactly the tutors of ``scores`` in
    ``tutor_scores``; ``tutors`` are added or updated, never removed (history refers to them).
    ``scores`` must be one snapshot (one ``as_of``).

    With ``changed_since`` (the ``mark`` of an earlier publish), ``sessions`` and
    ``reschedules`` are only what changed since it (the sessions of later loads, whatever their
    scheduled time, and the reschedules of later loads on sessions of the horizon): those are
    merged, sessions now before ``horizon_start`` leave with their reschedules, and nothing else
    of the horizon is read or shipped. Raises ``StaleMark`` (having written nothing) when the
    store is no longer as the mark left it, the horizon would grow back, or the change is big.
    """
    as_of_values = scores.get_column("as_of").unique().to_list() if scores.height else []
    if len(as_of_values) > 1:
        raise ValueError(f"the current snapshot must have one as_of, got {len(as_of_values)}")
    delta = changed_since is not None
    if changed_since is not None:
        _check_delta(changed_since, horizon_start, sessions, reschedules)
    leaving: list[str] = []  # changed sessions now scheduled before the horizon (delta)
    if horizon_start is not None:
        if delta:
            early = pl.col("scheduled_time") < horizon_start
            leaving = sessions.filter(early).get_column("session_id").to_list()
        sessions = sessions.filter(pl.col("scheduled_time") >= horizon_start)
    session_rows = _to_table(sessions, t.sessions)
    if not delta:
        reschedules = reschedules.join(
            session_rows.select("session_id"), on="session_id", how="semi"
        )
    frames = {
        t.tutors: _to_table(tutors, t.tutors),
        t.sessions: session_rows,
        t.reschedules: _to_table(reschedules, t.reschedules),
        t.tutor_scores: _to_table(scores, t.tutor_scores),
    }
    drivers = [] if risk_drivers is None else [(t.tutor_risk_drivers, None)]
    if risk_drivers is not None:
        frames[t.tutor_risk_drivers] = _to_table(risk_drivers, t.tutor_risk_drivers)

    def guard(conn: Connection) -> None:
        if changed_since is not None and _mark(conn, None).differs(changed_since):
            raise StaleMark("the store's sessions or reschedules changed since the last publish")

    def finish(conn: Connection, stats: PublishStats) -> None:
        if delta and horizon_start is not None:
            stats.deleted.update(_drop_before(conn, horizon_start, leaving))
        stats.mark = _mark(conn, horizon_start)
        stats.delta = delta

    return _publish(
        engine,
        frames,
        # Children before parents, so that no foreign key is broken on the way.
        mirror=[*drivers, (t.tutor_scores, None)]
        if delta
        else [*drivers, (t.tutor_scores, None), (t.reschedules, None), (t.sessions, None)],
        now=now,
        auto_upgrade=auto_upgrade,
        guard=guard,
        finish=finish,
    )


def _check_delta(
    mark: StoreMark,
    horizon_start: datetime | None,
    sessions: pl.DataFrame,
    reschedules: pl.DataFrame,
) -> None:
    """Refuse a delta publish the mark cannot take (before anything is opened)."""
    previous = None if mark.horizon_start is None else datetime.fromisoformat(mark.horizon_start)
    if (previous is None) != (horizon_start is None) or (
        previous is not None and horizon_start is not None and horizon_start < previous
    ):
        raise StaleMark(f"the serving horizon changed from {previous} to {horizon_start}")
    if max(sessions.height, reschedules.height) >= DIRECT_COPY_MIN_ROWS:
        raise StaleMark(f"{sessions.height:,} sessions changed: publishing the whole horizon")


def _mark(conn: Connection, horizon_start: datetime | None) -> StoreMark:
    """The store's mark now (``horizon_start``: what the publish being made covers)."""
    counts = [
        conn.execute(
            sa.select(sa.func.count(), sa.func.max(table.c.updated_at)).select_from(table)
        ).one()
        for table in (t.sessions, t.reschedules)
    ]
    return StoreMark(
        sessions=int(counts[0][0]),
        sessions_updated_at=_iso(counts[0][1]),
        reschedules=int(counts[1][0]),
        reschedules_updated_at=_iso(counts[1][1]),
        horizon_start=_iso(horizon_start),
    )


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _drop_before(conn: Connection, start: datetime, leaving: list[str]) -> dict[str, int]:
    """Delete the sessions scheduled before ``start`` and the ``leaving`` ones (a change moved
    them before it; the store still has them inside), reschedules first."""
    old = sa.select(t.sessions.c.session_id).where(t.sessions.c.scheduled_time < start)
    conditions = [(t.reschedules.c.session_id.in_(old), t.sessions.c.scheduled_time < start)]
    conditions += [
        (t.reschedules.c.session_id.in_(ids), t.sessions.c.session_id.in_(ids))
        for ids in (leaving[i : i + CHUNK_ROWS] for i in range(0, len(leaving), CHUNK_ROWS))
    ]
    moved = gone = 0
    for children, parents in conditions:
        moved += max(conn.execute(sa.delete(t.reschedules).where(children)).rowcount, 0)
        gone += max(conn.execute(sa.delete(t.sessions).where(parents)).rowcount, 0)
    return {t.reschedules.name: moved, t.sessions.name: gone}


def publish_history(
    engine: Engine,
    scores: pl.DataFrame | FrameParts,
    first_day: date,
    last_day: date,
    *,
    now: datetime,
    tutors: pl.DataFrame | None = None,
    auto_upgrade: bool = True,
) -> PublishStats:
    """Replace the stored daily snapshots of ``first_day..last_day`` with ``scores`` (the
    snapshots as of the end of each day; a long range in parts of whole tutors, to hold one
    part at a time), adding or updating ``tutors`` first if given."""

    def history_rows(frame: pl.DataFrame) -> pl.DataFrame:
        frame = frame.with_columns(
            (pl.col("as_of").dt.date() - pl.duration(days=1)).cast(pl.Date).alias("score_date")
        )
        outside = frame.filter(~pl.col("score_date").is_between(first_day, last_day))
        if outside.height:
            raise ValueError(
                f"{outside.height} score rows fall outside the days {first_day}..{last_day} "
                f"being replaced, e.g. {outside['score_date'][0]}"
            )
        return _to_table(frame, t.tutor_score_history)

    frames: dict[sa.Table, pl.DataFrame | FrameParts] = (
        {} if tutors is None else {t.tutors: _to_table(tutors, t.tutors)}
    )
    frames[t.tutor_score_history] = (
        scores.map(history_rows) if isinstance(scores, FrameParts) else history_rows(scores)
    )
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
    frames: Mapping[sa.Table, pl.DataFrame | FrameParts],
    *,
    mirror: list[tuple[sa.Table, sa.ColumnElement[bool] | None]],
    now: datetime,
    auto_upgrade: bool,
    guard: Callable[[Connection], None] | None = None,
    finish: Callable[[Connection, PublishStats], None] | None = None,
) -> PublishStats:
    """Upsert each frame into its table, in order; then, for each ``(table, scope)`` of
    ``mirror``, delete the rows in
    ``scope`` (None: the whole table) that its frame lacks. Under the lock, ``guard`` runs
    before anything is written and ``finish`` after everything, in the same transaction."""
    for table, frame in frames.items():
        if isinstance(frame, pl.DataFrame):  # before the store is touched (parts: as read)
            _check_unique_keys(table, frame)
    parts = {
        table: frame
        if isinstance(frame, FrameParts)
        else FrameParts.whole(frame, keys_checked=True)
        for table, frame in frames.items()
    }
    started = time.perf_counter()
    ensure_current(engine, auto_upgrade=auto_upgrade)
    stats = PublishStats()
    scopes = dict(mirror)
    with locked_transaction(engine) as conn:
        if guard is not None:
            guard(conn)
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT set_config('work_mem', :v, true)"), {"v": PUBLISH_MEMORY})
        # Decided under the lock, before anything is written: what each frame replaces.
        direct = {
            table: empty
            for table, frame in parts.items()
            if (empty := _replaces_nothing(conn, table, frame, scopes.get(table))) is not None
        }
        stages = {
            table: _stage(conn, table, frame)
            for table, frame in parts.items()
            if table not in direct
        }
        for table, frame in parts.items():
            stats.staged[table.name] = frame.height
            if table in direct:
                stats.written[table.name] = _copy_direct(conn, table, frame, now, direct[table])
            else:
                stats.written[table.name] = _merge(conn, table, stages[table], now)
        for table, scope in mirror:
            stats.deleted[table.name] = (
                0 if table in direct else _delete_unstaged(conn, table, stages[table], scope)
            )
        if finish is not None:
            finish(conn, stats)
        for stage in stages.values():
            stage.drop(conn)
    stats.seconds = time.perf_counter() - started
    return stats


def _replaces_nothing(
    conn: Connection,
    table: sa.Table,
    frame: FrameParts,
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
    conn: Connection, table: sa.Table, frame: FrameParts, now: datetime, table_empty: bool
) -> int:
    """Copy ``frame``, stamped ``now``, straight into ``table`` (which holds none of its keys);
    into an empty table with its keys and indexes made after the copy."""
    stamp = next(c for c in table.columns if c.name in STAMPS)
    keys = [c.name for c in table.primary_key.columns]
    # Into an empty table, the primary key and indexes are built once from sorted rows rather
    # than kept up row by row: at 5.4M history rows the primary key cost the COPY 11 of its
    # 27 s, and its build after it 4 s (benchmarks/README.md). Dropping the key takes the
    # foreign keys on it with it: their tables are empty too (nothing to point at).
    deferred_keys = [*table.foreign_key_constraints, *_referencing(table)] if table_empty else []
    deferred_indexes = list(table.indexes) if table_empty else []
    for fk in deferred_keys:
        conn.execute(sa.schema.DropConstraint(fk))
    for index in deferred_indexes:
        conn.execute(sa.schema.DropIndex(index))
    if table_empty:
        conn.execute(sa.schema.DropConstraint(table.primary_key))
    # In key order, the primary key's build sorts rows already sorted.
    stamped = (
        part.with_columns(pl.lit(now).alias(stamp.name)) for part in _checked_parts(table, frame)
    )
    _copy(conn, table, (piece for part in stamped for piece in _in_key_order(part, keys)))
    if table_empty:
        conn.execute(sa.schema.AddConstraint(table.primary_key))  # refuses a repeated key
    for index in deferred_indexes:
        conn.execute(sa.schema.CreateIndex(index))
    for fk in deferred_keys:
        conn.execute(sa.schema.AddConstraint(fk))  # checks every row at once
    if table_empty:
        # Statistics now, not at autovacuum's leisure: the next (small) publish into this table
        # then looks its rows up by key instead of hash-joining the whole table. An identifier
        # of tables.py only, quoted by the dialect; ANALYZE takes no bound parameters.
        quote = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql(f"ANALYZE {quote(table.name)}")  # noqa: S608, RUF100
    return frame.height


def _referencing(table: sa.Table) -> list[sa.ForeignKeyConstraint]:
    """The foreign keys of the other tables of ``table``'s metadata that point at it."""
    return [
        fk
        for other in table.metadata.tables.values()
        if other is not table
        for fk in other.foreign_key_constraints
        if fk.referred_table is table
    ]


def _checked_parts(table: sa.Table, frame: FrameParts) -> Iterator[pl.DataFrame]:
    """``frame``'s parts, each checked for keys it repeats or shares with an earlier part
    (a part's first key column must start after the previous part's ends)."""
    first_key = table.primary_key.columns[0].name
    previous_end = None
    for part in frame.read():
        if part.height == 0:
            continue
        if not frame.keys_checked:
            _check_unique_keys(table, part)
        start, end = part.get_column(first_key).min(), part.get_column(first_key).max()
        if previous_end is not None and not start > previous_end:  # type: ignore[operator]
            raise ValueError(
                f"parts of {table.name} overlap: one starts at {first_key} {start!r}, "
                f"the one before it ends at {previous_end!r}"
            )
        previous_end = end
        yield part


def _check_unique_keys(table: sa.Table, frame: pl.DataFrame) -> None:
    keys = [c.name for c in table.primary_key.columns]
    duplicated = frame.select(keys).is_duplicated()
    if duplicated.any():
        example = frame.filter(duplicated).row(0, named=True)
        raise ValueError(
            f"{duplicated.sum()} rows for {table.name} share their key with another row, e.g. "
            f"{ {k: example[k] for k in keys} }"
        )


def _stage(conn: Connection, table: sa.Table, frame: FrameParts) -> sa.Table:
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
        _copy(conn, stage, _checked_parts(table, frame))
    else:
        for part in _checked_parts(table, frame):
            for offset in range(0, part.height, CHUNK_ROWS):
                conn.execute(stage.insert(), part.slice(offset, CHUNK_ROWS).to_dicts())
    if conn.dialect.name == "postgresql":
        # Autovacuum never analyzes temporary tables; the planner needs their size (and the
        # keys' statistics are enough to choose the joins).
        quote = conn.dialect.identifier_preparer.quote
        keys = ", ".join(quote(c.name) for c in table.primary_key.columns)
        # Identifiers only (the stage's and its table's key columns, from tables.py), quoted
        # by the dialect; ANALYZE takes no bound parameters.
        conn.exec_driver_sql(f"ANALYZE {quote(stage.name)} ({keys})")  # noqa: S608, RUF100
    return stage


def _in_key_order(frame: pl.DataFrame, keys: list[str]) -> Iterator[pl.DataFrame]:
    """``frame``'s rows sorted by ``keys``, :data:`PART_ROWS` at a time (memory holds one
    slice's sorted copy, not the frame's)."""
    order = frame.select(pl.arg_sort_by(keys)).to_series()  # indices: no sorted copy
    for offset in range(0, frame.height, PART_ROWS):
        yield frame[order.slice(offset, PART_ROWS)]


def _copy(conn: Connection, target: sa.Table, parts: Iterable[pl.DataFrame]) -> None:
    """Bulk-load the rows of ``parts`` (frames with the same columns, sent in order) into
    ``target`` (a staging table, or a table being filled directly) with one
    ``COPY .. FROM STDIN``: in Postgres's binary format when every column of the first part has
    a binary encoding here (no text parsing on the server: several times cheaper for numbers
    and timestamps), else in CSV. Parts are produced and encoded on another thread, one chunk
    ahead of the one being sent, so the server never waits for the next part to be read."""
    quote = conn.dialect.identifier_preparer.quote
    server_types = _server_types(conn, target)
    nonempty = (part for part in parts if part.height)
    head = next(nonempty, None)
    if head is None:
        return
    first = _binary_columns(server_types, head)
    fmt = "csv" if first is None else "binary"
    columns = head.columns if first is None else first.columns
    # Identifiers only (a table of tables.py or its stage, and its column names), quoted by the
    # dialect, and one of two format keywords; COPY takes no bound parameters.
    statement = (
        f"COPY {quote(target.name)} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608, RUF100
        f"FROM STDIN (FORMAT {fmt})"
    )
    if first is None:
        chunks: Iterator[bytes | memoryview] = _csv_chunks(chain([head], nonempty))
    else:

        def physical() -> Iterator[pl.DataFrame]:
            yield first
            sent = first.height
            for part in nonempty:
                encoded = _binary_columns(server_types, part)
                if encoded is None or encoded.columns != first.columns:
                    # A value that does not fit its column (an integer too big): Postgres
                    # would refuse it in any format.
                    raise ValueError(f"rows {sent}.. of {target.name} do not fit its columns")
                sent += part.height
                yield encoded

        chunks = _binary_chunks(physical())
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for chunk in chunks:
                copy.write(chunk)
    except psycopg.Error as exc:  # the driver's own error: give it SQLAlchemy's shape
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


def _server_types(conn: Connection, target: sa.Table) -> dict[str, str]:
    """Each column of ``target`` on the server (Postgres) and its type's name."""
    if conn.dialect.name != "postgresql":
        return {}
    rows = conn.execute(
        sa.text(
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = CAST(:name AS regclass) AND attnum > 0 AND NOT attisdropped"
        ),
        {"name": conn.dialect.identifier_preparer.quote(target.name)},
    )
    return {str(name): str(kind) for name, kind in rows}


def _binary_columns(server_types: dict[str, str], frame: pl.DataFrame) -> pl.DataFrame | None:
    """``frame``'s columns as the values Postgres's binary COPY format carries, by the type
    each has on the server (``server_types``: integers, floats, booleans 0/1, dates as days and
    timestamps as microseconds since 2000-01-01; text), fixed-width columns first; None when a
    column has no such encoding here (or its values do not fit): the frame goes as CSV."""
    if frame.height == 0:
        return None
    exprs = []
    for name, dtype in frame.schema.items():
        expr = _binary_value(pl.col(name), server_types.get(name, ""), dtype)
        if expr is None:
            return None
        exprs.append(expr.alias(name))
    try:
        physical = frame.select(exprs)
    except pl.exceptions.PolarsError:  # e.g. an integer too big for its column: Postgres says
        return None
    text = [name for name, dtype in physical.schema.items() if dtype == pl.String]
    return physical.select(pl.exclude(text), *text)


def _binary_value(col: pl.Expr, server_type: str, dtype: pl.DataType) -> pl.Expr | None:
    """The expression turning a column of ``dtype`` into what binary COPY sends for
    ``server_type`` (None: not supported here)."""
    if server_type in ("text", "character varying"):
        return col if dtype == pl.String else None
    if server_type == "boolean":
        return col.cast(pl.UInt8) if dtype == pl.Boolean else None
    if server_type == "date":
        return col.cast(pl.Int32) - PG_EPOCH_DAYS if dtype == pl.Date else None
    if server_type == "timestamp with time zone":
        # A naive value would be read in the session's time zone: only zone-aware values here.
        if not isinstance(dtype, pl.Datetime) or dtype.time_zone is None:
            return None
        utc = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return utc.dt.cast_time_unit("us").cast(pl.Int64) - PG_EPOCH_MICROS
    if server_type in BINARY_NUMBERS and (dtype.is_integer() or dtype.is_float()):
        target = BINARY_NUMBERS[server_type]
        if dtype.is_float() and target.is_integer():
            return None
        return col.cast(target, strict=True)
    return None


def _binary_chunks(parts: Iterable[pl.DataFrame]) -> Iterator[bytes | memoryview]:
    """``parts`` (each from ``_binary_columns``, same columns) in Postgres's binary COPY
    format, a chunk at a time; the next chunk is encoded (mostly without the GIL), and the
    parts made, while this one is sent."""
    yield BINARY_SIGNATURE
    for buffers in one_ahead(map(_binary_chunk, _slices(parts, BINARY_CHUNK_ROWS)), "copy"):
        yield from buffers
    yield BINARY_TRAILER


def _binary_chunk(chunk: pl.DataFrame) -> list[bytes | memoryview]:
    """Rows as binary COPY tuples, in buffers sent one after another (joining them would copy
    the chunk once more). Rows with the same null fixed-width columns share one layout, packed
    at once as a numpy record array; text fields (last) are appended by Arrow. Rows come out
    grouped by that null pattern: COPY does not care about their order."""
    pattern = [
        pl.col(name).is_null().alias(f"__null_{i}")
        for i, (name, dtype) in enumerate(chunk.schema.items())
        if dtype != pl.String and chunk.get_column(name).has_nulls()
    ]
    if not pattern:
        return [_binary_rows(chunk)]
    groups = chunk.with_columns(pattern).partition_by(
        [e.meta.output_name() for e in pattern], include_key=False
    )
    return [_binary_rows(group) for group in groups]


def _binary_rows(rows: pl.DataFrame) -> bytes | memoryview:
    """Rows whose fixed-width columns are each all null or all set: per row a field count, then
    per field its length (-1: null) and its big-endian value."""
    fields: list[tuple[str, str]] = [("count", ">i2")]
    lengths: dict[str, int] = {}
    values: dict[str, np.ndarray[Any, Any]] = {}
    text = []
    for i, (name, dtype) in enumerate(rows.schema.items()):
        series = rows.get_column(name)
        if dtype == pl.String:
            text.append(series)
            continue
        fields.append((f"l{i}", ">i4"))
        if series.null_count() == rows.height:
            lengths[f"l{i}"] = -1
            continue
        fields.append((f"v{i}", BINARY_FORMATS[dtype]))
        lengths[f"l{i}"] = np.dtype(BINARY_FORMATS[dtype]).itemsize
        values[f"v{i}"] = series.to_numpy()
    records = np.empty(rows.height, dtype=np.dtype(fields))
    # Field by field over the whole chunk would stride through every record once per field
    # (81 passes over ~120 MB at 40 columns); a block at a time is 4-5x faster.
    for start in range(0, rows.height, RECORD_BLOCK_ROWS):
        stop = start + RECORD_BLOCK_ROWS
        block = records[start:stop]
        block["count"] = rows.width
        for field_name, length in lengths.items():
            block[field_name] = length
        for field_name, value in values.items():
            block[field_name] = value[start:stop]
    if not text:
        return records.tobytes()
    empty = pa.scalar(b"", pa.large_binary())
    joined = pc.binary_join_element_wise(
        _fixed_binary(records.view(np.uint8), records.itemsize),
        *(_text_field(series) for series in text),
        empty,
    )
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int64)
    start, end = offsets[joined.offset], offsets[joined.offset + len(joined)]
    return memoryview(joined.buffers()[2])[start:end]


def _fixed_binary(data: np.ndarray[Any, Any], width: int) -> pa.Array:
    """``data`` (bytes) cut into values of ``width`` bytes, as an Arrow binary array."""
    count = len(data) // width
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int64)
    return pa.Array.from_buffers(
        pa.large_binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def _text_field(series: pl.Series) -> pa.Array:
    """A text column as binary COPY fields: the length in bytes (-1: null), then the UTF-8."""
    lengths = series.str.len_bytes().cast(pl.Int32).fill_null(-1).to_numpy().astype(">i4")
    prefix = _fixed_binary(lengths.view(np.uint8), 4)
    value = series.to_arrow().cast(pa.large_binary())
    field = pc.binary_join_element_wise(prefix, value, pa.scalar(b"", pa.large_binary()))
    return field if not series.has_nulls() else pc.if_else(value.is_null(), prefix, field)


def _csv_chunks(parts: Iterable[pl.DataFrame]) -> Iterator[bytes]:
    """``parts`` as CSV, a chunk at a time; Polars renders the next chunk (without the GIL)
    while the caller sends this one, and no further ahead, to bound memory."""
    yield from one_ahead(map(_csv, _slices(parts, COPY_CHUNK_ROWS)), "copy")


def _slices(parts: Iterable[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """The rows of ``parts``, in order, ``rows`` at a time (a part's last slice may be short)."""
    for part in parts:
        for offset in range(0, part.height, rows):
            yield part.slice(offset, rows)


def _csv(rows: pl.DataFrame) -> bytes:
    """``rows`` as CSV the way COPY reads it: a null is an unquoted empty field, an empty
    string is quoted (``""``)."""
    buffer = io.BytesIO()
    rows.write_csv(buffer, include_header=False, quote_style="necessary")
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
