"""Scores -> serving store: idempotent, transactional upserts through SQLAlchemy.

Each publish runs in one transaction. Rows are upserted with the database's own
``INSERT .. ON CONFLICT DO UPDATE .. WHERE <something changed>``, so a re-run with the same
input changes no row and leaves ``updated_at`` / ``last_calculated_at`` alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final

import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.migrate import ensure_current

CHUNK_ROWS: Final = 5_000


@dataclass
class PublishStats:
    """Rows written (inserted or changed) and deleted per table by one publish."""

    written: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)

    def add(self, other: PublishStats) -> None:
        """Fold another publish's counts into these."""
        for name, n in other.written.items():
            self.written[name] = self.written.get(name, 0) + n
        for name, n in other.deleted.items():
            self.deleted[name] = self.deleted.get(name, 0) + n


def create_store_engine(url: str) -> Engine:
    """An engine for the serving store; SQLite files get their folder and foreign keys on."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA busy_timeout = 30000")
            cursor.close()

    return engine


def _chunks(frame: pl.DataFrame, size: int = CHUNK_ROWS) -> Iterator[list[dict[str, Any]]]:
    for offset in range(0, frame.height, size):
        yield frame.slice(offset, size).to_dicts()


def upsert(
    conn: Connection,
    table: sa.Table,
    frame: pl.DataFrame,
    *,
    stamp_column: str | None,
    stamp: datetime,
) -> int:
    """Insert new rows of ``frame`` and update changed ones; return how many were written.

    A row whose every column equals the stored one is left untouched (its stamp included).
    """
    if frame.height == 0:
        return 0
    keys = [c.name for c in table.primary_key.columns]
    values = [c for c in frame.columns if c not in keys]
    if stamp_column is not None:
        frame = frame.with_columns(pl.lit(stamp).alias(stamp_column))
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = dialect_insert(table)
    changed = sa.or_(*(table.c[c].is_distinct_from(stmt.excluded[c]) for c in values))
    update_cols = values + ([stamp_column] if stamp_column else [])
    stmt = stmt.on_conflict_do_update(
        index_elements=keys,
        set_={c: stmt.excluded[c] for c in update_cols},
        where=changed,
    )
    written = 0
    for rows in _chunks(frame):
        result = conn.execute(stmt, rows)
        written += max(result.rowcount, 0)
    return written


def _delete_missing(conn: Connection, table: sa.Table, keep: sa.ColumnElement[bool]) -> int:
    result = conn.execute(sa.delete(table).where(~keep))
    return max(result.rowcount, 0)


def publish_current(
    engine: Engine,
    *,
    tutors: pl.DataFrame,
    sessions: pl.DataFrame,
    reschedules: pl.DataFrame,
    scores: pl.DataFrame,
    horizon_start: datetime | None,
    now: datetime,
) -> PublishStats:
    """Publish tutors, recent sessions and reschedules, and the current score snapshot.

    ``sessions`` older than ``horizon_start`` (None: keep all) are removed from the store;
    ``scores`` must be one snapshot (one ``as_of``), which replaces the previous one.
    """
    ensure_current(engine)
    stats = PublishStats()
    as_of_values = scores.get_column("as_of").unique().to_list() if scores.height else []
    if len(as_of_values) > 1:
        raise ValueError(f"the current snapshot must have one as_of, got {len(as_of_values)}")
    with engine.begin() as conn:
        stats.written["tutors"] = upsert(
            conn, t.tutors, _to_table(tutors, t.tutors), stamp_column="updated_at", stamp=now
        )
        session_rows = _to_table(sessions, t.sessions)
        stats.written["sessions"] = upsert(
            conn, t.sessions, session_rows, stamp_column="updated_at", stamp=now
        )
        published = set(session_rows.get_column("session_id").to_list())
        resched_rows = _to_table(
            reschedules.filter(pl.col("session_id").is_in(list(published))), t.reschedules
        )
        stats.written["reschedules"] = upsert(
            conn, t.reschedules, resched_rows, stamp_column="updated_at", stamp=now
        )
        if horizon_start is not None:
            old = sa.select(t.sessions.c.session_id).where(
                t.sessions.c.scheduled_time < horizon_start
            )
            stats.deleted["reschedules"] = _delete_missing(
                conn, t.reschedules, ~t.reschedules.c.session_id.in_(old)
            )
            stats.deleted["sessions"] = _delete_missing(
                conn, t.sessions, t.sessions.c.scheduled_time >= horizon_start
            )
        stats.written["tutor_scores"] = upsert(
            conn,
            t.tutor_scores,
            _to_table(scores, t.tutor_scores),
            stamp_column="last_calculated_at",
            stamp=now,
        )
        if as_of_values:
            stats.deleted["tutor_scores"] = _delete_missing(
                conn, t.tutor_scores, t.tutor_scores.c.as_of == as_of_values[0]
            )
    return stats


def publish_history(
    engine: Engine, scores: pl.DataFrame, first_day: date, last_day: date, *, now: datetime
) -> PublishStats:
    """Replace the stored daily snapshots of ``first_day..last_day`` with ``scores``."""
    ensure_current(engine)
    stats = PublishStats()
    frame = scores.with_columns(
        (pl.col("as_of").dt.date() - pl.duration(days=1)).cast(pl.Date).alias("score_date")
    )
    with engine.begin() as conn:
        stats.written["tutor_score_history"] = upsert(
            conn,
            t.tutor_score_history,
            _to_table(frame, t.tutor_score_history),
            stamp_column="last_calculated_at",
            stamp=now,
        )
        # Rows of the range that the new snapshots no longer have (e.g. a tutor's only
        # session was re-exported with another tutor).
        h = t.tutor_score_history.c
        in_range = h.score_date.between(first_day, last_day)
        stale = conn.execute(sa.select(h.tutor_id, h.score_date).where(in_range)).all()
        fresh = set(zip(frame["tutor_id"].to_list(), frame["score_date"].to_list(), strict=True))
        gone = [(tid, day) for tid, day in stale if (tid, day) not in fresh]
        for tid, day in gone:
            conn.execute(
                sa.delete(t.tutor_score_history).where((h.tutor_id == tid) & (h.score_date == day))
            )
        stats.deleted["tutor_score_history"] = len(gone)
    return stats


def _to_table(frame: pl.DataFrame, table: sa.Table) -> pl.DataFrame:
    """The columns of ``frame`` that ``table`` stores (renaming the export's ``updated_at``)."""
    if "updated_at" in frame.columns and "source_updated_at" in table.c:
        frame = frame.rename({"updated_at": "source_updated_at"})
    stamps = {"updated_at", "last_calculated_at"}
    columns: Sequence[str] = [
        c.name for c in table.columns if c.name in frame.columns and c.name not in stamps
    ]
    return frame.select(columns)
