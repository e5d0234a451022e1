"""Late data: when a load changes sessions of days already scored, recompute those days."""

from datetime import date

import dagster as dg
import duckdb

from tutor_scoring_dagster.assessment import reach_days
from tutor_scoring_dagster.defs.partitions import daily_partitions
from tutor_scoring_dagster.defs.publish.assets import tutor_score_history
from tutor_scoring_dagster.defs.resources import RiskRuleResource, WarehouseResource
from tutor_scoring_dagster.defs.scores.assets import tutor_daily_activity, tutor_scores_daily
from tutor_scoring_dagster.scoring import LATE_DATA_REACH_DAYS, affected_day_ranges, read_new_loads
from tutor_scoring_dagster.warehouse import WarehouseLockedError, connect

LATE_DATA_ASSETS = [tutor_daily_activity, tutor_scores_daily, tutor_score_history]
"""What a late load makes stale: the daily assets, down to the published history."""


@dg.sensor(
    target=LATE_DATA_ASSETS,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Reads new loaded_files rows and, for the days their sessions were scheduled on (and "
        f"the days after them whose snapshots read them: {LATE_DATA_REACH_DAYS} for the score "
        "windows, more for the risk tiers' baseline), requests one range run of the daily "
        "assets. Cursor: the last load id seen."
    ),
)
def late_data_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, risk_rule: RiskRuleResource
) -> dg.SensorResult | dg.SkipReason:
    """Recompute the daily partitions a load touched (the days before today that its rows'
    scheduled times fall on, and the days after them whose windows read those days)."""
    after = int(context.cursor) if context.cursor else 0
    path = warehouse.file()
    if not path.exists():
        return dg.SkipReason(f"no warehouse at {path} yet")
    try:
        # Read-only and without waiting: a writer holding the file just delays us one tick.
        with connect(path, read_only=True, wait_s=0, memory_limit=warehouse.memory()) as con:
            loads = read_new_loads(con, after)
    except (WarehouseLockedError, duckdb.ConnectionException) as exc:
        return dg.SkipReason(f"warehouse busy, trying again next tick: {exc}")
    if loads is None:
        return dg.SkipReason("loaded_files has no min/max_scheduled_time columns yet")
    if loads.height == 0:
        return dg.SkipReason(f"no load after load {after}")
    last_key = daily_partitions.get_last_partition_key()
    ranges = (
        affected_day_ranges(
            loads,
            first_day=daily_partitions.start.date(),
            last_day=date.fromisoformat(last_key),
            reach_days=reach_days(risk_rule.assess_params()),
        )
        if last_key is not None
        else []
    )
    load_ids: list[int] = loads.get_column("load_id").to_list()
    first_load, last_load = min(load_ids), max(load_ids)
    requests = [
        dg.RunRequest(
            run_key=f"late-data:loads-{first_load}-{last_load}:{start}..{end}",
            tags={
                "dagster/asset_partition_range_start": start.isoformat(),
                "dagster/asset_partition_range_end": end.isoformat(),
                "tutor_scoring/late_data_loads": f"{first_load}-{last_load}",
            },
        )
        for start, end in ranges
    ]
    context.log.info(
        f"loads {first_load}..{last_load}: {len(requests)} range run(s) "
        + ", ".join(f"{s}..{e}" for s, e in ranges)
    )
    return dg.SensorResult(run_requests=requests, cursor=str(last_load))
