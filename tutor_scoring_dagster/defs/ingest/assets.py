"""Ingest: landing drops -> DuckDB warehouse."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import dagster as dg
from pydantic import Field

from tutor_scoring_dagster.defs.resources import LandingResource, WarehouseResource
from tutor_scoring_dagster.ingest import IngestReport, ingest_landing


class IngestConfig(dg.Config):
    """Which landing files to ingest (empty: every file waiting in the landing folder)."""

    paths: list[str] = Field(
        default=[],
        description="Files directly inside the landing folder (relative paths are taken "
        "relative to it); any other path is skipped and logged, never read or moved.",
    )
    min_age_seconds: int = Field(
        default=0,
        description="With no paths: leave files modified more recently than this for later "
        "(a guard against loading a file the platform is still writing).",
    )


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
        "files_skipped": dg.MetadataValue.int(report.count("skipped")),
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
    nothing loadable, or a symbolic link, moves to quarantine with a `.reason.txt`. A requested
    path outside the landing folder is skipped with a warning.
    """
    folder = landing.landing()
    # Not an error (a new deployment may not have had a drop yet), but a typo in the setting
    # must not pass as "0 files loaded": the run log and the asset page say so.
    missing = not folder.is_dir()
    if missing:
        context.log.warning(
            f"the landing folder {folder} does not exist: nothing to load "
            "(check TUTOR_SCORING_LANDING_DIR)"
        )
    with warehouse.connect() as con:
        report = ingest_landing(
            con,
            folder,
            archive_dir=landing.archive(),
            quarantine_dir=landing.quarantine(),
            paths=[Path(p) for p in config.paths] or None,
            min_age_s=config.min_age_seconds,
        )
    for line in ingest_log_lines(report):
        context.log.log(line.level, line.message)
    metadata = ingest_metadata(report)
    if missing:
        metadata[LANDING_FOLDER_MISSING] = dg.MetadataValue.path(str(folder))
    return dg.MaterializeResult(metadata=metadata)


LANDING_FOLDER_MISSING: Final = "landing_folder_missing"
"""Metadata of a pass whose landing folder did not exist: the folder looked for."""


FILES_LOGGED_ONE_BY_ONE: Final = 20
"""Above this many loaded (or duplicate) files in a pass, the run log counts them in one line:
each is still in the asset's ``files`` table and the ``loaded_files`` ledger. Every event costs
Dagster about a millisecond, and a backfill's thousands of lines bury its problems."""


@dataclass(frozen=True)
class LogLine:
    level: int
    message: str


def ingest_log_lines(report: IngestReport) -> list[LogLine]:
    """What the run log says of a pass: each quarantined or skipped file with its reason, and
    each loaded or duplicate file (or, for a big pass, their counts in one line)."""
    problems = [f for f in report.files if f.outcome in ("quarantined", "skipped")]
    others = [f for f in report.files if f.outcome not in ("quarantined", "skipped")]
    lines = [LogLine(logging.WARNING, f"{f.outcome} {f.file_name}: {f.reason}") for f in problems]
    if len(others) <= FILES_LOGGED_ONE_BY_ONE:
        lines += [
            LogLine(
                logging.INFO,
                f"{f.outcome} {f.file_name}: {f.rows_loaded} of {f.rows_read} rows loaded, "
                f"{f.rows_rejected} rejected",
            )
            for f in others
        ]
    else:
        rejected = sum(f.rows_rejected for f in others)
        lines.append(
            LogLine(
                logging.INFO,
                f"{report.count('loaded')} files loaded, {report.count('duplicate')} duplicates: "
                f"{report.rows_loaded} rows loaded, {rejected} rejected (per file: the "
                "asset's files table and the loaded_files ledger)",
            )
        )
    return lines
