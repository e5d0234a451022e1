"""Ingest sensor: a load for each new, complete file in the landing folder."""

import dagster as dg

from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.resources import LandingResource
from tutor_scoring_dagster.ingest import LandingCursor, ReadyFile, scan_landing

RUN_KEY_PREFIX = "landing-sha256:"

landing_ingest_job = dg.define_asset_job(
    "landing_ingest_job",
    selection=dg.AssetSelection.assets(landing_drops),
    description="Load the landing files named in the run config into the warehouse.",
)


def run_request(ready: ReadyFile) -> dg.RunRequest:
    """The run that loads one file; its run key is the file's content hash, so Dagster
    launches it once however often the sensor (or the daemon) starts over."""
    return dg.RunRequest(
        run_key=RUN_KEY_PREFIX + ready.sha256,
        run_config={"ops": {"landing_drops": {"config": {"paths": [str(ready.path.absolute())]}}}},
        tags={"tutor_scoring/landing_file": ready.path.name},
    )


@dg.sensor(
    job=landing_ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def landing_sensor(
    context: dg.SensorEvaluationContext, landing: LandingResource
) -> dg.SensorResult:
    """Watches the landing folder and loads each new export once it is complete.

    A file is complete once two ticks in a row see the same size and modification time (and
    its name is not `.tmp`/`.part`/hidden); one run per file, keyed by its sha256, so the
    same bytes never load twice, under any name. Symbolic links and files this sensor skips
    are left to the hourly job's full pass, which quarantines or archives them.
    """
    cursor = LandingCursor.from_json(context.cursor)
    ready, cursor = scan_landing(landing.landing(), cursor)
    for f in ready:
        context.log.info(f"new landing file {f.path.name} ({f.size} bytes, sha256 {f.sha256})")
    if not ready:
        waiting = sum(1 for f in cursor.files.values() if f.sha256 is None)
        reason = f"no new complete files ({waiting} waiting to be seen unchanged)"
        # The cursor moves on even so: it holds what this tick saw, for the next to compare.
        return dg.SensorResult(
            skip_reason=reason if waiting else "no new files", cursor=cursor.to_json()
        )
    return dg.SensorResult(run_requests=[run_request(f) for f in ready], cursor=cursor.to_json())
