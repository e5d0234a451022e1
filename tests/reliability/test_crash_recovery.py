"""Crashes: the pipeline is SIGKILLed (a real subprocess, no cleanup) in the middle of ingest,
scoring, publishing and sending; the next run completes, and the warehouse, the serving store,
the email ledger, the archive/quarantine folders and the outbox are what a run that never
crashed leaves (wall-clock columns aside). No email is sent twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tutor_scoring_dagster import ingest
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline

from ._support import (
    HERE,
    HISTORY_DAYS,
    T,
    build_drops,
    diff_states,
    env_for,
    environment,
    full_state,
    isolated_env,
    ledger_rows,
    settings_for,
)

DRIVER = HERE / "crash_driver.py"
BATCH_FILES = 4
"""Files per batch of the passes at the driver's ``batch-*`` points (and of their recovery)."""


def _new_db(pg_admin: sa.Engine, name: str) -> str:
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return pg_admin.url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def baseline(
    pg_admin: sa.Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """What one run that never crashed leaves behind (same drops, same as-of)."""
    home = tmp_path_factory.mktemp("baseline") / "home"
    # One database per process: xdist workers (or another checkout) run this module at once.
    url = _new_db(pg_admin, f"tutor_scoring_reliability_baseline_{os.getpid()}")
    settings = settings_for(home)
    build_drops(settings.landing_dir)
    with environment(**isolated_env(home, DATABASE_URL=url)):
        summary = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
        assert summary.success, summary.render()
        assert summary.value("email_reports", "emails_sent") >= 2, summary.render()
        state = full_state(settings, url)
    assert state["files"]["quarantine"], "the drops should quarantine something"
    assert any(n.endswith(".rejected.csv") for n in state["files"]["archive"])
    yield state
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


def _expire_claims(url: str) -> None:
    """Let the pending-claim lease (10 minutes) run out, as if the next run came later."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE email_reports SET next_attempt_at = :past "
                "WHERE status = 'pending' AND next_attempt_at IS NOT NULL"
            ),
            {"past": datetime.now(UTC) - timedelta(minutes=1)},
        )
    engine.dispose()


POINTS = [
    pytest.param("ingest-insert", 3, id="ingest-mid-transaction"),
    pytest.param("ingest-archive", 5, id="ingest-after-commit-before-archive"),
    pytest.param("ingest-rejected-csv", 1, id="ingest-after-commit-before-rejected-csv"),
    pytest.param("ingest-after-last-file", 0, id="ingest-after-the-last-file-of-a-pass"),
    pytest.param("batch-insert", 3, id="ingest-batch-mid-transaction"),
    pytest.param("batch-archive", 6, id="ingest-batch-after-commit-before-archive"),
    pytest.param("score-activity", 1, id="scoring-daily-activity-mid-transaction"),
    pytest.param("score-current", 1, id="scoring-current-snapshot-mid-transaction"),
    pytest.param("publish-copy", 2, id="publish-mid-copy"),
    pytest.param("publish-merge", 3, id="publish-mid-upsert"),
    pytest.param("send-before", 1, id="send-claimed-not-sent"),
    pytest.param("send-after", 1, id="send-sent-not-recorded"),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("point", "nth"), POINTS)
def test_sigkill_then_rerun_equals_a_run_that_never_crashed(
    point: str,
    nth: int,
    baseline: dict[str, Any],
    home: Settings,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    build_drops(home.landing_dir)
    env = env_for(
        home,
        DATABASE_URL=pg_url,
        RELIABILITY_AS_OF=T.isoformat(),
        RELIABILITY_HISTORY_DAYS=str(HISTORY_DAYS),
        RELIABILITY_BATCH_FILES=str(BATCH_FILES),
    )
    crashed = subprocess.run(
        [sys.executable, str(DRIVER), point, str(nth)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr[-3000:]
    if point.startswith("batch-"):
        # The next pass is batched too (the baseline's, one file at a time, must agree).
        monkeypatch.setattr(ingest, "BATCH_MIN_FILES", 1)
        monkeypatch.setattr(ingest, "BATCH_MAX_FILES", BATCH_FILES)

    recovered = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert recovered.success, recovered.render()
    if point.startswith("send"):
        # The killed run held a claim; once its lease runs out the next run finishes the job.
        _expire_claims(pg_url)
        again = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
        assert again.success, again.render()

    state = full_state(home, pg_url)
    problems = diff_states(baseline, state)
    assert not problems, "\n".join(problems)

    # Exactly once: one file per key in the outbox, every ledger row sent once.
    assert all(n == 1 for n in state["files"]["outbox"].values()), state["files"]["outbox"]
    rows = ledger_rows(pg_url)
    assert {r["status"] for r in rows} == {"sent"}
    if point.startswith("send"):
        assert sum(r["attempts"] == 2 for r in rows) == 1, "the killed send was not resumed"
    for r in rows:
        if point.startswith("send") and r["attempts"] == 2:
            # The killed attempt's outcome was unknown: resent under the same key and
            # Message-ID (the outbox kept one file), and the ledger says so.
            assert "possible duplicate" in (r["error_message"] or "")
        else:
            assert r["attempts"] == 1 and r["error_message"] is None, r
