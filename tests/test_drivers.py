"""Drivers of a flagged tutor's risk and the recommended actions (issue #11), on small frames
whose values are computed by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandera.errors
import polars as pl
import pytest

from tutor_scoring_dagster.drivers import (
    ACTION_SCHEMA,
    DRIVER_SCHEMA,
    DRIVERS,
    RULES_PATH,
    DriverParams,
    compute_drivers,
    load_action_rules,
    recommend_actions,
)
from tutor_scoring_dagster.risk_tiers import EVENT_SCHEMA, TIER_SCHEMA

T = datetime(2024, 6, 1, tzinfo=UTC)
UTC_US = pl.Datetime("us", "UTC")


def session(
    tutor: str,
    days_ago: float,
    *,
    moved: bool = False,
    notice: float | None = None,
    reason: str | None = None,
    no_show: bool = False,
) -> dict[str, object]:
    return {
        "tutor_id": tutor,
        "scheduled_time": T - timedelta(days=days_ago),
        "moved_by_tutor": moved,
        "no_show": no_show,
        "reason_code": reason,
        "notice_hours": notice,
    }


def build_events() -> pl.DataFrame:
    rows = [
        # A, last 7 days: 5 sessions, 3 moved (two double-booked at short notice, one unknown).
        session("A", 1, moved=True, notice=2, reason="double_booked"),
        session("A", 2, moved=True, notice=5, reason="double_booked"),
        session("A", 3, moved=True),
        session("A", 4),
        session("A", 5),
        # A, 8..29 days ago: 5 kept sessions, one a no-show; 40..58 days ago: 10 kept.
        *(session("A", d, no_show=d == 8) for d in (8, 12, 16, 20, 24)),
        *(session("A", 40 + 2 * i) for i in range(10)),
        # B: 10 sessions, one moved with two days' notice for illness.
        session("B", 3, moved=True, notice=48, reason="illness"),
        *(session("B", d) for d in range(4, 13)),
        # C: 10 kept sessions, one a no-show.
        *(session("C", d, no_show=d == 2) for d in range(1, 11)),
        # Outside the 30-day window and not read by anyone's 30-day drivers.
        session("B", 45, moved=True, notice=1, reason="other"),
    ]
    frame = pl.DataFrame(rows).with_columns(
        pl.format("s{}", pl.int_range(pl.len())).alias("session_id")
    )
    return frame.select(list(EVENT_SCHEMA)).cast(pl.Schema(EVENT_SCHEMA))


def flagged(*tutors: str) -> pl.DataFrame:
    return pl.DataFrame(
        {"tutor_id": list(tutors), "as_of": [T] * len(tutors)}, schema_overrides={"as_of": UTC_US}
    )


def by_driver(drivers: pl.DataFrame, tutor: str) -> dict[str, dict[str, object]]:
    rows = drivers.filter(pl.col("tutor_id") == tutor).iter_rows(named=True)
    return {r["driver"]: r for r in rows}


def test_drivers_against_the_population() -> None:
    drivers = compute_drivers(build_events(), flagged("A", "C"))
    assert drivers.schema == pl.Schema(DRIVER_SCHEMA)
    a = by_driver(drivers, "A")
    assert set(a) == set(DRIVERS)
    # Population over 30 days: 30 sessions, 4 moved; notice known for 3, short for 2;
    # reasons known for 3 (double_booked 2, illness 1); 2 no-shows.
    assert (a["short_notice"]["tutor_value"], a["short_notice"]["population_value"]) == (
        pytest.approx(1.0),
        pytest.approx(2 / 3),
    )
    assert a["short_notice"]["lift"] == pytest.approx(1.5)
    assert (a["short_notice"]["tutor_count"], a["short_notice"]["tutor_base"]) == (2, 2)
    assert a["reason_code"]["detail"] == "double_booked"
    assert a["reason_code"]["tutor_value"] == pytest.approx(1.0)
    assert a["reason_code"]["population_value"] == pytest.approx(2 / 3)
    assert a["no_show"]["tutor_value"] == pytest.approx(0.1)
    assert a["no_show"]["lift"] == pytest.approx(0.1 / (2 / 30))
    assert a["reschedule_rate"]["tutor_value"] == pytest.approx(0.3)
    assert a["reschedule_rate"]["population_value"] == pytest.approx(4 / 30)
    assert a["reason_code"]["description"] == (
        "'double_booked' given for 100% of reschedules (population 67%)"
    )


def test_trend_is_against_the_tutors_own_past_with_a_floor_on_the_lift() -> None:
    a = by_driver(compute_drivers(build_events(), flagged("A")), "A")["trend"]
    # Last 7 days 3 of 5 moved; the 83 days before: 0 of 15, so the lift uses the 1% floor.
    assert (a["tutor_value"], a["population_value"]) == (pytest.approx(0.6), 0.0)
    assert a["lift"] == pytest.approx(0.6 / 0.01)
    assert a["description"] == "60% rescheduled in the last 7 days (previous 83 days: 0%)"


def test_a_driver_without_a_base_has_no_row() -> None:
    c = by_driver(compute_drivers(build_events(), flagged("C")), "C")
    # C never moved a session: no notice, no reason.
    assert set(c) == {"no_show", "reschedule_rate", "trend"}
    assert (c["trend"]["tutor_base"], c["trend"]["population_value"]) == (7, 0.0)
    # With a 10-day recent window C has no earlier session: no reference, no lift.
    recent = compute_drivers(build_events(), flagged("C"), DriverParams(trend_recent_days=10))
    trend = by_driver(recent, "C")["trend"]
    assert trend["population_value"] is None and trend["lift"] is None
    assert compute_drivers(build_events(), flagged()).is_empty()


def test_a_longer_window_reads_older_sessions() -> None:
    b = by_driver(compute_drivers(build_events(), flagged("B"), DriverParams(window_days=60)), "B")
    assert b["short_notice"]["tutor_count"] == 1 and b["short_notice"]["tutor_base"] == 2


def test_the_reviewed_rule_file_is_valid() -> None:
    rules = load_action_rules()
    assert RULES_PATH.name == "recommended_actions.csv"
    assert set(rules.get_column("driver").unique().to_list()) == set(DRIVERS)
    # A catch-all rule guarantees every flagged tutor with a recent session gets an action.
    catch_all = rules.filter(pl.col("min_lift") == 0, pl.col("min_tutor_count") == 0)
    assert catch_all.height >= 1


def test_a_broken_rule_file_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "rules.csv"
    bad.write_text(
        "rule_id,driver,detail,min_lift,min_tutor_value,min_tutor_count,priority,action\n"
        "x,weather,,1,0,0,1,Buy an umbrella\n",
        encoding="utf-8",
    )
    with pytest.raises(pandera.errors.SchemaErrors):
        load_action_rules(bad)


def tiers(rows: list[tuple[str, str, datetime | None, bool, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "tutor_id": [r[0] for r in rows],
            "as_of": [T] * len(rows),
            "risk_tier": [r[1] for r in rows],
            "risk_probability": [r[4] for r in rows],
            "cusum_statistic": [2.0] * len(rows),
            "watch_since": [r[2] for r in rows],
            "newly_flagged": [r[3] for r in rows],
            "prior_alpha": [1.0] * len(rows),
            "prior_beta": [9.0] * len(rows),
        },
        schema=TIER_SCHEMA,
    )


RULES = pl.DataFrame(
    {
        "rule_id": ["spike", "illness", "booked", "any"],
        "driver": ["trend", "reason_code", "reason_code", "reschedule_rate"],
        "detail": [None, "illness", "double_booked", None],
        "min_lift": [3.0, 1.0, 1.2, 0.0],
        "min_tutor_value": [0.25, 0.0, 0.3, 0.0],
        "min_tutor_count": [2, 0, 2, 0],
        "priority": [1, 2, 2, 9],
        "action": ["Call this week", "Check in", "Review calendar", "Discuss the rate"],
    }
)


def test_actions_newly_flagged_first_with_top_drivers() -> None:
    tier_rows = tiers(
        [
            ("C", "high", T - timedelta(days=5), False, 0.99),
            ("A", "watch", T, True, 0.4),
            ("B", "ok", None, False, 0.1),
        ]
    )
    drivers = compute_drivers(build_events(), tier_rows.filter(pl.col("risk_tier") != "ok"))
    actions = recommend_actions(tier_rows, drivers, RULES)
    assert actions.schema == pl.Schema(ACTION_SCHEMA)
    assert actions.get_column("tutor_id").to_list() == ["A", "C"]  # B is not flagged
    a, c = actions.iter_rows(named=True)
    assert (a["action_rule_id"], a["action"], a["action_priority"]) == (
        "spike",
        "Call this week",
        1,
    )
    # Most urgent rule first; the illness rule does not match A's double bookings.
    assert a["top_drivers"] == (
        "60% rescheduled in the last 7 days (previous 83 days: 0%); "
        "'double_booked' given for 100% of reschedules (population 67%)"
    )
    # C only matches the catch-all, with a rate below the population's: the action is the
    # catch-all's, but the why is what stands out (no rule asks for no-shows at 1.4x).
    assert c["action_rule_id"] == "any"
    assert c["top_drivers"] == "10% of sessions were no-shows (population 7%)"


def test_the_why_never_gives_a_driver_at_or_below_its_reference() -> None:
    """A driver no higher than the population (or the tutor's past) does not explain a flag:
    a tutor with nothing that stands out has no why, though a catch-all rule still gives an
    action."""
    tier_rows = tiers([("C", "high", T - timedelta(days=5), False, 0.99)])
    drivers = compute_drivers(build_events(), tier_rows)
    assert drivers.filter(pl.col("lift") <= 1).height > 0
    for kept in (drivers, drivers.filter(pl.col("lift") <= 1)):
        row = recommend_actions(tier_rows, kept, RULES).row(0, named=True)
        assert row["action_rule_id"] == "any"
        why = row["top_drivers"]
        below = kept.filter(pl.col("lift") <= 1).get_column("description").to_list()
        assert why is None or not any(d in why for d in below), why
    assert row["top_drivers"] is None


def test_a_tutor_no_rule_matches_has_no_action() -> None:
    tier_rows = tiers([("A", "watch", T, True, 0.4)])
    drivers = compute_drivers(build_events(), tier_rows)
    actions = recommend_actions(tier_rows, drivers, RULES.filter(pl.col("rule_id") == "illness"))
    assert actions.height == 1
    assert actions.row(0, named=True)["action"] is None
