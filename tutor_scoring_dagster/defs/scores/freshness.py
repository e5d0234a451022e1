"""Yesterday's daily partition: a check per daily asset that is red while the partition due by
the deadline has not been materialized, and the schedule that runs it at the deadline.

Departure from Dagster's advice: freshness policies judge an asset by its latest
materialization of any partition, so a backfill of old days keeps them green while yesterday's
partition is missing (dagster-io/dagster discussion #34023). Dagster's superseded
``build_time_partition_freshness_checks`` sees that but fails its run while no partition is due
yet (the day and a half after ``TUTOR_SCORING_START_DATE``), so this check is the project's own.
"""

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from tutor_scoring_dagster.defs.partitions import (
    DAILY_DEADLINE_CRON,
    daily_partitions,
    due_day,
    last_deadline,
)
from tutor_scoring_dagster.defs.publish.assets import tutor_score_history
from tutor_scoring_dagster.defs.scores.assets import tutor_daily_activity, tutor_scores_daily

YESTERDAY_MATERIALIZED = "yesterday_materialized"
DUE_PARTITION = "due_partition"
"""Check metadata: the partition the check looked for."""


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            YESTERDAY_MATERIALIZED,
            asset=asset,
            description="Red from 01:30 UTC until yesterday's partition is materialized.",
        )
        for asset in (tutor_daily_activity, tutor_scores_daily, tutor_score_history)
    ],
    can_subset=True,
    name="yesterday_partition_freshness",
)
def yesterday_partition_freshness(
    context: dg.AssetCheckExecutionContext,
) -> Iterator[dg.AssetCheckResult]:
    """Whether each daily asset has the partition due now; any run that materializes the daily
    assets runs this again, so filling the day turns it green."""
    now = datetime.now(UTC)
    due, first = due_day(now), daily_partitions.start.date()
    due_by = last_deadline(now)
    for check in context.selected_asset_check_keys:
        metadata: dict[str, dg.RawMetadataValue] = {DUE_PARTITION: due.isoformat()}
        if due < first:
            passed = True
            description = f"no partition is due yet: the first, {first}, is due the day after it"
        else:
            wanted = dg.AssetRecordsFilter(
                asset_key=check.asset_key, asset_partitions=[due.isoformat()]
            )
            records = context.instance.fetch_materializations(wanted, limit=1).records
            passed = bool(records)
            if passed:
                description = f"partition {due} is materialized"
                metadata["materialized_at"] = dg.MetadataValue.timestamp(records[0].timestamp)
            else:
                description = (
                    f"partition {due} was due by {due_by:%Y-%m-%d %H:%M} UTC and is not "
                    "materialized: see the daily schedule's run for it, or backfill it"
                )
        yield dg.AssetCheckResult(
            asset_key=check.asset_key,
            check_name=check.name,
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=description,
            metadata=metadata,
        )


yesterday_partition_freshness_job = dg.define_asset_job(
    "yesterday_partition_freshness_job",
    selection=dg.AssetSelection.checks(yesterday_partition_freshness),
    description="Checks that yesterday's partition of each daily asset is materialized.",
)

yesterday_partition_freshness_schedule = dg.ScheduleDefinition(
    job=yesterday_partition_freshness_job,
    cron_schedule=DAILY_DEADLINE_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
"""At the deadline: the one moment the check can turn red by itself."""
