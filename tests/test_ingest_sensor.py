"""The landing sensor (a run per new, complete file, keyed by its hash; one run for a
backlog) and the landing_drops asset materialized through Dagster, on a real instance and a
real DuckDB file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.definitions import defs
from tutor_scoring_dagster.defs.ingest.assets import FILES_LOGGED_ONE_BY_ONE, landing_drops
from tutor_scoring_dagster.defs.ingest.sensors import (
    BATCH_RUN_KEY_PREFIX,
    RUN_KEY_PREFIX,
    landing_sensor,
)
from tutor_scoring_dagster.defs.resources import LandingResource, WarehouseResource
from tutor_scoring_dagster.ingest import MAX_RECENT_HASHES, LandingCursor, SeenFile, scan_landing
from tutor_scoring_dagster.warehouse import query_frame

HEADER = "session_id,tutor_id,scheduled_time,status,updated_at\n"


def sessions_text(*ids: str) -> str:
    return HEADER + "".join(f"{i},T1,2024-03-01T10:00:00Z,completed,\n" for i in ids)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Watcher:
    """Ticks the sensor the way the daemon does: each tick starts from the last cursor."""

    def __init__(self, instance: dg.DagsterInstance, landing: Path) -> None:
        self.instance = instance
        self.landing = landing
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={"landing": LandingResource(landing_dir=str(self.landing))},
        )
        result = landing_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert result.cursor is not None
        self.cursor = result.cursor
        return result

    def requested(self) -> list[dg.RunRequest]:
        return list(self.tick().run_requests or [])


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    """One test instance for the module: sensors only read it, and runs are told apart by id."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def landing(home: Settings) -> Path:
    home.landing_dir.mkdir(parents=True)
    return home.landing_dir


@pytest.fixture
def watcher(instance: dg.DagsterInstance, landing: Path) -> Watcher:
    return Watcher(instance, landing)


def test_a_new_file_is_requested_once_after_it_is_seen_unchanged(
    watcher: Watcher, landing: Path, home: Settings
) -> None:
    path = landing / "sessions_1.csv"
    path.write_text(sessions_text("S1"), encoding="utf-8")
    first = watcher.tick()
    assert not first.run_requests
    assert first.skip_reason is not None and "1 waiting" in str(first.skip_reason)
    (request,) = watcher.requested()
    assert request.run_key == RUN_KEY_PREFIX + sha(path)
    assert request.run_config == {
        "ops": {"landing_drops": {"config": {"paths": [str(path.absolute())]}}}
    }
    assert request.tags["tutor_scoring/landing_file"] == "sessions_1.csv"
    assert watcher.requested() == []
    assert watcher.requested() == []
    # Cheap: the sensor never opened (or created) the warehouse.
    assert not home.warehouse.exists()


def test_a_growing_file_waits_until_it_stops_changing(watcher: Watcher, landing: Path) -> None:
    path = landing / "sessions_1.csv"
    path.write_text(sessions_text("S1"), encoding="utf-8")
    assert watcher.requested() == []
    with path.open("a", encoding="utf-8") as fh:
        fh.write("S2,T1,2024-03-01T10:00:00Z,completed,\n")
    assert watcher.requested() == []  # size changed since the last tick
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert watcher.requested() == []  # same size, new mtime: rewritten in place
    (request,) = watcher.requested()
    assert request.run_key == RUN_KEY_PREFIX + sha(path)


def test_partial_and_hidden_files_are_never_requested_until_renamed(
    watcher: Watcher, landing: Path
) -> None:
    part = landing / "sessions_1.csv.part"
    part.write_text(sessions_text("S1"), encoding="utf-8")
    (landing / ".sessions_2.csv").write_text(sessions_text("S2"), encoding="utf-8")
    (landing / "sessions_3.csv.tmp").write_text(sessions_text("S3"), encoding="utf-8")
    for _ in range(3):
        assert watcher.requested() == []
    final = part.rename(landing / "sessions_1.csv")
    assert watcher.requested() == []
    (request,) = watcher.requested()
    assert request.run_key == RUN_KEY_PREFIX + sha(final)


def test_the_same_bytes_renamed_or_dropped_again_are_not_requested(
    watcher: Watcher, landing: Path, tmp_path: Path
) -> None:
    path = landing / "sessions_1.csv"
    path.write_text(sessions_text("S1"), encoding="utf-8")
    watcher.tick()
    assert len(watcher.requested()) == 1
    shutil.copy(path, landing / "sessions_1_copy.csv")
    assert watcher.requested() == []
    assert watcher.requested() == []
    # The run archived the original; the platform then drops the very same file again.
    path.rename(tmp_path / "archived.csv")
    path.write_text(sessions_text("S1"), encoding="utf-8")
    assert watcher.requested() == []
    assert watcher.requested() == []
    # New bytes under the old name are a new file.
    path.write_text(sessions_text("S1", "S2"), encoding="utf-8")
    watcher.tick()
    (request,) = watcher.requested()
    assert request.run_key == RUN_KEY_PREFIX + sha(path)


def test_several_new_files_go_to_one_run_oldest_first(watcher: Watcher, landing: Path) -> None:
    for i in (1, 2, 3):
        path = landing / f"sessions_{i}.csv"
        path.write_text(sessions_text(f"S{i}"), encoding="utf-8")
        os.utime(path, ns=(0, i * 1_000_000_000))
    (landing / "reschedules_1.csv").symlink_to(landing / "sessions_1.csv")  # left to the hourly
    (landing / "archive").mkdir()
    watcher.tick()
    (request,) = watcher.requested()
    paths = request.run_config["ops"]["landing_drops"]["config"]["paths"]
    assert [Path(p).name for p in paths] == ["sessions_1.csv", "sessions_2.csv", "sessions_3.csv"]


def test_the_cursor_survives_a_restart_and_a_lost_cursor_repeats_the_same_run_key(
    instance: dg.DagsterInstance, landing: Path
) -> None:
    path = landing / "sessions_1.csv"
    path.write_text(sessions_text("S1"), encoding="utf-8")
    before = Watcher(instance, landing)
    before.tick()
    (request,) = before.requested()
    # A restarted daemon resumes from the stored cursor: nothing new to launch.
    after = Watcher(instance, landing)
    after.cursor = before.cursor
    assert after.requested() == []
    # With the cursor lost the request comes back under the same key, which Dagster's
    # run-key check turns into no run: the file still loads once.
    lost = Watcher(instance, landing)
    lost.tick()
    (again,) = lost.requested()
    assert again.run_key == request.run_key


def test_cursor_round_trip_and_an_unreadable_cursor_starts_afresh() -> None:
    cursor = LandingCursor(
        files={"a.csv": SeenFile(10, 123, None), "b.csv": SeenFile(5, 456, "ab" * 8)},
        recent=("ab" * 8,),
    )
    text = cursor.to_json()
    assert json.loads(text)["version"] == 1
    assert LandingCursor.from_json(text) == cursor
    for broken in (None, "", "not json", '{"version": 99}', '{"version": 1, "files": []}'):
        assert LandingCursor.from_json(broken) == LandingCursor()


def test_the_sensor_definition() -> None:
    assert landing_sensor.minimum_interval_seconds == 30
    assert landing_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert landing_sensor.job_name == "landing_ingest_job"


def _resources(home: Settings) -> dict[str, object]:
    return {
        "landing": LandingResource(landing_dir=str(home.landing_dir)),
        "warehouse": WarehouseResource(path=str(home.warehouse)),
    }


def test_a_sensor_request_runs_the_landing_job_and_loads_only_its_file(
    watcher: Watcher, landing: Path, home: Settings, instance: dg.DagsterInstance
) -> None:
    path = landing / "sessions_1.csv"
    path.write_text(sessions_text("S1", "S2"), encoding="utf-8")
    watcher.tick()
    (first,) = watcher.requested()
    (landing / "sessions_2.csv").write_text(sessions_text("S3"), encoding="utf-8")
    watcher.tick()
    (second,) = watcher.requested()
    # The code location's job: ingest, then the snapshot, its checks, publish and reports.
    job = defs.resolve_job_def("landing_ingest_job")
    result = job.execute_in_process(run_config=first.run_config, instance=instance)
    assert result.success
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        "landing_drops",
        "tutor_scores_current",
        "tutor_scores",
        "email_reports",
    }
    # Only the requested file was loaded; the other waits for its own run.
    assert sorted(p.name for p in landing.iterdir() if p.is_file()) == ["sessions_2.csv"]
    with warehouse.connect(home.warehouse) as con:
        ids = query_frame(con, "SELECT session_id FROM raw_sessions ORDER BY 1").to_series()
    assert ids.to_list() == ["S1", "S2"]
    # A retried run of the same request finds its file gone: nothing happens, nothing fails.
    again = job.execute_in_process(run_config=first.run_config, instance=instance)
    assert again.success
    (event,) = [
        e
        for e in again.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("landing_drops")
    ]
    metadata = event.materialization.metadata
    assert metadata["files_skipped"].value == 1
    assert metadata["rows_loaded"].value == 0
    assert second.run_key != first.run_key


def test_the_files_of_a_tick_go_to_one_run_whose_key_names_the_set(
    watcher: Watcher, landing: Path
) -> None:
    """A drop's files (or a backlog) seen complete on the same tick load, score and report
    together: one snapshot with all of them, never one per file."""
    count = 5
    for i in range(count):
        path = landing / f"sessions_{i}.csv"
        path.write_text(sessions_text(f"S{i}"), encoding="utf-8")
        os.utime(path, ns=(0, (i + 1) * 1_000_000_000))
    watcher.tick()
    (request,) = watcher.requested()
    paths = request.run_config["ops"]["landing_drops"]["config"]["paths"]
    assert [Path(p).name for p in paths] == [f"sessions_{i}.csv" for i in range(count)]
    hashes = "\n".join(sorted(sha(landing / Path(p).name) for p in paths))
    assert request.run_key == BATCH_RUN_KEY_PREFIX + hashlib.sha256(hashes.encode()).hexdigest()
    assert request.tags["tutor_scoring/landing_file"].startswith(f"{count} files: sessions_0")
    # A lost cursor gives the same set, so the same key: Dagster launches nothing new.
    lost = Watcher(watcher.instance, landing)
    lost.tick()
    (again,) = lost.requested()
    assert again.run_key == request.run_key


def test_materializing_landing_drops_reports_each_file(
    home: Settings, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    (landing / "sessions_1.csv").write_text(
        sessions_text("S1", "S2") + "S3,T1,2024-03-01T10:00:00Z,cancelled,\n", encoding="utf-8"
    )
    (landing / "sessions_copy.csv").write_text(
        sessions_text("S1", "S2") + "S3,T1,2024-03-01T10:00:00Z,cancelled,\n", encoding="utf-8"
    )
    (landing / "reschedules_1.csv").write_text("session_id;initiator\nS1;tutor\n", "utf-8")
    result = dg.materialize([landing_drops], resources=_resources(home), instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert {k: metadata[k] for k in metadata if k != "files"} == {
        "files_loaded": 1,
        "files_quarantined": 1,
        "files_duplicate": 1,
        "files_skipped": 0,
        "rows_loaded": 2,
        "rows_rejected": 1,
    }
    table = str(metadata["files"])
    assert "| sessions_1.csv | loaded | 3 | 2 | 1 |" in table
    assert "| reschedules_1.csv | quarantined | 0 | 0 | 0 | missing required column(s)" in table
    assert "| sessions_copy.csv | duplicate |" in table
    assert sorted(p.name for p in landing.iterdir() if p.is_file()) == []

    # Paths from run config: outside the landing folder is refused and left alone.
    outside = tmp_path / "sessions_9.csv"
    outside.write_text(sessions_text("S9"), encoding="utf-8")
    refused = dg.materialize(
        [landing_drops],
        resources=_resources(home),
        instance=instance,
        run_config={"ops": {"landing_drops": {"config": {"paths": [str(outside)]}}}},
    )
    (event,) = refused.get_asset_materialization_events()
    assert event.materialization.metadata["files_skipped"].value == 1
    assert "outside the landing folder" in str(event.materialization.metadata["files"].value)
    assert outside.exists()


def _run_log(instance: dg.DagsterInstance, run_id: str) -> list[tuple[int, str]]:
    """The user's lines of a run's log (not Dagster's own events): level and message."""
    return [(e.level, e.user_message) for e in instance.all_logs(run_id) if e.dagster_event is None]


def test_the_run_log_names_each_problem_file_and_counts_a_big_pass(
    home: Settings, instance: dg.DagsterInstance
) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    few = FILES_LOGGED_ONE_BY_ONE
    for i in range(few):
        (landing / f"sessions_{i:02}.csv").write_text(sessions_text(f"S{i}"), encoding="utf-8")
    (landing / "reschedules_1.csv").write_text("session_id;initiator\nS1;tutor\n", "utf-8")
    small = dg.materialize([landing_drops], resources=_resources(home), instance=instance)
    lines = _run_log(instance, small.run_id)
    assert [m for level, m in lines if level == logging.WARNING] == [
        "quarantined reschedules_1.csv: missing required column(s) session_id, initiator, "
        "cancelled_at; found session_id;initiator (the header has one column: is the file "
        "comma-separated?)"
    ]
    infos = [m for level, m in lines if level == logging.INFO]
    assert infos == [
        f"loaded sessions_{i:02}.csv: 1 of 1 rows loaded, 0 rejected" for i in range(few)
    ]

    # One file more: a backfill's thousands of lines would bury its problems (and cost
    # Dagster a millisecond each), so the loaded files are counted in one line.
    for i in range(few + 1):
        (landing / f"sessions_b{i:02}.csv").write_text(sessions_text(f"B{i}"), encoding="utf-8")
    (landing / "sessions_b00_again.csv").write_text(sessions_text("B0"), encoding="utf-8")
    (landing / "sessions_empty.csv").write_text("", encoding="utf-8")
    big = dg.materialize([landing_drops], resources=_resources(home), instance=instance)
    lines = _run_log(instance, big.run_id)
    assert [m.split(":")[0] for level, m in lines if level == logging.WARNING] == [
        "quarantined sessions_empty.csv"
    ]
    assert [m for level, m in lines if level == logging.INFO] == [
        f"{few + 1} files loaded, 1 duplicates: {few + 1} rows loaded, 0 rejected (per file: "
        "the asset's files table and the loaded_files ledger)"
    ]
    (event,) = big.get_asset_materialization_events()
    table = str(event.materialization.metadata["files"].value)
    assert table.count("| loaded | 1 |") == few + 1  # each file still named on the asset page


def test_a_backlog_is_handed_over_in_slices_and_the_cursor_stays_small(landing: Path) -> None:
    for i in range(150):
        (landing / f"sessions_{i:03d}.csv").write_text(sessions_text(f"S{i}"), encoding="utf-8")
    ready, cursor = scan_landing(landing, LandingCursor())
    assert ready == []
    ready, cursor = scan_landing(landing, cursor, max_files=100)
    assert len(ready) == 100
    more, cursor = scan_landing(landing, cursor, max_files=100)
    assert len(more) == 50
    assert {f.path.name for f in ready} | {f.path.name for f in more} == {
        f"sessions_{i:03d}.csv" for i in range(150)
    }
    for path in landing.iterdir():
        path.unlink()
    _, cursor = scan_landing(landing, cursor)
    assert cursor.files == {}
    assert len(cursor.recent) == MAX_RECENT_HASHES
    assert len(cursor.to_json()) < 2500
