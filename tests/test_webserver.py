"""The code location served by `dagster-webserver`, driven through its GraphQL API as the UI
drives it: a partitioned run is launched, runs in its own process and succeeds, and the UI
shows its partition and its checks' results."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from dagster_graphql import DagsterGraphQLClient

from tutor_scoring_dagster.config import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
T = datetime(2026, 3, 1, tzinfo=UTC)
PARTITION = "2026-02-28"  # the snapshot as of T
LOCATION = "tutor_scoring"
STARTUP_SECONDS = 45
RUN_SECONDS = 90

# No daemon runs here: the instance must launch runs at once, not queue them (Dagster's
# default coordinator is the queued one).
DAGSTER_YAML = """\
run_coordinator:
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""

# Each run still gets its own process; its steps share it rather than starting one each.
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}

WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace {
  locationEntries { name loadStatus locationOrLoadError { __typename
    ... on PythonError { message } } } } } }
"""

ASSET_QUERY = """
query { assetNodeOrError(assetKey: {path: ["dashboard_site"]}) { __typename
  ... on AssetNode { groupName kinds } } }
"""

HEALTH_QUERY = """
query {
  assetNodeOrError(assetKey: {path: ["tutor_scores_daily"]}) { __typename ... on AssetNode {
    assetPartitionStatuses { __typename
      ... on TimePartitionStatuses { ranges { status startKey endKey } } }
    assetChecksOrError { __typename ... on AssetChecks { checks {
      name blocking executionForLatestMaterialization { status partition } } } } } }
  assetOrError(assetKey: {path: ["tutor_scores_daily"]}) { __typename
    ... on Asset { assetHealth { assetHealth } } }
}
"""


@dataclass
class Server:
    port: int
    log: Path

    def graphql(self, query: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            data: dict[str, Any] = json.load(response)["data"]
            return data

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_drops(landing: Path) -> None:
    """Two tutors' sessions over the week before T, one of them often moved by the tutor."""
    landing.mkdir(parents=True)
    sessions, reschedules = [], []
    for day in range(1, 8):
        for tutor in ("A", "B"):
            sid = f"{tutor}{day}"
            at = T - timedelta(days=day, hours=3)
            moved = tutor == "A" and day % 2 == 1
            sessions.append(
                {
                    "session_id": sid,
                    "tutor_id": tutor,
                    "scheduled_time": at.isoformat(),
                    "status": "rescheduled" if moved else "completed",
                }
            )
            if moved:
                reschedules.append(
                    {
                        "session_id": sid,
                        "initiator": "tutor",
                        "cancelled_at": (at - timedelta(hours=4)).isoformat(),
                    }
                )
    pl.DataFrame(sessions).write_csv(landing / "sessions_20260301T0000.csv")
    pl.DataFrame(reschedules).write_csv(landing / "reschedules_20260301T0000.csv")
    # Written an hour ago: the hourly sweep leaves files younger than two minutes for later.
    an_hour_ago = time.time() - 3600
    for drop in landing.iterdir():
        os.utime(drop, (an_hour_ago, an_hour_ago))


@pytest.fixture
def webserver(tmp_path: Path) -> Iterator[Server]:
    """`dagster-webserver` on a free port, over a fresh SQLite instance and project home."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    home = tmp_path / "home"
    write_drops(home / "landing")
    env = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}
    env.update(DAGSTER_HOME=str(dagster_home), TUTOR_SCORING_HOME=str(home))
    env.pop("TUTOR_SCORING_SITE_DIR", None)
    server = Server(port=free_port(), log=tmp_path / "webserver.log")
    executable = Path(sys.executable).parent / "dagster-webserver"
    with server.log.open("wb") as log:
        proc = subprocess.Popen(
            [str(executable), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(server.port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the code server dies with it
        )
    try:
        wait_until_loaded(server, proc)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def wait_until_loaded(server: Server, proc: subprocess.Popen[bytes]) -> None:
    """Until /server_info answers and the code location has loaded (or failed to)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster-webserver exited:\n{server.tail()}"
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/server_info", timeout=2
            ) as response:
                if response.status == 200:
                    entries = server.graphql(WORKSPACE_QUERY)["workspaceOrError"]
                    status = {e["name"]: e for e in entries["locationEntries"]}.get(LOCATION)
                    if status and status["loadStatus"] == "LOADED":
                        loaded = status["locationOrLoadError"]
                        assert loaded["__typename"] == "RepositoryLocation", loaded
                        return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver not ready in {STARTUP_SECONDS} s:\n{server.tail()}")


def wait_for_run(client: DagsterGraphQLClient, run_id: str, server: Server) -> str:
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return str(status)
        time.sleep(1)
    pytest.fail(f"run {run_id} not finished in {RUN_SECONDS} s:\n{server.tail()}")


@pytest.mark.slow
def test_webserver_launches_a_partitioned_run(webserver: Server, tmp_path: Path) -> None:
    asset = webserver.graphql(ASSET_QUERY)["assetNodeOrError"]
    assert asset["__typename"] == "AssetNode" and "html" in asset["kinds"]

    client = DagsterGraphQLClient("127.0.0.1", port_number=webserver.port)
    ingest = client.submit_job_execution(
        "hourly_scoring_job", repository_location_name=LOCATION, run_config=IN_PROCESS
    )
    assert wait_for_run(client, ingest, webserver) == "SUCCESS"
    run_id = client.submit_job_execution(
        "daily_scores_job",
        repository_location_name=LOCATION,
        run_config=IN_PROCESS,
        tags={"dagster/partition": PARTITION},
    )
    assert wait_for_run(client, run_id, webserver) == "SUCCESS"

    # The partition's snapshot reached the serving store, one row per tutor.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'scores.sqlite'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT tutor_id, total_sessions_7d FROM tutor_score_history ORDER BY 1")
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("A", 6), ("B", 6)]

    # What the data team watches in the UI for the daily asset: the partitions bar, and each
    # check's latest result. `yesterday_materialized` is red: the partition it wants is the one
    # due by the wall clock (yesterday's), later than the one run here. Dagster OSS computes
    # no overall "asset health" (a Dagster+ status): README says to watch the checks instead.
    seen = webserver.graphql(HEALTH_QUERY)
    node = seen["assetNodeOrError"]
    assert node["assetPartitionStatuses"]["ranges"] == [
        {"status": "MATERIALIZED", "startKey": PARTITION, "endKey": PARTITION}
    ]
    checks = {
        c["name"]: (c["blocking"], (c["executionForLatestMaterialization"] or {}).get("status"))
        for c in node["assetChecksOrError"]["checks"]
    }
    assert checks.pop("yesterday_materialized") == (False, "FAILED")
    assert checks and set(checks.values()) == {(True, "SUCCEEDED")}, checks
    assert seen["assetOrError"] == {"__typename": "Asset", "assetHealth": None}
