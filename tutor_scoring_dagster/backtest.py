"""Backtest of risk rules: replay daily as-of snapshots from the warehouse and score the flags
against ground truth (issue #11).

Every snapshot day of the range is computed at once (one frame of tutor x day markers, see
risk_tiers.py), for four rules:

- ``original``: some 7/30/90-day reschedule rate above the threshold, from a single session on
  (the original system);
- ``min_sessions_5``: the contract's ``is_high_risk`` (at least 5 sessions in that window);
- ``watch_or_high``: risk tier ``watch`` or ``high``;
- ``high``: risk tier ``high``.

With labels (the generator's ``ground_truth.csv``) each rule is scored on:

- false alarms: flagged tutor-days of *steady* tutors, i.e. profile ``reliable`` or
  ``near_threshold`` with no onset and a true rate of at most :data:`STEADY_MAX_RATE`;
- deteriorating tutors whose onset leaves :data:`RECALL_DAYS` days inside the range: the share
  flagged on some snapshot day ``d`` with ``onset <= d <= onset + 21 days`` (snapshot ``d`` is as
  of the end of day ``d``, so it already holds the onset day's sessions), and the median of days
  from onset to the first such flag (a tutor never flagged counts as later than all others);
- the share of chronic tutors' tutor-days that are flagged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Final

import duckdb
import polars as pl

from tutor_scoring_dagster.risk_tiers import (
    FLAGGED_TIERS,
    TierParams,
    as_of_markers,
    read_first_sessions,
    read_session_events,
    risk_evidence,
    tiers_from_evidence,
)
from tutor_scoring_dagster.schemas import WINDOWS_DAYS, high_risk
from tutor_scoring_dagster.scoring import partition_as_of

RULES: Final = {
    "original": "any 7/30/90-day rate > threshold, >= 1 session",
    "min_sessions_5": "any 7/30/90-day rate > threshold, >= 5 sessions (is_high_risk)",
    "watch_or_high": "risk tier watch or high",
    "high": "risk tier high",
}
"""Rules the backtest scores, by name, with what each flags."""
BASELINE_RULE: Final = "original"
STEADY_PROFILES: Final = ("reliable", "near_threshold")
STEADY_MAX_RATE: Final = 0.12
RECALL_DAYS: Final = 21

GOAL: Final = {
    "max_false_alarm_ratio": 0.25,
    "min_recall_21d": 0.90,
    "max_extra_median_delay_days": 2.0,
    "min_chronic_flagged_share": 0.95,
}
"""What ``watch_or_high`` must achieve against ``original`` (issue #11)."""

_NEVER: Final = 1_000_000  # days: stands for "never flagged" in the censored median

SUMMARY_SCHEMA: Final[dict[str, pl.DataType]] = {
    "rule": pl.String(),
    "flags": pl.String(),
    "tutor_days": pl.Int64(),
    "flagged_tutor_days": pl.Int64(),
    "steady_tutor_days": pl.Int64(),
    "steady_false_alarm_days": pl.Int64(),
    "steady_false_alarm_rate": pl.Float64(),
    "false_alarms_vs_original": pl.Float64(),
    "reliable_flagged_share": pl.Float64(),
    "near_threshold_flagged_share": pl.Float64(),
    "deteriorating_tutors": pl.Int64(),
    "recall_21d": pl.Float64(),
    "median_delay_days": pl.Float64(),
    "median_delay_vs_original_days": pl.Float64(),
    "chronic_tutor_days": pl.Int64(),
    "chronic_flagged_share": pl.Float64(),
}
"""One row per rule; the label columns are null without labels."""


@dataclass(frozen=True)
class BacktestResults:
    """What :func:`run_backtest` found, with renderers."""

    start: date
    end: date
    every_days: int
    params: TierParams
    summary: pl.DataFrame
    """One row per rule (:data:`SUMMARY_SCHEMA`)."""
    daily: pl.DataFrame = field(repr=False)
    """One row per tutor and snapshot day: ``tutor_id``, ``day``, ``risk_tier``,
    ``cusum_statistic``, ``risk_probability``, ``baseline_rate`` and a boolean column per
    rule."""
    seconds: float = 0.0

    def goal_failures(self) -> list[str]:
        """How ``watch_or_high`` misses the issue's goal against ``original`` (empty: met)."""
        rows = {r["rule"]: r for r in self.summary.iter_rows(named=True)}
        new = rows["watch_or_high"]
        if new["recall_21d"] is None:
            return ["no labels: the goal cannot be checked"]
        failures = []
        ratio = new["false_alarms_vs_original"]
        if ratio is None or ratio > GOAL["max_false_alarm_ratio"]:
            failures.append(f"false alarms {ratio} x original > {GOAL['max_false_alarm_ratio']}")
        if new["recall_21d"] < GOAL["min_recall_21d"]:
            failures.append(f"recall within 21 days {new['recall_21d']:.3f} < 0.90")
        extra = new["median_delay_vs_original_days"]
        if extra is None or extra > GOAL["max_extra_median_delay_days"]:
            failures.append(f"median delay {extra} days behind original > 2")
        chronic = new["chronic_flagged_share"]
        if chronic is None or chronic < GOAL["min_chronic_flagged_share"]:
            failures.append(f"chronic tutors flagged on {chronic} of days < 0.95")
        return failures

    def to_markdown(self) -> str:
        """The summary as a Markdown table (rates in percent, delays in days)."""
        columns = {
            "rule": "rule",
            "flagged_tutor_days": "flagged tutor-days",
            "steady_false_alarm_days": "steady false-alarm tutor-days",
            "false_alarms_vs_original": "vs original",
            "reliable_flagged_share": "reliable flagged",
            "near_threshold_flagged_share": "near-threshold flagged",
            "recall_21d": "deteriorating flagged <= 21 d",
            "median_delay_days": "median delay (d)",
            "chronic_flagged_share": "chronic days flagged",
        }
        percent = {
            "false_alarms_vs_original",
            "reliable_flagged_share",
            "near_threshold_flagged_share",
            "recall_21d",
            "chronic_flagged_share",
        }

        def cell(name: str, value: object) -> str:
            if value is None:
                return "-"
            if name in percent:
                return f"{100 * float(value):.1f}%"  # type: ignore[arg-type]
            if isinstance(value, float):
                return f"{value:g}"
            return f"{value:,}" if isinstance(value, int) else str(value)

        lines = [
            "| " + " | ".join(columns.values()) + " |",
            "|" + "|".join("---" if c == "rule" else "---:" for c in columns) + "|",
        ]
        for row in self.summary.iter_rows(named=True):
            lines.append("| " + " | ".join(cell(c, row[c]) for c in columns) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, object]:
        """Range, parameters, definitions and the summary rows (JSON-ready)."""
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "every_days": self.every_days,
            "params": self.params.as_dict(),
            "definitions": {
                "rules": RULES,
                "steady": f"profile in {list(STEADY_PROFILES)}, no onset, "
                f"true_reschedule_rate <= {STEADY_MAX_RATE}",
                "recall_days": RECALL_DAYS,
                "goal": GOAL,
            },
            "seconds": round(self.seconds, 3),
            "summary": self.summary.to_dicts(),
            "goal_failures": self.goal_failures(),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def read_labels(path: Path) -> pl.DataFrame:
    """The ground truth columns the backtest reads: ``tutor_id``, ``profile``,
    ``true_reschedule_rate``, ``onset`` (a date, null when none)."""
    try:
        return pl.read_csv(path, columns=list(LABEL_SCHEMA), schema_overrides=LABEL_SCHEMA)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path} is not a ground_truth.csv as `tutor-scoring generate` writes one (columns "
            f"{', '.join(LABEL_SCHEMA)}): {first}"
        ) from None


LABEL_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tutor_id": pl.String(),
    "profile": pl.String(),
    "true_reschedule_rate": pl.Float64(),
    "onset": pl.Date(),
}
"""The columns of a ground truth file the backtest reads."""


def snapshot_flags(events: pl.DataFrame, markers: pl.DataFrame, params: TierParams) -> pl.DataFrame:
    """Per marker: ``tutor_id``, ``day`` (the snapshot day whose end is ``as_of``),
    ``risk_tier``, ``cusum_statistic``, ``risk_probability``, ``baseline_rate`` (the rate the
    CUSUM judged the tutor against) and one boolean per rule."""
    evidence = risk_evidence(events, markers, params, windows_days=WINDOWS_DAYS)
    tiers = tiers_from_evidence(evidence, params)
    windows = [(pl.col(f"reschedules_{w}d"), pl.col(f"sessions_{w}d")) for w in WINDOWS_DAYS]
    return tiers.select(
        "tutor_id",
        (pl.col("as_of").dt.date() - pl.duration(days=1)).alias("day"),
        "risk_tier",
        "cusum_statistic",
        "risk_probability",
        "baseline_rate",
        high_risk(windows, params.threshold, 1).alias("original"),
        high_risk(windows, params.threshold, 5).alias("min_sessions_5"),
        pl.col("risk_tier").is_in(FLAGGED_TIERS).alias("watch_or_high"),
        (pl.col("risk_tier") == "high").alias("high"),
    ).sort("tutor_id", "day")


def summarize(
    daily: pl.DataFrame, labels: pl.DataFrame | None, *, start: date, end: date
) -> pl.DataFrame:
    """Score each rule's daily flags (:func:`snapshot_flags`) against ``labels``
    (:func:`read_labels`); rows follow :data:`SUMMARY_SCHEMA`."""
    long = daily.unpivot(
        index=["tutor_id", "day"], on=list(RULES), variable_name="rule", value_name="flagged"
    )
    totals = long.group_by("rule").agg(
        pl.len().cast(pl.Int64).alias("tutor_days"),
        pl.col("flagged").sum().cast(pl.Int64).alias("flagged_tutor_days"),
    )
    order = pl.DataFrame({"rule": list(RULES), "flags": list(RULES.values())})
    if labels is None:
        known = {"flags", *totals.columns}
        return order.join(totals, on="rule", how="left").select(
            pl.col(c).cast(t) if c in known else pl.lit(None, t).alias(c)
            for c, t in SUMMARY_SCHEMA.items()
        )

    labelled = long.join(labels, on="tutor_id", how="inner")
    steady = (
        pl.col("profile").is_in(STEADY_PROFILES)
        & pl.col("onset").is_null()
        & (pl.col("true_reschedule_rate") <= STEADY_MAX_RATE)
    )
    shares = labelled.group_by("rule").agg(
        steady.sum().cast(pl.Int64).alias("steady_tutor_days"),
        (steady & pl.col("flagged")).sum().cast(pl.Int64).alias("steady_false_alarm_days"),
        pl.col("flagged")
        .filter(pl.col("profile") == "reliable")
        .mean()
        .alias("reliable_flagged_share"),
        pl.col("flagged")
        .filter(pl.col("profile") == "near_threshold")
        .mean()
        .alias("near_threshold_flagged_share"),
        (pl.col("profile") == "chronic").sum().cast(pl.Int64).alias("chronic_tutor_days"),
        pl.col("flagged")
        .filter(pl.col("profile") == "chronic")
        .mean()
        .alias("chronic_flagged_share"),
    )
    eligible = (
        (pl.col("profile") == "deteriorating")
        & (pl.col("onset") >= start)
        & (pl.col("onset") + pl.duration(days=RECALL_DAYS) <= end)
    )
    first_flags = (
        labelled.filter(eligible & pl.col("flagged") & (pl.col("day") >= pl.col("onset")))
        .group_by("rule", "tutor_id")
        .agg(((pl.col("day") - pl.col("onset")).dt.total_days().min()).alias("delay"))
    )
    onsets = labelled.filter(eligible).select("rule", "tutor_id").unique()
    delays = (
        onsets.join(first_flags, on=["rule", "tutor_id"], how="left")
        .group_by("rule")
        .agg(
            pl.len().cast(pl.Int64).alias("deteriorating_tutors"),
            (pl.col("delay") <= RECALL_DAYS).fill_null(False).mean().alias("recall_21d"),
            pl.col("delay").fill_null(_NEVER).median().alias("median_delay_days"),
        )
        .with_columns(
            pl.when(pl.col("median_delay_days") < _NEVER).then(pl.col("median_delay_days"))
        )
    )
    summary = (
        order.join(totals, on="rule", how="left")
        .join(shares, on="rule", how="left")
        .join(delays, on="rule", how="left")
    )
    baseline = summary.filter(pl.col("rule") == BASELINE_RULE)
    base_alarms = baseline.get_column("steady_false_alarm_days").item()
    base_delay = baseline.get_column("median_delay_days").item()
    return summary.with_columns(
        (pl.col("steady_false_alarm_days") / pl.col("steady_tutor_days")).alias(
            "steady_false_alarm_rate"
        ),
        (pl.col("steady_false_alarm_days") / pl.lit(base_alarms if base_alarms else None)).alias(
            "false_alarms_vs_original"
        ),
        (pl.col("median_delay_days") - pl.lit(base_delay, dtype=pl.Float64)).alias(
            "median_delay_vs_original_days"
        ),
        pl.col("deteriorating_tutors").fill_null(0),
    ).select(pl.col(c).cast(t) for c, t in SUMMARY_SCHEMA.items())


def run_backtest(
    con: duckdb.DuckDBPyConnection,
    start: date,
    end: date,
    every_days: int = 1,
    labels: Path | None = None,
    params: TierParams | None = None,
) -> BacktestResults:
    """Replay the snapshots as of the end of every ``every_days``-th day of ``start..end`` from
    the warehouse, all days and tutors at once, and score each rule of :data:`RULES` (against
    ``labels``, a ground_truth.csv, when given)."""
    if every_days < 1:
        raise ValueError(f"every_days must be >= 1, got {every_days}")
    if start > end:
        raise ValueError(f"start {start} is after end {end}")
    params = params or TierParams()
    began = time.perf_counter()
    days = pl.date_range(start, end, timedelta(days=every_days), eager=True).to_list()
    instants = [partition_as_of(d) for d in days]
    reach = max(params.lookback_days, *WINDOWS_DAYS)
    events = read_session_events(con, start=instants[0] - timedelta(days=reach), end=instants[-1])
    markers = as_of_markers(read_first_sessions(con, end=instants[-1]), instants)
    daily = snapshot_flags(events, markers, params)
    summary = summarize(
        daily, read_labels(labels) if labels is not None else None, start=start, end=end
    )
    return BacktestResults(
        start=start,
        end=end,
        every_days=every_days,
        params=params,
        summary=summary,
        daily=daily,
        seconds=time.perf_counter() - began,
    )
