"""Risk tiers per tutor and as-of instant: early warning and confirmed risk (issue #11).

``is_high_risk`` (DESIGN.md, "Scores") stays what it is; the tier is extra evidence beside it
(docs/risk-tiers.md has the method, its calibration and its backtest):

- ``watch``: early warning. A *self-referenced* Bernoulli CUSUM over the tutor's sessions in
  scheduled order (``x = 1`` when the tutor moved the session): each session is judged against
  the tutor's own reschedule rate over the ``baseline_days`` before it (shrunk towards ``p0``,
  clipped to ``[p0_min, p0_max]``) as the acceptable rate, and against ``p1`` as the rate to
  detect; the statistic restarts ``cusum_horizon_days`` before ``T`` and fires above
  ``cusum_h``. A tutor who was reliable needs fewer moves to fire than one who always hovered
  near the threshold. Also ``watch``: the posterior below exceeds ``watch_level``.
- ``high``: confirmed risk. The posterior probability that the tutor's true reschedule rate is
  above ``threshold``, under a Beta prior fitted to the whole tutor population at ``T``
  (empirical Bayes), exceeds ``level``: 2 of 3 sessions is weak evidence, 200 of 300 is not.
- ``insufficient_data``: fewer than ``min_sessions`` sessions in the posterior window, whatever
  the evidence; ``ok`` otherwise. ``high`` wins over ``watch``.

Everything is set-based over any number of tutors and instants at once: each as-of instant is
a *marker* row ``(tutor_id, as_of)`` merged into the tutor's sorted sessions, cumulative sums run
over that frame per tutor, and window quantities are rolling aggregates by time over
``[T - W days, T)`` read at the markers (the contract's windows, exact at any instant). A
session's baseline is such a window too, read at the session itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Final

import duckdb
import numpy as np
import polars as pl
from scipy.special import betainc

from tutor_scoring_dagster.params import TierParams
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import FLAGGED_TIERS
from tutor_scoring_dagster.scoring import as_utc, day_offset, day_start, snapshot_day
from tutor_scoring_dagster.warehouse import query_frame

UTC_US: Final[pl.DataType] = pl.Datetime("us", "UTC")

EVENT_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tutor_id": pl.String(),
    "session_id": pl.String(),
    "scheduled_time": UTC_US,
    "moved_by_tutor": pl.Boolean(),
    "no_show": pl.Boolean(),
    "reason_code": pl.String(),
    "notice_hours": pl.Float64(),
}
"""Per-session events (``sql/risk_session_events_select.sql``), read by tiers and drivers."""

TIER_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tutor_id": pl.String(),
    "as_of": UTC_US,
    "risk_tier": pl.String(),
    "risk_probability": pl.Float64(),
    "cusum_statistic": pl.Float64(),
    "watch_since": UTC_US,
    "newly_flagged": pl.Boolean(),
    "prior_alpha": pl.Float64(),
    "prior_beta": pl.Float64(),
}
"""Columns of :func:`compute_risk_tiers` rows, in order (the new score-row columns)."""


def cusum_weights(p0: float, p1: float) -> tuple[float, float]:
    """The CUSUM increments ``(w1, w0)`` for a moved and a kept session: the log-likelihood
    ratio of rate ``p1`` against ``p0``."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


def baseline_rate(moved: pl.Expr, sessions: pl.Expr, params: TierParams) -> pl.Expr:
    """The acceptable rate from ``moved`` of ``sessions`` in the baseline window: shrunk
    towards ``p0`` by ``baseline_sessions`` pseudo-sessions, clipped to ``[p0_min, p0_max]``;
    ``p0`` itself when ``baseline_days`` is 0."""
    if params.baseline_days == 0:
        return pl.lit(params.p0, dtype=pl.Float64)
    m = params.baseline_sessions
    shrunk = (moved.cast(pl.Float64) + m * params.p0) / (sessions.cast(pl.Float64) + m)
    # No history and no pseudo-sessions: 0 / 0 is p0.
    return shrunk.fill_nan(params.p0).clip(params.p0_min, params.p0_max)


def neutral_rate(p0: float, p1: float) -> float:
    """The true rate at which the CUSUM has no drift: above it the statistic tends to grow."""
    w1, w0 = cusum_weights(p0, p1)
    return -w0 / (w1 - w0)


# Reading the warehouse


def read_session_events(
    con: duckdb.DuckDBPyConnection, *, start: datetime, end: datetime
) -> pl.DataFrame:
    """Per-session events (:data:`EVENT_SCHEMA`) of sessions scheduled in ``[start, end)``."""
    frame = query_frame(con, load_sql("risk_session_events_select"), {"start": start, "end": end})
    return _utc(frame, "scheduled_time").cast(pl.Schema(EVENT_SCHEMA))


def read_first_sessions(con: duckdb.DuckDBPyConnection, *, end: datetime) -> pl.DataFrame:
    """Each tutor's first scheduled time before ``end`` (``tutor_id``, ``first_scheduled_time``)."""
    frame = query_frame(con, load_sql("risk_tutor_first_session_select"), {"end": end})
    return _utc(frame, "first_scheduled_time")


def _utc(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    # DuckDB hands timestamps over in the connection's time zone; compare them in UTC.
    return frame.with_columns(pl.col(column).dt.convert_time_zone("UTC").dt.cast_time_unit("us"))


# Markers: the (tutor, as-of instant) pairs to evaluate


def as_of_markers(first_sessions: pl.DataFrame, instants: Sequence[datetime]) -> pl.DataFrame:
    """``(tutor_id, as_of)`` for every instant and every tutor with a session before it, sorted
    by tutor and instant."""
    times = pl.DataFrame({"as_of": [as_utc(t) for t in instants]}, schema={"as_of": UTC_US})
    return (
        first_sessions.lazy()
        .select("tutor_id", "first_scheduled_time")
        .join(times.lazy().unique(), how="cross")
        .filter(pl.col("first_scheduled_time") < pl.col("as_of"))
        .select("tutor_id", "as_of")
        .sort("tutor_id", "as_of")
        .collect()
    )


def merge_markers(
    events: pl.DataFrame | pl.LazyFrame,
    markers: pl.DataFrame | pl.LazyFrame,
    values: Mapping[str, pl.Expr],
) -> pl.LazyFrame:
    """Sessions and markers in one frame sorted by tutor and time (``t``), with ``is_marker``
    and the per-session ``values`` (null on markers).

    A marker sorts before the sessions scheduled at its own instant, so a running sum read at a
    marker covers exactly the sessions scheduled before it. Sessions at the same instant follow
    their ``session_id``, so that running sums are the same on every run.
    """
    sessions = events.lazy().select(
        "tutor_id",
        pl.col("scheduled_time").alias("t"),
        pl.lit(False).alias("is_marker"),
        "session_id",
        *(expr.alias(name) for name, expr in values.items()),
    )
    marks = markers.lazy().select(
        "tutor_id",
        pl.col("as_of").alias("t"),
        pl.lit(True).alias("is_marker"),
    )
    return (
        pl.concat([sessions, marks], how="diagonal_relaxed")
        .sort(
            "tutor_id",
            "t",
            "is_marker",
            "session_id",
            descending=[False, False, True, False],
            nulls_last=False,
        )
        .drop("session_id")
    )


def window_sum(column: str, days: int) -> pl.Expr:
    """Per tutor, the sum of ``column`` over the rows with ``t - days <= time < t`` (nulls,
    i.e. markers, add nothing); read at a marker it is the contract's window before ``T``."""
    return (
        pl.col(column)
        .fill_null(0)
        .rolling_sum_by("t", timedelta(days=days), closed="left")
        .over("tutor_id")
    )


# Evidence, prior and tiers


def risk_evidence(
    events: pl.DataFrame,
    markers: pl.DataFrame,
    params: TierParams,
    *,
    windows_days: Sequence[int] = (),
) -> pl.DataFrame:
    """Per marker ``(tutor_id, as_of)``: ``sessions``/``reschedules`` in the posterior window,
    ``sessions_{W}d``/``reschedules_{W}d`` for each extra window, ``baseline_rate`` (the
    acceptable rate a session at ``T`` would be judged against) and ``cusum_statistic``.

    Each session ``j`` gets the increment ``ln(p1 / b_j)`` when moved by the tutor and
    ``ln((1 - p1) / (1 - b_j))`` when not, ``b_j`` being :func:`baseline_rate` over the
    tutor's sessions in ``[t_j - baseline_days, t_j)``. The CUSUM restarted at ``T -
    horizon`` is ``C(T) - min(C(T - horizon), min of C over the window's sessions)`` for the
    running sum ``C`` of increments, i.e. the larger of the window's total increment and
    ``C(T)`` minus the window's lowest ``C``: the textbook recursion ``S = max(0, S + w)``
    as cumulative sums and rolling minima per tutor.
    """
    p1 = params.p1
    moved = pl.col("moved_by_tutor").cast(pl.Int64)
    merged = merge_markers(events, markers, {"x": moved, "n": pl.lit(1, dtype=pl.Int64)})
    baseline = baseline_rate(
        window_sum("x", params.baseline_days), window_sum("n", params.baseline_days), params
    )
    increment = (
        pl.when(pl.col("is_marker"))
        .then(pl.lit(0.0))
        .when(pl.col("x") == 1)
        .then((p1 / pl.col("baseline_rate")).log())
        .otherwise(((1 - p1) / (1 - pl.col("baseline_rate"))).log())
    )
    horizon = timedelta(days=params.cusum_horizon_days)
    windows = sorted({params.posterior_window_days, *windows_days})
    evidence = (
        merged.with_columns(baseline.alias("baseline_rate"))
        .with_columns(increment.alias("w"))
        .with_columns(pl.col("w").cum_sum().over("tutor_id").alias("c"))
        .with_columns(
            # Markers are not sessions: they never set the window's minimum.
            pl.when(~pl.col("is_marker"))
            .then(pl.col("c"))
            .rolling_min_by("t", horizon, closed="left")
            .over("tutor_id")
            .alias("c_min"),
            window_sum("w", params.cusum_horizon_days).alias("w_sum"),
            *(window_sum("n", d).alias(f"sessions_{d}d") for d in windows),
            *(window_sum("x", d).alias(f"reschedules_{d}d") for d in windows),
        )
        .filter(pl.col("is_marker"))
        .select(
            "tutor_id",
            pl.col("t").alias("as_of"),
            pl.col(f"sessions_{params.posterior_window_days}d").alias("sessions"),
            pl.col(f"reschedules_{params.posterior_window_days}d").alias("reschedules"),
            *(pl.col(f"sessions_{d}d") for d in windows_days),
            *(pl.col(f"reschedules_{d}d") for d in windows_days),
            "baseline_rate",
            # max_horizontal skips the null minimum of an empty window (statistic 0).
            pl.max_horizontal("w_sum", pl.col("c") - pl.col("c_min"))
            .clip(lower_bound=0.0)
            .alias("cusum_statistic"),
        )
    )
    return evidence.collect()


def fit_prior(evidence: pl.DataFrame, params: TierParams) -> pl.DataFrame:
    """Per ``as_of``: the Beta prior (``prior_alpha``, ``prior_beta``) of true reschedule rates,
    fitted by the method of moments to the tutors with sessions at that instant.

    Beta-binomial moments (Kleinman 1973): with ``mu = sum k / sum n`` and weights ``n``, the
    spread of observed rates is ``mu (1 - mu) (rho sum n + (1 - rho) N)``, binomial noise
    included, so tutors with tiny ``n`` weigh little and inflate nothing. ``rho = 1 / (a + b +
    1)`` is clipped to the configured bounds; a population too small to fit gets the largest.
    """
    mu = pl.col("sum_k") / pl.col("sum_n")
    spread = pl.col("sum_k2_over_n") - mu * pl.col("sum_k")
    mu_c = mu.clip(1e-4, 1 - 1e-4)
    rho = (spread / (mu_c * (1 - mu_c)) - pl.col("tutors")) / (pl.col("sum_n") - pl.col("tutors"))
    rho = (
        pl.when(pl.col("sum_n") > pl.col("tutors"))
        .then(rho)
        .otherwise(pl.lit(params.max_prior_rho))
        .clip(params.min_prior_rho, params.max_prior_rho)
    )
    strength = 1 / rho - 1
    instants = evidence.select(pl.col("as_of").unique())
    fitted = (
        evidence.lazy()
        .filter(pl.col("sessions") > 0)
        .group_by("as_of")
        .agg(
            pl.len().alias("tutors"),
            pl.col("sessions").sum().cast(pl.Float64).alias("sum_n"),
            pl.col("reschedules").sum().cast(pl.Float64).alias("sum_k"),
            (pl.col("reschedules").cast(pl.Float64) ** 2 / pl.col("sessions"))
            .sum()
            .alias("sum_k2_over_n"),
        )
        # Rounded: float sums in any order give the same prior, so a recomputed snapshot
        # gives the same rows.
        .select(
            "as_of",
            (mu_c * strength).round(9).alias("prior_alpha"),
            ((1 - mu_c) * strength).round(9).alias("prior_beta"),
        )
    )
    # An instant whose tutors have no session in the window gets the weakest prior at 1/2.
    weakest = 1 / params.max_prior_rho - 1
    return (
        instants.lazy()
        .join(fitted, on="as_of", how="left")
        .with_columns(
            pl.col("prior_alpha").fill_null(weakest / 2),
            pl.col("prior_beta").fill_null(weakest / 2),
        )
        .sort("as_of")
        .collect()
    )


def posterior_exceedance(
    alpha: np.ndarray, beta: np.ndarray, k: np.ndarray, n: np.ndarray, threshold: float
) -> np.ndarray:
    """P(rate > threshold) under the posterior Beta(alpha + k, beta + n - k), elementwise."""
    # 1 - I_t(a, b) = I_{1-t}(b, a): the upper tail without cancellation near 1.
    return np.asarray(betainc(beta + n - k, alpha + k, 1.0 - threshold), dtype=np.float64)


def compute_risk_tiers(
    events: pl.DataFrame, markers: pl.DataFrame, params: TierParams
) -> pl.DataFrame:
    """Tier rows (:data:`TIER_SCHEMA`) for every marker ``(tutor_id, as_of)``.

    ``events`` (:data:`EVENT_SCHEMA`) must hold every session of the marked tutors scheduled in
    the :attr:`TierParams.lookback_days` days before each instant. ``watch_since`` and
    ``newly_flagged`` read the tutor's earlier rows among ``markers``: pass consecutive daily
    instants (the first one counts as the start of any run it is flagged in).
    """
    return tiers_from_evidence(risk_evidence(events, markers, params), params).select(
        list(TIER_SCHEMA)
    )


def tiers_from_evidence(evidence: pl.DataFrame, params: TierParams) -> pl.DataFrame:
    """:func:`risk_evidence` rows with the prior, ``risk_probability``, ``risk_tier``,
    ``watch_since`` and ``newly_flagged`` added (every evidence column kept)."""
    with_prior = evidence.join(fit_prior(evidence, params), on="as_of", how="left")
    probability = posterior_exceedance(
        with_prior.get_column("prior_alpha").to_numpy(),
        with_prior.get_column("prior_beta").to_numpy(),
        with_prior.get_column("reschedules").to_numpy().astype(np.float64),
        with_prior.get_column("sessions").to_numpy().astype(np.float64),
        params.threshold,
    )
    tier = (
        pl.when(pl.col("sessions") < params.min_sessions)
        .then(pl.lit("insufficient_data"))
        .when(pl.col("risk_probability") > params.level)
        .then(pl.lit("high"))
        .when(
            (pl.col("cusum_statistic") > params.cusum_h)
            | (pl.col("risk_probability") > params.watch_level)
        )
        .then(pl.lit("watch"))
        .otherwise(pl.lit("ok"))
    )
    flagged = pl.col("risk_tier").is_in(FLAGGED_TIERS)
    run = (flagged != flagged.shift(1).over("tutor_id")).fill_null(True).cum_sum().over("tutor_id")
    return (
        with_prior.with_columns(pl.Series("risk_probability", probability))
        .with_columns(tier.alias("risk_tier"))
        .sort("tutor_id", "as_of")
        .with_columns(
            pl.when(flagged)
            .then(pl.col("as_of").first().over("tutor_id", run))
            .alias("watch_since"),
        )
        .with_columns((flagged & (pl.col("watch_since") == pl.col("as_of"))).alias("newly_flagged"))
    )


# Entry points on the warehouse


def risk_tiers_for_instants(
    con: duckdb.DuckDBPyConnection,
    instants: Sequence[datetime],
    params: TierParams,
    *,
    events: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Tier rows for every tutor scored at each of ``instants`` (consecutive days for
    ``watch_since`` to mean "since"), from the warehouse's sessions: ``events`` when the
    caller has read them already (at least the :attr:`TierParams.lookback_days` days before
    the first instant, up to the last)."""
    if not instants:
        return pl.DataFrame(schema=TIER_SCHEMA)
    first, last = min(instants), max(instants)
    if events is None:
        start = first - timedelta(days=params.lookback_days)
        events = read_session_events(con, start=start, end=last)
    markers = as_of_markers(read_first_sessions(con, end=last), instants)
    return compute_risk_tiers(events, markers, params)


def risk_tiers_for_days(
    con: duckdb.DuckDBPyConnection,
    first_day: date,
    last_day: date,
    params: TierParams,
    *,
    offset: timedelta = timedelta(0),
    since_lookback_days: int = 30,
    events: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Tier rows as of the end of each day ``first_day..last_day`` (days start ``offset``
    after midnight UTC, as in scoring.py): one row per scored tutor and day.

    ``watch_since`` looks back ``since_lookback_days`` days before ``first_day`` at most; a run
    that started earlier shows the start of that lookback. ``events``: as in
    :func:`risk_tiers_for_instants`, from the first of those days on.
    """
    days = pl.date_range(
        first_day - timedelta(days=since_lookback_days), last_day, "1d", eager=True
    ).to_list()
    instants = [day_start(d + timedelta(days=1), offset) for d in days]
    tiers = risk_tiers_for_instants(con, instants, params, events=events)
    return tiers.filter(pl.col("as_of") >= day_start(first_day + timedelta(days=1), offset))


def risk_tiers_as_of(
    con: duckdb.DuckDBPyConnection,
    as_of: datetime,
    params: TierParams,
    *,
    since_lookback_days: int = 30,
) -> pl.DataFrame:
    """Tier rows of every scored tutor as of the instant ``as_of`` (the hourly snapshot);
    ``watch_since`` from the ``since_lookback_days`` days before (0: see
    :func:`carry_watch_since`)."""
    day = snapshot_day(as_of)
    return risk_tiers_for_days(
        con, day, day, params, offset=day_offset(as_of), since_lookback_days=since_lookback_days
    )


def carry_watch_since(previous: pl.DataFrame, current: pl.DataFrame) -> pl.DataFrame:
    """``current`` tier rows with ``watch_since`` and ``newly_flagged`` carried on from the
    ``previous`` snapshot's rows of the same tutors (e.g. yesterday's stored history), so a
    snapshot computed alone (``since_lookback_days=0``) keeps an unbroken warning's start."""
    before = previous.select("tutor_id", pl.col("watch_since").alias("_previous_since"))
    flagged = pl.col("risk_tier").is_in(FLAGGED_TIERS)
    carried = pl.coalesce("_previous_since", "as_of")
    return (
        current.join(before, on="tutor_id", how="left")
        .with_columns(
            pl.when(flagged).then(carried).alias("watch_since"),
            (flagged & pl.col("_previous_since").is_null()).alias("newly_flagged"),
        )
        .select(current.columns)
    )
