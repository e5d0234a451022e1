"""Jobs and schedules, and the in-process run behind ``tutor-scoring run``."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from tutor_scoring_dagster.defs.ingest.assets import LANDING_FOLDER_MISSING, landing_drops
from tutor_scoring_dagster.defs.partitions import daily_partitions
from tutor_scoring_dagster.defs.publish.assets import tutor_score_history, tutor_scores
from tutor_scoring_dagster.defs.reports.assets import email_reports
from tutor_scoring_dagster.defs.reports.checks import email_delivery_latency
from tutor_scoring_dagster.defs.resources import default_resources
from tutor_scoring_dagster.defs.scores.assets import (
    tutor_daily_activity,
    tutor_scores_current,
    tutor_scores_daily,
)
from tutor_scoring_dagster.defs.scores.checks import (
    tutor_scores_current_checks,
    tutor_scores_daily_checks,
)
from tutor_scoring_dagster.defs.scores.freshness import yesterday_partition_freshness
from tutor_scoring_dagster.defs.site.assets import dashboard_site
from tutor_scoring_dagster.scoring import floor_to_hour, snapshot_day

HOURLY_ASSETS = [landing_drops, tutor_scores_current, tutor_scores, email_reports, dashboard_site]
DAILY_ASSETS = [tutor_daily_activity, tutor_scores_daily, tutor_score_history]
FRESH_ASSETS = [landing_drops, tutor_scores_current, tutor_scores, email_reports]
"""What a landing run does: the hourly job's work but the dashboard (rebuilt hourly)."""

landing_ingest_job = dg.define_asset_job(
    "landing_ingest_job",
    selection=dg.AssetSelection.assets(*FRESH_ASSETS),
    description="Load the landing files named in the run config, score the current snapshot as "
    "of the minute the step runs, publish it (after its blocking checks) and send the reports "
    "that are due: tutor alerts at once, the digest at most once an hour.",
    # Departure from DESIGN.md ("refreshed hourly"): stakeholders must hear about a risky
    # tutor within an hour of the session, so each drop is scored when it lands rather than
    # at the next top of the hour (README, "Departures from DESIGN.md").
    config={"ops": {"tutor_scores_current": {"config": {"floor": "minute"}}}},
    # The steps form one chain: separate step processes would only add a code-location load
    # (~4 s) per step to drop-to-email latency. The warehouse pool still applies.
    executor_def=dg.in_process_executor,
)

hourly_scoring_job = dg.define_asset_job(
    "hourly_scoring_job",
    selection=dg.AssetSelection.assets(*HOURLY_ASSETS),
    description="Ingest new drops, score as of the start of the hour, publish, send reports.",
    # The sensor hands over files once they stop changing; the hourly sweep only takes
    # files untouched for two minutes, so it never loads one the platform is still writing.
    config={"ops": {"landing_drops": {"config": {"min_age_seconds": 120}}}},
)

daily_scores_job = dg.define_asset_job(
    "daily_scores_job",
    selection=dg.AssetSelection.assets(*DAILY_ASSETS),
    description="Daily activity, the daily score snapshot and its history in the store.",
)

hourly_scoring_schedule = dg.ScheduleDefinition(
    job=hourly_scoring_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)

daily_scores_schedule = dg.build_schedule_from_partitioned_job(
    daily_scores_job,
    hour_of_day=0,
    minute_of_hour=15,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


def _minutes(value: float | None) -> str:
    return "n/a (no delivery recorded)" if value is None else f"{value} min"


@dataclass
class RunSummary:
    """What one run of the whole pipeline did, for people."""

    success: bool
    as_of: datetime
    days: tuple[str, str] | None
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    run_ids: list[str] = field(default_factory=list)
    failed_checks: list[str] = field(default_factory=list)
    """Asset checks that did not pass without failing the run (non-blocking ones)."""

    def add(self, result: dg.ExecuteInProcessResult) -> None:
        """Take in one run: its materializations' metadata, its failures and failed checks."""
        self.run_ids.append(result.run_id)
        self.success = self.success and result.success
        self.failed_checks += [
            f"{e.asset_key.to_user_string()} {e.check_name}"
            + (f" ({e.severity.value})" if e.severity != dg.AssetCheckSeverity.ERROR else "")
            + (f": {e.description}" if e.description else "")
            for e in result.get_asset_check_evaluations()
            # A failed blocking check already fails its step: it is listed as an error.
            if not e.passed and not (e.blocking and e.severity == dg.AssetCheckSeverity.ERROR)
        ]
        for event in result.all_events:
            if event.is_step_materialization:
                mat = event.step_materialization_data.materialization
                self.metadata[mat.asset_key.to_user_string()] = {
                    k: v.value for k, v in mat.metadata.items()
                }
            elif event.is_step_failure:
                self.errors.append(f"{event.step_key}: {_failure_reason(event)}")

    def value(self, asset: str, key: str, default: Any = 0) -> Any:
        return self.metadata.get(asset, {}).get(key, default)

    def render(self) -> str:
        lines = [
            f"run {'succeeded' if self.success else 'FAILED'}: scores as of "
            f"{self.as_of:%Y-%m-%d %H:%M} UTC"
            + (f", daily partitions {self.days[0]}..{self.days[1]}" if self.days else ""),
            f"  files loaded:      {self.value('landing_drops', 'files_loaded')}"
            f" ({self.value('landing_drops', 'files_quarantined')} quarantined,"
            f" {self.value('landing_drops', 'files_duplicate')} duplicates,"
            f" {self.value('landing_drops', 'files_skipped')} skipped)",
            f"  rows rejected:     {self.value('landing_drops', 'rows_rejected')}",
            f"  tutors scored:     {self.value('tutor_scores_current', 'tutors_scored')}",
            f"  high-risk tutors:  {self.value('tutor_scores_current', 'high_risk_rows')}",
            f"  emails sent:       {self.value('email_reports', 'emails_sent')}",
            "  email latency p95: "
            + _minutes(self.value("email_reports", "latency_p95_minutes_last_day", None))
            + " (session to delivery, last day)",
        ]
        missing = self.value("landing_drops", LANDING_FOLDER_MISSING, None)
        if missing is not None:
            lines.append(
                f"  warning: the landing folder {missing} does not exist, so nothing was "
                "loaded (check TUTOR_SCORING_LANDING_DIR)"
            )
        lines += [f"  check failed: {c}" for c in self.failed_checks]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


def run_pipeline(
    *,
    as_of: datetime | None = None,
    history_days: int = 30,
    instance: dg.DagsterInstance | None = None,
    resources: dict[str, Any] | None = None,
    log_level: str = "WARNING",
) -> RunSummary:
    """Run every asset in-process: the snapshot as of ``as_of`` (default: the start of the
    current hour) and the ``history_days`` daily partitions that end the day before it.

    Three runs, in the order a deployment makes them: the landing run, the daily partitions
    as one range run, then the snapshot (scores, publish, reports, dashboard). A failed run
    skips what depends on it, as one run's failed step would."""
    as_of = floor_to_hour(datetime.now(UTC)) if as_of is None else as_of.astimezone(UTC)
    last_day = snapshot_day(as_of)
    start = daily_partitions.start.date()
    first_day = max(start, last_day - timedelta(days=history_days - 1))
    days = (first_day.isoformat(), last_day.isoformat()) if last_day >= start else None
    summary = RunSummary(success=True, as_of=as_of, days=days)
    instance = instance or _instance()

    def run(assets: list[Any], tags: dict[str, str] | None = None, **config: Any) -> bool:
        with _planned_once_per_asset(instance):
            result = dg.materialize(
                assets,
                resources=resources or default_resources(),
                instance=instance,
                tags=tags,
                run_config={
                    **config,
                    "loggers": {"console": {"config": {"log_level": log_level}}},
                },
                raise_on_error=False,
            )
        summary.add(result)
        return result.success

    if not run([landing_drops]):
        return summary  # everything else reads what it loads
    # Separate runs because a range run tags every asset in it with the range: Dagster would
    # plan each day of the unpartitioned assets too (5 x 1,095 events at 10M, ~7 s).
    daily_ok = days is None or run(
        # On an instance the UI reads, the partition check too: a run filling yesterday turns
        # it green. A throwaway instance knows only this run, so the check would say nothing.
        [
            *DAILY_ASSETS,
            tutor_scores_daily_checks,
            *([] if instance.is_ephemeral else [yesterday_partition_freshness]),
        ],
        tags={
            "dagster/asset_partition_range_start": days[0],
            "dagster/asset_partition_range_end": days[1],
        },
    )
    snapshot: list[Any] = [
        tutor_scores_current,
        tutor_scores_current_checks,
        tutor_scores,
        email_reports,
        email_delivery_latency,
    ]
    # The dashboard charts the history: not rebuilt when the history was not published.
    run(
        snapshot + ([dashboard_site] if daily_ok else []),
        ops={"tutor_scores_current": {"config": {"as_of": as_of.isoformat()}}},
    )
    return summary


def _failure_reason(event: dg.DagsterEvent) -> str:
    """The reason a step failed as people need it: the Failure's description if it raised
    one, else the innermost error (after retries Dagster wraps it in 'Exceeded max_retries')."""
    data = event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description.strip()
    error = data.error
    while error is not None and error.cause is not None:
        error = error.cause
    return " ".join((error.message if error else "unknown error").split())


PLANNED_ONCE_PER_ASSET = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"


@contextmanager
def _planned_once_per_asset(instance: dg.DagsterInstance) -> Iterator[None]:
    """On a throwaway in-memory instance, a range run's planned materializations are one event
    per asset instead of one per asset and day (README, "Operations").

    Dagster's flag costs the days' "failed" and "in progress" marks, which only a UI reads;
    no UI ever reads an in-memory instance, and at 1,095 days the events are seconds of the
    rebuild. A persistent instance (``DAGSTER_HOME``) keeps its marks, as does an operator's
    own setting of the flag. Dagster reads the flag from the environment when it creates a
    run, so it is set for the process while the run lasts: runs made meanwhile by other
    threads of this process would read it too."""
    if not instance.is_ephemeral or PLANNED_ONCE_PER_ASSET in os.environ:
        yield
        return
    os.environ[PLANNED_ONCE_PER_ASSET] = "1"
    try:
        yield
    finally:
        os.environ.pop(PLANNED_ONCE_PER_ASSET, None)


def _instance() -> dg.DagsterInstance:
    """The instance DAGSTER_HOME points at, or an in-memory one."""
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()
