"""The daily partitions of score history: partition D is the snapshot as of D + 1 day, 00:00 UTC."""

import dagster as dg

from tutor_scoring_dagster.config import load_settings

# The start date is read when the code location loads (a partitions definition is static);
# TUTOR_SCORING_START_DATE moves it, e.g. to the first day of a platform's data.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=load_settings().start_date, timezone="UTC", end_offset=0
)

DAILY_DEADLINE_CRON = "30 1 * * *"
"""Yesterday's partition is due by 01:30 UTC: the daily schedule starts it at 00:15."""
