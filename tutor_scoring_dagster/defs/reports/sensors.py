"""The report sensor: launches a report run for report work that is due and that no
publishing run has sent (retries, expired claims)."""

from datetime import UTC, datetime

import dagster as dg
import sqlalchemy as sa

from tutor_scoring_dagster.defs.reports.assets import email_reports
from tutor_scoring_dagster.defs.resources import ServingStoreResource
from tutor_scoring_dagster.reports import IngestNews, ReportSettings, find_due_work

REPORT_SENSOR_INTERVAL_S = 300
"""How often the sensor looks (a few cheap queries). It is the safety net, not the fresh path:
every run that publishes a snapshot (landing runs, the hourly job) sends what is due in the
same run. What is left for the sensor is retries, whose backoff starts at 5 minutes (so
looking more often would not resend sooner), claims whose lease expired, and work a run
could not send (its report step failed before claiming); 5 minutes bounds those waits."""

INGEST_ASSET = dg.AssetKey("landing_drops")

email_reports_job = dg.define_asset_job(
    "email_reports_job",
    selection=dg.AssetSelection.assets(email_reports),
    description="Render and send the report emails that are due (launched by report_sensor, "
    "or by hand: with no keys in its config it sends whatever is due).",
)


def ingest_news_in(instance: dg.DagsterInstance) -> IngestNews:
    """A check of whether ingest quarantined files or rejected rows since an instant, read from
    the materializations of `landing_drops` (so the sensor needs no warehouse connection)."""

    def news(since: datetime | None) -> bool:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=INGEST_ASSET,
                after_timestamp=since.timestamp() if since is not None else None,
            ),
            limit=100,
        ).records
        for record in records:
            materialization = record.asset_materialization
            meta = materialization.metadata if materialization is not None else {}
            for name in ("files_quarantined", "rows_rejected"):
                value = meta.get(name)
                if isinstance(value, dg.IntMetadataValue) and (value.value or 0) > 0:
                    return True
        return False

    return news


@dg.sensor(
    job=email_reports_job,
    minimum_interval_seconds=REPORT_SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finds report work that is still due (failed reports whose retry time came, "
    "claims whose lease expired, and anything a publishing run left unsent: the hour's digest, "
    "newly high-risk tutors, session batches) in the serving store's ledger and snapshot, and "
    "launches email_reports_job for it. Landing runs and the hourly job send their own reports; "
    "this is the safety net. The run key names the due keys and attempts, so a tick never "
    "launches the same work twice.",
)
def report_sensor(
    context: dg.SensorEvaluationContext, serving_store: ServingStoreResource
) -> dg.SensorResult | dg.SkipReason:
    now = datetime.now(UTC)
    settings = ReportSettings.from_env()
    try:
        with serving_store.engine() as engine:
            work = find_due_work(
                engine, now=now, settings=settings, ingest_news=ingest_news_in(context.instance)
            )
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        # No store yet (nothing published, or not migrated): nothing to report on.
        return dg.SkipReason(f"serving store not readable yet: {type(exc).__name__}")
    if not work:
        return dg.SkipReason("no report work is due")
    keys = [*work.keys, *work.superseded]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=work.run_key(now),
                run_config={"ops": {"email_reports": {"config": {"keys": keys}}}},
                tags={"tutor_scoring/report_keys": ", ".join(keys)[:1000]},
            )
        ]
    )
