"""Pandera models: the one truth of every table's columns and types.

The three *drop* models describe a landing file after its text has been parsed into types
(DESIGN.md, "Landing drops"): a field typed ``Optional[...]`` may be missing from a file, every
other field is required and must be non-empty. ``TutorScores`` describes a score snapshot
(DESIGN.md, "Scores"). Other modules derive their column lists from these models.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Final

import pandera.polars as pa
import polars as pl
from pandera.engines.polars_engine import DateTime

WINDOWS_DAYS: Final = (7, 30, 90)
SESSION_STATUSES: Final = ("completed", "rescheduled", "no_show")
INITIATORS: Final = ("tutor", "student")
RISK_STATUSES: Final = ("high", "ok", "insufficient_data")
RISK_TIERS: Final = ("high", "watch", "ok", "insufficient_data")
FLAGGED_TIERS: Final = ("high", "watch")
DRIVERS: Final = ("short_notice", "reason_code", "no_show", "reschedule_rate", "trend")
LONG_TEXT: Final = {"long_text": True}
"""Field metadata of free text longer than an identifier (a ``TEXT`` column in the store)."""

RATES: Final = {"reschedule_rate": "tutor_reschedules", "no_show_rate": "no_shows"}
"""Each windowed rate -> the windowed count it divides by ``total_sessions``."""

UTC_MICROS: Final = {"time_unit": "us", "time_zone": "UTC"}
"""Every timestamp in the warehouse is UTC with microsecond precision."""


def _utc(*, nullable: bool) -> pa.Field:  # type: ignore[valid-type]
    return pa.Field(dtype_kwargs=UTC_MICROS, nullable=nullable)


class TutorDrop(pa.DataFrameModel):
    """A row of a ``tutors*`` export."""

    tutor_id: str = pa.Field(str_length={"min_value": 1})
    name: str | None = pa.Field(nullable=True)
    email: str | None = pa.Field(nullable=True)
    is_active: bool | None = pa.Field(nullable=True)
    updated_at: DateTime | None = _utc(nullable=True)

    class Config:
        strict = False


class SessionDrop(pa.DataFrameModel):
    """A row of a ``sessions*`` export."""

    session_id: str = pa.Field(str_length={"min_value": 1})
    tutor_id: str = pa.Field(str_length={"min_value": 1})
    student_id: str | None = pa.Field(nullable=True)
    scheduled_time: DateTime = _utc(nullable=False)
    completed_time: DateTime | None = _utc(nullable=True)
    status: str = pa.Field(isin=SESSION_STATUSES)
    duration_minutes: int | None = pa.Field(ge=0, nullable=True)
    created_at: DateTime | None = _utc(nullable=True)
    updated_at: DateTime | None = _utc(nullable=True)

    class Config:
        strict = False

    @pa.dataframe_check(name="completed_time not before scheduled_time")
    def completed_after_scheduled(cls, data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(
            pl.col("completed_time").is_null()
            | (pl.col("completed_time") >= pl.col("scheduled_time"))
        )


class RescheduleDrop(pa.DataFrameModel):
    """A row of a ``reschedules*`` export."""

    session_id: str = pa.Field(str_length={"min_value": 1})
    initiator: str = pa.Field(isin=INITIATORS)
    original_time: DateTime | None = _utc(nullable=True)
    new_time: DateTime | None = _utc(nullable=True)
    reason: str | None = pa.Field(nullable=True)
    reason_code: str | None = pa.Field(nullable=True)
    cancelled_at: DateTime = _utc(nullable=False)
    hours_before_session: float | None = pa.Field(nullable=True)
    created_at: DateTime | None = _utc(nullable=True)

    class Config:
        strict = False


DROP_MODELS: Final[dict[str, type[pa.DataFrameModel]]] = {
    "tutors": TutorDrop,
    "sessions": SessionDrop,
    "reschedules": RescheduleDrop,
}
"""Entity name (the start of a landing file's name) -> its model."""


def drop_columns(entity: str) -> dict[str, pl.DataType]:
    """The contract's columns of an entity, in order, with their Polars types."""
    schema = DROP_MODELS[entity].to_schema()
    return {name: col.dtype.type for name, col in schema.columns.items()}


def required_columns(entity: str) -> list[str]:
    """Columns a file of this entity must have (a file without one is quarantined)."""
    schema = DROP_MODELS[entity].to_schema()
    return [name for name, col in schema.columns.items() if col.required]


def rate(numerator: pl.Expr, total: pl.Expr) -> pl.Expr:
    """A windowed rate: ``numerator / total``, null when the window is empty."""
    return pl.when(total > 0).then(numerator / total)


def high_risk(
    windows: Iterable[tuple[pl.Expr, pl.Expr]],
    threshold: pl.Expr | float,
    min_sessions: pl.Expr | int,
) -> pl.Expr:
    """The contract's risk rule over ``(tutor_reschedules, total_sessions)`` of each window: some
    window has at least ``min_sessions`` sessions and a reschedule rate above ``threshold``."""
    return pl.any_horizontal(
        (total >= min_sessions) & (rate(moved, total) > threshold) for moved, total in windows
    )


def risk_status(high: pl.Expr, windows: Iterable[pl.Expr], min_sessions: pl.Expr | int) -> pl.Expr:
    """``high``, else ``insufficient_data`` when no window (its total sessions in ``windows``)
    has ``min_sessions`` sessions, else ``ok``."""
    qualifies = pl.any_horizontal(total >= min_sessions for total in windows)
    return (
        pl.when(high)
        .then(pl.lit("high"))
        .when(~qualifies)
        .then(pl.lit("insufficient_data"))
        .otherwise(pl.lit("ok"))
    )


class TutorScores(pa.DataFrameModel):
    """One tutor's scores as of one instant (a row of a score snapshot)."""

    tutor_id: str
    as_of: DateTime = _utc(nullable=False)

    total_sessions_7d: int = pa.Field(ge=0)
    total_sessions_30d: int = pa.Field(ge=0)
    total_sessions_90d: int = pa.Field(ge=0)
    tutor_reschedules_7d: int = pa.Field(ge=0)
    tutor_reschedules_30d: int = pa.Field(ge=0)
    tutor_reschedules_90d: int = pa.Field(ge=0)
    no_shows_7d: int = pa.Field(ge=0)
    no_shows_30d: int = pa.Field(ge=0)
    no_shows_90d: int = pa.Field(ge=0)

    reschedule_rate_7d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    reschedule_rate_30d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    reschedule_rate_90d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    no_show_rate_7d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    no_show_rate_30d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    no_show_rate_90d: float = pa.Field(in_range={"min_value": 0, "max_value": 1}, nullable=True)
    reschedule_rate_7d_lower95: float = pa.Field(ge=0, le=1, nullable=True)
    reschedule_rate_30d_lower95: float = pa.Field(ge=0, le=1, nullable=True)
    reschedule_rate_90d_lower95: float = pa.Field(ge=0, le=1, nullable=True)
    no_show_rate_7d_lower95: float = pa.Field(ge=0, le=1, nullable=True)
    no_show_rate_30d_lower95: float = pa.Field(ge=0, le=1, nullable=True)
    no_show_rate_90d_lower95: float = pa.Field(ge=0, le=1, nullable=True)

    reschedule_rate_30d_change_7d: float = pa.Field(
        in_range={"min_value": -1, "max_value": 1}, nullable=True
    )
    is_high_risk: bool
    risk_status: str = pa.Field(isin=RISK_STATUSES)
    newly_high_risk: bool
    no_longer_high_risk: bool
    risk_threshold: float = pa.Field(in_range={"min_value": 0, "max_value": 1})
    min_sessions: int = pa.Field(ge=1)

    class Config:
        strict = True
        unique = ["tutor_id", "as_of"]

    @pa.dataframe_check(name="counts within their window: 7d <= 30d <= 90d, parts <= total")
    def counts_nest(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ok = pl.lit(True)
        for w in WINDOWS_DAYS:
            total = pl.col(f"total_sessions_{w}d")
            ok = ok & (pl.col(f"tutor_reschedules_{w}d") <= total)
            ok = ok & (pl.col(f"no_shows_{w}d") <= total)
        for short, long in itertools.pairwise(WINDOWS_DAYS):
            for count in ("total_sessions", *RATES.values()):
                ok = ok & (pl.col(f"{count}_{short}d") <= pl.col(f"{count}_{long}d"))
        return data.lazyframe.select(ok)

    @pa.dataframe_check(name="rate = numerator / total, null only when the window is empty")
    def rates_match_counts(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ok = pl.lit(True)
        for w in WINDOWS_DAYS:
            total = pl.col(f"total_sessions_{w}d")
            for rate_name, count in RATES.items():
                r = pl.col(f"{rate_name}_{w}d")
                expected = pl.col(f"{count}_{w}d") / total
                ok = ok & pl.when(total == 0).then(r.is_null()).otherwise(
                    r.is_not_null() & ((r - expected).abs() <= 1e-9)
                )
        return data.lazyframe.select(ok)

    @pa.dataframe_check(name="Wilson lower bound <= rate, null together")
    def wilson_below_rate(cls, data: pa.PolarsData) -> pl.LazyFrame:
        ok = pl.lit(True)
        for w in WINDOWS_DAYS:
            for rate_name in RATES:
                r, lo = pl.col(f"{rate_name}_{w}d"), pl.col(f"{rate_name}_{w}d_lower95")
                ok = ok & pl.when(r.is_null()).then(lo.is_null()).otherwise(lo <= r + 1e-12)
        return data.lazyframe.select(ok)

    @pa.dataframe_check(name="risk follows the rule kept on the row")
    def risk_follows_rule(cls, data: pa.PolarsData) -> pl.LazyFrame:
        totals = [pl.col(f"total_sessions_{w}d") for w in WINDOWS_DAYS]
        high = high_risk(
            (
                (pl.col(f"tutor_reschedules_{w}d"), pl.col(f"total_sessions_{w}d"))
                for w in WINDOWS_DAYS
            ),
            pl.col("risk_threshold"),
            pl.col("min_sessions"),
        )
        status = risk_status(high, totals, pl.col("min_sessions"))
        ok = (pl.col("is_high_risk") == high) & (pl.col("risk_status") == status)
        # Newly / no longer high risk compare with the day before: they imply today's flag.
        ok = ok & ~(pl.col("newly_high_risk") & pl.col("no_longer_high_risk"))
        ok = ok & (~pl.col("newly_high_risk") | pl.col("is_high_risk"))
        ok = ok & (~pl.col("no_longer_high_risk") | ~pl.col("is_high_risk"))
        return data.lazyframe.select(ok)


class TutorRiskTiers(pa.DataFrameModel):
    """One tutor's risk tier as of one instant, with its evidence and, for a flagged tutor,
    the top drivers and the recommended action (issue #11; beside the contract's
    ``is_high_risk``, which keeps its meaning)."""

    tutor_id: str
    as_of: DateTime = _utc(nullable=False)
    risk_tier: str = pa.Field(isin=RISK_TIERS)
    risk_probability: float = pa.Field(ge=0, le=1, nullable=True)
    """P(true reschedule rate > threshold | the tutor's sessions), beta-binomial posterior."""
    cusum_statistic: float = pa.Field(ge=0, nullable=True)
    """The Bernoulli CUSUM statistic S = C - min C at the instant (``watch`` above its limit)."""
    watch_since: DateTime = _utc(nullable=True)
    """The first instant of the current unbroken ``watch``/``high`` run."""
    newly_flagged: bool
    prior_alpha: float = pa.Field(gt=0, nullable=True)
    prior_beta: float = pa.Field(gt=0, nullable=True)
    top_drivers: str = pa.Field(nullable=True, metadata=LONG_TEXT)
    recommended_action: str = pa.Field(nullable=True, metadata=LONG_TEXT)

    class Config:
        strict = True
        unique = ["tutor_id", "as_of"]

    @pa.dataframe_check(name="only watch/high tutors are flagged, have a start and an action")
    def flagged_consistent(cls, data: pa.PolarsData) -> pl.LazyFrame:
        flagged = pl.col("risk_tier").is_in(FLAGGED_TIERS)
        ok = (~pl.col("newly_flagged") | flagged) & (flagged == pl.col("watch_since").is_not_null())
        ok = ok & (flagged | pl.col("recommended_action").is_null())
        ok = ok & (pl.col("watch_since").is_null() | (pl.col("watch_since") <= pl.col("as_of")))
        return data.lazyframe.select(ok)


class TutorRiskDrivers(pa.DataFrameModel):
    """Why a flagged tutor is flagged: one driver of one tutor as of one instant, the tutor's
    value against the population's (for ``trend``: the tutor's own earlier rate)."""

    tutor_id: str
    as_of: DateTime = _utc(nullable=False)
    driver: str = pa.Field(isin=DRIVERS)
    detail: str = pa.Field(nullable=True)
    """The reason code, for ``reason_code``; else null."""
    tutor_value: float = pa.Field(ge=0, le=1)
    population_value: float = pa.Field(ge=0, le=1, nullable=True)
    lift: float = pa.Field(ge=0, nullable=True)
    tutor_count: int = pa.Field(ge=0)
    tutor_base: int = pa.Field(gt=0)
    description: str = pa.Field(metadata=LONG_TEXT)

    class Config:
        strict = True
        unique = ["tutor_id", "as_of", "driver"]


def score_columns() -> list[str]:
    """Columns of a score snapshot, in order."""
    return list(TutorScores.to_schema().columns)


def score_schema() -> dict[str, pl.DataType]:
    """Columns of a score snapshot, in order, with their Polars types."""
    return model_schema(TutorScores)


def model_schema(model: type[pa.DataFrameModel]) -> dict[str, pl.DataType]:
    """A model's columns, in order, with their Polars types."""
    return {name: col.dtype.type for name, col in model.to_schema().columns.items()}


def score_row_schema() -> dict[str, pl.DataType]:
    """Columns of a stored score row: the snapshot's scores, then its risk tier."""
    tiers = model_schema(TutorRiskTiers)
    return {**score_schema(), **{k: v for k, v in tiers.items() if k not in ("tutor_id", "as_of")}}


def is_long_text(model: type[pa.DataFrameModel], column: str) -> bool:
    """Whether a model's column holds free text (a ``TEXT`` column in the store)."""
    return bool((model.to_schema().columns[column].metadata or {}).get("long_text"))
