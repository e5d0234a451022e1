"""Warehouse -> scores: per-tutor rolling 7/30/90-day rates and the risk rule (DESIGN.md, "Scores").

Sessions are first counted per tutor and day (``sql/tutor_daily_activity_select.sql``), where a
day is the 24 hours that end at a multiple of one day before the as-of instant ``T``. The window
``T - W days <= scheduled_time < T`` is then exactly the last ``W`` days, so one Polars rolling
sum over a dense calendar scores any number of consecutive snapshots at once: the hourly
snapshot is one day of that calendar, a 365-day backfill is 365 days of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final

import duckdb
import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import RATES, WINDOWS_DAYS, TutorScores, score_columns
from tutor_scoring_dagster.warehouse import query_frame

LONGEST_WINDOW: Final = max(WINDOWS_DAYS)
TREND_LAG_DAYS: Final = 7
LOOKBACK_DAYS: Final = LONGEST_WINDOW + TREND_LAG_DAYS
"""Days of activity before the first snapshot day that its windows and trend read."""

WILSON_Z: Final = 1.959963984540054  # two-sided 95%
COUNTS: Final = {
    "sessions": "total_sessions",
    "tutor_reschedules": "tutor_reschedules",
    "no_shows": "no_shows",
}
"""Daily activity counts -> the name of their windowed sums in a score row."""


@dataclass(frozen=True)
class RiskRule:
    """When a tutor is high risk: some window's reschedule rate above ``threshold``, with at
    least ``min_sessions`` sessions in that window."""

    threshold: float = 0.15
    min_sessions: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"risk threshold must be in [0, 1], got {self.threshold}")
        if self.min_sessions < 1:
            raise ValueError(f"min_sessions must be >= 1, got {self.min_sessions}")


class ScoresInvalid(Exception):
    """Computed scores broke the TutorScores contract (a bug or corrupt input)."""

    def __init__(self, failure_cases: pl.DataFrame) -> None:
        self.failure_cases = failure_cases
        checks = failure_cases.get_column("check").cast(pl.String).unique().to_list()
        super().__init__(
            f"{failure_cases.height} score value(s) break the contract: {', '.join(checks)[:400]}"
        )


def floor_to_hour(instant: datetime) -> datetime:
    """The start of the hour containing ``instant``, in UTC."""
    utc = as_utc(instant)
    return utc.replace(minute=0, second=0, microsecond=0)


def as_utc(instant: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken to be UTC already)."""
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def day_offset(as_of: datetime) -> timedelta:
    """How far after midnight UTC the days that end at ``as_of`` start."""
    utc = as_utc(as_of)
    return utc - datetime.combine(utc.date(), time(0), tzinfo=UTC)


def snapshot_day(as_of: datetime) -> date:
    """The last whole day before ``as_of`` (days as in :func:`day_offset`)."""
    return (as_utc(as_of) - day_offset(as_of)).date() - timedelta(days=1)


def partition_as_of(day: date) -> datetime:
    """The as-of instant of a daily partition: the end of that day, UTC."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)


def read_activity(
    con: duckdb.DuckDBPyConnection, *, start: datetime, end: datetime, offset: timedelta
) -> pl.DataFrame:
    """Per tutor and day counts of sessions scheduled in ``[start, end)``."""
    return query_frame(
        con,
        load_sql("tutor_daily_activity_select"),
        {"start": start, "end": end, "day_offset": offset},
    )


def read_first_activity(
    con: duckdb.DuckDBPyConnection, *, end: datetime, offset: timedelta
) -> pl.DataFrame:
    """Each tutor's first activity day before ``end``."""
    return query_frame(
        con, load_sql("tutor_first_activity_select"), {"end": end, "day_offset": offset}
    )


def wilson_lower_bound(successes: pl.Expr, trials: pl.Expr) -> pl.Expr:
    """95% Wilson score lower bound of a proportion; null when there are no trials."""
    n = trials.cast(pl.Float64)
    p = successes.cast(pl.Float64) / n
    z2 = WILSON_Z**2
    centre = p + z2 / (2 * n)
    margin = WILSON_Z * ((p * (1 - p) / n) + z2 / (4 * n * n)).sqrt()
    bound = ((centre - margin) / (1 + z2 / n)).clip(0.0, 1.0)
    return pl.when(trials > 0).then(bound)


def wilson_lower_bound_scalar(successes: int, trials: int) -> float | None:
    """:func:`wilson_lower_bound` for one pair of numbers (reference for tests and reports)."""
    if trials == 0:
        return None
    p = successes / trials
    z2 = WILSON_Z**2
    centre = p + z2 / (2 * trials)
    margin = WILSON_Z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return min(1.0, max(0.0, (centre - margin) / (1 + z2 / trials)))


def _high_risk(rule: RiskRule, suffix: str = "") -> pl.Expr:
    """Whether some window qualifies; ``suffix`` picks lagged columns."""
    flags = [
        (pl.col(f"total_sessions_{w}d{suffix}") >= rule.min_sessions)
        & (
            pl.col(f"tutor_reschedules_{w}d{suffix}")
            > rule.threshold * pl.col(f"total_sessions_{w}d{suffix}")
        )
        for w in WINDOWS_DAYS
    ]
    return pl.any_horizontal(flags)


def compute_scores(
    activity: pl.DataFrame,
    first_activity: pl.DataFrame,
    snapshot_days: list[date],
    *,
    offset: timedelta,
    rule: RiskRule,
) -> pl.DataFrame:
    """Score every tutor seen by each snapshot day, for consecutive ``snapshot_days``.

    ``activity`` holds per tutor and day counts (``sessions``, ``tutor_reschedules``,
    ``no_shows``) for at least the :data:`LOOKBACK_DAYS` days before the first snapshot day;
    ``first_activity`` each tutor's first activity day. Snapshot day ``d`` is as of
    ``d + 1 day + offset``. The result follows :class:`TutorScores`, sorted by day and tutor.
    """
    if not snapshot_days:
        return pl.DataFrame(schema=_empty_schema())
    first_day, last_day = min(snapshot_days), max(snapshot_days)
    if (last_day - first_day).days + 1 != len(set(snapshot_days)):
        raise ValueError("snapshot days must be consecutive")
    tutors = first_activity.filter(pl.col("first_activity_date") <= last_day).select(
        "tutor_id", "first_activity_date"
    )
    calendar = pl.DataFrame(
        {
            "activity_date": pl.date_range(
                first_day - timedelta(days=LOOKBACK_DAYS), last_day, "1d", eager=True
            )
        }
    )
    # A dense tutor x day grid, so that a window of W rows is a window of W days.
    grid = (
        tutors.join(calendar, how="cross")
        .join(
            activity.select("tutor_id", "activity_date", *COUNTS),
            on=["tutor_id", "activity_date"],
            how="left",
        )
        .with_columns(pl.col(c).fill_null(0).cast(pl.Int64) for c in COUNTS)
        .sort("tutor_id", "activity_date")
    )
    rolled = grid.with_columns(
        pl.col(count).rolling_sum(w, min_samples=1).over("tutor_id").alias(f"{name}_{w}d")
        for w in WINDOWS_DAYS
        for count, name in COUNTS.items()
    )
    lagged_cols = [
        f"{name}_{w}d" for w in WINDOWS_DAYS for name in ("total_sessions", "tutor_reschedules")
    ]
    rolled = rolled.with_columns(
        *(pl.col(c).shift(1).over("tutor_id").alias(f"{c}_prev") for c in lagged_cols),
        pl.when(pl.col("total_sessions_30d") > 0)
        .then(pl.col("tutor_reschedules_30d") / pl.col("total_sessions_30d"))
        .shift(TREND_LAG_DAYS)
        .over("tutor_id")
        .alias("_rate_30d_week_ago"),
    )
    snap = rolled.filter(
        pl.col("activity_date").is_between(first_day, last_day)
        & (pl.col("activity_date") >= pl.col("first_activity_date"))
    )
    rate_exprs = []
    for w in WINDOWS_DAYS:
        total = pl.col(f"total_sessions_{w}d")
        for rate, count in RATES.items():
            numerator = pl.col(f"{count}_{w}d")
            rate_exprs.append(pl.when(total > 0).then(numerator / total).alias(f"{rate}_{w}d"))
            rate_exprs.append(wilson_lower_bound(numerator, total).alias(f"{rate}_{w}d_lower95"))
    qualifies = pl.any_horizontal(
        pl.col(f"total_sessions_{w}d") >= rule.min_sessions for w in WINDOWS_DAYS
    )
    high = _high_risk(rule)
    # The day before a tutor's first activity they were not high risk.
    was_high = _high_risk(rule, "_prev").fill_null(False)
    scores = snap.with_columns(
        (
            pl.datetime(
                pl.col("activity_date").dt.year(),
                pl.col("activity_date").dt.month(),
                pl.col("activity_date").dt.day(),
                time_unit="us",
                time_zone="UTC",
            )
            + pl.duration(days=1)
            + pl.lit(offset)
        ).alias("as_of"),
        *rate_exprs,
        high.alias("is_high_risk"),
        pl.when(high)
        .then(pl.lit("high"))
        .when(~qualifies)
        .then(pl.lit("insufficient_data"))
        .otherwise(pl.lit("ok"))
        .alias("risk_status"),
        (high & ~was_high).alias("newly_high_risk"),
        (~high & was_high).alias("no_longer_high_risk"),
        pl.lit(rule.threshold, dtype=pl.Float64).alias("risk_threshold"),
        pl.lit(rule.min_sessions, dtype=pl.Int64).alias("min_sessions"),
    ).with_columns(
        (pl.col("reschedule_rate_30d") - pl.col("_rate_30d_week_ago")).alias(
            "reschedule_rate_30d_change_7d"
        )
    )
    return scores.sort("as_of", "tutor_id").select(score_columns())


def _empty_schema() -> dict[str, pl.DataType]:
    return {name: col.dtype.type for name, col in TutorScores.to_schema().columns.items()}


def validate_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """Check scores against :class:`TutorScores` (every failure at once); raise ScoresInvalid."""
    try:
        return TutorScores.validate(scores, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ScoresInvalid(exc.failure_cases) from exc


def score_as_of(con: duckdb.DuckDBPyConnection, as_of: datetime, rule: RiskRule) -> pl.DataFrame:
    """The snapshot of every tutor's scores as of the instant ``as_of`` (validated)."""
    as_of = as_utc(as_of)
    offset = day_offset(as_of)
    activity = read_activity(
        con, start=as_of - timedelta(days=LOOKBACK_DAYS + 1), end=as_of, offset=offset
    )
    first = read_first_activity(con, end=as_of, offset=offset)
    scores = compute_scores(activity, first, [snapshot_day(as_of)], offset=offset, rule=rule)
    return validate_scores(scores)


def materialize_daily_activity(
    con: duckdb.DuckDBPyConnection, first_day: date, last_day: date
) -> int:
    """Recompute the stored daily activity of ``first_day..last_day``; return the row count."""
    start = partition_as_of(first_day) - timedelta(days=1)
    end = partition_as_of(last_day)
    activity = read_activity(con, start=start, end=end, offset=timedelta(0))
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            load_sql("tutor_daily_activity_delete"), {"first_day": first_day, "last_day": last_day}
        )
        con.register("incoming_activity", activity)
        con.execute(load_sql("tutor_daily_activity_insert"))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister("incoming_activity")
    return activity.height


def score_days(
    con: duckdb.DuckDBPyConnection, first_day: date, last_day: date, rule: RiskRule
) -> pl.DataFrame:
    """Daily snapshots (as of each day's end) for ``first_day..last_day``, from stored activity."""
    lookback_start = first_day - timedelta(days=LOOKBACK_DAYS)
    activity = query_frame(
        con,
        load_sql("tutor_daily_activity_range_select"),
        {"first_day": lookback_start, "last_day": last_day},
    )
    first = query_frame(con, load_sql("tutor_first_activity_stored_select"), {"last_day": last_day})
    days = pl.date_range(first_day, last_day, "1d", eager=True).to_list()
    scores = compute_scores(activity, first, days, offset=timedelta(0), rule=rule)
    return validate_scores(scores)
