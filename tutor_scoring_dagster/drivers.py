"""Why a flagged tutor is flagged, and what their manager can do about it (issue #11).

Drivers compare a flagged tutor's recent sessions with the whole population's over the same
window before the same as-of instant (a tutor's trend compares with the tutor's own past):

- ``short_notice``: share of the tutor's reschedules made less than ``short_notice_hours``
  before the session;
- ``reason_code``: the tutor's most frequent reschedule reason (``detail``) and its share;
- ``no_show``: share of sessions ending as a no-show;
- ``reschedule_rate``: share of sessions the tutor moved;
- ``trend``: the tutor's reschedule rate over the last ``trend_recent_days`` days against the
  tutor's own ``trend_baseline_days`` days before them.

``lift`` is ``tutor_value / max(population_value, lift_floor)``: the floor keeps a lift finite
when the reference is zero. Recommended actions come from a reviewed rule table kept as data
(``rules/recommended_actions.csv``), matched on driver, detail and minimum lift, value and count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.params import RULES_PATH, DriverParams
from tutor_scoring_dagster.risk_tiers import FLAGGED_TIERS, UTC_US, window_sums_at

DRIVERS: Final = ("short_notice", "reason_code", "no_show", "reschedule_rate", "trend")
_POPULATION: Final = "\x00population"  # a tutor id no export can hold: the whole population

DRIVER_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tutor_id": pl.String(),
    "as_of": UTC_US,
    "driver": pl.String(),
    "detail": pl.String(),
    "tutor_value": pl.Float64(),
    "population_value": pl.Float64(),
    "lift": pl.Float64(),
    "tutor_count": pl.Int64(),
    "tutor_base": pl.Int64(),
    "description": pl.String(),
}
"""Rows of ``tutor_risk_drivers``: ``tutor_value = tutor_count / tutor_base``;
``population_value`` is the population's value (for ``trend``: the tutor's own earlier rate);
``detail`` is the reason code for ``reason_code``, else null; ``description`` is one line for a
manager."""

ACTION_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tutor_id": pl.String(),
    "as_of": UTC_US,
    "risk_tier": pl.String(),
    "watch_since": UTC_US,
    "newly_flagged": pl.Boolean(),
    "risk_probability": pl.Float64(),
    "cusum_statistic": pl.Float64(),
    "top_drivers": pl.String(),
    "action": pl.String(),
    "action_rule_id": pl.String(),
    "action_priority": pl.Int64(),
}
"""Rows of :func:`recommend_actions`: one per flagged tutor and instant."""


class ActionRule(pa.DataFrameModel):
    """A row of ``rules/recommended_actions.csv``: when a driver matches, the action to take.

    A rule matches a driver row with the same ``driver`` (and ``detail``, when the rule has
    one) whose lift, value and count reach the rule's minimums. A tutor's action is the
    matching rule with the lowest ``priority`` (then the highest lift)."""

    rule_id: str = pa.Field(unique=True, str_length={"min_value": 1})
    driver: str = pa.Field(isin=DRIVERS)
    detail: str | None = pa.Field(nullable=True)
    min_lift: float = pa.Field(ge=0)
    min_tutor_value: float = pa.Field(ge=0, le=1)
    min_tutor_count: int = pa.Field(ge=0)
    priority: int = pa.Field(ge=1)
    action: str = pa.Field(str_length={"min_value": 1})

    class Config:
        strict = True


def load_action_rules(path: Path = RULES_PATH) -> pl.DataFrame:
    """The reviewed rule table, validated (:class:`ActionRule`)."""
    rules = pl.read_csv(
        path,
        schema_overrides={
            "rule_id": pl.String(),
            "driver": pl.String(),
            "detail": pl.String(),
            "min_lift": pl.Float64(),
            "min_tutor_value": pl.Float64(),
            "min_tutor_count": pl.Int64(),
            "priority": pl.Int64(),
            "action": pl.String(),
        },
    )
    return ActionRule.validate(rules, lazy=True)


def _pct(expr: pl.Expr) -> pl.Expr:
    return pl.format("{}%", (expr * 100).round(0).cast(pl.Int64))


def compute_drivers(
    events: pl.DataFrame, flagged: pl.DataFrame, params: DriverParams | None = None
) -> pl.DataFrame:
    """Driver rows (:data:`DRIVER_SCHEMA`) for each ``(tutor_id, as_of)`` of ``flagged``.

    ``events`` (risk_tiers.EVENT_SCHEMA) must hold every session, of every tutor, scheduled in
    the :attr:`DriverParams.lookback_days` days before each instant: the population's values
    are read from them too. A driver without a base (no reschedule, no session) has no row.
    """
    params = params or DriverParams()
    if flagged.is_empty():
        return pl.DataFrame(schema=DRIVER_SCHEMA)
    moved = pl.col("moved_by_tutor")
    codes: list[str] = (
        events.filter(moved & pl.col("reason_code").is_not_null())
        .get_column("reason_code")
        .unique()
        .sort()
        .to_list()
    )
    values = {
        "sessions": pl.lit(1, dtype=pl.Int64),
        "moved": moved.cast(pl.Int64),
        "no_shows": pl.col("no_show").cast(pl.Int64),
        "notice_known": (moved & pl.col("notice_hours").is_not_null()).cast(pl.Int64),
        "short_notice": (moved & (pl.col("notice_hours") < params.short_notice_hours)).cast(
            pl.Int64
        ),
        "reason_known": (moved & pl.col("reason_code").is_not_null()).cast(pl.Int64),
        **{
            f"reason_{i}": (moved & (pl.col("reason_code") == code)).fill_null(False).cast(pl.Int64)
            for i, code in enumerate(codes)
        },
    }
    w, recent = params.window_days, params.trend_recent_days
    long = recent + params.trend_baseline_days
    sums = {name: (name, w) for name in values}
    trend = {
        "recent_sessions": ("sessions", recent),
        "recent_moved": ("moved", recent),
        "long_sessions": ("sessions", long),
        "long_moved": ("moved", long),
    }
    markers = flagged.select("tutor_id", "as_of").unique()
    counted = events.select("tutor_id", "scheduled_time", **values)
    tutor = window_sums_at(
        counted.join(markers.select("tutor_id").unique(), on="tutor_id", how="semi"),
        markers,
        {**sums, **trend},
    )
    population = window_sums_at(
        counted.with_columns(pl.lit(_POPULATION).alias("tutor_id")),
        markers.select(pl.lit(_POPULATION).alias("tutor_id"), "as_of").unique(),
        sums,
    ).drop("tutor_id")
    both = tutor.join(population, on="as_of", how="left", suffix="_pop").with_columns(
        (pl.col("long_moved") - pl.col("recent_moved")).alias("baseline_moved"),
        (pl.col("long_sessions") - pl.col("recent_sessions")).alias("baseline_sessions"),
    )
    tv, pv = pl.col("tutor_value"), pl.col("population_value")
    frames = [
        _driver_rows(
            both,
            "short_notice",
            "short_notice",
            "notice_known",
            pl.format(
                "{} of reschedules at < {} h notice (population {})",
                _pct(tv),
                pl.lit(f"{params.short_notice_hours:g}"),
                _pct(pv),
            ),
            params,
        ),
        _driver_rows(
            both,
            "no_show",
            "no_shows",
            "sessions",
            pl.format("{} of sessions were no-shows (population {})", _pct(tv), _pct(pv)),
            params,
        ),
        _driver_rows(
            both,
            "reschedule_rate",
            "moved",
            "sessions",
            pl.format(
                "{} of sessions rescheduled in {} days (population {})",
                _pct(tv),
                pl.lit(w),
                _pct(pv),
            ),
            params,
        ),
        _driver_rows(
            both,
            "trend",
            "recent_moved",
            "recent_sessions",
            pl.format(
                "{} rescheduled in the last {} days (previous {} days: {})",
                _pct(tv),
                pl.lit(recent),
                pl.lit(params.trend_baseline_days),
                pl.when(pv.is_not_null()).then(_pct(pv)).otherwise(pl.lit("no sessions")),
            ),
            params,
            reference=("baseline_moved", "baseline_sessions"),
        ),
    ]
    if codes:
        # The tutor's most frequent reason (ties: the first code in sorted order).
        index = pl.concat_list(f"reason_{i}" for i in range(len(codes))).list.arg_max()
        with_reason = both.with_columns(index.alias("reason_index")).with_columns(
            pl.concat_list(f"reason_{i}" for i in range(len(codes)))
            .list.get(pl.col("reason_index"))
            .alias("reason_count"),
            pl.concat_list(f"reason_{i}_pop" for i in range(len(codes)))
            .list.get(pl.col("reason_index"))
            .alias("reason_count_pop"),
            pl.lit(pl.Series(codes)).gather(pl.col("reason_index")).alias("reason"),
        )
        frames.append(
            _driver_rows(
                with_reason.filter(pl.col("reason_count") > 0),
                "reason_code",
                "reason_count",
                "reason_known",
                pl.format(
                    "'{}' given for {} of reschedules (population {})",
                    pl.col("reason"),
                    _pct(tv),
                    _pct(pv),
                ),
                params,
                detail=pl.col("reason"),
            )
        )
    return (
        pl.concat(frames, how="vertical")
        .select(list(DRIVER_SCHEMA))
        .sort("tutor_id", "as_of", "driver")
    )


def _driver_rows(
    both: pl.DataFrame,
    driver: str,
    count: str,
    base: str,
    description: pl.Expr,
    params: DriverParams,
    *,
    reference: tuple[str, str] | None = None,
    detail: pl.Expr | None = None,
) -> pl.DataFrame:
    """One driver's rows: ``count / base`` for the tutor against the reference (by default the
    population's same ratio, columns suffixed ``_pop``); rows without a base are left out."""
    ref_count, ref_base = reference or (f"{count}_pop", f"{base}_pop")
    return (
        both.filter(pl.col(base) > 0)
        .with_columns(
            (pl.col(count) / pl.col(base)).alias("tutor_value"),
            pl.when(pl.col(ref_base) > 0)
            .then(pl.col(ref_count) / pl.col(ref_base))
            .alias("population_value"),
        )
        .select(
            "tutor_id",
            "as_of",
            pl.lit(driver).alias("driver"),
            (detail if detail is not None else pl.lit(None, pl.String)).alias("detail"),
            "tutor_value",
            "population_value",
            # No reference (e.g. a trend with no earlier sessions): no lift.
            pl.when(pl.col("population_value").is_not_null())
            .then(
                pl.col("tutor_value")
                / pl.max_horizontal(pl.col("population_value"), pl.lit(params.lift_floor))
            )
            .alias("lift"),
            pl.col(count).cast(pl.Int64).alias("tutor_count"),
            pl.col(base).cast(pl.Int64).alias("tutor_base"),
            description.alias("description"),
        )
    )


def recommend_actions(
    tiers: pl.DataFrame,
    drivers: pl.DataFrame,
    rules: pl.DataFrame,
    *,
    top_drivers: int = 2,
) -> pl.DataFrame:
    """Each flagged tutor's action and top drivers (:data:`ACTION_SCHEMA`), newly flagged
    tutors first, then by how recently the warning started, ``high`` before ``watch``, and
    the posterior probability.

    ``tiers`` are tier rows (risk_tiers.TIER_SCHEMA), ``drivers`` their :func:`compute_drivers`
    rows, ``rules`` the :func:`load_action_rules` table. The action is the most urgent matching
    rule's; a tutor no rule matches has a null action. ``top_drivers`` (the "why") lists up to
    ``top_drivers`` drivers that stand out (lift above 1: above the population, or above the
    tutor's own past), those matching a rule first, most urgent first, then by lift; a tutor
    with none has a null ``top_drivers``.
    """
    flagged = tiers.filter(pl.col("risk_tier").is_in(FLAGGED_TIERS))
    keys = ["tutor_id", "as_of"]
    matched = (
        drivers.join(rules, on="driver", how="inner", suffix="_rule")
        .filter(
            (pl.col("detail_rule").is_null() | (pl.col("detail_rule") == pl.col("detail")))
            & (pl.col("lift").fill_null(0.0) >= pl.col("min_lift"))
            & (pl.col("tutor_value") >= pl.col("min_tutor_value"))
            & (pl.col("tutor_count") >= pl.col("min_tutor_count"))
        )
        .sort([*keys, "priority", "lift"], descending=[False, False, False, True], nulls_last=True)
    )
    best = matched.group_by(keys, maintain_order=True).agg(
        pl.col("action").first(),
        pl.col("rule_id").first().alias("action_rule_id"),
        pl.col("priority").first().cast(pl.Int64).alias("action_priority"),
    )
    # A catch-all rule (min_lift 0) gives every flagged tutor an action, but a driver at or
    # below its reference ("8% rescheduled, population 10%") does not explain a flag.
    urgency = matched.group_by([*keys, "driver"]).agg(pl.col("priority").min())
    why = (
        drivers.filter(pl.col("lift") > 1)
        .join(urgency, on=[*keys, "driver"], how="left")
        .sort([*keys, "priority", "lift"], descending=[False, False, False, True], nulls_last=True)
        .group_by(keys, maintain_order=True)
        .agg(
            pl.col("description")
            .unique(maintain_order=True)
            .head(top_drivers)
            .str.join("; ")
            .alias("top_drivers")
        )
    )
    tier_rank = pl.col("risk_tier").replace_strict({"high": 0, "watch": 1}, return_dtype=pl.Int8)
    return (
        flagged.join(best, on=keys, how="left")
        .join(why, on=keys, how="left")
        .sort(
            [
                pl.col("newly_flagged"),
                pl.col("watch_since"),
                tier_rank,
                pl.col("risk_probability"),
                pl.col("tutor_id"),
            ],
            descending=[True, True, False, True, False],
            nulls_last=True,
        )
        .select(list(ACTION_SCHEMA))
    )
