"""The code location loads as the UI, the daemon and the CLI load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tutor_scoring_dagster.definitions import defs

ROOT = Path(__file__).resolve().parent.parent

EXPECTED_GROUPS = {
    "landing_drops": "ingest",
    "tutor_daily_activity": "scores",
    "tutor_scores_daily": "scores",
    "tutor_scores_current": "scores",
    "tutor_scores": "publish",
    "tutor_score_history": "publish",
    "email_reports": "reports",
}


def test_every_stage_is_an_asset_that_explains_itself() -> None:
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    for name, group in EXPECTED_GROUPS.items():
        spec = specs[name]
        assert spec.group_name == group, name
        assert spec.description, f"{name} has no description for the UI"
        assert spec.kinds, f"{name} has no kinds"
        assert spec.owners, f"{name} has no owner"


def test_hourly_assets_must_be_fresh_within_the_hour() -> None:
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    for name in ("tutor_scores_current", "tutor_scores", "email_reports", "dashboard_site"):
        assert specs[name].freshness_policy is not None, name
    for name in ("tutor_daily_activity", "tutor_scores_daily", "tutor_score_history"):
        assert specs[name].freshness_policy is not None, name


def test_daily_assets_backfill_in_one_run() -> None:
    graph = defs.resolve_asset_graph()
    for name in ("tutor_daily_activity", "tutor_scores_daily", "tutor_score_history"):
        node = graph.get(dg.AssetKey(name))
        assert node.partitions_def is not None
        assert node.backfill_policy == dg.BackfillPolicy.single_run()


def test_schedules_and_jobs() -> None:
    assert {s.name for s in defs.schedules or []} >= {
        "hourly_scoring_job_schedule",
        "daily_scores_job_schedule",
    }
    hourly = next(s for s in defs.schedules or [] if s.name == "hourly_scoring_job_schedule")
    assert hourly.cron_schedule == "0 * * * *"


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All code locations passed validation" in done.stderr + done.stdout


def test_a_landing_run_loads_scores_publishes_and_reports() -> None:
    job = defs.resolve_job_def("landing_ingest_job")
    assets = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert assets == {"landing_drops", "tutor_scores_current", "tutor_scores", "email_reports"}
    # The checks that gate publishing run in the same run, as in the hourly job.
    checks = {k.name for k in job.asset_layer.asset_graph.asset_check_keys}
    assert {"one_row_per_tutor_per_snapshot", "rates_consistent_with_counts"} <= checks
    assert {"tutors_known", "counts_reconcile_with_sessions", "email_delivery_latency"} <= checks
    # Scored as of the run's own minute; one process for the whole chain.
    defaults = job.run_config_schema.config_type.fields["ops"].default_value
    assert defaults["tutor_scores_current"]["config"]["floor"] == "minute"
    assert job.executor_def.name == "in_process"
    sensor = next(s for s in defs.sensors or [] if s.name == "landing_sensor")
    assert sensor.job_name == "landing_ingest_job"
    # The hourly job keeps its top-of-the-hour snapshot and the dashboard.
    hourly = defs.resolve_job_def("hourly_scoring_job")
    assert "dashboard_site" in {
        k.to_user_string() for k in hourly.asset_layer.executable_asset_keys
    }
    report = next(s for s in defs.sensors or [] if s.name == "report_sensor")
    assert report.minimum_interval_seconds == 300
