"""Warehouse -> scores: per-tutor rolling 7/30/90-day rates and the risk rule (DESIGN.md, "Scores").

Sessions are first counted per tutor and day (``sql/tutor_daily_activity_select.sql``), where a
day is the 24 hours that end at a multiple of one day before the as-of instant ``T``. The window
``T - W days <= scheduled_time < T`` is then exactly the last ``W`` days, so one pass of running
sums over a dense day x tutor calendar scores any number of consecutive snapshots at once: the
hourly snapshot is one day of that calendar, a 365-day backfill is 365 days of it. Every path
(hourly, one partition, a backfill, the CLI) reads the same sessions through the same SQL, so the
same warehouse and ``T`` give the same numbers.

The second half holds what checks published scores (an independent count over instants, not
days) and what finds the partitions a late export touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final

import duckdb
import numpy as np
import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import (
    RATES,
    WINDOWS_DAYS,
    TutorRiskTiers,
    TutorScores,
    high_risk,
    rate,
    risk_status,
    score_columns,
    score_schema,
)
from tutor_scoring_dagster.warehouse import query_frame

LONGEST_WINDOW: Final = max(WINDOWS_DAYS)
TREND_WINDOW: Final = 30
TREND_LAG_DAYS: Final = 7
LOOKBACK_DAYS: Final = LONGEST_WINDOW + TREND_LAG_DAYS
"""Days of activity before the first snapshot day that its windows and trend read."""
LATE_DATA_REACH_DAYS: Final = LOOKBACK_DAYS - 1
"""Days after a day whose snapshots a change to that day's sessions can reach (conservative:
the furthest is the day-before flag of the 90-day window, 90 days on)."""

# compute_scores scores TREND_LAG_DAYS days before the first snapshot day too (for the trend and
# newly_high_risk); their windows must fit in the activity read before the first snapshot day.
assert LOOKBACK_DAYS - TREND_LAG_DAYS >= LONGEST_WINDOW - 1
assert TREND_WINDOW in WINDOWS_DAYS

CHUNK_DAYS: Final = 180
"""Snapshot days scored, validated or audited at a time: a 3-year range at once held several
copies of 5 million wide rows (8 GB); per chunk, one copy and a chunk's worth of work."""

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
        checks = failure_cases.get_column("check").cast(pl.String).unique().sort().to_list()
        super().__init__(
            f"{failure_cases.height} score value(s) break the contract: {', '.join(checks)[:400]}"
        )


# Instants and days


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


def day_start(day: date, offset: timedelta) -> datetime:
    """The instant a day starts, for days that start ``offset`` after midnight UTC."""
    return datetime.combine(day, time(0), tzinfo=UTC) + offset


def snapshot_day(as_of: datetime) -> date:
    """The last whole day before ``as_of`` (days as in :func:`day_offset`)."""
    return (as_utc(as_of) - day_offset(as_of)).date() - timedelta(days=1)


def partition_as_of(day: date) -> datetime:
    """The as-of instant of a daily partition: the end of that day, UTC."""
    return day_start(day + timedelta(days=1), timedelta(0))


# Reading the warehouse


def read_activity(
    con: duckdb.DuckDBPyConnection, *, start: datetime, end: datetime, offset: timedelta
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per tutor and day counts of the sessions scheduled in ``[start, end)``, and each tutor's
    first activity day before ``end`` (days start ``offset`` after midnight UTC)."""
    rows = query_frame(
        con,
        load_sql("tutor_daily_activity_select"),
        {"start": start, "end": end, "day_offset": offset},
    )
    first = rows.group_by("tutor_id").agg(pl.col("first_activity_date").min())
    activity = rows.filter(pl.col("activity_date").is_not_null()).drop("first_activity_date")
    return activity, first


# Scoring


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


def _running_totals(cells: pl.DataFrame, *, n_days: int, n_tutors: int) -> dict[str, np.ndarray]:
    """Per count, a (day, tutor) matrix of each tutor's sum over the calendar days before that
    day (row 0 is zero), from ``cells`` (``day_index``, ``tutor_index`` and the counts).

    Day-major matrices make a window of every tutor the difference of two rows, already in
    (day, tutor) order: no per-tutor grouping and no sort.
    """
    day = cells.get_column("day_index").to_numpy() + 1
    tutor = cells.get_column("tutor_index").to_numpy()
    running = {}
    for count in COUNTS:
        values = cells.get_column(count).to_numpy()
        grid = np.zeros((n_days + 1, n_tutors), dtype=np.int64)
        grid[day, tutor] = values
        running[count] = grid.cumsum(axis=0, out=grid)
        # A repeated (tutor, day) would have overwritten a count: the grand total tells.
        if int(grid[-1].sum()) != int(values.sum()):
            raise ValueError("activity must hold one row per tutor and day")
    return running


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
    ``no_shows``; one row per tutor and day) for at least the :data:`LOOKBACK_DAYS` days before
    the first snapshot day; ``first_activity`` each tutor's first activity day. Snapshot day
    ``d`` is as of ``d + 1 day + offset``. The result follows :class:`TutorScores`, sorted by
    as-of and tutor.
    """
    if not snapshot_days:
        return pl.DataFrame(schema=score_schema())
    first_day, last_day = min(snapshot_days), max(snapshot_days)
    n_snapshots = (last_day - first_day).days + 1
    if n_snapshots != len(set(snapshot_days)):
        raise ValueError("snapshot days must be consecutive")
    calendar_start = first_day - timedelta(days=LOOKBACK_DAYS)

    def day_index(column: str) -> pl.Expr:
        return (pl.col(column) - pl.lit(calendar_start)).dt.total_days()

    # Tutors in id order, so that (day, tutor) order is (as_of, tutor_id) order.
    tutors = (
        first_activity.lazy()
        .filter(pl.col("first_activity_date") <= last_day)
        .select("tutor_id", day_index("first_activity_date").alias("first_index"))
        .sort("tutor_id")
        .collect()
        .with_row_index("tutor_index")
    )
    n_tutors = tutors.height
    cells = (
        activity.lazy()
        .filter(pl.col("activity_date").is_between(calendar_start, last_day))
        .join(tutors.lazy().select("tutor_id", "tutor_index"), on="tutor_id")
        .select(day_index("activity_date").alias("day_index"), "tutor_index", *COUNTS)
        .collect()
    )
    running = _running_totals(cells, n_days=LOOKBACK_DAYS + n_snapshots, n_tutors=n_tutors)
    # Days are scored from TREND_LAG_DAYS before the first snapshot day: the trend compares
    # with the snapshot a week before, newly_high_risk with the one a day before.
    first_scored = LOOKBACK_DAYS - TREND_LAG_DAYS
    n_scored = TREND_LAG_DAYS + n_snapshots

    def window(count: str, days: int) -> np.ndarray:
        """``count`` summed over the ``days`` days that end on each scored day, per scored day
        and tutor, flattened day-major."""
        end = first_scored + 1
        ending = running[count][end : end + n_scored]
        starting = running[count][end - days : end - days + n_scored]
        return (ending - starting).ravel()

    windows = {
        f"{name}_{w}d": window(count, w) for w in WINDOWS_DAYS for count, name in COUNTS.items()
    }
    rate_exprs = []
    for w in WINDOWS_DAYS:
        total = pl.col(f"total_sessions_{w}d")
        for rate_name, count in RATES.items():
            numerator = pl.col(f"{count}_{w}d")
            rate_exprs.append(rate(numerator, total).alias(f"{rate_name}_{w}d"))
            rate_exprs.append(
                wilson_lower_bound(numerator, total).alias(f"{rate_name}_{w}d_lower95")
            )
    high = pl.col("is_high_risk")
    was_high = pl.col("_was_high")
    row = pl.int_range(pl.len(), dtype=pl.Int64)
    scores = (
        pl.LazyFrame(windows)
        .with_columns(
            (row % n_tutors).alias("tutor_index"),
            (first_scored + row // n_tutors).alias("day_index"),
            high_risk(
                (
                    (pl.col(f"tutor_reschedules_{w}d"), pl.col(f"total_sessions_{w}d"))
                    for w in WINDOWS_DAYS
                ),
                rule.threshold,
                rule.min_sessions,
            ).alias("is_high_risk"),
            *rate_exprs,
        )
        # Every tutor has a row on every scored day, so n_tutors rows back is the same tutor a
        # day earlier (a tutor not yet seen then has empty windows: not high risk).
        .with_columns(
            high.shift(n_tutors).alias("_was_high"),
            (
                pl.col(f"reschedule_rate_{TREND_WINDOW}d")
                - pl.col(f"reschedule_rate_{TREND_WINDOW}d").shift(TREND_LAG_DAYS * n_tutors)
            ).alias("reschedule_rate_30d_change_7d"),
        )
        # Snapshot days only, each tutor from their first activity day on.
        .filter(
            (pl.col("day_index") >= LOOKBACK_DAYS)
            & (
                pl.col("day_index")
                >= pl.lit(tutors.get_column("first_index")).gather(pl.col("tutor_index"))
            )
        )
        .with_columns(
            pl.lit(tutors.get_column("tutor_id")).gather(pl.col("tutor_index")).alias("tutor_id"),
            # Calendar day i ends at the as-of instant of its snapshot.
            (
                pl.lit(day_start(calendar_start + timedelta(days=1), offset))
                + pl.duration(days=pl.col("day_index"))
            ).alias("as_of"),
            risk_status(
                high, [pl.col(f"total_sessions_{w}d") for w in WINDOWS_DAYS], rule.min_sessions
            ).alias("risk_status"),
            (high & ~was_high).alias("newly_high_risk"),
            (~high & was_high).alias("no_longer_high_risk"),
            pl.lit(rule.threshold, dtype=pl.Float64).alias("risk_threshold"),
            pl.lit(rule.min_sessions, dtype=pl.Int64).alias("min_sessions"),
        )
    )
    return scores.select(score_columns()).collect()


def validate_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """Check scores against :class:`TutorScores` (every failure at once); raise ScoresInvalid."""
    try:
        return TutorScores.validate(scores, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ScoresInvalid(exc.failure_cases) from exc


def score_snapshots(
    con: duckdb.DuckDBPyConnection,
    first_day: date,
    last_day: date,
    rule: RiskRule,
    *,
    offset: timedelta = timedelta(0),
) -> pl.DataFrame:
    """Validated snapshots as of the end of each day ``first_day..last_day``, for days that start
    ``offset`` after midnight UTC, from the sessions in the warehouse."""
    calendar_start = first_day - timedelta(days=LOOKBACK_DAYS)
    end = day_start(last_day + timedelta(days=1), offset)
    activity, first = read_activity(
        con, start=day_start(calendar_start, offset), end=end, offset=offset
    )
    days = pl.date_range(first_day, last_day, "1d", eager=True).to_list()
    # Chunks of consecutive days: each is scored exactly as a run of its own days would be.
    chunks = [
        validate_scores(
            compute_scores(activity, first, days[i : i + CHUNK_DAYS], offset=offset, rule=rule)
        )
        for i in range(0, len(days), CHUNK_DAYS)
    ]
    return pl.concat(chunks, rechunk=False) if len(chunks) > 1 else chunks[0]


def score_as_of(con: duckdb.DuckDBPyConnection, as_of: datetime, rule: RiskRule) -> pl.DataFrame:
    """The snapshot of every tutor's scores as of the instant ``as_of`` (validated)."""
    day = snapshot_day(as_of)
    return score_snapshots(con, day, day, rule, offset=day_offset(as_of))


def score_days(
    con: duckdb.DuckDBPyConnection, first_day: date, last_day: date, rule: RiskRule
) -> pl.DataFrame:
    """Daily snapshots (as of each day's end, UTC) for ``first_day..last_day`` (validated)."""
    return score_snapshots(con, first_day, last_day, rule)


def materialize_daily_activity(
    con: duckdb.DuckDBPyConnection, first_day: date, last_day: date
) -> int:
    """Recompute the stored daily activity of ``first_day..last_day``; return the row count."""
    start = day_start(first_day, timedelta(0))
    end = partition_as_of(last_day)
    activity, _ = read_activity(con, start=start, end=end, offset=timedelta(0))
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


# Checking published scores


TUTORS_AUDIT: Final = "tutors_known"
"""The check that every scored tutor is in the warehouse's ``tutors`` view."""
COUNTS_AUDIT: Final = "counts_reconcile_with_sessions"
"""The check that recounts every scored window from the warehouse's sessions."""
AUDITS: Final = {
    "one_row_per_tutor_per_snapshot": (
        "No tutor appears twice in a snapshot, and every row belongs to a checked snapshot."
    ),
    "rates_consistent_with_counts": (
        "The TutorScores contract: types, ranges, rate = count / total (null only for an empty "
        "window), Wilson bound <= rate, risk flags that follow the rule kept on the row; and "
        "the TutorRiskTiers contract (a known tier, probability in [0, 1], only watch/high "
        "tutors flagged with a start and an action)."
    ),
    TUTORS_AUDIT: "Every scored tutor exists in the warehouse `tutors` view.",
    COUNTS_AUDIT: (
        "Every tutor with a session scheduled before the as-of instant is scored, and each "
        "window's counts equal an independent count over the warehouse `sessions` view."
    ),
}
"""Checks of a published score snapshot (:func:`audit_scores`): name -> what it asserts."""

KEYS: Final = ["tutor_id", "as_of"]
FIRST: Final = ["as_of", "tutor_id"]
"""Snapshot order: which of a check's offending rows its finding names first."""
WINDOW_COUNTS: Final = [f"{name}_{w}d" for w in WINDOWS_DAYS for name in COUNTS.values()]
"""The windowed counts of a score row, in the order of its columns."""
MICROS_PER_DAY: Final = 86_400_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Finding:
    """The outcome of one check of published scores: the offending rows, if any."""

    name: str
    failures: pl.DataFrame

    @property
    def passed(self) -> bool:
        """True when no row offends."""
        return self.failures.height == 0


def epoch_us(instant: datetime) -> int:
    """Microseconds since the Unix epoch (a naive ``instant`` is taken to be UTC)."""
    return (as_utc(instant) - _EPOCH) // timedelta(microseconds=1)


class ReferenceCounts:
    """The windowed counts of score rows as of some instants, counted independently of the
    scoring path (see :func:`audit_score_parts`): each session read with its exact instant and
    placed, by binary search, among the instants counted as of and their windows' starts."""

    def __init__(self, con: duckdb.DuckDBPyConnection, instants: list[datetime]) -> None:
        """Count, from the warehouse, for the as-of ``instants`` (sorted, UTC)."""
        as_of_us = np.array([epoch_us(t) for t in instants], dtype=np.int64)
        # Every instant a count is taken before: T and T - W, for every T and W.
        self.edges = np.unique(
            np.concatenate([as_of_us - w * MICROS_PER_DAY for w in (0, *WINDOWS_DAYS)])
        )
        tutors = query_frame(
            con, load_sql("tutor_scores_reference_tutors_select"), {"latest": instants[-1]}
        )
        self.tutor_ids = tutors.get_column("tutor_id")
        self.first_us = tutors.get_column("first_time").dt.epoch("us").to_numpy()
        con.register("reference_tutors", tutors.select("tutor_id").with_row_index("tutor_rank"))
        try:
            sessions = query_frame(
                con,
                load_sql("tutor_scores_reference_sessions_select"),
                {
                    "earliest": instants[0] - timedelta(days=LONGEST_WINDOW),
                    "latest": instants[-1],
                },
            )
        finally:
            con.unregister("reference_tutors")
        # A session scheduled at x is before edge e iff x < e, i.e. iff e comes after the
        # side="right" position of x among the edges. Cells are edge-major: the tutors of
        # one instant are next to each other, as the rows of a snapshot are.
        n_tutors = self.tutor_ids.len()
        rank = sessions.get_column("tutor_rank").to_numpy().astype(np.int64)
        scheduled_us = sessions.get_column("scheduled_us").to_numpy()
        cell = np.searchsorted(self.edges, scheduled_us, "right") * n_tutors + rank
        kinds = {
            "total_sessions": None,
            "tutor_reschedules": sessions.get_column("moved_by_tutor").to_numpy(),
            "no_shows": sessions.get_column("no_show").to_numpy(),
        }
        self.before: dict[str, np.ndarray] = {}
        """Count name -> per edge and tutor rank (flat, edge-major), the tutor's sessions of
        that kind before the edge."""
        for name, kind in kinds.items():
            cells = cell if kind is None else cell[kind]
            per_cell = np.bincount(cells, minlength=(self.edges.size + 1) * n_tutors)
            # int32: a tutor's sessions fit, and a long range's table takes half the memory.
            before = per_cell.reshape(self.edges.size + 1, n_tutors).cumsum(axis=0, dtype=np.int32)
            self.before[name] = before.ravel()

    def counts(self, instants: list[datetime]) -> pl.DataFrame:
        """The windowed counts of every tutor seen before each of ``instants`` (sorted, UTC,
        among those counted for), sorted by as-of and tutor: as of ``T``, the sessions before
        ``T`` less those before ``T - W``."""
        as_of_us = np.array([epoch_us(t) for t in instants], dtype=np.int64)
        # (instant, rank) pairs in row-major order are (as_of, tutor_id) order.
        instant_index, rank = np.nonzero(self.first_us[np.newaxis, :] < as_of_us[:, np.newaxis])
        n_tutors = self.tutor_ids.len()
        as_of = as_of_us[instant_index]
        before_as_of = {
            name: before.take(np.searchsorted(self.edges, as_of) * n_tutors + rank)
            for name, before in self.before.items()
        }
        columns = {}
        for w in WINDOWS_DAYS:
            at_start = np.searchsorted(self.edges, as_of - w * MICROS_PER_DAY) * n_tutors + rank
            for name, before in self.before.items():
                window = before_as_of[name] - before.take(at_start)
                columns[f"{name}_{w}d"] = window.astype(np.int64)
        return pl.DataFrame(
            {
                "tutor_id": self.tutor_ids.gather(rank),
                "as_of": pl.Series(instants, dtype=pl.Datetime("us", "UTC")).gather(instant_index),
                **{name: columns[name] for name in WINDOW_COUNTS},
            }
        )


def audit_scores(
    con: duckdb.DuckDBPyConnection, scores: pl.DataFrame, instants: list[datetime]
) -> list[Finding]:
    """Check score rows published for the as-of ``instants`` against the warehouse: one
    :class:`Finding` per entry of :data:`AUDITS`, in that order.

    Long ranges are checked :data:`CHUNK_DAYS` instants at a time (every row in exactly one
    chunk, by its as-of), with the same findings as at once."""

    def rows_between(start: datetime | None, end: datetime | None) -> pl.DataFrame:
        inside = pl.lit(True)
        if start is not None:
            inside &= pl.col("as_of") >= start
        if end is not None:
            inside &= pl.col("as_of") < end
        return scores.filter(inside)

    return audit_score_parts(con, instants, rows_between)


def audit_score_parts(
    con: duckdb.DuckDBPyConnection,
    instants: list[datetime],
    rows_between: Callable[[datetime | None, datetime | None], pl.DataFrame],
) -> list[Finding]:
    """:func:`audit_scores` of the rows ``rows_between(start, end)`` returns (``start <=
    as_of < end``; None: unbounded), read :data:`CHUNK_DAYS` instants at a time, so that a
    long range is never in memory at once.

    The counts are checked against :class:`ReferenceCounts`, an independent count: the
    scoring path buckets sessions into days (a DATE cast after the day offset) and takes
    differences of running day totals over a dense day x tutor calendar; the reference never
    forms days. It reads each session's exact instant with its own SQL, and counts a window
    ``T - W <= scheduled_time < T`` as the sessions before ``T`` less those before ``T - W``:
    each session is placed by binary search among the exact instants ``T`` and ``T - W``
    themselves, whatever their time of day or spacing. A wrong day boundary, offset, window
    length, lookback or running total on either side shows as a mismatch."""
    utc = sorted({as_utc(t) for t in instants})
    if not utc:
        raise ValueError("no instant to count as of")
    chunks = [utc[i : i + CHUNK_DAYS] for i in range(0, len(utc), CHUNK_DAYS)]
    parts: list[dict[str, pl.DataFrame]] = []
    scored_tutors: list[pl.Series] = []
    # The reference reads and counts on a connection of its own while the first chunk is read
    # and validated: either leaves a core idle much of the time.
    with con.cursor() as own, ThreadPoolExecutor(max_workers=1) as pool:
        counting = pool.submit(ReferenceCounts, own, utc)
        for i, chunk in enumerate(chunks):
            start = chunk[0] if i > 0 else None
            end = chunks[i + 1][0] if i + 1 < len(chunks) else None
            scores = _in_snapshot_order(rows_between(start, end))
            scored_tutors.append(scores.get_column("tutor_id").unique())
            part = _audit_chunk(scores, chunk)
            expected = counting.result().counts(chunk)
            part[COUNTS_AUDIT] = _count_mismatches(expected, scores)
            parts.append(part)
            del scores, expected  # one chunk of rows in memory at a time
    findings = []
    for name in AUDITS:
        if name == TUTORS_AUDIT:  # one query for every chunk's tutors
            failures = _unknown_tutors(con, pl.concat(scored_tutors).unique())
        else:
            failures = pl.concat([part[name] for part in parts], how="vertical_relaxed")
        if len(parts) > 1 and name == "rates_consistent_with_counts":
            failures = (
                failures.group_by("check", "column")
                .agg(
                    pl.col("rows").sum().cast(pl.UInt32),
                    # The first of the chunks' firsts is the first of all.
                    *(
                        pl.col(f"first_{key}")
                        .sort_by([f"first_{k}" for k in FIRST], nulls_last=True)
                        .first()
                        for key in KEYS
                    ),
                )
                .sort("check", "column")
            )
        elif len(parts) > 1 and name == COUNTS_AUDIT:
            failures = failures.sort(KEYS)
        findings.append(Finding(name, failures))
    return findings


def _audit_chunk(scores: pl.DataFrame, instants: list[datetime]) -> dict[str, pl.DataFrame]:
    """The failures of the rows for some consecutive ``instants`` (in snapshot order:
    :func:`_in_snapshot_order`) under the checks of :data:`AUDITS` that need nothing but the
    rows."""
    # In snapshot order a repeated (as_of, tutor_id) follows the row it repeats.
    as_of, tutor = pl.col("as_of"), pl.col("tutor_id")
    repeats = (
        as_of.eq_missing(as_of.shift())
        & tutor.eq_missing(tutor.shift())
        & (pl.int_range(pl.len()) > 0)
    )
    duplicates = scores.filter(repeats).select(KEYS).unique()
    unexpected_as_of = scores.filter(~pl.col("as_of").is_in(instants)).select(KEYS).unique()
    return {
        "one_row_per_tutor_per_snapshot": pl.concat(
            [duplicates.sort(KEYS), unexpected_as_of.sort(KEYS)], how="vertical_relaxed"
        ),
        "rates_consistent_with_counts": _contract_failures(scores),
    }


def _in_snapshot_order(scores: pl.DataFrame) -> pl.DataFrame:
    """``scores`` sorted by as-of, then tutor, as the reference counts are (so that they are
    compared in place), sorting only rows that are not in that order already."""
    return scores if _strictly_sorted(scores) else scores.sort("as_of", "tutor_id")


def _strictly_sorted(scores: pl.DataFrame) -> bool:
    """Whether each row's (as_of, tutor_id) comes strictly after the row before's."""
    as_of, tutor = pl.col("as_of"), pl.col("tutor_id")
    after = (as_of > as_of.shift()) | ((as_of == as_of.shift()) & (tutor > tutor.shift()))
    return bool(scores.select(after.slice(1).fill_null(False).all()).item())


def _contract_failures(scores: pl.DataFrame) -> pl.DataFrame:
    """Rows breaking the TutorScores (and, once assessed, TutorRiskTiers) contract, per check
    and column."""
    # Each failure names its first offending row (tutor and snapshot) when it has one, so a
    # check's page says where to look without opening the warehouse.
    as_of = scores.schema.get("as_of", pl.Datetime("us", "UTC"))
    broken = [
        pl.DataFrame(
            schema={
                "check": pl.String,
                "column": pl.String,
                "rows": pl.UInt32,
                "first_tutor_id": pl.String,
                "first_as_of": as_of,
            }
        )
    ]
    # A stored row is its scores then its risk tier (schemas.score_row_schema): both contracts.
    # Rows scored but not yet assessed (scoring.py alone, without assessment.py) carry none of
    # the tier columns; a row with some of them must have them all.
    tiers = set(TutorRiskTiers.to_schema().columns) - set(KEYS)
    assessed = bool(tiers & set(scores.columns))
    for model in (TutorScores, TutorRiskTiers) if assessed else (TutorScores,):
        try:
            model.validate(scores.select(list(model.to_schema().columns)), lazy=True)
        except pa.errors.SchemaErrors as exc:
            # Only a failing frame is located (the select above found its keys). First in
            # snapshot order, not row order: findings do not depend on row order.
            located = scores.select(KEYS).with_row_index("index")
            broken.append(
                exc.failure_cases.with_columns(pl.col("index").cast(pl.UInt32))
                .join(located, on="index", how="left")
                .group_by(pl.col("check").cast(pl.String), pl.col("column").cast(pl.String))
                .agg(
                    pl.len().cast(pl.UInt32).alias("rows"),
                    *(
                        pl.col(key).sort_by(FIRST, nulls_last=True).first().alias(f"first_{key}")
                        for key in KEYS
                    ),
                )
            )
        except pl.exceptions.ColumnNotFoundError as exc:
            missing = str(exc).splitlines()[0]
            broken.append(
                pl.DataFrame(
                    {
                        "check": ["column_in_dataframe"],
                        "column": [missing],
                        "rows": [scores.height],
                        "first_tutor_id": [None],
                        "first_as_of": [None],
                    },
                    schema=broken[0].schema,
                )
            )
    return pl.concat(broken, how="vertical_relaxed").sort("check", "column")


def _count_mismatches(expected: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """Rows whose windowed counts differ from ``expected`` (a row on one side only too): the
    expected counts, then the scored ones (``<count>_scored``), sorted by tutor and as-of."""
    scored = scores.select(*KEYS, *WINDOW_COUNTS)
    differs = pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_scored")) for c in WINDOW_COUNTS)
    if scored.height == expected.height and scored.select(KEYS).equals(expected.select(KEYS)):
        # The same rows in the same order (a sound snapshot): compare in place, no join.
        side_by_side = pl.concat(
            [expected, scored.drop(KEYS).rename(lambda c: f"{c}_scored")], how="horizontal"
        )
        return side_by_side.filter(differs).sort(KEYS)
    return (
        expected.join(scored, on=KEYS, how="full", coalesce=True, suffix="_scored")
        .filter(differs)
        .sort(KEYS)
    )


def _unknown_tutors(con: duckdb.DuckDBPyConnection, tutor_ids: pl.Series) -> pl.DataFrame:
    """Those of ``tutor_ids`` missing from the warehouse's ``tutors`` view, sorted."""
    con.register("checked_scores", tutor_ids.to_frame("tutor_id"))
    try:
        return query_frame(con, load_sql("tutor_scores_unknown_tutors_select"))
    finally:
        con.unregister("checked_scores")


# Late data


def read_new_loads(con: duckdb.DuckDBPyConnection, after_load_id: int) -> pl.DataFrame | None:
    """Loads after ``after_load_id`` with the range of scheduled times their rows touched,
    every export of the sessions they touch included (a session moved to another day, a
    reschedule without ``original_time``); None while the warehouse's ``loaded_files`` does
    not record that range."""
    needed = {"load_id", "min_scheduled_time", "max_scheduled_time"}
    present = query_frame(con, load_sql("loaded_files_columns_select"))
    if not needed <= set(present.get_column("column_name").to_list()):
        return None
    return query_frame(con, load_sql("loaded_files_scheduled_select"), {"after": after_load_id})


def affected_day_ranges(
    loads: pl.DataFrame,
    *,
    first_day: date,
    last_day: date,
    reach_days: int = LATE_DATA_REACH_DAYS,
) -> list[tuple[date, date]]:
    """Daily partitions to recompute after ``loads`` (``min_scheduled_time``,
    ``max_scheduled_time``): each touched day and the ``reach_days`` days after it whose
    snapshots read it (:data:`LATE_DATA_REACH_DAYS` for the scores' windows), clipped to
    ``first_day..last_day``, overlapping ranges merged."""
    spans = (
        loads.drop_nulls(["min_scheduled_time", "max_scheduled_time"])
        .select(
            pl.col("min_scheduled_time").dt.convert_time_zone("UTC").dt.date().alias("start"),
            (
                pl.col("max_scheduled_time").dt.convert_time_zone("UTC").dt.date()
                + pl.duration(days=reach_days)
            ).alias("end"),
        )
        .with_columns(
            pl.col("start").clip(lower_bound=first_day), pl.col("end").clip(upper_bound=last_day)
        )
        .filter(pl.col("start") <= pl.col("end"))
        .sort("start")
    )
    ranges: list[tuple[date, date]] = []
    for start, end in spans.iter_rows():  # one row per loaded file, not per session
        if ranges and start <= ranges[-1][1] + timedelta(days=1):
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((start, end))
    return ranges
