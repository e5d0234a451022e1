"""The read queries of the serving store (what the original REST API offered), on SQLite and a
throwaway Postgres database: filters, sort orders, pagination edges, lookups, history."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
import test_store_frames as f

from tutor_scoring_dagster.store import reads
from tutor_scoring_dagster.store.publish import (
    create_store_engine,
    publish_current,
    publish_history,
)

N_TUTORS = 40
UNSCORED = "T09999"  # in the tutors export, no session yet
HISTORY_FROM = f.AS_OF.date() - timedelta(days=60)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def published(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sa.Engine, dict[str, pl.DataFrame]]]:
    """A store holding a snapshot of N_TUTORS tutors, their sessions and 60 days of history,
    published once per database for the whole module (the tests only read it)."""
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('reads') / 'store.sqlite'}", None
    else:
        admin: sa.Engine = request.getfixturevalue("pg_admin")
        name = f"tutor_scoring_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    sessions = f.sessions(3_000, N_TUTORS)
    unscored = pl.DataFrame({"tutor_id": [UNSCORED], "name": ["Newcomer"]})
    data = {
        "tutors": pl.concat([f.tutors(N_TUTORS), unscored], how="diagonal_relaxed").with_columns(
            pl.col("is_active").fill_null(True), pl.col("in_tutors_export").fill_null(True)
        ),
        "sessions": sessions,
        "reschedules": f.reschedules(sessions),
        # With the name the tutors export gives; T00000's windows are empty (null rates).
        "scores": f.scores(N_TUTORS).with_columns(name=pl.format("Tutor {}", "tutor_id")),
    }
    engine = create_store_engine(url)
    publish_current(
        engine,
        **{k: v.drop("name") if k == "scores" else v for k, v in data.items()},
        horizon_start=None,
        now=f.AS_OF,
    )
    history = f.history(N_TUTORS, HISTORY_FROM, 60)
    publish_history(engine, history, HISTORY_FROM, HISTORY_FROM + timedelta(59), now=f.AS_OF)
    yield engine, {**data, "history": history}
    engine.dispose()
    if drop is not None:
        with admin.connect() as conn:
            conn.execute(sa.text(drop))


def expected_order(
    scores: pl.DataFrame, risk_status: str | None, sort_by: str, order: str
) -> list[str]:
    if risk_status is not None:
        scores = scores.filter(pl.col("risk_status") == risk_status)
    ranked = scores.sort(
        [sort_by, "tutor_id"], descending=[order == "desc", False], nulls_last=True
    )
    return ranked["tutor_id"].to_list()


@pytest.mark.parametrize(
    ("risk_status", "sort_by", "order"),
    [
        (None, "reschedule_rate_30d", "desc"),
        (None, "reschedule_rate_30d", "asc"),
        ("high", "total_sessions_90d", "desc"),
        ("ok", "no_show_rate_7d", "asc"),
        ("insufficient_data", "reschedule_rate_7d", "desc"),
        (None, "name", "asc"),
    ],
)
def test_list_tutors_filters_and_sorts_like_the_api(
    published: tuple[sa.Engine, dict[str, pl.DataFrame]],
    risk_status: str | None,
    sort_by: str,
    order: str,
) -> None:
    engine, data = published
    want = expected_order(data["scores"], risk_status, sort_by, order)
    assert want, "each filter should match some tutors"
    page = reads.list_tutors(
        engine, risk_status=risk_status, sort_by=sort_by, order=order, limit=1000
    )
    assert [row["tutor_id"] for row in page.tutors] == want
    assert page.total == len(want) and (page.limit, page.offset) == (1000, 0)
    row = page.tutors[0]
    assert {"name", "email", "is_active", "risk_status", "reschedule_rate_30d"} <= row.keys()
    assert row["as_of"] == f.AS_OF  # an aware UTC datetime on every database


@pytest.mark.parametrize("tier", ["high", "watch", "ok", "insufficient_data"])
def test_list_tutors_filters_by_risk_tier(
    published: tuple[sa.Engine, dict[str, pl.DataFrame]], tier: str
) -> None:
    engine, data = published
    want = data["scores"].filter(pl.col("risk_tier") == tier).sort("tutor_id")
    assert want.height > 0
    page = reads.list_tutors(engine, risk_tier=tier, sort_by="tutor_id", order="asc", limit=1000)
    assert [r["tutor_id"] for r in page.tutors] == want.get_column("tutor_id").to_list()
    assert page.total == want.height
    assert {r["risk_tier"] for r in page.tutors} == {tier}
    both = reads.list_tutors(engine, risk_status="high", risk_tier=tier, limit=1000)
    assert both.total == want.filter(pl.col("risk_status") == "high").height


def test_the_default_order_puts_empty_windows_last(
    published: tuple[sa.Engine, dict[str, pl.DataFrame]],
) -> None:
    engine, _ = published
    rates = [row["reschedule_rate_30d"] for row in reads.list_tutors(engine, limit=1000).tutors]
    known = [r for r in rates if r is not None]
    assert known == sorted(known, reverse=True)
    assert rates[len(known) :] == [None] * (len(rates) - len(known))
    assert None in rates


def test_pagination_edges(published: tuple[sa.Engine, dict[str, pl.DataFrame]]) -> None:
    engine, data = published
    everyone = [row["tutor_id"] for row in reads.list_tutors(engine, limit=1000).tutors]
    pages = [reads.list_tutors(engine, limit=7, offset=o) for o in range(0, N_TUTORS + 7, 7)]
    assert [row["tutor_id"] for p in pages for row in p.tutors] == everyone
    assert [len(p.tutors) for p in pages][-2:] == [N_TUTORS % 7, 0]
    past_the_end = reads.list_tutors(engine, limit=10, offset=10_000)
    assert past_the_end.tutors == [] and past_the_end.total == N_TUTORS
    nothing = reads.list_tutors(engine, risk_status="high", limit=0)
    high = expected_order(data["scores"], "high", "tutor_id", "asc")
    assert nothing.tutors == [] and nothing.total == len(high) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sort_by": "salary"}, "cannot sort tutors by 'salary'; allowed: tutor_id, as_of, "),
        ({"risk_status": "low_risk"}, "unknown risk status 'low_risk'; allowed: high, ok, "),
        ({"order": "up"}, "unknown sort order 'up'; allowed: asc, desc"),
        ({"risk_tier": "amber"}, "unknown risk tier 'amber'; allowed: high, watch, ok, "),
        ({"limit": -1}, "limit must be 0 or more, got -1"),
        ({"offset": -5}, "offset must be 0 or more, got -5"),
    ],
)
def test_list_tutors_refuses_bad_arguments_in_one_line(
    kwargs: dict[str, Any], message: str, tmp_path: Any
) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'never_opened.sqlite'}")
    with pytest.raises(ValueError) as caught:
        reads.list_tutors(engine, **kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    if "sort_by" in kwargs:
        assert str(caught.value).endswith(", name")
        assert "reschedule_rate_30d" in str(caught.value)


def test_tutor_detail(published: tuple[sa.Engine, dict[str, pl.DataFrame]]) -> None:
    engine, data = published
    detail = reads.tutor_detail(engine, "T00003")
    assert detail.tutor["name"] == "Tutor T00003"
    want = data["scores"].filter(pl.col("tutor_id") == "T00003").row(0, named=True)
    assert detail.scores is not None
    assert {k: detail.scores[k] for k in want if k != "name"} == {
        k: v for k, v in want.items() if k != "name"
    }
    mine = data["sessions"].filter(pl.col("tutor_id") == "T00003")
    stats = detail.statistics
    assert stats["sessions"] == mine.height
    assert stats["sessions_by_status"] == dict(mine["status"].value_counts().sort("status").rows())
    assert stats["first_scheduled"] == mine["scheduled_time"].min()
    assert stats["last_scheduled"] == mine["scheduled_time"].max()
    moved = data["reschedules"].join(mine.select("session_id"), on="session_id", how="semi")
    assert stats["reschedules_by_initiator"] == dict(
        moved["initiator"].value_counts().sort("initiator").rows()
    )
    assert set(stats["reschedules_by_initiator"]) == {"student", "tutor"}
    assert stats["mean_hours_notice_by_initiator"] == {"student": 5.0, "tutor": 5.0}

    newcomer = reads.tutor_detail(engine, UNSCORED)
    assert newcomer.scores is None and newcomer.statistics["sessions"] == 0
    with pytest.raises(LookupError, match="no tutor 'T77777' in the serving store"):
        reads.tutor_detail(engine, "T77777")


def test_tutor_history(published: tuple[sa.Engine, dict[str, pl.DataFrame]]) -> None:
    engine, data = published
    until = datetime.combine(HISTORY_FROM + timedelta(50), datetime.min.time(), f.AS_OF.tzinfo)
    # 150 days: further back than the stored history (60 days) reaches.
    history = reads.tutor_history(engine, "T00004", days=150, limit=3, until=until)
    assert (history.since, history.until) == (until - timedelta(days=150), until)

    moves = (
        data["reschedules"]
        .join(data["sessions"].select("session_id", "tutor_id"), on="session_id")
        .filter(
            (pl.col("tutor_id") == "T00004")
            & pl.col("cancelled_at").is_between(history.since, until, closed="left")
        )
        .sort(["cancelled_at", "session_id"], descending=[True, False])
    )
    assert moves.height > 3
    assert [r["session_id"] for r in history.reschedules] == moves["session_id"].head(3).to_list()
    assert history.reschedules[0]["cancelled_at"] == moves["cancelled_at"][0]
    assert {"scheduled_time", "status", "initiator", "reason"} <= history.reschedules[0].keys()

    days = [p["score_date"] for p in history.trend]
    assert days == [HISTORY_FROM + timedelta(d) for d in range(51)]  # the stored ones
    mine = data["history"].filter(pl.col("tutor_id") == "T00004")
    first = mine.filter(pl.col("as_of").dt.date() == HISTORY_FROM + timedelta(1))
    assert history.trend[0]["reschedule_rate_30d"] == first["reschedule_rate_30d"][0]
    assert set(history.trend[0]) == {"score_date", *reads.TREND_FIELDS}

    assert reads.tutor_history(engine, "T00004", days=30, limit=0, until=until).reschedules == []
    with pytest.raises(LookupError, match="T77777"):
        reads.tutor_history(engine, "T77777")
    with pytest.raises(ValueError, match="days must be at least 1"):
        reads.tutor_history(engine, "T00004", days=0)


def test_every_read_is_backed_by_an_index(
    published: tuple[sa.Engine, dict[str, pl.DataFrame]],
) -> None:
    engine, _ = published
    statements: list[tuple[str, Any]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, params))

    reads.list_tutors(engine, risk_status="high", limit=10, offset=5)
    reads.tutor_detail(engine, "T00003")
    reads.tutor_history(engine, "T00003", days=90)
    sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(statements) >= 7
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # With sequential scans priced out, one left in a plan means no index could serve.
            conn.exec_driver_sql("SET enable_seqscan = off")
            for statement, params in statements:
                rows = conn.exec_driver_sql("EXPLAIN " + statement, params)
                plan = "\n".join(r[0] for r in rows)
                assert "Seq Scan" not in plan, plan
        else:
            for statement, params in statements:
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                plan = "\n".join(r[-1] for r in rows)
                assert not re.search(r"^SCAN \w+$", plan, re.MULTILINE), plan  # a full scan


def test_dates_of_the_trend_are_dates(
    published: tuple[sa.Engine, dict[str, pl.DataFrame]],
) -> None:
    engine, _ = published
    point = reads.tutor_history(engine, "T00001", days=3, until=f.AS_OF - timedelta(days=2)).trend
    assert point and all(isinstance(p["score_date"], date) for p in point)
