"""Publishing to the serving store, on SQLite and a throwaway Postgres database: idempotent,
only changed rows written, all or nothing, one publish at a time, and the serving horizon."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
import sqlalchemy as sa
import test_store_frames as f

from tutor_scoring_dagster.schemas import score_row_schema
from tutor_scoring_dagster.store import publish as p
from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.migrate import ensure_current
from tutor_scoring_dagster.store.publish import (
    create_store_engine,
    horizon_start,
    publish_current,
    publish_history,
)
from tutor_scoring_dagster.warehouse import ensure_schema, export_daily_scores, replace_rows

NOW = datetime(2026, 3, 1, 0, 5, tzinfo=UTC)
STAMPS = {"updated_at", "last_calculated_at"}
TABLES = (t.tutors, t.sessions, t.reschedules, t.tutor_scores, t.tutor_score_history)


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    engine = create_store_engine(store_url)
    yield engine
    engine.dispose()


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC datetimes."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def dump(engine: sa.Engine, *, stamps: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Every published row, in key order."""
    out = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings()
            out[table.name] = [
                {k: v for k, v in row.items() if stamps or k not in STAMPS} for row in rows
            ]
    return out


def snapshot(n_sessions: int = 300, n_tutors: int = 12, *, shift: int = 0) -> dict[str, Any]:
    sessions = f.sessions(n_sessions, n_tutors)
    return {
        "tutors": f.tutors(n_tutors),
        "sessions": sessions,
        "reschedules": f.reschedules(sessions),
        "scores": f.scores(n_tutors, shift=shift),
    }


def publish(
    engine: sa.Engine, data: dict[str, Any], now: datetime = NOW, **kw: Any
) -> p.PublishStats:
    return publish_current(
        engine, **data, horizon_start=kw.pop("horizon_start", None), now=now, **kw
    )


def test_republishing_the_same_input_writes_nothing(engine: sa.Engine) -> None:
    data = snapshot()
    first = publish(engine, data)
    assert first.written == {
        "tutors": 12,
        "sessions": 300,
        "reschedules": data["reschedules"].height,
        "tutor_scores": 12,
    }
    assert first.staged == first.written
    before = dump(engine)

    again = publish(engine, data, now=NOW + timedelta(hours=1))
    assert set(again.written.values()) == {0} and set(again.deleted.values()) == {0}
    assert dump(engine) == before  # row for row, updated_at / last_calculated_at included


def test_only_new_and_changed_rows_are_written_and_stamped(engine: sa.Engine) -> None:
    data = snapshot()
    publish(engine, data)
    later = NOW + timedelta(hours=1)
    changed = {
        **data,
        "sessions": data["sessions"].with_columns(
            status=pl.when(pl.col("session_id") == "S1").then(pl.lit("no_show")).otherwise("status")
        ),
        "scores": data["scores"].with_columns(
            min_sessions=pl.when(pl.col("tutor_id") == "T00003").then(7).otherwise("min_sessions")
        ),
    }
    stats = publish(engine, changed, now=later)
    assert stats.written == {"tutors": 0, "sessions": 1, "reschedules": 0, "tutor_scores": 1}
    stored = dump(engine)
    stamped = {
        (table, row.get("session_id") or row["tutor_id"])
        for table, rows in stored.items()
        for row in rows
        if any(utc(row.get(s)) == later for s in STAMPS)
    }
    assert stamped == {("sessions", "S1"), ("tutor_scores", "T00003")}


def test_a_failed_publish_leaves_the_store_as_it_was(engine: sa.Engine) -> None:
    publish(engine, snapshot())
    before = dump(engine)
    bad = snapshot(n_sessions=400, shift=3)
    # The last score row breaks a check constraint: sessions, written before it, roll back too.
    bad["scores"] = bad["scores"].with_columns(
        reschedule_rate_7d=pl.when(pl.col("tutor_id") == "T00011")
        .then(2.0)
        .otherwise("reschedule_rate_7d")
    )
    with pytest.raises(sa.exc.IntegrityError, match="reschedule_rate_7d"):
        publish(engine, bad, now=NOW + timedelta(hours=1))
    assert dump(engine) == before


def test_a_publish_that_dies_after_its_writes_leaves_the_store_as_it_was(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(engine, snapshot())
    before = dump(engine)

    def die(*_args: Any) -> int:
        raise RuntimeError("killed between the upserts and the deletes")

    monkeypatch.setattr(p, "_delete_unstaged", die)
    with pytest.raises(RuntimeError, match="killed"):
        publish(engine, snapshot(n_sessions=200, shift=5), now=NOW + timedelta(hours=1))
    assert dump(engine) == before


def test_concurrent_publishes_take_turns(engine: sa.Engine) -> None:
    a, b = snapshot(2_000, 30), snapshot(1_500, 25, shift=2)
    expected = []
    for data in (a, b):
        publish(engine, data)
        expected.append(dump(engine, stamps=False))
    assert expected[0] != expected[1]

    errors: list[BaseException] = []

    def run(data: dict[str, Any]) -> None:
        try:
            publish(engine, data, now=NOW + timedelta(hours=1))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    for _round in range(2):
        threads = [threading.Thread(target=run, args=(d,)) for d in (a, b, a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert dump(engine, stamps=False) in expected  # one snapshot entirely, never a mix


def test_the_serving_horizon_keeps_recent_sessions_and_their_reschedules(
    engine: sa.Engine,
) -> None:
    data = snapshot(600, 10)
    sessions, reschedules = data["sessions"], data["reschedules"]

    def stored_ids(table: sa.Table) -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(table.c.session_id)).scalars())

    def expected(since: datetime) -> set[str]:
        return set(sessions.filter(pl.col("scheduled_time") >= since)["session_id"])

    publish(engine, data)  # no horizon: all of them
    assert stored_ids(t.sessions) == set(sessions["session_id"])
    assert stored_ids(t.reschedules) == set(reschedules["session_id"])

    for days in (120, 30):
        start = horizon_start(data["scores"], days, now=NOW)
        assert start == f.AS_OF - timedelta(days=days)
        stats = publish(engine, data, horizon_start=start)
        kept = expected(start)
        assert stored_ids(t.sessions) == kept
        assert stored_ids(t.reschedules) == kept & set(reschedules["session_id"])
        assert stats.deleted["sessions"] > 0 and stats.deleted["reschedules"] > 0
        assert stats.written["sessions"] == 0  # what stays is not rewritten

    stats = publish(engine, data, horizon_start=None)  # SERVING_HORIZON_DAYS=0 brings all back
    assert stored_ids(t.sessions) == set(sessions["session_id"])
    assert stats.written["sessions"] == sessions.height - len(expected(f.AS_OF - timedelta(30)))


def test_horizon_start() -> None:
    scores = f.scores(3)
    assert horizon_start(scores, 0, now=NOW) is None
    assert horizon_start(scores, 180, now=NOW) == f.AS_OF - timedelta(days=180)
    assert horizon_start(scores.clear(), 7, now=NOW) == NOW - timedelta(days=7)
    with pytest.raises(ValueError, match="SERVING_HORIZON_DAYS"):
        horizon_start(scores, -1, now=NOW)


def test_the_current_snapshot_replaces_the_previous_one(engine: sa.Engine) -> None:
    publish(engine, snapshot(n_tutors=12))
    smaller = snapshot(n_tutors=12)
    smaller["scores"] = f.scores(8, f.AS_OF + timedelta(hours=1))
    stats = publish(engine, smaller)
    assert stats.deleted["tutor_scores"] == 4 and stats.written["tutor_scores"] == 8
    with engine.connect() as conn:
        as_of = conn.execute(sa.select(sa.func.count(sa.distinct(t.tutor_scores.c.as_of)))).scalar()
        tutors = conn.execute(sa.select(sa.func.count()).select_from(t.tutors)).scalar()
    assert as_of == 1 and tutors == 12  # tutors stay: history refers to them


def test_risk_drivers_are_mirrored_with_the_snapshot(engine: sa.Engine) -> None:
    data = snapshot(n_tutors=12)
    data["risk_drivers"] = f.drivers(data["scores"])
    assert data["risk_drivers"].height > 0
    first = publish(engine, data)
    assert first.written["tutor_risk_drivers"] == data["risk_drivers"].height
    before = dump_drivers(engine)
    again = publish(engine, data, now=NOW + timedelta(hours=1))
    assert again.written["tutor_risk_drivers"] == 0 and dump_drivers(engine) == before

    # The next snapshot flags fewer tutors: their drivers leave with it, in the same publish.
    later = snapshot(n_tutors=12)
    later["scores"] = f.scores(12, f.AS_OF + timedelta(hours=1), shift=4)
    later["risk_drivers"] = f.drivers(later["scores"]).head(2)
    stats = publish(engine, later, now=NOW + timedelta(hours=2))
    assert stats.deleted["tutor_risk_drivers"] == data["risk_drivers"].height
    assert stats.written["tutor_risk_drivers"] == 2
    assert [(r["tutor_id"], r["driver"]) for r in dump_drivers(engine)] == [
        (r["tutor_id"], r["driver"])
        for r in later["risk_drivers"].sort("tutor_id", "driver").to_dicts()
    ]


def dump_drivers(engine: sa.Engine) -> list[dict[str, Any]]:
    d = t.tutor_risk_drivers
    with engine.connect() as conn:
        query = sa.select(d).order_by(d.c.tutor_id, d.c.driver)
        return [dict(r) for r in conn.execute(query).mappings()]


def test_history_replaces_exactly_its_days(engine: sa.Engine) -> None:
    first = date(2026, 2, 1)
    days = f.history(6, first, 4)
    stats = publish_history(engine, days, first, first + timedelta(3), now=NOW, tutors=f.tutors(6))
    assert stats.written == {"tutors": 6, "tutor_score_history": 24}
    before = dump(engine)
    assert publish_history(engine, days, first, first + timedelta(3), now=NOW).written == {
        "tutor_score_history": 0
    }
    assert dump(engine) == before

    # Days 2..3 again, one tutor gone from day 3 and one rate changed: day 1 is not touched.
    last = days.filter(
        pl.col("as_of").dt.date().is_between(first + timedelta(2), first + timedelta(3))
    )
    last = last.filter(
        ~((pl.col("tutor_id") == "T00001") & (pl.col("as_of") == last["as_of"].max()))
    )
    last = last.with_columns(
        min_sessions=pl.when(pl.col("tutor_id") == "T00002").then(9).otherwise("min_sessions")
    )
    stats = publish_history(engine, last, first + timedelta(1), first + timedelta(2), now=NOW)
    assert stats.deleted == {"tutor_score_history": 1}
    assert stats.written == {"tutor_score_history": 2}  # T00002 on both days
    with engine.connect() as conn:
        per_day = dict(
            conn.execute(
                sa.select(t.tutor_score_history.c.score_date, sa.func.count())
                .group_by(t.tutor_score_history.c.score_date)
                .order_by(t.tutor_score_history.c.score_date)
            ).all()
        )
    assert list(per_day.values()) == [6, 6, 5, 6]


@pytest.mark.parametrize("direct", [False, True], ids=["merged", "copied"])
def test_history_in_parts_from_the_warehouse_is_the_history_whole(
    engine: sa.Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
) -> None:
    """A long backfill is exported from the warehouse in parts of whole tutors and published a
    part at a time (memory holds one part): the store ends as with the whole frame, on the
    staged merge and on the direct copy alike; parts that share keys are refused."""
    first = date(2026, 2, 1)
    days = f.history(7, first, 5)
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    ensure_schema(con)
    replace_rows(con, "tutor_scores_daily", days.select(list(score_row_schema())))
    window = {"start": datetime(2026, 2, 2, tzinfo=UTC), "end": datetime(2026, 2, 7, tzinfo=UTC)}
    paths = export_daily_scores(
        con,
        **window,
        folder=tmp_path,
        part_rows=11,  # two tutors' 5 days a part (whole tutors: 10 rows), the last alone
    )
    con.close()
    parts = p.FrameParts.from_parquet(paths)
    assert (len(paths), parts.height) == (4, 35)
    if direct:
        monkeypatch.setattr(p, "DIRECT_COPY_MIN_ROWS", 1)
    last = first + timedelta(4)
    publish_history(engine, parts, first, last, now=NOW, tutors=f.tutors(7))
    in_parts = dump(engine)
    with engine.begin() as conn:
        conn.execute(sa.delete(t.tutor_score_history))
    publish_history(engine, days, first, last, now=NOW)
    assert dump(engine) == in_parts
    assert len(in_parts["tutor_score_history"]) == 35

    overlapping = p.FrameParts(parts.schema, 70, lambda: iter([days, days]))
    with pytest.raises(ValueError, match="parts of tutor_score_history overlap"):
        publish_history(engine, overlapping, first, last, now=NOW)
    assert dump(engine) == in_parts


def test_frames_that_cannot_be_published_are_refused_before_writing(engine: sa.Engine) -> None:
    data = snapshot()
    doubled = {**data, "sessions": pl.concat([data["sessions"], data["sessions"].head(1)])}
    with pytest.raises(ValueError, match="2 rows for sessions share their key"):
        publish(engine, doubled)
    two_snapshots = {**data, "scores": pl.concat([f.scores(2), f.scores(2, NOW)])}
    with pytest.raises(ValueError, match="one as_of"):
        publish(engine, two_snapshots)
    with pytest.raises(ValueError, match="outside the days"):
        publish_history(
            engine, f.history(2, date(2026, 2, 1), 3), date(2026, 2, 1), date(2026, 2, 2), now=NOW
        )
    assert not sa.inspect(engine).has_table("tutors")  # refused before even migrating


def test_text_survives_the_bulk_load_exactly(engine: sa.Engine) -> None:
    data = snapshot(200, 4)
    odd = ["", 'comma, "quote"', "line\nbreak", "back\\slash", "ünïcødé ✓", None, "\\N", "NULL"]
    moved = data["reschedules"].head(len(odd)).with_columns(reason=pl.Series(odd))
    publish(engine, {**data, "reschedules": moved})
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(t.reschedules.c.reason).order_by(t.reschedules.c.session_id)
        ).scalars()
        assert list(stored) == list(moved.sort("session_id")["reason"])
    assert set(publish(engine, {**data, "reschedules": moved}).written.values()) == {0}


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = create_store_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("block", [2, p.RECORD_BLOCK_ROWS])
def test_binary_copy_round_trips_every_type(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Postgres gets frames in its binary COPY format (SQLite has no COPY): values come back
    exactly, edge cases included (nulls, NaN, infinities, dates and instants before 2000,
    multi-byte text), however many records are packed at a time."""
    monkeypatch.setattr(p, "RECORD_BLOCK_ROWS", block)
    engine = pg_engine
    table = sa.Table(
        "binary_round_trip",
        sa.MetaData(),
        sa.Column("k", sa.Integer, primary_key=True),
        sa.Column("s", sa.String(1000)),
        sa.Column("txt", sa.Text),
        sa.Column("f", sa.Float),
        sa.Column("b", sa.Boolean),
        sa.Column("d", sa.Date),
        sa.Column("ts", sa.DateTime(timezone=True)),
        sa.Column("i", sa.Integer),
        sa.Column("nothing", sa.Text),
    )
    frame = pl.DataFrame(
        {
            "k": [1, 2, 3, 4, 5, 6],
            "s": ["a", "", None, "é€😀", "x" * 300, "y"],
            "txt": ["x" * 200, None, "", 'line\nbreak,"q"', "\\N", "tab\t"],
            "f": [1.5, float("nan"), None, float("inf"), -0.0, 1e-300],
            "b": [True, False, None, True, False, True],
            "d": [
                date(1999, 12, 31),
                date(2000, 1, 1),
                None,
                date(1970, 1, 1),
                None,
                date(1900, 1, 1),
            ],
            "ts": [
                datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                None,
                datetime(2026, 1, 1, tzinfo=UTC),
                datetime(1960, 1, 1, tzinfo=UTC),
                datetime(2000, 1, 1, tzinfo=UTC),
                datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC),
            ],
            "i": [2**31 - 1, -(2**31), None, 0, 7, -1],
            "nothing": pl.Series([None] * 6, dtype=pl.String),
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC"), "i": pl.Int64},
    )
    with engine.begin() as conn:
        table.create(conn)
        types = p._server_types(conn, table)
        assert p._binary_columns(types, frame) is not None
        p._copy(conn, table, [frame])
        stored = [tuple(r) for r in conn.execute(sa.select(table).order_by(table.c.k))]
        # Too big for its column: the frame goes as CSV, and Postgres says what is wrong.
        assert p._binary_columns(types, frame.with_columns(i=pl.lit(2**40))) is None
        table.drop(conn)
    for want, got in zip(frame.rows(), stored, strict=True):
        assert all(w == g or (w != w and g != g) for w, g in zip(want, got, strict=True)), got


@pytest.mark.parametrize("amount", [sa.Integer, sa.Numeric], ids=["binary", "csv"])
def test_a_copy_in_parts_and_in_key_order_sends_every_row_once(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, amount: type[sa.types.TypeEngine[Any]]
) -> None:
    """Frames are put in key order and encoded a slice at a time (memory holds one slice's
    copy; binary rows are packed a block at a time within it), and a frame's parts go as one
    COPY, made ahead of the one being sent: what arrives is every row once, in the order asked
    for, in either format (``numeric`` has no binary encoding here: CSV)."""
    monkeypatch.setattr(p, "PART_ROWS", 7)
    monkeypatch.setattr(p, "BINARY_CHUNK_ROWS", 3)
    monkeypatch.setattr(p, "RECORD_BLOCK_ROWS", 2)
    monkeypatch.setattr(p, "COPY_CHUNK_ROWS", 4)
    table = sa.Table(
        "parts_round_trip",
        sa.MetaData(),
        sa.Column("seq", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("k", sa.Integer),
        sa.Column("s", sa.Text),
        sa.Column("amount", amount),
    )
    frame = pl.DataFrame(
        {
            "k": list(range(50, 0, -1)),
            "s": [f"v{i}" if i % 4 else None for i in range(50)],
            "amount": [i % 9 for i in range(50)],
        }
    )
    # Parts of consecutive key ranges, as the history's Parquet parts are (an empty one too).
    parts = [frame.filter(pl.col("k").is_between(lo, lo + 19)) for lo in (1, 21, 41, 61)]
    with pg_engine.begin() as conn:
        table.create(conn)
        assert (p._binary_columns(p._server_types(conn, table), frame) is None) == (
            amount is sa.Numeric
        )
        p._copy(conn, table, (piece for part in parts for piece in p._in_key_order(part, ["k"])))
        stored = conn.execute(
            sa.select(table.c.k, table.c.s, sa.cast(table.c.amount, sa.Integer)).order_by(
                table.c.seq
            )
        ).all()
        table.drop(conn)
    assert [tuple(r) for r in stored] == frame.sort("k").rows()  # arrived in key order


def test_a_part_that_fails_its_check_mid_copy_leaves_nothing(pg_engine: sa.Engine) -> None:
    """A part read (on the copy's own thread) after others were sent that repeats an earlier
    part's keys stops the COPY with the check's error, and the publish's transaction keeps
    none of the rows sent before it."""
    table = sa.Table("parts_overlap", sa.MetaData(), sa.Column("k", sa.Integer, primary_key=True))
    parts = [pl.DataFrame({"k": [1, 2]}), pl.DataFrame({"k": [3, 4]}), pl.DataFrame({"k": [4]})]
    frame = p.FrameParts(parts[0].schema, 5, lambda: iter(parts))
    with pg_engine.begin() as conn:
        table.create(conn)
    try:
        with pytest.raises(ValueError, match="overlap"), pg_engine.begin() as conn:
            p._copy(conn, table, p._checked_parts(table, frame))
        with pg_engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
    finally:
        with pg_engine.begin() as conn:
            table.drop(conn)


def store_schema(engine: sa.Engine) -> dict[str, Any]:
    """Every table's primary key, indexes, foreign keys and checks, as the server reports them."""
    inspector = sa.inspect(engine)
    return {
        table.name: (
            inspector.get_pk_constraint(table.name),
            sorted(inspector.get_indexes(table.name), key=lambda i: str(i["name"])),
            sorted(inspector.get_foreign_keys(table.name), key=lambda k: str(k["name"])),
            sorted(inspector.get_check_constraints(table.name), key=lambda c: str(c["name"])),
        )
        for table in t.metadata.sorted_tables
    }


def test_a_first_publish_copied_straight_in_keeps_every_key_and_index(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into an empty store, big frames are copied straight into their tables with the primary
    key, indexes and foreign keys (the table's own and those pointing at it) made after the
    copy: the store ends with the schema it started with, the same rows as a merged publish,
    and its keys enforced."""
    ensure_current(pg_engine)
    migrated = store_schema(pg_engine)
    data = snapshot(400, 9)
    first = date(2026, 2, 1)
    days = f.history(9, first, 5)
    monkeypatch.setattr(p, "DIRECT_COPY_MIN_ROWS", 1)
    statements: list[str] = []
    sa.event.listen(pg_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    publish(pg_engine, data)
    publish_history(pg_engine, days, first, first + timedelta(4), now=NOW)
    dropped = {s.split()[-1] for s in statements if "DROP CONSTRAINT pk_" in s}
    published = ["tutors", "sessions", "reschedules", "tutor_scores", "tutor_score_history"]
    assert dropped == {f"pk_{name}" for name in published}  # tutors': four tables point at it
    assert store_schema(pg_engine) == migrated
    # The rows are those a merge would have written: merged again, nothing changes.
    assert set(publish(pg_engine, data).written.values()) == {0}
    history_again = publish_history(pg_engine, days, first, first + timedelta(4), now=NOW)
    assert history_again.written == {"tutor_score_history": 0}
    with pg_engine.begin() as conn:
        session = conn.execute(sa.select(t.sessions).limit(1)).mappings().one()
        with pytest.raises(sa.exc.IntegrityError, match="pk_sessions"), conn.begin_nested():
            conn.execute(sa.insert(t.sessions).values(**session))
        with pytest.raises(sa.exc.IntegrityError, match="fk_reschedules"), conn.begin_nested():
            conn.execute(
                sa.insert(t.reschedules).values(
                    session_id="NO-SUCH-SESSION",
                    cancelled_at=NOW,
                    initiator="tutor",
                    updated_at=NOW,
                )
            )


def changed_snapshot(data: dict[str, Any], start: datetime) -> tuple[dict[str, Any], pl.DataFrame]:
    """The next hour's snapshot of ``data``, and the sessions it changed: statuses updated,
    new sessions, one session moved before ``start`` (it must leave the store), and a new
    reschedule of one of the changed sessions."""
    sessions = data["sessions"]
    ids = pl.col("session_id")
    changed_ids = sessions.sort("scheduled_time", descending=True)["session_id"].head(5)
    updated = sessions.filter(ids.is_in(changed_ids.to_list())).with_columns(
        status=pl.lit("no_show"), updated_at=pl.col("updated_at") + timedelta(hours=1)
    )
    moved = updated.head(1).with_columns(scheduled_time=pl.lit(start) - timedelta(days=1))
    updated = pl.concat([moved, updated.slice(1)])
    fresh = sessions.head(3).with_columns(
        session_id=pl.format("NEW{}", pl.int_range(3)), scheduled_time=pl.lit(f.AS_OF)
    )
    changed = pl.concat([updated, fresh])
    everything = pl.concat([sessions.filter(~ids.is_in(changed["session_id"].to_list())), changed])
    extra = f.reschedules(fresh.with_columns(status=pl.lit("rescheduled"))).head(1)
    data = {**data, "sessions": everything, "reschedules": pl.concat([data["reschedules"], extra])}
    return data, changed


def test_a_delta_publish_ends_where_the_full_mirror_would(engine: sa.Engine) -> None:
    """Given only the changed sessions (and reschedules) and the previous publish's mark, the
    store ends exactly as a publish of the whole horizon leaves it; unchanged rows keep their
    stamps; sessions that fell out of the (advanced) horizon leave with their reschedules."""
    data = snapshot(600, 10)
    start = horizon_start(data["scores"], 120, now=NOW)
    assert start is not None
    first = publish(engine, data, horizon_start=start)
    assert first.mark is not None and not first.delta

    later = start + timedelta(days=30)  # the horizon moves on
    new, changed = changed_snapshot(data, later)
    changed_reschedules = new["reschedules"].join(changed, on="session_id", how="semi")
    changed_reschedules = changed_reschedules.filter(
        pl.col("session_id").is_in(
            new["sessions"].filter(pl.col("scheduled_time") >= later)["session_id"].to_list()
        )
    )
    before = dump(engine)
    delta = publish(
        engine,
        {**new, "sessions": changed, "reschedules": changed_reschedules},
        now=NOW + timedelta(hours=1),
        horizon_start=later,
        changed_since=first.mark,
    )
    assert delta.delta and delta.mark is not None
    assert delta.written["sessions"] == 4 + 3 and delta.written["tutor_scores"] == 0
    assert delta.deleted["sessions"] > 1 and delta.deleted["reschedules"] > 0
    after = dump(engine)
    unchanged = set(new["sessions"]["session_id"]) - set(changed["session_id"])
    stamps = {r["session_id"]: r["updated_at"] for r in before["sessions"]}
    assert all(
        stamps[r["session_id"]] == r["updated_at"]
        for r in after["sessions"]
        if r["session_id"] in unchanged
    )

    # The whole horizon published now changes nothing: the delta left exactly that state.
    full = publish(engine, new, now=NOW + timedelta(hours=2), horizon_start=later)
    assert set(full.written.values()) == {0} and set(full.deleted.values()) == {0}
    assert dump(engine) == after
    assert full.mark is not None and not full.mark.differs(delta.mark)


def test_a_delta_publish_on_a_store_that_moved_on_is_refused(engine: sa.Engine) -> None:
    """A delta needs the store as the mark left it, and a horizon that does not grow back:
    otherwise ``StaleMark`` and nothing written (the caller publishes the whole horizon)."""
    data = snapshot(300, 6)
    start = horizon_start(data["scores"], 120, now=NOW)
    assert start is not None
    mark = publish(engine, data, horizon_start=start).mark
    assert mark is not None
    new, changed = changed_snapshot(data, start)
    publish(engine, new, horizon_start=start, now=NOW + timedelta(hours=1))  # someone else
    before = dump(engine)
    nothing = {**new, "sessions": changed, "reschedules": new["reschedules"].clear()}
    with pytest.raises(p.StaleMark, match="changed since"):
        publish(engine, nothing, horizon_start=start, changed_since=mark)
    with pytest.raises(p.StaleMark, match="horizon"):
        publish(engine, nothing, horizon_start=start - timedelta(days=1), changed_since=mark)
    assert dump(engine) == before


def test_the_hourly_asset_ships_a_delta_that_ends_where_the_mirror_would(
    home: Any, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real assets: the next hour's `tutor_scores` on the same Dagster instance
    reads and ships only the later loads' sessions (metadata `delta`), and a whole-horizon
    mirror afterwards (a fresh instance: no mark) finds nothing to write or delete."""
    import dagster as dg
    from reliability._support import HISTORY_DAYS, T, build_drops, newly_risky_drops

    from tutor_scoring_dagster.defs.jobs import run_pipeline
    from tutor_scoring_dagster.defs.publish.assets import tutor_scores
    from tutor_scoring_dagster.defs.resources import default_resources

    monkeypatch.setenv("DATABASE_URL", store_url)
    build_drops(home.landing_dir)
    with dg.instance_for_test() as instance:
        first = run_pipeline(as_of=T, history_days=HISTORY_DAYS, instance=instance)
        assert first.success, first.render()
        assert first.value("tutor_scores", "delta") is False
        newly_risky_drops(home.landing_dir, tutors=("Z3",))
        for entity in ("sessions", "reschedules"):
            (home.landing_dir / f"{entity}_20260301T1130.csv").rename(
                home.landing_dir / f"{entity}_20260301T1230.csv"
            )
        later = run_pipeline(
            as_of=T + timedelta(hours=1), history_days=HISTORY_DAYS, instance=instance
        )
        assert later.success, later.render()
        assert later.value("tutor_scores", "delta") is True
        assert later.value("tutor_scores", "sessions_written") > 0
    with dg.instance_for_test() as fresh:
        mirror = dg.materialize([tutor_scores], resources=default_resources(), instance=fresh)
    meta = mirror.asset_materializations_for_node("tutor_scores")[0].metadata
    assert meta["delta"].value is False
    assert {k: v.value for k, v in meta.items() if k.endswith(("_written", "_deleted"))} == {
        f"{table}_{kind}": 0
        for table in ("tutors", "sessions", "reschedules", "tutor_scores", "tutor_risk_drivers")
        for kind in ("written", "deleted")
        if not (table == "tutors" and kind == "deleted")
    }
