"""Asset checks on the report emails."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from tutor_scoring_dagster.defs.reports.assets import email_reports
from tutor_scoring_dagster.defs.resources import ServingStoreResource
from tutor_scoring_dagster.reports import ReportSettings
from tutor_scoring_dagster.store.ledger import delivery_latencies, percentile

LATENCY_LOOKBACK = timedelta(days=1)


@dg.asset_check(
    asset=email_reports,
    description="p95 of the time from a report's newest session to its delivery, over the "
    "reports sent in the last day, is within REPORT_LATENCY_TARGET_MINUTES (default 60).",
)
def email_delivery_latency(serving_store: ServingStoreResource) -> dg.AssetCheckResult:
    target = ReportSettings.from_env().latency_target
    with serving_store.engine() as engine:
        latencies = delivery_latencies(engine, datetime.now(UTC) - LATENCY_LOOKBACK)
    p95 = percentile(latencies, 0.95)
    minutes = {
        "reports_last_day": dg.MetadataValue.int(len(latencies)),
        "target_minutes": dg.MetadataValue.float(target.total_seconds() / 60),
    }
    if p95 is None:
        return dg.AssetCheckResult(
            passed=True, metadata={**minutes, "note": dg.MetadataValue.text("no report sent")}
        )
    p95_minutes = round(p95.total_seconds() / 60, 1)
    return dg.AssetCheckResult(
        passed=p95 <= target,
        description=f"p95 session-to-email latency {p95_minutes} min over the last day's "
        f"{len(latencies)} reports (target {target.total_seconds() / 60:g} min)",
        metadata={
            **minutes,
            "p95_minutes": dg.MetadataValue.float(p95_minutes),
            "max_minutes": dg.MetadataValue.float(round(latencies[-1].total_seconds() / 60, 1)),
        },
    )
