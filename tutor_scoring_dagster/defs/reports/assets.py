"""Reports: serving store -> rendered emails, delivered exactly once per idempotency key."""

from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import dagster as dg
import duckdb
from pydantic import Field

from tutor_scoring_dagster.defs.publish.assets import tutor_scores
from tutor_scoring_dagster.defs.resources import (
    EmailResource,
    RiskRuleResource,
    ServingStoreResource,
    WarehouseResource,
)
from tutor_scoring_dagster.reports import (
    ReportSettings,
    deliver_due,
    find_due_work,
    report_config,
)
from tutor_scoring_dagster.store.ledger import delivery_latency_p95
from tutor_scoring_dagster.store.migrate import ensure_current


class EmailReportsConfig(dg.Config):
    """Which report keys to send (set by `report_sensor`); empty: everything due now."""

    keys: list[str] = Field(default_factory=list)


@dg.asset(
    group_name="reports",
    kinds={"email", "jinja"},
    deps=[tutor_scores],
    owners=["team:data"],
)
def email_reports(
    context: dg.AssetExecutionContext,
    config: EmailReportsConfig,
    warehouse: WarehouseResource,
    serving_store: ServingStoreResource,
    risk_rule: RiskRuleResource,
    email: EmailResource,
) -> dg.MaterializeResult:
    """The report emails due for the current snapshot (digest, high-risk alerts, session
    reports), rendered from `reports/` and sent through EMAIL_SERVICE to ADMIN_EMAIL. The
    ledger `email_reports` in the serving store records each by idempotency key, so none is
    sent twice; failures are retried by later ticks of `report_sensor`."""
    settings = ReportSettings.from_env()
    sender = email.sender()
    cfg = report_config(
        risk_rule.rule(),
        settings,
        backend=sender.name,
        sender_address=email.from_address(),
        recipients=email.to(),
    )
    with serving_store.engine() as engine, ExitStack() as stack:
        ensure_current(engine)
        work = find_due_work(engine, now=datetime.now(UTC), settings=settings)
        if config.keys:
            asked = set(config.keys)
            work = work.only(asked)
            gone = sorted(asked - set(work.keys) - set(work.superseded))
            if gone:
                context.log.info(f"no longer due (sent or taken by another run): {gone}")
        opened: list[duckdb.DuckDBPyConnection] = []

        def open_warehouse() -> duckdb.DuckDBPyConnection | None:
            # Only a digest reads the warehouse (data-quality notes, the previous snapshot).
            if not opened:
                opened.append(stack.enter_context(warehouse.connect(read_only=True)))
            return opened[0]

        outcome = deliver_due(engine, sender, work, config=cfg, warehouse=open_warehouse)
        p95 = delivery_latency_p95(engine, datetime.now(UTC) - timedelta(days=1))
    for key, error in outcome.failed.items():
        context.log.error(f"report {key} failed: {error}")
    for key in outcome.resent_unknown:
        context.log.warning(f"report {key} resent after an attempt with an unknown outcome")
    metadata: dict[str, dg.MetadataValue] = {
        "emails_sent": dg.MetadataValue.int(len(outcome.sent)),
        "already_sent": dg.MetadataValue.int(len(outcome.skipped)),
        "sent_keys": dg.MetadataValue.json(outcome.sent),
        "closed": dg.MetadataValue.json(outcome.closed),
    }
    if p95 is not None:
        metadata["latency_p95_minutes_last_day"] = dg.MetadataValue.float(
            round(p95.total_seconds() / 60, 1)
        )
    if outcome.failed:
        raise dg.Failure(
            description=f"{len(outcome.failed)} report(s) could not be sent; the ledger "
            "records each as failed with its error, and report_sensor retries them with backoff",
            metadata={**metadata, "failed": dg.MetadataValue.json(outcome.failed)},
        )
    return dg.MaterializeResult(metadata=metadata)
