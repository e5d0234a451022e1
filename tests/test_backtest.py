"""The backtest (issue #11) on a small planted warehouse whose answers are known by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tutor_scoring_dagster.backtest import RULES, SUMMARY_SCHEMA, run_backtest

D0 = date(2024, 1, 1)
DAYS = 200
START, END = D0 + timedelta(days=100), D0 + timedelta(days=DAYS - 1)
BURST = 150  # S2 moves the sessions of days 150 and 151
ONSET = 130  # D1 moves every session from day 130 on


def moved(tutor: str, day: int) -> bool:
    """Which of a tutor's daily sessions the tutor rescheduled."""
    if tutor == "S2":
        return day in (BURST, BURST + 1)
    if tutor == "D1":
        return day >= ONSET
    if tutor == "C1":
        return day % 2 == 0
    return False  # S1 and the unlabelled U never move a session


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    """One session a day at noon for each tutor over 200 days, as the two views read."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    sessions, reschedules = [], []
    for tutor in ("S1", "S2", "D1", "C1", "U"):
        for day in range(DAYS):
            at = datetime.combine(D0 + timedelta(days=day), datetime.min.time(), UTC)
            at += timedelta(hours=12)
            sid = f"{tutor}-{day}"
            is_moved = moved(tutor, day)
            status = "rescheduled" if is_moved else "completed"
            sessions.append(
                {"session_id": sid, "tutor_id": tutor, "scheduled_time": at, "status": status}
            )
            if is_moved:
                reschedules.append(
                    {
                        "session_id": sid,
                        "initiator": "tutor",
                        "reason_code": "other",
                        "cancelled_at": at - timedelta(hours=30),
                        "hours_before_session": 30.0,
                    }
                )
    con.register("s", pl.DataFrame(sessions))
    con.register("r", pl.DataFrame(reschedules))
    con.execute("CREATE TABLE sessions AS SELECT * FROM s")
    con.execute("CREATE TABLE reschedules AS SELECT * FROM r")
    yield con
    con.close()


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("truth") / "ground_truth.csv"
    pl.DataFrame(
        {
            "tutor_id": ["S1", "S2", "D1", "C1"],
            "profile": ["reliable", "near_threshold", "deteriorating", "chronic"],
            "true_reschedule_rate": [0.03, 0.11, 0.35, 0.5],
            "onset": [None, None, (D0 + timedelta(days=ONSET)).isoformat(), None],
            "true_no_show_rate": [0.02] * 4,  # other columns of the file are ignored
        }
    ).write_csv(path)
    return path


def rows(summary: pl.DataFrame) -> dict[str, dict[str, object]]:
    return {r["rule"]: r for r in summary.iter_rows(named=True)}


def test_planted_answers(con: duckdb.DuckDBPyConnection, labels: Path) -> None:
    result = run_backtest(con, START, END, labels=labels)
    assert result.summary.schema == pl.Schema(SUMMARY_SCHEMA)
    got = rows(result.summary)
    assert list(got) == list(RULES)
    for r in got.values():
        assert r["tutor_days"] == 5 * 100
        assert r["steady_tutor_days"] == 2 * 100
        assert r["chronic_flagged_share"] == 1.0  # 1 of 2 sessions moved: flagged every day
        assert r["deteriorating_tutors"] == 1
    # S2's two moves in a row: the original flags the 6 days whose 7-day window holds both
    # (2/7 > 15%). S2 never moved in the 90 days before, so the CUSUM judges the first move
    # against the floor 2% (ln 20 = 2.996, just below h = 3), the second against 3/110
    # (ln 14.67): 5.68, and each kept session after them against 4/110 (-0.474): above 3
    # for 5 more kept sessions, 6 days as well. A tutor who never moves and then moves
    # twice in a row is exactly what the early warning is for.
    assert got["original"]["steady_false_alarm_days"] == 6
    assert got["min_sessions_5"]["steady_false_alarm_days"] == 6
    assert got["watch_or_high"]["steady_false_alarm_days"] == 6
    assert got["high"]["steady_false_alarm_days"] == 0
    assert got["watch_or_high"]["false_alarms_vs_original"] == 1.0
    assert got["watch_or_high"]["near_threshold_flagged_share"] == pytest.approx(0.06)
    # D1: the onset day's move alone is 1/7 (and ln 20 < h); the second move flags both rules
    # a day later.
    assert got["original"]["median_delay_days"] == 1.0
    assert got["watch_or_high"]["median_delay_days"] == 1.0
    assert got["watch_or_high"]["median_delay_vs_original_days"] == 0.0
    assert got["watch_or_high"]["recall_21d"] == 1.0
    # Confirmation takes longer than the early warning.
    high_delay = got["high"]["median_delay_days"]
    assert high_delay is None or float(high_delay) > 1  # type: ignore[arg-type]
    # The planted set misses the goal's false-alarm ratio (1.0 > 0.25), and says so.
    assert any("false alarms" in f for f in result.goal_failures())


def test_daily_flags_of_the_burst(con: duckdb.DuckDBPyConnection) -> None:
    daily = run_backtest(con, START, END).daily.filter(pl.col("tutor_id") == "S2")
    burst = D0 + timedelta(days=BURST)

    def flagged_days(rule: str) -> list[int]:
        days = daily.filter(pl.col(rule)).get_column("day").to_list()
        return [(d - burst).days for d in days]

    assert flagged_days("original") == [1, 2, 3, 4, 5, 6]
    assert flagged_days("watch_or_high") == [1, 2, 3, 4, 5, 6]
    statistic = daily.filter(pl.col("day") >= burst).get_column("cusum_statistic").to_list()
    first, second, kept = math.log(20), math.log(0.4 * 110 / 3), math.log(0.6 / (1 - 4 / 110))
    assert statistic[:8] == pytest.approx([first] + [first + second + d * kept for d in range(7)])


def test_without_labels_and_every_other_day(con: duckdb.DuckDBPyConnection) -> None:
    result = run_backtest(con, START, END, every_days=2)
    got = rows(result.summary)
    assert got["original"]["tutor_days"] == 5 * 50
    assert got["original"]["recall_21d"] is None
    assert result.daily.get_column("day").n_unique() == 50
    assert result.goal_failures() == ["no labels: the goal cannot be checked"]


def test_renderers(con: duckdb.DuckDBPyConnection, labels: Path) -> None:
    result = run_backtest(con, START, END, labels=labels)
    table = result.to_markdown().splitlines()
    assert table[0].startswith("| rule | flagged tutor-days |")
    assert len(table) == 2 + len(RULES)
    assert table[4].startswith("| watch_or_high |")
    data = json.loads(result.to_json())
    assert data["start"] == START.isoformat() and data["params"]["cusum_h"] == 3.0
    assert [r["rule"] for r in data["summary"]] == list(RULES)
    assert data["definitions"]["steady"].endswith("true_reschedule_rate <= 0.12")


def test_bad_arguments(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(ValueError):
        run_backtest(con, END, START)
    with pytest.raises(ValueError):
        run_backtest(con, START, END, every_days=0)
