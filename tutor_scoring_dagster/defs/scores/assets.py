"""Scores: daily activity, rolling 7/30/90-day rates, daily partitions, hourly snapshot."""

from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import dagster as dg
import duckdb
import polars as pl

from tutor_scoring_dagster.ahead import one_behind
from tutor_scoring_dagster.assessment import (
    AssessParams,
    assess_as_of,
    assess_days_by_chunk,
    reach_days,
)
from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.partitions import daily_partitions
from tutor_scoring_dagster.defs.resources import RiskRuleResource, WarehouseResource
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import FLAGGED_TIERS
from tutor_scoring_dagster.scoring import (
    LOOKBACK_DAYS,
    as_utc,
    floor_to_hour,
    materialize_daily_activity,
    partition_as_of,
)
from tutor_scoring_dagster.warehouse import fetch_one, newest_load, replace_rows, replace_tables

TOP_RISKS = 10
"""High-risk rows the asset page previews."""
LOADS_THROUGH: Final = "loads_through"
"""Metadata of the score assets: the newest warehouse load the scores saw."""


def _top_risk_rows(scores: pl.DataFrame) -> pl.DataFrame:
    """The high-risk tutors with the highest 30-day reschedule rates, each once (on a range of
    days, at their highest: a range run would otherwise list one tutor once per day)."""
    high = scores.filter(pl.col("is_high_risk")).sort(
        "reschedule_rate_30d", "as_of", "tutor_id", descending=[True, False, False]
    )
    return high.unique("tutor_id", keep="first", maintain_order=True).head(TOP_RISKS)


def _top_risks(high: pl.DataFrame) -> str:
    if high.height == 0:
        return "No high-risk tutors."
    lines = ["| tutor | as of | 7d | 30d | 90d | sessions 30d |", "|---|---|---|---|---|---|"]
    for r in high.iter_rows(named=True):
        rates = [
            "-" if r[f"reschedule_rate_{w}d"] is None else f"{r[f'reschedule_rate_{w}d']:.0%}"
            for w in (7, 30, 90)
        ]
        lines.append(
            f"| {r['tutor_id']} | {r['as_of']:%Y-%m-%d %H:%M} | {' | '.join(rates)} "
            f"| {r['total_sessions_30d']} |"
        )
    return "\n".join(lines)


class ScoreTally:
    """Counts (rows per risk tier too) and the top risks of score rows, for the asset page,
    taken a part at a time: a backfill stores its parts as they come, never all at once."""

    def __init__(self) -> None:
        self._tutors: list[pl.Series] = []
        self._counts: Counter[str] = Counter()
        self._top: list[pl.DataFrame] = []

    def add(self, scores: pl.DataFrame) -> pl.DataFrame:
        """Count ``scores`` in; returns them, to be passed on."""
        self._tutors.append(scores.get_column("tutor_id").unique())
        self._counts["rows"] += scores.height
        self._counts["high_risk_rows"] += int(scores.get_column("is_high_risk").sum())
        for tier in FLAGGED_TIERS:
            self._counts[f"{tier}_tier_rows"] += scores.filter(pl.col("risk_tier") == tier).height
        self._counts["newly_flagged_rows"] += int(scores.get_column("newly_flagged").sum())
        top = _top_risk_rows(scores)
        # Copied out: a slice of the chunk would keep its sorted high-risk rows in memory.
        self._top.append(pl.DataFrame(top.rows(), schema=top.schema, orient="row"))
        return scores

    def metadata(self) -> dict[str, dg.MetadataValue]:
        tutors = pl.concat(self._tutors).n_unique() if self._tutors else 0
        top = _top_risk_rows(pl.concat(self._top)) if self._top else pl.DataFrame()
        counts = ["rows", "high_risk_rows", *(f"{t}_tier_rows" for t in FLAGGED_TIERS)]
        return {
            "tutors_scored": dg.MetadataValue.int(tutors),
            **{name: dg.MetadataValue.int(self._counts[name]) for name in counts},
            "newly_flagged_rows": dg.MetadataValue.int(self._counts["newly_flagged_rows"]),
            "top_risks": dg.MetadataValue.md(_top_risks(top)),
        }


def score_metadata(scores: pl.DataFrame) -> dict[str, dg.MetadataValue]:
    """Counts (rows per risk tier too) and a preview of the top risks, for the asset page."""
    tally = ScoreTally()
    tally.add(scores)
    return tally.metadata()


@dg.asset(
    group_name="scores",
    kinds={"duckdb"},
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="warehouse",
    deps=[landing_drops],
    owners=["team:data"],
)
def tutor_daily_activity(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Per tutor and day: sessions, sessions the tutor rescheduled, and no-shows (by the
    original scheduled time), in the warehouse table `tutor_daily_activity`."""
    window = context.partition_time_window
    first_day, last_day = window.start.date(), (window.end - timedelta(days=1)).date()
    with warehouse.connect() as con:
        rows = materialize_daily_activity(con, first_day, last_day)
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(rows),
            "days": dg.MetadataValue.int((last_day - first_day).days + 1),
        }
    )


@dg.asset(
    group_name="scores",
    kinds={"polars", "duckdb"},
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="warehouse",
    deps=[
        dg.AssetDep(
            tutor_daily_activity,
            # A day's windows read the 90 days (and the trend 7 more) before it, and its risk
            # tier (default parameters) its baseline's days, so a change to one day's activity
            # makes the following days' snapshots stale too.
            partition_mapping=dg.TimeWindowPartitionMapping(
                start_offset=-max(LOOKBACK_DAYS, reach_days(AssessParams()) + 1),
                allow_nonexistent_upstream_partitions=True,
            ),
        )
    ],
    owners=["team:data"],
)
def tutor_scores_daily(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, risk_rule: RiskRuleResource
) -> dg.MaterializeResult:
    """Each tutor's scores as of the end of each day (rolling 7/30/90-day rates, Wilson
    bounds, risk, and the risk tier with its evidence), validated by the
    `TutorScores` and `TutorRiskTiers` schemas, in the warehouse table
    `tutor_scores_daily`. A multi-day backfill runs as one vectorized run with the same rows
    as one run per day. The counts come from the warehouse's sessions through the same SQL
    as `tutor_daily_activity`, so a partition never depends on which earlier partitions
    happened to be materialized."""
    window = context.partition_time_window
    first_day, last_day = window.start.date(), (window.end - timedelta(days=1)).date()
    tally = ScoreTally()
    start, end = partition_as_of(first_day), partition_as_of(last_day + timedelta(days=1))
    with (
        warehouse.connect() as con,
        con.cursor() as writer,
        # Closed before the connection, however storing ends: the assessment's threads are done.
        closing(
            assess_days_by_chunk(
                con,
                first_day,
                last_day,
                risk_rule.rule(),
                risk_rule.assess_params(),
                with_drivers=False,
            )
        ) as chunks,
    ):
        # The loads these days saw, read before any is assessed: the checks, a later step, may
        # see newer ones.
        loads_through = newest_load(con)
        # Tiers and their evidence for every day; drivers and actions are the current
        # snapshot's (tutor_scores_current): over years of history they would cost more than
        # the scores themselves.

        def tallied() -> Iterator[pl.DataFrame]:
            for chunk in chunks:
                scores = tally.add(chunk.scores)
                del chunk
                yield scores
                del scores  # stored by now: not kept while the next chunk is assessed

        # Partition D holds the snapshot as of D + 1 day (all of its own rows, nothing else).
        # Each chunk of days is stored (in one transaction, on a thread and a connection of its
        # own) while the next is assessed: years of rows are never all in memory (~0.5 GB off
        # the rebuild's peak, benchmarks/README.md).
        one_behind(
            lambda parts: replace_rows(writer, "tutor_scores_daily", parts, "as_of", start, end),
            tallied(),
            "store",
        )
    return dg.MaterializeResult(
        metadata={
            "first_as_of": dg.MetadataValue.text(partition_as_of(first_day).isoformat()),
            "last_as_of": dg.MetadataValue.text(partition_as_of(last_day).isoformat()),
            LOADS_THROUGH: dg.MetadataValue.int(loads_through),
            **tally.metadata(),
        }
    )


class SnapshotConfig(dg.Config):
    """The instant to score as of: ``as_of`` exactly when given (ISO 8601); when empty, the
    time the step runs, floored to ``floor``: ``hour`` (the hourly schedule) or ``minute``
    (the landing sensor's runs)."""

    as_of: str = ""
    floor: Literal["hour", "minute"] = "hour"


def resolve_as_of(
    text: str,
    floor: str = "hour",
    *,
    now: datetime | None = None,
    newest: datetime | None = None,
) -> datetime:
    """The as-of instant of a snapshot run.

    ``text`` when given, exactly (a backfill or ``tutor-scoring run --as-of`` may go back in
    time). Otherwise ``now`` (default: the clock) floored to the hour or the minute, but never
    before ``newest``, the snapshot already scored, unless that one lies in the future: an
    hourly run that queued behind a landing run's fresher snapshot scores that instant again
    rather than an older one.
    """
    if text:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    now = datetime.now(UTC) if now is None else as_utc(now)
    resolved = now.replace(second=0, microsecond=0) if floor == "minute" else floor_to_hour(now)
    if newest is not None and resolved < as_utc(newest) <= now:
        return as_utc(newest)
    return resolved


def scored_as_of(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """The as-of instant of the snapshot in the warehouse's `tutor_scores_current`, if any."""
    row = fetch_one(con, load_sql("tutor_scores_current_as_of_select"))
    value = row[0] if row is not None else None
    return as_utc(value) if isinstance(value, datetime) else None


@dg.asset(
    group_name="scores",
    kinds={"polars", "duckdb"},
    pool="warehouse",
    deps=[landing_drops],
    owners=["team:data"],
)
def tutor_scores_current(
    context: dg.AssetExecutionContext,
    config: SnapshotConfig,
    warehouse: WarehouseResource,
    risk_rule: RiskRuleResource,
) -> dg.MaterializeResult:
    """Every tutor's scores, risk tier and (for `watch` and `high` tutors) drivers and action
    as of one instant, in the warehouse tables `tutor_scores_current` and
    `tutor_risk_drivers_current`, published to the serving store: as of the start of the hour
    by the hourly schedule, and as of the run's own minute by each landing run, so a new drop
    is scored within minutes (a departure from DESIGN.md's hourly refresh, for the one-hour
    promise: README, "Departures from DESIGN.md"). A snapshot never goes back in time unless
    an as-of is given."""
    with warehouse.connect() as con:
        # Resolved here, when the step runs inside the `warehouse` pool, not when the run was
        # requested: a run that queued behind others scores a later instant, never an earlier.
        now = datetime.now(UTC)
        newest = None if config.as_of else scored_as_of(con)
        as_of = resolve_as_of(config.as_of, config.floor, now=now, newest=newest)
        held = as_of != resolve_as_of(config.as_of, config.floor, now=now)
        # The loads this snapshot saw: its checks, in a later step, may see newer ones.
        loads_through = newest_load(con)
        assessed = assess_as_of(con, as_of, risk_rule.rule(), risk_rule.assess_params())
        scores = assessed.scores
        replace_tables(
            con, {"tutor_scores_current": scores, "tutor_risk_drivers_current": assessed.drivers}
        )
    return dg.MaterializeResult(
        metadata={
            "as_of": dg.MetadataValue.text(as_of.isoformat()),
            "as_of_rule": dg.MetadataValue.text(
                "given"
                if config.as_of
                else "held at the newer snapshot already scored"
                if held
                else f"the run's {config.floor}"
            ),
            LOADS_THROUGH: dg.MetadataValue.int(loads_through),
            **score_metadata(scores),
        }
    )
