"""Reports: serving store -> rendered emails, delivered exactly once per idempotency key."""

import dagster as dg

from tutor_scoring_dagster.defs.publish.assets import tutor_scores
from tutor_scoring_dagster.defs.resources import (
    EmailResource,
    RiskRuleResource,
    ServingStoreResource,
    WarehouseResource,
)
from tutor_scoring_dagster.reports import deliver, due_digest


@dg.asset(
    group_name="reports",
    kinds={"email", "jinja"},
    deps=[tutor_scores],
    owners=["team:data"],
)
def email_reports(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    serving_store: ServingStoreResource,
    risk_rule: RiskRuleResource,
    email: EmailResource,
) -> dg.MaterializeResult:
    """The reports due for the current snapshot (the risk digest to ADMIN_EMAIL), rendered
    from `reports/` and sent through EMAIL_SERVICE; the ledger `email_reports` in the serving
    store records each one so none is sent twice."""
    with serving_store.engine() as engine:
        with warehouse.connect(read_only=True) as con:
            report = due_digest(engine, con, risk_rule.rule())
        reports = [report] if report else []
        outcome = deliver(
            engine,
            email.sender(),
            reports,
            sender_address=email.from_address(),
            recipients=email.to(),
        )
    for key, error in outcome.failed.items():
        context.log.error(f"report {key} failed: {error}")
    if outcome.failed:
        raise dg.Failure(
            description=f"{len(outcome.failed)} report(s) could not be sent; "
            "they stay in the ledger as failed and are retried by the next run",
            metadata={"failed": dg.MetadataValue.json(outcome.failed)},
        )
    return dg.MaterializeResult(
        metadata={
            "emails_sent": dg.MetadataValue.int(len(outcome.sent)),
            "already_sent": dg.MetadataValue.int(len(outcome.already_sent)),
            "sent_keys": dg.MetadataValue.json(outcome.sent),
        }
    )
