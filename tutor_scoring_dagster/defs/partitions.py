"""The daily partitions of score history: partition D is the snapshot as of D + 1 day, 00:00 UTC."""

from datetime import UTC, date, datetime, time, timedelta

import dagster as dg

from tutor_scoring_dagster.config import load_settings

# The start date is read when the code location loads (a partitions definition is static);
# TUTOR_SCORING_START_DATE moves it, e.g. to the first day of a platform's data.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=load_settings().start_date, timezone="UTC", end_offset=0
)

DAILY_DEADLINE = time(1, 30)
"""Yesterday's partition is due by 01:30 UTC: the daily schedule starts it at 00:15."""
DAILY_DEADLINE_CRON = f"{DAILY_DEADLINE.minute} {DAILY_DEADLINE.hour} * * *"


def last_deadline(now: datetime) -> datetime:
    """The latest daily deadline at or before ``now``."""
    now = now.astimezone(UTC)
    deadline = datetime.combine(now.date(), DAILY_DEADLINE, tzinfo=UTC)
    return deadline if deadline <= now else deadline - timedelta(days=1)


def due_day(now: datetime) -> date:
    """The day whose partition must exist at ``now``: yesterday's from the deadline on, the day
    before's until then."""
    return last_deadline(now).date() - timedelta(days=1)
