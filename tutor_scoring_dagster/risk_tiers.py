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
a *marker* row ``(tutor_id, as_of)``; sessions and markers are placed by one integer key per
(tutor, time), and a window ``[T - W days, T)`` (the contract's, exact at any instant) is the
running total before ``T`` less the one before ``T - W``, found by binary search. A session's
baseline is such a window too, read at the session itself; the CUSUM's horizon is a rolling
aggregate over sessions and markers merged in key order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
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


def read_tier_sessions(
    con: duckdb.DuckDBPyConnection, *, start: datetime, end: datetime
) -> pl.DataFrame:
    """The sessions scheduled in ``[start, end)`` with only what tiers read (``tutor_id``,
    ``session_id``, ``scheduled_time``, ``moved_by_tutor``), in no particular order."""
    frame = query_frame(con, load_sql("risk_tier_sessions_select"), {"start": start, "end": end})
    return _utc(frame, "scheduled_time").cast(
        {k: EVENT_SCHEMA[k] for k in ("tutor_id", "session_id", "scheduled_time", "moved_by_tutor")}
    )


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
    acceptable rate a session at ``T`` would be judged against) and ``cusum_statistic``;
    sorted by tutor and instant.

    Each session ``j`` gets the increment ``ln(p1 / b_j)`` when moved by the tutor and
    ``ln((1 - p1) / (1 - b_j))`` when not, ``b_j`` being :func:`baseline_rate` over the
    tutor's sessions in ``[t_j - baseline_days, t_j)``. The CUSUM restarted at ``T -
    horizon`` is ``C(T) - min(C(T - horizon), min of C over the window's sessions)`` for the
    running sum ``C`` of increments, i.e. the larger of the window's total increment and
    ``C(T)`` minus the window's lowest ``C``: the textbook recursion ``S = max(0, S + w)``
    as cumulative sums and rolling minima per tutor.

    ``events`` needs ``tutor_id``, ``scheduled_time`` and ``moved_by_tutor``; sessions at the
    same instant count in ``session_id`` order, or in their given order without that column
    (as :func:`read_tier_sessions` returns them). Running sums start at the first session of
    ``events``, so the same frame gives the same floats to the last bit.
    """
    windows = sorted({params.posterior_window_days, *windows_days})
    tutors = (
        pl.concat([events.get_column("tutor_id"), markers.get_column("tutor_id")]).unique().sort()
    )
    s_g, m_g = (
        _ranks(events.get_column("tutor_id"), tutors),
        _ranks(markers.get_column("tutor_id"), tutors),
    )
    s_t, m_t = _micros(events.get_column("scheduled_time")), _micros(markers.get_column("as_of"))
    keys = _TimeKeys.fit(len(tutors), np.concatenate([s_t, m_t]), _reach_days(params, windows))
    s_key, m_key = keys.key(s_g, s_t), keys.key(m_g, m_t)
    moved = events.get_column("moved_by_tutor").fill_null(False).to_numpy()
    order = _session_order(events, s_key)
    if order is not None:
        # Only the columns read below, not the whole frame with its strings (~0.3 s of a
        # current snapshot at 10M; the daily range's narrower frame gained nothing measurable).
        moved, s_g, s_key = moved[order], s_g[order], s_key[order]
    if np.any(np.diff(m_key) < 0):
        order = np.argsort(m_key, kind="stable")
        markers, m_g, m_key = markers[order], m_g[order], m_key[order]
    sessions = _Sessions.build(s_g, s_key, moved, params)
    frame_start = np.searchsorted(s_key, np.arange(len(tutors)) * keys.span, side="left")
    evidence = _evidence(
        sessions, np.arange(len(s_key)), frame_start, m_g, m_key, params, windows_days
    )
    return pl.concat([markers.select("tutor_id", "as_of"), evidence], how="horizontal")


_DAY_US: Final = 86_400_000_000
"""Microseconds in a day: windows over the integer time ``key``."""


def _reach_days(params: TierParams, windows: Sequence[int]) -> int:
    return max(params.baseline_days, params.cusum_horizon_days, *windows)


def _ranks(tutor_ids: pl.Series, tutors: pl.Series) -> np.ndarray:
    """Each id's position in ``tutors`` (sorted, unique, holding every id)."""
    return tutor_ids.cast(pl.Enum(tutors)).to_physical().to_numpy().astype(np.int64)


def _micros(times: pl.Series) -> np.ndarray:
    return times.dt.epoch("us").to_numpy()


@dataclass(frozen=True)
class _TimeKeys:
    """One integer per (tutor rank, instant): the instant in microseconds, offset by the rank
    times a span longer than the data plus any window, so that sorting by key sorts by tutor
    then time, and a window ``[key - W, key)`` never reaches another tutor."""

    base: int
    span: int

    @classmethod
    def fit(cls, tutors: int, micros: np.ndarray, reach_days: int) -> _TimeKeys:
        base = int(micros.min()) if micros.size else 0
        span = (int(micros.max()) - base if micros.size else 0) + reach_days * _DAY_US + 1
        if tutors * span >= 2**62:
            raise ValueError("too many tutors or too long a time range for one integer key")
        return cls(base, span)

    def key(self, ranks: np.ndarray, micros: np.ndarray) -> np.ndarray:
        return ranks * self.span + (micros - self.base)


def window_sums_at(
    sessions: pl.DataFrame, markers: pl.DataFrame, sums: Mapping[str, tuple[str, int]]
) -> pl.DataFrame:
    """One row per marker (``tutor_id``, ``as_of``), in the markers' order, with a column per
    entry of ``sums`` (name -> (an integer column of ``sessions``, days)): that column's total
    over the tutor's sessions (``tutor_id``, ``scheduled_time``) with ``as_of - days <=
    scheduled_time < as_of``; nulls count 0.

    Running totals at the windows' edges: a window is the sessions before ``as_of`` less those
    before ``as_of - days``, never a rolling sum at every session (tests hold the two equal)."""
    tutors = pl.concat([sessions.get_column("tutor_id"), markers.get_column("tutor_id")])
    tutors = tutors.unique().sort()
    s_us, m_us = _micros(sessions.get_column("scheduled_time")), _micros(markers["as_of"])
    keys = _TimeKeys.fit(
        tutors.len(),
        np.concatenate([s_us, m_us]),
        max((days for _, days in sums.values()), default=0),
    )
    s_key = keys.key(_ranks(sessions.get_column("tutor_id"), tutors), s_us)
    m_key = keys.key(_ranks(markers.get_column("tutor_id"), tutors), m_us)
    # A marker's window holds the sessions with key in [key - W, key): sessions at the
    # marker's own instant come after it. Every window edge, sorted: the sessions between two
    # edges are summed by one count in their own order (no sort of the sessions, no gather of
    # each column: the current snapshot's drivers at 10M, 0.9 -> 0.6 s), and the running sum
    # of those counts at edge j is the total of the sessions before it.
    ends = {0, *(days for _, days in sums.values())}
    at = {days: m_key - days * _DAY_US for days in ends}
    edges = np.unique(np.concatenate(list(at.values())))
    between = np.searchsorted(edges, s_key, side="right")  # how many edges are <= the session
    edge = {days: np.searchsorted(edges, bound) for days, bound in at.items()}
    running: dict[str, np.ndarray] = {}
    totals: dict[str, np.ndarray] = {}
    for name, (column, days) in sums.items():
        if column not in running:
            values = sessions.get_column(column).fill_null(0).to_numpy()
            # In int64, exactly (a float bincount loses integers past 2**53 of the whole
            # column's total, and is no faster).
            per_gap = np.zeros(len(edges) + 1, dtype=np.int64)
            np.add.at(per_gap, between, values.astype(np.int64, copy=False))
            running[column] = np.cumsum(per_gap)
        totals[name] = running[column][edge[0]] - running[column][edge[days]]
    return markers.select("tutor_id", "as_of").with_columns(
        pl.Series(name, total, dtype=pl.Int64) for name, total in totals.items()
    )


def _increments(x: np.ndarray, n: np.ndarray, moved: np.ndarray, params: TierParams) -> np.ndarray:
    """Each session's CUSUM increment from ``x`` moves of ``n`` sessions in its baseline
    window (polars' log, as everywhere else, so that the bits agree)."""
    p1 = params.p1
    baseline = pl.col("baseline_rate")
    increment = (
        pl.when(pl.col("moved") == 1)
        .then((p1 / baseline).log())
        .otherwise(((1 - p1) / (1 - baseline)).log())
    )
    return (
        pl.DataFrame({"x": x, "n": n, "moved": moved})
        .with_columns(baseline_rate(pl.col("x"), pl.col("n"), params).alias("baseline_rate"))
        .select(increment.alias("w"))
        .to_series()
        .to_numpy()
    )


@dataclass(frozen=True)
class _Sessions:
    """Sessions sorted by key, with what each needs whatever frame it is read in: ``before``
    (index of the first session at its own key), ``window_first`` (of the first in its
    baseline window) and ``w``, its increment when that window is whole."""

    g: np.ndarray
    key: np.ndarray
    moved: np.ndarray
    moves: np.ndarray
    before: np.ndarray
    window_first: np.ndarray
    w: np.ndarray

    @classmethod
    def build(
        cls, g: np.ndarray, key: np.ndarray, moved: np.ndarray, params: TierParams
    ) -> _Sessions:
        index = np.arange(len(key), dtype=np.int64)
        before = np.maximum.accumulate(np.where(np.diff(key, prepend=-1) != 0, index, 0))
        moved = moved.astype(np.int8)
        moves = np.concatenate([[0], np.cumsum(moved, dtype=np.int64)])
        first = np.searchsorted(key, key - params.baseline_days * _DAY_US, side="left")
        n, x = before - first, moves[before] - moves[first]
        if not params.baseline_days:
            n, x = np.zeros_like(n), np.zeros_like(x)
        return cls(g, key, moved, moves, before, first, _increments(x, n, moved, params))

    def counts(
        self, keys: np.ndarray, days: int, before: np.ndarray, frame_first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sessions and moves with key in ``[key - days, key)`` from ``frame_first`` on:
        exact integers, as polars' rolling sums of them."""
        first = np.maximum(
            np.searchsorted(self.key, keys - days * _DAY_US, side="left"), frame_first
        )
        return before - first, self.moves[before] - self.moves[first]


def _evidence(
    sessions: _Sessions,
    own: np.ndarray,
    frame_start: np.ndarray,
    m_g: np.ndarray,
    m_key: np.ndarray,
    params: TierParams,
    windows_days: Sequence[int],
) -> pl.DataFrame:
    """:func:`risk_evidence`'s columns after ``tutor_id`` and ``as_of``, one row per marker
    (``m_g``, ``m_key``, sorted by key), over the frame of sessions ``own`` (ascending indices
    into ``sessions``: per tutor ``g``, those from index ``frame_start[g]`` up to the markers),
    exactly as if those sessions were all there is."""
    n_s, n_m = len(own), len(m_key)
    m_before = np.searchsorted(sessions.key, m_key, side="left")
    m_first = frame_start[m_g]
    windows = sorted({params.posterior_window_days, *windows_days})
    at_marker: dict[str, np.ndarray] = {}
    for d in windows:
        at_marker[f"sessions_{d}d"], at_marker[f"reschedules_{d}d"] = sessions.counts(
            m_key, d, m_before, m_first
        )
    base = params.baseline_days
    m_n, m_x = (
        sessions.counts(m_key, base, m_before, m_first)
        if base
        else (np.zeros(n_m, dtype=np.int64), np.zeros(n_m, dtype=np.int64))
    )
    # A session whose baseline window starts before the frame reads only the frame's part
    # of it (as a frame of its own sessions would).
    s_first = frame_start[sessions.g[own]]
    w = sessions.w[own]
    cut = np.flatnonzero(sessions.window_first[own] < s_first) if base else np.zeros(0, int)
    if cut.size:
        rows = own[cut]
        first, before = s_first[cut], sessions.before[rows]
        w[cut] = _increments(
            sessions.moves[before] - sessions.moves[first],
            before - first,
            sessions.moved[rows],
            params,
        )

    # Sessions and markers merged by key, a marker before the sessions at its own key (a running
    # sum read at a marker covers exactly the sessions scheduled before it); markers add 0.
    # Floats run through the same polars operations as the frame "one row per session and
    # marker, per tutor" did, so that they agree to the last bit.
    local_before = np.searchsorted(own, m_before, side="left")
    index = np.arange(n_s)
    at = np.empty(n_s + n_m, dtype=np.int64)
    # Each session moves up by the markers at or before it: a count, not a search per session.
    markers_through = np.cumsum(np.bincount(local_before, minlength=n_s + 1))[:n_s]
    at[index + markers_through] = index
    at[local_before + np.arange(n_m)] = n_s + np.arange(n_m)
    horizon = f"{params.cusum_horizon_days * _DAY_US}i"
    statistic = (
        pl.DataFrame(
            {
                "g": np.concatenate([sessions.g[own], m_g])[at],
                "key": np.concatenate([sessions.key[own], m_key])[at],
                "is_marker": at >= n_s,
                "w": np.concatenate([w, np.zeros(n_m)])[at],
            }
        )
        .lazy()
        .with_columns(pl.col("key").set_sorted())
        .with_columns(pl.col("w").cum_sum().over("g").alias("c"))
        .select(
            "is_marker",
            "c",
            # Markers are not sessions: they never set the window's minimum.
            pl.when(~pl.col("is_marker"))
            .then(pl.col("c"))
            .rolling_min_by("key", horizon, closed="left")
            .alias("c_min"),
            # One pass equals one per tutor: polars restarts a window's running (Kahan) sum
            # whenever the window empties, as it does at each tutor's first row.
            pl.col("w").rolling_sum_by("key", horizon, closed="left").alias("w_sum"),
        )
        .filter(pl.col("is_marker"))
        .select(
            # max_horizontal skips the null minimum of an empty window (statistic 0).
            pl.max_horizontal("w_sum", pl.col("c") - pl.col("c_min"))
            .clip(lower_bound=0.0)
            .alias("cusum_statistic"),
        )
        .collect()
        .to_series()
    )
    p = params.posterior_window_days
    return pl.DataFrame(
        {
            "sessions": at_marker[f"sessions_{p}d"],
            "reschedules": at_marker[f"reschedules_{p}d"],
            **{f"sessions_{d}d": at_marker[f"sessions_{d}d"] for d in windows_days},
            **{f"reschedules_{d}d": at_marker[f"reschedules_{d}d"] for d in windows_days},
        }
    ).with_columns(
        pl.DataFrame({"x": m_x, "n": m_n})
        .with_columns(baseline_rate(pl.col("x"), pl.col("n"), params).alias("baseline_rate"))
        .get_column("baseline_rate"),
        statistic,
    )


def _session_order(events: pl.DataFrame, key: np.ndarray) -> np.ndarray | None:
    """The permutation sorting ``events`` by ``key`` then ``session_id`` (in their given order
    without that column); None when they are sorted already."""
    step = np.diff(key)
    ties = np.flatnonzero(step == 0)
    has_ids = "session_id" in events.columns
    if not np.any(step < 0):
        if not ties.size or not has_ids:
            return None
        ids = events.get_column("session_id")
        if not (ids.gather(ties) > ids.gather(ties + 1)).any():
            return None
    order = (
        pl.DataFrame({"key": key})
        .with_row_index("i")
        .sort("key", maintain_order=True)
        .get_column("i")
        .to_numpy()
        .astype(np.int64)
    )
    if not has_ids:
        return order
    # Sessions of one tutor at one instant (rare) in session_id order.
    step = np.diff(key[order])
    tied = np.flatnonzero(
        np.concatenate([[False], step == 0]) | np.concatenate([step == 0, [False]])
    )
    if tied.size:
        rows = order[tied]
        by_id = (
            pl.DataFrame(
                {"key": key[rows], "session_id": events.get_column("session_id").gather(rows)}
            )
            .with_row_index("i")
            .sort("key", "session_id")
            .get_column("i")
            .to_numpy()
        )
        order[tied] = rows[by_id]
    return order


def exact_sums(frame: pl.DataFrame, by: str, column: str) -> pl.DataFrame:
    """Per value of ``by``: the sum of the floats ``column``, correctly rounded, so the same
    bits whatever the order of the rows or how the frame lies in memory. (Polars' sum is not:
    its SIMD blocks follow the frame's chunks and alignment, so sorted terms are not enough;
    at 10M sessions that flipped one day's rounded prior between two runs.)"""
    groups = frame.group_by(by).agg(pl.col(column))
    totals = [math.fsum(terms) for terms in groups.get_column(column).to_list()]
    return groups.with_columns(pl.Series(column, totals, dtype=pl.Float64))


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
    positive = evidence.filter(pl.col("sessions") > 0)
    fitted = (
        positive.lazy()
        .group_by("as_of")
        .agg(
            pl.len().alias("tutors"),
            pl.col("sessions").sum().cast(pl.Float64).alias("sum_n"),
            pl.col("reschedules").sum().cast(pl.Float64).alias("sum_k"),
        )
        .join(
            exact_sums(
                positive.select(
                    "as_of",
                    (pl.col("reschedules").cast(pl.Float64) ** 2 / pl.col("sessions")).alias(
                        "sum_k2_over_n"
                    ),
                ),
                "as_of",
                "sum_k2_over_n",
            ).lazy(),
            on="as_of",
        )
        # Rounded, so that a prior does not carry more digits than it has meaning; the sums
        # are exact, so a recomputed snapshot gives the same rows.
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
    # Once per distinct (alpha, beta, k, n), the same values bit for bit: a day's tutors share
    # its prior and mostly a few counts, so over years of days betainc sees ~1 row in 12
    # (2.4 s -> 0.9 s for 5.5M rows, benchmarks/README.md).
    keys = pl.DataFrame({"alpha": alpha, "beta": beta, "k": k, "n": n})
    distinct = keys.unique()
    a, b = distinct.get_column("alpha").to_numpy(), distinct.get_column("beta").to_numpy()
    dk, dn = distinct.get_column("k").to_numpy(), distinct.get_column("n").to_numpy()
    # 1 - I_t(a, b) = I_{1-t}(b, a): the upper tail without cancellation near 1.
    tail = np.asarray(betainc(b + dn - dk, a + dk, 1.0 - threshold), dtype=np.float64)
    return (
        keys.join(
            distinct.with_columns(pl.Series("tail", tail)),
            on=keys.columns,
            how="left",
            maintain_order="left",
        )
        .get_column("tail")
        .to_numpy()
    )


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
        events = read_tier_sessions(con, **_sessions_read(first, last, params))
    markers = as_of_markers(read_first_sessions(con, end=last), instants)
    return compute_risk_tiers(events, markers, params)


def _sessions_read(first: datetime, last: datetime, params: TierParams) -> dict[str, datetime]:
    """The sessions tiers at instants ``first..last`` read: ``start`` and ``end``."""
    return {"start": first - timedelta(days=params.lookback_days), "end": last}


def day_instants(
    first_day: date, last_day: date, *, offset: timedelta, since_lookback_days: int
) -> list[datetime]:
    """The instants :func:`risk_tiers_for_days` evaluates: the end of each day from
    ``since_lookback_days`` before ``first_day`` to ``last_day``."""
    days = pl.date_range(
        first_day - timedelta(days=since_lookback_days), last_day, "1d", eager=True
    ).to_list()
    return [day_start(d + timedelta(days=1), offset) for d in days]


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
    instants = day_instants(
        first_day, last_day, offset=offset, since_lookback_days=since_lookback_days
    )
    tiers = risk_tiers_for_instants(con, instants, params, events=events)
    return tiers.filter(pl.col("as_of") >= day_start(first_day + timedelta(days=1), offset))


def risk_tiers_by_chunk(
    con: duckdb.DuckDBPyConnection,
    chunks: Sequence[tuple[date, date]],
    params: TierParams,
    *,
    offset: timedelta = timedelta(0),
    since_lookback_days: int = 30,
) -> Iterator[pl.DataFrame]:
    """For each chunk of days ``(first_day, last_day)`` in order, the rows of
    :func:`risk_tiers_for_days` on it, to the last bit, with the sessions read once for all.

    Each chunk still reads exactly its own sessions (running sums start where a call on it
    alone would start them), but the read, the tutors' ranks and first sessions are shared.
    """
    if not chunks:
        return
    per_chunk = [
        day_instants(first, last, offset=offset, since_lookback_days=since_lookback_days)
        for first, last in chunks
    ]
    reads = [_sessions_read(instants[0], instants[-1], params) for instants in per_chunk]
    end = max(r["end"] for r in reads)
    sessions = read_tier_sessions(con, start=min(r["start"] for r in reads), end=end)
    first_sessions = read_first_sessions(con, end=end)
    tutors = (
        pl.concat([sessions.get_column("tutor_id"), first_sessions.get_column("tutor_id")])
        .unique()
        .sort()
    )
    s_g = _ranks(sessions.get_column("tutor_id"), tutors)
    s_t = _micros(sessions.get_column("scheduled_time"))
    moved = sessions.get_column("moved_by_tutor").fill_null(False).to_numpy()
    f_g = _ranks(first_sessions.get_column("tutor_id"), tutors)
    f_t = _micros(first_sessions.get_column("first_scheduled_time"))
    times = [np.array([_micros_of(t) for t in instants]) for instants in per_chunk]
    keys = _TimeKeys.fit(
        len(tutors),
        np.concatenate([s_t, *times]),
        _reach_days(params, [params.posterior_window_days]),
    )
    s_key = keys.key(s_g, s_t)
    order = _session_order(sessions, s_key)
    del sessions
    if order is not None:
        s_g, s_t, s_key, moved = s_g[order], s_t[order], s_key[order], moved[order]
    all_sessions = _Sessions.build(s_g, s_key, moved, params)
    ranks = np.arange(len(tutors))
    for (first_day, _), instants, read in zip(chunks, times, reads, strict=True):
        lo, hi = _micros_of(read["start"]), _micros_of(read["end"])
        own = np.flatnonzero((s_t >= lo) & (s_t < hi))
        frame_start = np.searchsorted(s_key, keys.key(ranks, np.full(len(ranks), lo)))
        # Every instant after a tutor's first session, by tutor (as_of_markers, as arrays).
        starts = np.searchsorted(instants, f_t, side="right")
        per_tutor = len(instants) - starts
        m_g = np.repeat(f_g, per_tutor)
        shift = np.repeat(np.cumsum(per_tutor) - per_tutor - starts, per_tutor)
        m_t = instants[np.arange(len(m_g)) - shift]
        order = np.lexsort((m_t, m_g))
        m_g, m_t = m_g[order], m_t[order]
        evidence = _evidence(all_sessions, own, frame_start, m_g, keys.key(m_g, m_t), params, ())
        marks = pl.DataFrame(
            {
                "tutor_id": tutors.gather(m_g),
                "as_of": pl.Series(m_t).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
            }
        )
        evidence = pl.concat([marks, evidence], how="horizontal")
        tiers = tiers_from_evidence(evidence, params).select(list(TIER_SCHEMA))
        yield tiers.filter(pl.col("as_of") >= day_start(first_day + timedelta(days=1), offset))


def _micros_of(instant: datetime) -> int:
    return (as_utc(instant) - _EPOCH) // timedelta(microseconds=1)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


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
