"""Ingest sensor: a run for new, complete files in the landing folder, which loads them and
brings the current snapshot, the serving store and the reports up to date."""

from collections.abc import Sequence
from hashlib import sha256

import dagster as dg

from tutor_scoring_dagster.defs.jobs import landing_ingest_job
from tutor_scoring_dagster.defs.resources import LandingResource
from tutor_scoring_dagster.ingest import LandingCursor, ReadyFile, scan_landing

RUN_KEY_PREFIX = "landing-sha256:"
BATCH_RUN_KEY_PREFIX = "landing-sha256-set:"


def run_request(files: Sequence[ReadyFile]) -> dg.RunRequest:
    """The run that loads ``files`` (then scores, publishes and reports). Its run key is the
    file's content hash (several files: the hash of their sorted hashes), so Dagster launches
    it once however often the sensor (or the daemon) starts over. A file that ends up in two
    different runs (only after a lost cursor) still loads once: ingest's ledger knows its hash,
    and the first run moved it out of the landing folder."""
    if len(files) == 1:
        run_key = RUN_KEY_PREFIX + files[0].sha256
        label = files[0].path.name
    else:
        hashes = "\n".join(sorted(f.sha256 for f in files))
        run_key = BATCH_RUN_KEY_PREFIX + sha256(hashes.encode()).hexdigest()
        label = f"{len(files)} files: " + ", ".join(f.path.name for f in files)
    return dg.RunRequest(
        run_key=run_key,
        run_config={
            "ops": {"landing_drops": {"config": {"paths": [str(f.path.absolute()) for f in files]}}}
        },
        tags={"tutor_scoring/landing_file": label[:1000]},
    )


def run_requests(ready: Sequence[ReadyFile]) -> list[dg.RunRequest]:
    """One run for the new files of a tick, oldest first: a drop's sessions and reschedules
    are scored, published and reported together, never as a snapshot with half of them."""
    return [run_request(ready)] if ready else []


@dg.sensor(
    job=landing_ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def landing_sensor(
    context: dg.SensorEvaluationContext, landing: LandingResource
) -> dg.SensorResult:
    """Watches the landing folder and hands each new export over once it is complete, to a
    run that loads it, scores the current snapshot as of the run's minute, publishes it and
    sends the reports due (an alert within about two minutes of the drop).

    A file is complete once two ticks in a row see the same size and modification time (and
    its name is not `.tmp`/`.part`/hidden); one run for the files a tick finds, keyed by their
    sha256 (several: the hash of the sorted hashes), so the same bytes never load twice, under
    any name. Symbolic links and files this sensor skips are left to the hourly job's full
    pass, which quarantines or archives them.
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
    return dg.SensorResult(run_requests=run_requests(ready), cursor=cursor.to_json())
