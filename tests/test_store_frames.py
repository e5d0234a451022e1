"""Frames to publish in the serving-store tests (and the benchmark), built without a warehouse,
and a check that they hold to the data contract the real pipeline's frames hold to."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl

from tutor_scoring_dagster.schemas import (
    WINDOWS_DAYS,
    TutorRiskDrivers,
    TutorRiskTiers,
    TutorScores,
    model_schema,
    score_row_schema,
)

AS_OF = datetime(2026, 3, 1, tzinfo=UTC)
THRESHOLD, MIN_SESSIONS = 0.15, 5
UTC_US = pl.Datetime("us", "UTC")


def tutor_ids(n: int) -> list[str]:
    return [f"T{i:05d}" for i in range(n)]


def tutors(n: int) -> pl.DataFrame:
    """``n`` tutors as the warehouse exports them."""
    ids = tutor_ids(n)
    return pl.DataFrame(
        {
            "tutor_id": ids,
            "name": [f"Tutor {i}" for i in ids],
            "email": [f"{i.lower()}@example.com" for i in ids],
            "is_active": [i % 7 != 0 for i in range(n)],
            "in_tutors_export": [True] * n,
            "updated_at": [AS_OF - timedelta(days=400)] * n,
        },
        schema_overrides={"updated_at": UTC_US},
    )


def scores(n: int, as_of: datetime = AS_OF, *, shift: int = 0) -> pl.DataFrame:
    """A snapshot of ``n`` tutors as of ``as_of``, every rule of ``TutorScores`` kept; ``shift``
    gives other (still valid) numbers to the same tutors."""
    i = pl.col("i")
    frame = pl.DataFrame({"tutor_id": tutor_ids(n)}).with_row_index("i").with_columns(i.cast(int))
    totals = {
        7: (i + shift) % 9,
        30: (i + shift) % 9 + i % 17,
        90: (i + shift) % 9 + i % 17 + i % 5,
    }
    columns: dict[str, pl.Expr] = {"as_of": pl.lit(as_of, UTC_US)}
    high = pl.lit(False)
    for w in WINDOWS_DAYS:
        total = totals[w]
        # Even tutors move about a third of their sessions, odd ones a ninth (below 15%).
        counts = {"tutor_reschedules": total // (3 + 6 * (i % 2)), "no_shows": total // 4}
        columns[f"total_sessions_{w}d"] = total
        for count, expr in counts.items():
            columns[f"{count}_{w}d"] = expr
        for rate, count in (("reschedule_rate", "tutor_reschedules"), ("no_show_rate", "no_shows")):
            value = pl.when(total > 0).then(counts[count] / total)
            columns[f"{rate}_{w}d"] = value
            columns[f"{rate}_{w}d_lower95"] = value / 2
        high = high | ((total >= MIN_SESSIONS) & (counts["tutor_reschedules"] / total > THRESHOLD))
    qualifies = pl.any_horizontal(totals[w] >= MIN_SESSIONS for w in WINDOWS_DAYS)
    columns |= {
        "reschedule_rate_30d_change_7d": pl.lit(None, pl.Float64),
        "is_high_risk": high,
        "risk_status": pl.when(high)
        .then(pl.lit("high"))
        .when(~qualifies)
        .then(pl.lit("insufficient_data"))
        .otherwise(pl.lit("ok")),
        "newly_high_risk": pl.lit(False),
        "no_longer_high_risk": pl.lit(False),
        "risk_threshold": pl.lit(THRESHOLD),
        "min_sessions": pl.lit(MIN_SESSIONS, pl.Int64),
    }
    # Tiers: high risk by the rule -> "high", every fifth other tutor "watch" (since yesterday).
    tier = (
        pl.when(high)
        .then(pl.lit("high"))
        .when(~qualifies)
        .then(pl.lit("insufficient_data"))
        .when(i % 5 == 0)
        .then(pl.lit("watch"))
        .otherwise(pl.lit("ok"))
    )
    flagged = tier.is_in(["high", "watch"])
    columns |= {
        "risk_tier": tier,
        "risk_probability": pl.when(qualifies).then((i % 10) / 10),
        "cusum_statistic": pl.when(qualifies).then((i % 7) / 2),
        "watch_since": pl.when(flagged).then(pl.lit(as_of - timedelta(days=1), UTC_US)),
        "newly_flagged": pl.lit(False),
        "prior_alpha": pl.lit(2.0),
        "prior_beta": pl.lit(18.0),
        "top_drivers": pl.when(flagged).then(pl.lit("Short-notice reschedules: 80% (team 30%)")),
        "recommended_action": pl.when(flagged).then(pl.lit("Remind the tutor of the policy.")),
    }
    out = frame.with_columns(**columns)
    return out.select(list(score_row_schema()))


def drivers(snapshot: pl.DataFrame) -> pl.DataFrame:
    """Two drivers (reschedule rate, short notice) of each watch/high tutor of ``snapshot``."""
    flagged = snapshot.filter(pl.col("risk_tier").is_in(["high", "watch"]))
    rows = []
    for r in flagged.iter_rows(named=True):
        rows += [
            {
                "tutor_id": r["tutor_id"],
                "as_of": r["as_of"],
                "driver": "reschedule_rate",
                "detail": None,
                "tutor_value": 0.3,
                "population_value": 0.1,
                "lift": 3.0,
                "tutor_count": 9,
                "tutor_base": 30,
                "description": "30% of sessions rescheduled in 30 days (population 10%)",
            },
            {
                "tutor_id": r["tutor_id"],
                "as_of": r["as_of"],
                "driver": "short_notice",
                "detail": None,
                "tutor_value": 0.8,
                "population_value": 0.0,
                "lift": 80.0,
                "tutor_count": 8,
                "tutor_base": 10,
                "description": "80% of reschedules at < 24 h notice (population 0%)",
            },
        ]
    return pl.DataFrame(rows, schema=model_schema(TutorRiskDrivers))


def history(n_tutors: int, first_day: date, days: int) -> pl.DataFrame:
    """Daily snapshots (as of the end of each day) of ``first_day`` and the ``days - 1`` after."""
    return pl.concat(
        scores(
            n_tutors,
            datetime.combine(first_day, datetime.min.time(), UTC) + timedelta(d + 1),
            shift=d,
        )
        for d in range(days)
    )


def sessions(n: int, n_tutors: int, *, days: int = 180) -> pl.DataFrame:
    """``n`` sessions of ``n_tutors`` tutors, scheduled over the ``days`` before ``AS_OF``."""
    i = pl.col("i")
    scheduled = pl.lit(AS_OF, UTC_US) - pl.duration(minutes=(i * 7919) % (days * 24 * 60))
    draw = i.hash(7) % 100  # spread statuses evenly over tutors
    status = pl.when(draw < 10).then(pl.lit("rescheduled"))
    status = status.when(draw < 18).then(pl.lit("no_show")).otherwise(pl.lit("completed"))
    return (
        pl.DataFrame({"i": pl.int_range(n, eager=True)})
        .with_columns(
            session_id=pl.format("S{}", i),
            tutor_id=pl.format("T{}", (i % n_tutors).cast(pl.String).str.zfill(5)),
            student_id=pl.format("U{}", i % 997),
            scheduled_time=scheduled,
            status=status,
        )
        .with_columns(
            completed_time=pl.when(pl.col("status") == "completed").then(
                pl.col("scheduled_time") + pl.duration(minutes=60)
            ),
            duration_minutes=pl.when(pl.col("status") == "completed").then(pl.lit(60)),
            created_at=pl.col("scheduled_time") - pl.duration(days=7),
            updated_at=pl.col("scheduled_time") + pl.duration(hours=2),
        )
        .drop("i")
    )


def reschedules(session_frame: pl.DataFrame) -> pl.DataFrame:
    """One reschedule of each ``rescheduled`` session, by the tutor for two in three."""
    moved = session_frame.filter(pl.col("status") == "rescheduled").with_row_index("i")
    return moved.select(
        "session_id",
        cancelled_at=pl.col("scheduled_time") - pl.duration(hours=5),
        initiator=pl.when(pl.col("i") % 3 == 0).then(pl.lit("student")).otherwise(pl.lit("tutor")),
        original_time=pl.col("scheduled_time"),
        new_time=pl.col("scheduled_time") + pl.duration(days=2),
        reason=pl.when(pl.col("i") % 2 == 0).then(pl.lit('sick, "really"')).otherwise(pl.lit("")),
        reason_code=pl.lit("other"),
        hours_before_session=pl.lit(5.0),
        created_at=pl.col("scheduled_time") - pl.duration(hours=5),
    )


def test_built_scores_keep_the_score_contract() -> None:
    for shift in (0, 4):
        for model in (TutorScores, TutorRiskTiers):
            columns = list(model.to_schema().columns)
            model.validate(scores(60, shift=shift).select(columns), lazy=True)
    days = history(5, date(2026, 2, 1), 3)
    assert days.height == 15 and days["as_of"].n_unique() == 3


def test_built_sessions_have_every_status_and_both_initiators() -> None:
    frame = sessions(500, 20)
    assert set(frame["status"]) == {"completed", "rescheduled", "no_show"}
    assert set(reschedules(frame)["initiator"]) == {"tutor", "student"}
    assert frame["session_id"].is_unique().all()
