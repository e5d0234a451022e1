"""The code location: every definition under ``defs/``, plus project-wide policies."""

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import dagster as dg

from tutor_scoring_dagster.defs.partitions import DAILY_DEADLINE_CRON

# Stakeholders must hear about a risky tutor within an hour: the current snapshot and what is
# published from it go red in the UI when they are more than an hour old.
HOURLY_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(hours=1), warn_window=timedelta(minutes=50)
)
HOURLY_ASSETS = dg.AssetSelection.assets(
    "tutor_scores_current", "tutor_scores", "email_reports", "dashboard_site"
)
# Some partition of each daily asset is materialized in the 24 hours before 01:30 UTC (the
# policy is asset-level; `yesterday_partition_freshness` checks yesterday's partition itself).
DAILY_FRESHNESS = dg.FreshnessPolicy.cron(
    deadline_cron=DAILY_DEADLINE_CRON, lower_bound_delta=timedelta(hours=24), timezone="UTC"
)
DAILY_ASSETS = dg.AssetSelection.assets(
    "tutor_daily_activity", "tutor_scores_daily", "tutor_score_history"
)


def _unique(items: Iterable[object] | None) -> list[object]:
    return list({id(item): item for item in items or []}.values())


def _once_each(defs: dg.Definitions) -> dg.Definitions:
    """The same definitions with each one listed once: the defs loader lists a definition once
    per module that imports it, and mapping specs would turn those copies into duplicates."""
    return dg.Definitions(
        assets=_unique(defs.assets),  # type: ignore[arg-type]
        asset_checks=_unique(defs.asset_checks),  # type: ignore[arg-type]
        schedules=_unique(defs.schedules),  # type: ignore[arg-type]
        sensors=_unique(defs.sensors),  # type: ignore[arg-type]
        jobs=_unique(defs.jobs),  # type: ignore[arg-type]
        resources=defs.resources,
    )


defs = (
    _once_each(dg.load_from_defs_folder(path_within_project=Path(__file__).parent))
    .map_resolved_asset_specs(
        func=lambda spec: dg.apply_freshness_policy(spec, HOURLY_FRESHNESS),
        selection=HOURLY_ASSETS,
    )
    .map_resolved_asset_specs(
        func=lambda spec: dg.apply_freshness_policy(spec, DAILY_FRESHNESS),
        selection=DAILY_ASSETS,
    )
)
