"""Site: serving store -> a static dashboard site, rebuilt after each publish."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from tutor_scoring_dagster.defs.publish.assets import (
    store_errors_explained,
    tutor_score_history,
    tutor_scores,
)
from tutor_scoring_dagster.defs.resources import ServingStoreResource
from tutor_scoring_dagster.site import build_site, default_site_dir


class DashboardSiteConfig(dg.Config):
    """Where the site goes and how much history it shows."""

    site_dir: str | None = Field(
        None, description="Env TUTOR_SCORING_SITE_DIR (default <TUTOR_SCORING_HOME>/site)."
    )
    chart_days: int = Field(180, ge=1, description="Days of score history in each chart.")
    reschedules_per_tutor: int = Field(
        100, ge=1, description="Newest reschedules listed on a tutor's page."
    )


@dg.asset(
    group_name="reports",
    kinds={"html", "jinja"},
    deps=[tutor_scores, tutor_score_history],
    owners=["team:data"],
)
def dashboard_site(
    config: DashboardSiteConfig, serving_store: ServingStoreResource
) -> dg.MaterializeResult:
    """A static dashboard of the serving store: `index.html` lists every tutor with a risk
    badge (sortable, filterable, no server needed), and `tutors/<id>.html` charts a tutor's
    7/30/90-day reschedule rates and daily sessions against the threshold and lists the
    tutor's reschedules. Only files whose content changed are rewritten."""
    out_dir = Path(config.site_dir) if config.site_dir else default_site_dir()
    with store_errors_explained(serving_store.url()), serving_store.engine() as engine:
        stats = build_site(
            engine,
            out_dir,
            chart_days=config.chart_days,
            reschedules_per_tutor=config.reschedules_per_tutor,
        )
    index = stats.index.resolve()
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.path(str(index)),
            "url": dg.MetadataValue.url(index.as_uri()),
            "tutors": dg.MetadataValue.int(stats.tutors),
            "high_risk": dg.MetadataValue.int(stats.high_risk),
            "files_written": dg.MetadataValue.int(stats.written),
            "files_unchanged": dg.MetadataValue.int(stats.unchanged),
            "files_removed": dg.MetadataValue.int(stats.removed),
        }
    )
