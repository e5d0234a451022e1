"""Concurrency: ingest runs (as the landing sensor requests them), the hourly scoring run and a
90-day backfill of the daily partitions, submitted together to a real `dagster-daemon` with the
queued run coordinator and a pool limit of one step (the deployment's dagster.yaml, on SQLite).
All succeed; none fails on DuckDB's single-writer lock, because the steps that write the
warehouse take turns in the `warehouse` pool."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from tutor_scoring_dagster.config import Settings

from ._support import REPO, build_drops, env_for

RUN_TIMEOUT_S = 150
BACKFILL = ("2025-12-01", "2026-02-28")  # 90 daily partitions, one run (single-run policy)
WAREHOUSE_STEPS = {
    "landing_drops",
    "tutor_daily_activity",
    "tutor_scores_daily",
    "tutor_scores_current",
}
"""The steps in the `warehouse` pool (they write the DuckDB file)."""

DAGSTER_YAML = """\
storage:
  sqlite:
    base_dir: {base}
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: 4
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


class Daemon:
    """A `dagster-daemon` process group (the daemon, its code server, the runs it launched)."""

    def __init__(self, proc: subprocess.Popen[bytes], env: dict[str, str]) -> None:
        self.proc = proc
        self.env = env

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def daemon(home: Settings, tmp_path: Path) -> Iterator[Daemon]:
    """A `dagster-daemon` over a fresh SQLite instance (its sensors and schedules run too: any
    run they launch must succeed as well)."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML.format(base=dagster_home))
    env = env_for(home, DAGSTER_HOME=str(dagster_home))
    # Create the instance's SQLite schema once, up front: the daemon and the concurrent
    # `dagster job launch` processes would otherwise race to create the same tables.
    subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "instance", "migrate"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: its code server goes with it
    )
    handle = Daemon(proc, env)
    try:
        yield handle
    finally:
        handle.stop()
        log.close()


def launch(
    env: dict[str, str], job: str, config: dict | None = None, tags: dict | None = None
) -> str:
    args = [str(Path(sys.executable).parent / "dagster"), "job", "launch", "-w", "workspace.yaml"]
    args += ["-j", job, "--config-json", json.dumps(config or {})]
    if tags:
        args += ["--tags", json.dumps(tags)]
    done = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_ingest_hourly_and_backfill_runs_share_the_warehouse_without_lock_errors(
    home: Settings, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted(str(p) for p in build_drops(home.landing_dir))
    in_process = {"execution": {"config": {"in_process": {}}}}

    def ingest(part: list[str]) -> str:
        # The landing job runs in one process already (its own executor).
        config = {"ops": {"landing_drops": {"config": {"paths": part}}}}
        return launch(daemon.env, "landing_ingest_job", config)

    submissions = [
        lambda: ingest(files[0::2]),
        lambda: ingest(files[1::2]),
        lambda: launch(daemon.env, "hourly_scoring_job", in_process),
        lambda: launch(
            daemon.env,
            "daily_scores_job",
            in_process,
            tags={
                "dagster/asset_partition_range_start": BACKFILL[0],
                "dagster/asset_partition_range_end": BACKFILL[1],
            },
        ),
    ]
    with ThreadPoolExecutor(len(submissions)) as pool:
        list(pool.map(lambda submit: submit(), submissions))

    monkeypatch.setenv("DAGSTER_HOME", daemon.env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            runs = instance.get_runs()
            if len(runs) >= 4 and all(r.is_finished for r in runs):
                break
            assert time.monotonic() < deadline, [(r.job_name, r.status) for r in runs]
            time.sleep(1)
        statuses = {r.run_id: (r.job_name, r.status) for r in runs}
        failed = {k: v for k, v in statuses.items() if v[1] != dg.DagsterRunStatus.SUCCESS}
        logs = {
            run_id: "\n".join(
                (r.dagster_event.message or "") if r.dagster_event else r.user_message
                for r in instance.all_logs(run_id)
            )
            for run_id in failed
        }
        assert not failed, f"{failed}\n{logs}"
        intervals = _step_intervals(instance, [r.run_id for r in runs])
        partitions = instance.get_materialized_partitions(dg.AssetKey("tutor_scores_daily"))

    # The warehouse writers never overlapped: the pool held them to one at a time.
    spans = sorted(s for step, s in intervals if step in WAREHOUSE_STEPS)
    assert len(spans) >= 6
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.05, spans
    jobs = sorted(job for job, _ in statuses.values())
    assert jobs.count("landing_ingest_job") >= 2 and "daily_scores_job" in jobs
    assert len(partitions) == 90 and min(partitions) == BACKFILL[0]
    daemon.stop()  # no late sensor or schedule run writes the warehouse while it is read
    with duckdb.connect(str(home.warehouse), read_only=True) as con:
        loaded = con.execute("SELECT count(*) FROM loaded_files").fetchone()
        days = con.execute("SELECT count(DISTINCT as_of) FROM tutor_scores_daily").fetchone()
    assert loaded == (len(files) - 1,)  # all but the unloadable one
    assert days is not None and days[0] >= 19  # every day with sessions, in the backfill


def _step_intervals(
    instance: dg.DagsterInstance, run_ids: list[str]
) -> list[tuple[str, tuple[float, float]]]:
    """(step, (start, end)) of every step of the runs, from their event logs."""
    out = []
    for run_id in run_ids:
        started: dict[str, float] = {}
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is None or event.step_key is None:
                continue
            if event.event_type_value == "STEP_START":
                started[event.step_key] = record.timestamp
            elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
                out.append((event.step_key, (started[event.step_key], record.timestamp)))
    return out
