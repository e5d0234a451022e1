"""Yesterday's daily partition: a check that goes red when it is not materialized by the
deadline, and the sensor that evaluates it."""

import warnings

import dagster as dg

from tutor_scoring_dagster.defs.partitions import DAILY_DEADLINE_CRON
from tutor_scoring_dagster.defs.publish.assets import tutor_score_history
from tutor_scoring_dagster.defs.scores.assets import tutor_daily_activity, tutor_scores_daily

# Departure from Dagster's advice: these checks are "superseded" by FreshnessPolicy, but the
# policy judges an asset by its latest materialization of any partition, so a backfill of old
# days keeps it green while yesterday's partition is missing (dagster-io/dagster discussion
# #34023). Only the partition check sees that.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.SupersessionWarning)
    yesterday_partition_freshness = dg.build_time_partition_freshness_checks(
        assets=[tutor_daily_activity, tutor_scores_daily, tutor_score_history],
        deadline_cron=DAILY_DEADLINE_CRON,
        timezone="UTC",
    )
    yesterday_partition_freshness_sensor = dg.build_sensor_for_freshness_checks(
        freshness_checks=yesterday_partition_freshness,
        name="yesterday_partition_freshness_sensor",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
"""The checks are red from 01:30 UTC while yesterday's partition has no materialization; a run
that materializes it (the daily job, a backfill, the late-data sensor's) runs them again. The
sensor evaluates them when they can next go overdue."""
