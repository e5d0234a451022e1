"""Scores computed by hand: window edges, reschedules, empty windows, the risk rule, Wilson
bounds and trends, through the same warehouse functions the assets call."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import Any

import polars as pl
import pytest

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.ingest import ingest_landing
from tutor_scoring_dagster.schemas import score_columns
from tutor_scoring_dagster.scoring import (
    RiskRule,
    ScoresInvalid,
    compute_scores,
    partition_as_of,
    score_as_of,
    score_days,
    validate_scores,
    wilson_lower_bound_scalar,
)

US = timedelta(microseconds=1)


def iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Drops:
    """Sessions and reschedules of a small hand-made platform export."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    reschedules: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self, sid: str, tutor: str, at: datetime, status: str = "completed", moved_by: str = ""
    ) -> None:
        self.sessions.append(
            {"session_id": sid, "tutor_id": tutor, "scheduled_time": iso(at), "status": status}
        )
        if moved_by:
            self.reschedules.append(
                {
                    "session_id": sid,
                    "initiator": moved_by,
                    "original_time": iso(at),
                    "cancelled_at": iso(at - timedelta(days=1)),
                }
            )

    def load(self, home: Settings) -> Path:
        """Write the drops as CSV, ingest them, and return the warehouse file."""
        home.landing_dir.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(self.sessions).write_csv(home.landing_dir / "sessions_1.csv")
        if self.reschedules:
            pl.DataFrame(self.reschedules).write_csv(home.landing_dir / "reschedules_1.csv")
        with warehouse.connect(home.warehouse) as con:
            warehouse.ensure_schema(con)
            report = ingest_landing(
                con,
                home.landing_dir,
                archive_dir=home.archive_dir,
                quarantine_dir=home.quarantine_dir,
            )
        assert report.count("loaded") == 1 + bool(self.reschedules), report
        assert report.rows_rejected == 0
        return home.warehouse


def by_tutor(scores: pl.DataFrame) -> dict[str, dict[str, Any]]:
    assert scores.get_column("tutor_id").is_unique().all()
    return {row["tutor_id"]: row for row in scores.iter_rows(named=True)}


# The daily path (T at midnight) and the hourly path (T at any instant) share every rule.
AS_OF = [datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 1, 13, 37, 5, 250_000, tzinfo=UTC)]


def snapshot(home: Settings, as_of: datetime, rule: RiskRule) -> dict[str, dict[str, Any]]:
    with warehouse.connect(home.warehouse) as con:
        if as_of == partition_as_of(as_of.date() - timedelta(days=1)):
            day = as_of.date() - timedelta(days=1)
            scores = score_days(con, day, day, rule)
        else:
            scores = score_as_of(con, as_of, rule)
    assert scores.columns == score_columns()
    assert (scores.get_column("as_of") == as_of).all()
    return by_tutor(scores)


@pytest.mark.parametrize("as_of", AS_OF, ids=["midnight", "mid-hour"])
def test_window_edges_and_reschedules(home: Settings, as_of: datetime) -> None:
    d = Drops()
    # Edges: T - W counts, one microsecond earlier does not; T itself and the future never do.
    d.add("a1", "A", as_of - timedelta(days=7))
    d.add("a2", "A", as_of - timedelta(days=7) - US)
    d.add("a3", "A", as_of - US, status="no_show")
    d.add("a4", "A", as_of)
    d.add("a5", "A", as_of + timedelta(days=2), moved_by="tutor")
    d.add("a6", "A", as_of - timedelta(days=90), status="no_show")
    d.add("a7", "A", as_of - timedelta(days=90) - US, moved_by="tutor")
    # Moved by the student only: a rate of 0, not null.
    d.add("b1", "B", as_of - timedelta(days=2), status="rescheduled", moved_by="student")
    # Moved by the tutor, then held: still a tutor reschedule.
    d.add("c1", "C", as_of - timedelta(days=3), status="completed", moved_by="tutor")
    d.add("c2", "C", as_of - timedelta(days=3), status="completed", moved_by="student")
    # Only an old session: empty 7- and 30-day windows have null rates.
    d.add("e1", "E", as_of - timedelta(days=45))
    # Only sessions at or after T: not scored at all yet.
    d.add("f1", "F", as_of)
    d.add("f2", "F", as_of + timedelta(hours=1))
    d.load(home)
    rule = RiskRule(threshold=0.15, min_sessions=1)
    rows = snapshot(home, as_of, rule)

    assert set(rows) == {"A", "B", "C", "E"}
    a = rows["A"]
    assert (a["total_sessions_7d"], a["total_sessions_30d"], a["total_sessions_90d"]) == (2, 3, 4)
    assert (a["no_shows_7d"], a["no_shows_30d"], a["no_shows_90d"]) == (1, 1, 2)
    assert (a["tutor_reschedules_7d"], a["tutor_reschedules_90d"]) == (0, 0)
    assert a["reschedule_rate_90d"] == 0.0
    assert a["no_show_rate_90d"] == 0.5
    assert a["is_high_risk"] is False and a["risk_status"] == "ok"

    b = rows["B"]
    assert (b["total_sessions_7d"], b["tutor_reschedules_7d"]) == (1, 0)
    assert b["reschedule_rate_7d"] == 0.0 and b["reschedule_rate_7d_lower95"] == 0.0

    c = rows["C"]
    assert (c["total_sessions_7d"], c["tutor_reschedules_7d"]) == (2, 1)
    assert c["reschedule_rate_7d"] == 0.5
    assert c["is_high_risk"] is True and c["risk_status"] == "high"

    e = rows["E"]
    assert (e["total_sessions_7d"], e["total_sessions_30d"], e["total_sessions_90d"]) == (0, 0, 1)
    for w in (7, 30):
        for name in ("reschedule_rate", "no_show_rate"):
            assert e[f"{name}_{w}d"] is None and e[f"{name}_{w}d_lower95"] is None
    assert e["reschedule_rate_90d"] == 0.0
    assert e["reschedule_rate_30d_change_7d"] is None

    for row in rows.values():
        assert (row["risk_threshold"], row["min_sessions"]) == (0.15, 1)


@pytest.mark.parametrize("as_of", AS_OF, ids=["midnight", "mid-hour"])
def test_risk_rule_min_sessions_and_threshold(home: Settings, as_of: datetime) -> None:
    d = Drops()

    def tutor(name: str, sessions: int, moved: int) -> None:
        for i in range(sessions):
            when = as_of - timedelta(days=1, hours=i)
            d.add(f"{name}{i}", name, when, moved_by="tutor" if i < moved else "")

    tutor("EXACTLY_MIN", 5, 1)  # 1/5 = 20% with exactly min_sessions: high
    tutor("ONE_SHORT", 4, 4)  # 100%, but 4 sessions: insufficient data, not high
    tutor("AT_THRESHOLD", 20, 3)  # exactly 15% is not above the threshold
    tutor("JUST_ABOVE", 20, 4)
    tutor("RELIABLE", 6, 0)
    d.load(home)
    rows = snapshot(home, as_of, RiskRule(threshold=0.15, min_sessions=5))

    assert rows["EXACTLY_MIN"]["is_high_risk"] is True
    assert rows["EXACTLY_MIN"]["risk_status"] == "high"
    assert rows["ONE_SHORT"]["is_high_risk"] is False
    assert rows["ONE_SHORT"]["risk_status"] == "insufficient_data"
    assert rows["ONE_SHORT"]["reschedule_rate_7d"] == 1.0
    assert rows["AT_THRESHOLD"]["reschedule_rate_7d"] == 0.15
    assert rows["AT_THRESHOLD"]["risk_status"] == "ok"
    assert rows["JUST_ABOVE"]["risk_status"] == "high"
    assert rows["RELIABLE"]["risk_status"] == "ok"
    assert all(r["risk_threshold"] == 0.15 and r["min_sessions"] == 5 for r in rows.values())

    # min_sessions = 1 is the original system's rule: any rate above the threshold.
    original = snapshot(home, as_of, RiskRule(threshold=0.15, min_sessions=1))
    assert original["ONE_SHORT"]["risk_status"] == "high"
    assert original["AT_THRESHOLD"]["risk_status"] == "ok"


def wilson_reference(successes: int, trials: int) -> float:
    """The Wilson score interval's lower end, from its textbook form."""
    z = NormalDist().inv_cdf(0.975)
    p = successes / trials
    return (
        p + z * z / (2 * trials) - z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    ) / (1 + z * z / trials)


@pytest.mark.parametrize(
    ("successes", "trials", "published"),
    [(10, 10, 0.7225), (0, 10, 0.0), (2, 3, 0.2077), (200, 300, 0.6115), (1, 20, 0.0089)],
)
def test_wilson_lower_bound(successes: int, trials: int, published: float) -> None:
    bound = wilson_lower_bound_scalar(successes, trials)
    assert bound is not None
    assert bound == pytest.approx(wilson_reference(successes, trials), abs=1e-12)
    assert bound == pytest.approx(published, abs=5e-5)
    assert wilson_lower_bound_scalar(0, 0) is None


def test_wilson_bound_in_scores_matches_reference(home: Settings) -> None:
    as_of = AS_OF[1]
    d = Drops()
    for i in range(3):
        d.add(f"w{i}", "W", as_of - timedelta(days=1, hours=i), moved_by="tutor" if i else "")
    d.load(home)
    w = snapshot(home, as_of, RiskRule())["W"]
    assert w["reschedule_rate_7d"] == pytest.approx(2 / 3)
    assert w["reschedule_rate_7d_lower95"] == pytest.approx(wilson_reference(2, 3), abs=1e-12)
    assert w["reschedule_rate_7d_lower95"] <= w["reschedule_rate_7d"]


def test_trend_and_flags_against_the_day_before(home: Settings) -> None:
    d = Drops()
    d.add("d1", "D", datetime(2024, 2, 1, 10, tzinfo=UTC))
    d.add("d2", "D", datetime(2024, 2, 10, 10, tzinfo=UTC), moved_by="tutor")
    d.load(home)
    rule = RiskRule(threshold=0.15, min_sessions=1)
    with warehouse.connect(home.warehouse) as con:
        daily = score_days(con, date(2024, 1, 25), date(2024, 5, 12), rule)
        hourly = {
            day: score_as_of(con, partition_as_of(day), rule)
            for day in (date(2024, 2, 10), date(2024, 5, 10))
        }
    rows = {r["as_of"].date() - timedelta(days=1): r for r in daily.iter_rows(named=True)}
    assert min(rows) == date(2024, 2, 1)  # scored from the first session's day on

    def flags(day: date) -> tuple[bool, bool, bool]:
        r = rows[day]
        return r["is_high_risk"], r["newly_high_risk"], r["no_longer_high_risk"]

    assert flags(date(2024, 2, 9)) == (False, False, False)
    assert flags(date(2024, 2, 10)) == (True, True, False)
    assert flags(date(2024, 2, 11)) == (True, False, False)
    # The moved session leaves the 90-day window 90 days after its day.
    assert flags(date(2024, 5, 9)) == (True, False, False)
    assert flags(date(2024, 5, 10)) == (False, False, True)
    assert rows[date(2024, 5, 10)]["risk_status"] == "insufficient_data"
    # Change of the 30-day rate against the snapshot 7 days earlier.
    assert rows[date(2024, 2, 10)]["reschedule_rate_30d_change_7d"] == 0.5  # 1/2 - 0/1
    assert rows[date(2024, 2, 5)]["reschedule_rate_30d_change_7d"] is None  # nothing a week ago
    assert rows[date(2024, 2, 17)]["reschedule_rate_30d_change_7d"] == 0.0
    # The hourly path at midnight gives the daily partition's row, to the last bit.
    for day, snap in hourly.items():
        assert snap.to_dicts() == [rows[day]]


def test_compute_scores_rejects_bad_input() -> None:
    activity = pl.DataFrame(
        {
            "tutor_id": ["A", "A"],
            "activity_date": [date(2024, 1, 1)] * 2,
            "sessions": [1, 2],
            "tutor_reschedules": [0, 0],
            "no_shows": [0, 0],
        }
    )
    first = pl.DataFrame({"tutor_id": ["A"], "first_activity_date": [date(2024, 1, 1)]})
    with pytest.raises(ValueError, match="one row per tutor and day"):
        compute_scores(activity, first, [date(2024, 1, 2)], offset=timedelta(0), rule=RiskRule())
    with pytest.raises(ValueError, match="consecutive"):
        compute_scores(
            activity[:1],
            first,
            [date(2024, 1, 2), date(2024, 1, 4)],
            offset=timedelta(0),
            rule=RiskRule(),
        )
    empty = compute_scores(
        activity[:0], first[:0], [date(2024, 1, 2)], offset=timedelta(0), rule=RiskRule()
    )
    assert empty.height == 0 and empty.columns == score_columns()
    validate_scores(empty)


def test_validation_reports_every_broken_rule() -> None:
    activity = pl.DataFrame(
        {
            "tutor_id": ["A", "B"],
            "activity_date": [date(2024, 1, 1)] * 2,
            "sessions": [4, 2],
            "tutor_reschedules": [1, 0],
            "no_shows": [0, 1],
        }
    )
    first = activity.select("tutor_id", pl.col("activity_date").alias("first_activity_date"))
    scores = compute_scores(
        activity, first, [date(2024, 1, 1)], offset=timedelta(0), rule=RiskRule(min_sessions=1)
    )
    validate_scores(scores)
    broken = scores.with_columns(
        pl.when(pl.col("tutor_id") == "A")
        .then(0.9)
        .otherwise(pl.col("reschedule_rate_7d"))
        .alias("reschedule_rate_7d"),
        pl.when(pl.col("tutor_id") == "B")
        .then(pl.lit(True))
        .otherwise(pl.col("is_high_risk"))
        .alias("is_high_risk"),
    )
    with pytest.raises(ScoresInvalid) as caught:
        validate_scores(broken)
    checks = set(caught.value.failure_cases.get_column("check").cast(pl.String))
    assert "rate = numerator / total, null only when the window is empty" in checks
    assert "risk follows the rule kept on the row" in checks
