"""The DuckDB warehouse: connecting (one writer at a time) and creating its tables and views."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Final

import duckdb
import polars as pl

from tutor_scoring_dagster.config import memory_size
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import (
    DROP_MODELS,
    TutorRiskDrivers,
    drop_columns,
    model_schema,
    score_row_schema,
)

log = logging.getLogger(__name__)

RAW_METADATA_COLUMNS: Final[dict[str, pl.DataType]] = {
    "load_id": pl.Int64(),
    "source_file": pl.String(),
    "source_line": pl.Int64(),
    "extra_columns": pl.String(),  # unknown columns of the export, as a JSON object
}
"""Columns every raw_<entity> table has besides the contract's."""

LOCK_WAIT_S: Final = 120.0

SCORE_TABLES: Final = ("tutor_scores_daily", "tutor_scores_current")
"""Warehouse tables holding score snapshots (columns: ``schemas.score_row_schema``)."""

DRIVER_TABLES: Final = ("tutor_risk_drivers_current",)
"""Warehouse tables holding risk drivers (columns: the TutorRiskDrivers model)."""

CURRENT_ENTITIES: Final = ("sessions", "reschedules")
"""Entities whose current state is kept in a table, ``<entity>_current`` (the latest export of
each row, as of the loads recorded in ``current_loads``), behind the view ``<entity>``."""


class WarehouseLockedError(RuntimeError):
    """Another process held the warehouse for longer than we were willing to wait."""


def raw_table(entity: str) -> str:
    """The raw (append-only history) table of an entity."""
    if entity not in DROP_MODELS:
        raise ValueError(f"unknown entity {entity!r}")
    return f"raw_{entity}"


def raw_frame_schema(entity: str) -> dict[str, pl.DataType]:
    """Columns and types of ``raw_<entity>``: the contract's, then the load metadata."""
    return {**drop_columns(entity), **RAW_METADATA_COLUMNS}


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


@contextmanager
def connect(
    path: Path,
    *,
    read_only: bool = False,
    wait_s: float = LOCK_WAIT_S,
    memory_limit: str | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse, waiting (with backoff) while another process holds its lock.

    DuckDB allows a single writing process; Dagster's ``warehouse`` pool keeps our own writers
    in line, and this wait covers everything else (a CLI query, a run outside the pool).
    ``memory_limit`` (e.g. ``1GB``, Settings.warehouse_memory) caps DuckDB's cache and working
    memory; by default DuckDB takes up to 80% of the machine's.
    """
    size = None if memory_limit is None else memory_size(memory_limit, "memory_limit")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if not _is_lock_error(exc) or time.monotonic() >= deadline:
                if _is_lock_error(exc):
                    raise WarehouseLockedError(
                        f"the warehouse {path} stayed locked by another process for {wait_s:.0f} s"
                    ) from exc
                raise
            log.info("warehouse %s is locked by another process; retrying in %.2f s", path, delay)
            time.sleep(delay + random.uniform(0, delay / 2))
            delay = min(delay * 2, 2.0)
    try:
        con.execute("SET TimeZone = 'UTC'")
        # A bar drawn on stderr by every long statement would flood run logs.
        con.execute("SET enable_progress_bar = false")
        if size is not None:
            # SQL audit (noqa: S608): SET takes no bound parameter; the value is a size
            # checked by memory_size (digits and a unit), never other text.
            con.execute(f"SET memory_limit = '{size}'")  # noqa: S608, RUF100
        yield con
    finally:
        con.close()


def fetch_one(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None
) -> tuple[object, ...] | None:
    """The first row of a query, or None; the result is read to the end (DuckDB 2 wants that
    before the connection runs anything else)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def query_frame(
    con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, object] | None = None
) -> pl.DataFrame:
    """A query's whole result as a Polars frame."""
    frame = pl.from_arrow(con.sql(sql, params=params or {}).to_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def export_parts(
    con: duckdb.DuckDBPyConnection,
    *,
    key_rows_sql: str,
    part_sql: str,
    params: dict[str, object],
    folder: Path,
    part_rows: int,
) -> list[Path]:
    """A query's result written to Parquet files in ``folder``, one per part of about
    ``part_rows`` rows, so that a consumer can hold one part at a time.

    ``key_rows_sql`` (with ``params``) returns each key's row count in key order; parts hold
    whole keys, consecutive ranges of them. ``part_sql`` returns the rows of the keys from
    ``$first_key`` to ``$last_key`` (with ``params``). Returns the files in key order.
    """
    counts = query_frame(con, key_rows_sql, params)
    keys, rows = counts.get_column(counts.columns[0]), counts.get_column(counts.columns[1])
    # Part i holds the keys whose cumulative rows end in [i * part_rows, (i + 1) * part_rows).
    parts = counts.select(((rows.cum_sum() - 1) // part_rows).alias("part"), keys.alias("key"))
    ranges = parts.group_by("part", maintain_order=True).agg(
        pl.col("key").first().alias("first_key"), pl.col("key").last().alias("last_key")
    )
    bounds = list(ranges.iter_rows()) or [(0, None, None)]  # no rows: one empty part
    paths = []
    for i, (_, first_key, last_key) in enumerate(bounds):
        path = folder / f"part-{i:05d}.parquet"
        frame = query_frame(con, part_sql, {**params, "first_key": first_key, "last_key": last_key})
        frame.write_parquet(path, compression="lz4", statistics=False)
        paths.append(path)
    return paths


def export_daily_scores(
    con: duckdb.DuckDBPyConnection,
    *,
    start: datetime,
    end: datetime,
    folder: Path,
    part_rows: int,
) -> list[Path]:
    """The daily snapshots with ``start <= as_of < end``, as Parquet parts of whole tutors in
    key order (:func:`export_parts`): what ``tutor_score_history`` publishes."""
    return export_parts(
        con,
        key_rows_sql=load_sql("tutor_scores_daily_tutor_rows_select"),
        part_sql=load_sql("tutor_scores_daily_part_select"),
        params={"start": start, "end": end},
        folder=folder,
        part_rows=part_rows,
    )


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted (a quote in it doubled)."""
    return '"' + name.replace('"', '""') + '"'


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the warehouse's tables and views, adding model columns new since last time."""
    con.execute(load_sql("warehouse_create"))
    con.execute(load_sql("loaded_files_add_columns"))
    frames = {raw_table(e): raw_frame_schema(e) for e in DROP_MODELS}
    frames.update({t: score_row_schema() for t in SCORE_TABLES})
    frames.update({t: model_schema(TutorRiskDrivers) for t in DRIVER_TABLES})
    for table, schema in frames.items():
        empty = pl.DataFrame(schema=schema)
        con.register("raw_columns", empty)
        try:
            # table comes from a closed set (raw_table), never from input
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM raw_columns")  # noqa: S608
            existing = {
                row[0]
                for row in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                    [table],
                ).fetchall()
            }
            for name in empty.columns:
                if name not in existing:
                    # The type comes from DuckDB's own mapping of the empty Polars column.
                    col_type = fetch_one(
                        con,
                        "SELECT column_type FROM (DESCRIBE SELECT * FROM raw_columns) "
                        "WHERE column_name = ?",
                        [name],
                    )
                    assert col_type is not None
                    con.execute(
                        # SQL audit (noqa: S608): the table from a closed set, the column from
                        # a model, both quoted; the type from DuckDB's catalog, not from input.
                        f"ALTER TABLE {quote_ident(table)} "
                        f"ADD COLUMN {quote_ident(name)} {col_type[0]}"
                    )
        finally:
            con.unregister("raw_columns")
    for entity in CURRENT_ENTITIES:
        _ensure_current_table(con, entity)
    if fetch_one(con, load_sql("tutor_daily_activity_primary_key_select")) == (True,):
        con.execute(load_sql("tutor_daily_activity_rebuild"))
    con.execute(load_sql("current_views_create"))
    refresh_current(con)


def _ensure_current_table(con: duckdb.DuckDBPyConnection, entity: str) -> None:
    """``<entity>_current``: the columns of ``raw_<entity>`` but the unknown extras, in order."""
    raw, current = raw_table(entity), f"{entity}_current"
    # Both names come from closed sets (CURRENT_ENTITIES, raw_table), never from input.
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {current} AS "  # noqa: S608
        f"SELECT * EXCLUDE (extra_columns) FROM {raw} LIMIT 0"
    )
    columns = "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?"
    have = {row[0] for row in con.execute(columns, [current]).fetchall()}
    for name, col_type in con.execute(columns + " ORDER BY ordinal_position", [raw]).fetchall():
        if name != "extra_columns" and name not in have:
            con.execute(
                # SQL audit (noqa: S608): the names quoted, the table's from a closed set, the
                # column's and the type from the raw table's own catalog entry, not from input.
                f"ALTER TABLE {quote_ident(current)} ADD COLUMN {quote_ident(name)} {col_type}"
            )


def newest_load(con: duckdb.DuckDBPyConnection) -> int:
    """The id of the warehouse's newest load (0: none yet)."""
    row = fetch_one(con, load_sql("current_loads_select"))
    return int(row[0]) if row is not None else 0  # type: ignore[call-overload]


def sessions_changed_after(con: duckdb.DuckDBPyConnection, load_id: int) -> pl.DataFrame:
    """``tutor_id`` and ``scheduled_time`` of every export of the sessions whose rows (or
    reschedules) the loads after ``load_id`` hold."""
    return query_frame(con, load_sql("sessions_changed_after_select"), {"after": load_id})


def refresh_current(con: duckdb.DuckDBPyConnection) -> int:
    """Merge the loads not yet in ``sessions_current`` / ``reschedules_current`` into them, in
    one transaction; return the newest load id now merged (0: they were up to date).

    Ingest calls this after each pass, and every writable connection after creating the
    schema (so a pass that stopped early, or a warehouse older than these tables, catches up).
    The views read pending loads on the fly meanwhile, so this changes speed, never results.
    """
    state = fetch_one(con, load_sql("current_loads_select"))
    assert state is not None
    newest, *merged = (int(v) for v in state)  # type: ignore[call-overload]
    behind = {e: after for e, after in zip(CURRENT_ENTITIES, merged, strict=True) if after < newest}
    if not behind:
        return 0
    con.execute("BEGIN TRANSACTION")
    try:
        for entity, after in behind.items():
            bounds = {"after": after, "upto": newest}
            if after:  # at watermark 0 the current table is empty: nothing to supersede
                con.execute(load_sql(f"{entity}_current_delete"), bounds)
            con.execute(load_sql(f"{entity}_current_insert"), bounds)
            con.execute(load_sql("current_loads_upsert"), {"entity": entity, "load_id": newest})
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return newest


def replace_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: pl.DataFrame | Iterable[pl.DataFrame],
    column: str | None = None,
    start: object = None,
    end: object = None,
) -> None:
    """Replace a score or driver table's rows (all, or those with ``start <= column < end``)
    in one transaction, with ``rows`` (a frame, or parts of one as they come)."""
    replace_tables(con, {table: rows}, column, start, end)


def replace_tables(
    con: duckdb.DuckDBPyConnection,
    frames: Mapping[str, pl.DataFrame | Iterable[pl.DataFrame]],
    column: str | None = None,
    start: object = None,
    end: object = None,
) -> None:
    """:func:`replace_rows` for several tables at once, in one transaction (a snapshot and
    its drivers change together or not at all)."""
    for table in frames:
        if table not in SCORE_TABLES + DRIVER_TABLES:
            raise ValueError(f"not a score or driver table: {table!r}")
    con.execute("BEGIN TRANSACTION")
    try:
        for table, rows in frames.items():
            # Identifiers come from SCORE_TABLES, DRIVER_TABLES and the models, never input.
            if column is None:
                con.execute(f"DELETE FROM {table}")  # noqa: S608
            else:
                con.execute(
                    f'DELETE FROM {table} WHERE "{column}" >= $start AND "{column}" < $end',  # noqa: S608
                    {"start": start, "end": end},
                )
            for part in [rows] if isinstance(rows, pl.DataFrame) else rows:
                if column is not None and column not in part.columns:
                    raise ValueError(f"unknown column {column!r}")
                # DuckDB finds the frame by its variable name (a replacement scan; no table of
                # the warehouse has that name): a frame registered instead stays in memory
                # until the connection closes, each part of a long backfill on top of the last.
                replace_tables_incoming_part = part
                con.execute(
                    f"INSERT INTO {table} BY NAME SELECT * FROM replace_tables_incoming_part"  # noqa: S608
                )
                del replace_tables_incoming_part, part  # not kept while the next part is made
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
