"""Ingest: landing drops -> DuckDB warehouse."""

import dagster as dg

from tutor_scoring_dagster.defs.resources import LandingResource, WarehouseResource
from tutor_scoring_dagster.ingest import IngestReport, ingest_landing


class IngestConfig(dg.Config):
    """Which landing files to ingest (empty: every file waiting in the landing folder)."""

    paths: list[str] = []


def ingest_metadata(report: IngestReport) -> dict[str, dg.MetadataValue]:
    """Rows read / loaded / rejected per file, for the asset page."""
    lines = ["| file | outcome | read | loaded | rejected | reason |", "|---|---|---|---|---|---|"]
    for f in report.files:
        reason = (f.reason or "").replace("|", "/")[:160]
        lines.append(
            f"| {f.file_name} | {f.outcome} | {f.rows_read} | {f.rows_loaded} | "
            f"{f.rows_rejected} | {reason} |"
        )
    return {
        "files_loaded": dg.MetadataValue.int(report.count("loaded")),
        "files_quarantined": dg.MetadataValue.int(report.count("quarantined")),
        "files_duplicate": dg.MetadataValue.int(report.count("duplicate")),
        "rows_loaded": dg.MetadataValue.int(report.rows_loaded),
        "rows_rejected": dg.MetadataValue.int(report.rows_rejected),
        "files": dg.MetadataValue.md("\n".join(lines) if report.files else "No new files."),
    }


@dg.asset(
    group_name="ingest",
    kinds={"duckdb", "polars"},
    pool="warehouse",
    owners=["team:data"],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def landing_drops(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    landing: LandingResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Exports dropped by the platform, loaded into the warehouse's raw tables exactly once.

    Each file is validated row by row (Pandera, all failures at once); valid rows load in one
    transaction with the file's rejected rows, then the file moves to the archive. A file with
    nothing loadable moves to quarantine with a `.reason.txt`.
    """
    from pathlib import Path

    with warehouse.connect() as con:
        report = ingest_landing(
            con,
            landing.landing(),
            archive_dir=landing.archive(),
            quarantine_dir=landing.quarantine(),
            paths=[Path(p) for p in config.paths] or None,
        )
    for f in report.files:
        if f.outcome == "quarantined":
            context.log.warning(f"quarantined {f.file_name}: {f.reason}")
    return dg.MaterializeResult(metadata=ingest_metadata(report))
