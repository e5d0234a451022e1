"""The benchmark (benchmarks/README.md) end to end on small data: every stage runs and the
numbers agree with each other. Correctness only: nothing here asserts how fast anything is
(the CPU-time checks are bounds that any run meets, whatever the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.postgres
@pytest.mark.slow
def test_benchmark_smoke_run_agrees_with_the_floor_and_the_baseline(
    pg_admin: sa.Engine, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--smoke",
            "--data",
            str(tmp_path / "data"),
            "--results",
            str(results),
            "--pg-admin-url",
            pg_admin.url.render_as_string(hide_password=False),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((results / "latest.json").read_text())
    stages = report["stages"]
    assert not [name for name, stage in stages.items() if "error" in stage]

    generated = stages["generate_parquet"]
    assert generated["sessions"] > 150_000 and generated["tutors"] == 500

    # The CSV variant and the Parquet drops load the same rows.
    rebuild = stages["rebuild"]
    assert rebuild["success"], rebuild["errors"]
    assert stages["ingest_csv"]["success"]
    assert stages["ingest_csv"]["rows_loaded"] == rebuild["rows_loaded"] > generated["sessions"]
    assert rebuild["tutors_scored"] == 500
    assert {s["step"] for s in rebuild["steps"]} >= {
        "landing_drops",
        "tutor_daily_activity",
        "tutor_scores_daily",
        "tutor_scores_daily_checks",
        "tutor_score_history",
        "tutor_scores",
        "email_reports",
        "dashboard_site",
    }
    assert all(s["status"] == "success" for s in rebuild["steps"])

    # The work in CPU time, per step and in all: this process's and the Postgres server's
    # (local here), in seconds, never more than the cores could give (a step's to within the
    # samples around it).
    cores = report["machine"]["cores"]
    assert rebuild["server_cpu_seconds"] is not None, "the test's Postgres server must run here"
    for step in rebuild["steps"]:
        assert 0 <= step["cpu_seconds"] <= (step["seconds"] + 2) * cores, step
        assert step["server_cpu_seconds"] >= 0, step
        assert step["cores_busy"] is None or 0 < step["cores_busy"] <= cores + 0.5, step
    assert 0 < rebuild["cpu_seconds"] <= rebuild["seconds"] * cores + 0.5
    assert rebuild["server_cpu_seconds"] > 0  # the publishes' COPY and index builds
    publishing = [
        s for s in rebuild["steps"] if s["step"] in ("tutor_score_history", "tutor_scores")
    ]
    assert sum(s["server_cpu_seconds"] for s in publishing) > 0

    # DuckDB alone counts what the pipeline scored: every tutor, every day, every window.
    floor = stages["floor"]
    assert floor["rows"] == rebuild["daily_rows"] == floor["compared_rows"] > 0
    assert floor["mismatches"] == 0
    assert 0 < floor["cpu_seconds"] <= floor["seconds"] * cores + 0.5

    # The original system's per-session queries give the published numbers.
    baseline = stages["baseline"]
    assert baseline["sessions"] == 200 and baseline["queries"] == 600
    assert baseline["mismatches"] == 0

    tick = stages["tick"]
    assert tick["success"] and tick["rows_loaded"] > 125 and tick["digest_sent"]

    latency = stages["latency"]
    assert latency["emailed"] == len(latency["drops"]) == 3
    assert all(d["landing_ticks"] == 2 and d["ingest_runs"] == 1 for d in latency["drops"])
    assert latency["p95_seconds"] >= latency["p50_seconds"] > 0

    summary = report["summary"]
    assert set(summary["targets"]) == {
        "rebuild_seconds",
        "rebuild_vs_floor",
        "peak_rss_mb",
        "tick_seconds",
        "latency_p95_seconds",
        "throughput_vs_baseline",
    }
    assert all(t["value"] is not None for t in summary["targets"].values())
    # The pipeline validates, checks and publishes what the floor only counts: more work.
    work = summary["work"]
    assert work["rebuild_cpu_seconds"] == pytest.approx(
        rebuild["cpu_seconds"] + rebuild["server_cpu_seconds"], abs=0.1
    )
    assert work["rebuild_vs_floor_cpu"] > 1
    assert work["rebuild_seconds_every_core_busy"] == pytest.approx(
        work["rebuild_cpu_seconds"] / cores, abs=0.1
    )
    assert {"cpu", "cores", "ram_gb", "python", "duckdb", "polars", "postgres"} <= set(
        report["machine"]
    )
    page = (results / "latest.md").read_text()
    assert "full rebuild" in page and "floor" in page and "baseline" in page
    assert "Work in CPU time" in page and "Postgres CPU s" in page

    # The run cleans up after itself: no data left, no database left.
    assert not (tmp_path / "data").exists()
    with pg_admin.connect() as conn:
        left = conn.execute(
            sa.text("SELECT count(*) FROM pg_database WHERE datname = :name"),
            {"name": report["plan"]["database"]},
        ).scalar()
    assert left == 0
