"""The whole flow end to end, as a user runs it: drops -> DuckDB -> scores -> store -> email."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
import sys
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa
from drops import HandDrop

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import PLANNED_ONCE_PER_ASSET, run_pipeline
from tutor_scoring_dagster.defs.scores import assets as score_assets
from tutor_scoring_dagster.scoring import wilson_lower_bound_scalar

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def build_drops(landing: Path) -> None:
    """A handful of tutors whose scores as of T are computed by hand in the tests below."""
    drop = HandDrop()
    session = drop.session

    # A: 30-day window edge counts, T itself and the future do not.
    session("A1", "A", T - timedelta(days=30), "rescheduled", moved_by="tutor")  # 30d, 90d
    session("A2", "A", T, "completed")  # at T: not yet
    session("A3", "A", T + timedelta(days=1), "rescheduled", moved_by="tutor")  # future
    session("A4", "A", T - timedelta(hours=1), "completed", moved_by="tutor")  # moved, then held
    session("A5", "A", T - timedelta(days=2), "no_show")
    session("A6", "A", T - timedelta(days=3), "completed")
    session("A7", "A", T - timedelta(days=4), "completed")
    session("A8", "A", T - timedelta(days=10), "completed")
    session("A9", "A", T - timedelta(days=60), "completed")
    # B: a student-initiated reschedule only: rate 0.
    for i in range(5):
        session(f"B{i}", "B", T - timedelta(days=i + 1), "completed")
    session("B9", "B", T - timedelta(days=1, hours=3), "rescheduled", moved_by="student")
    # C: everything rescheduled, but too few sessions to judge.
    session("C1", "C", T - timedelta(days=1), "rescheduled", moved_by="tutor")
    session("C2", "C", T - timedelta(days=2), "rescheduled", moved_by="tutor")
    # D: just outside the 30-day window (by a microsecond), inside the 90-day one.
    session("D0", "D", T - timedelta(days=30, microseconds=1), "rescheduled", moved_by="tutor")
    for i in range(4):
        session(f"D{i + 1}", "D", T - timedelta(days=31 + i), "rescheduled", moved_by="tutor")

    drop.write(
        landing,
        tutors=[
            {
                "tutor_id": "A",
                "name": "Ana <b>Bold</b>",
                "email": "a@example.com",
                "is_active": "true",
            },
            {"tutor_id": "B", "name": "Ben", "email": "b@example.com", "is_active": "t"},
            {"tutor_id": "C", "name": "Cid", "email": "c@example.com", "is_active": "1"},
        ],  # D has no tutors export: the pipeline creates it from its sessions
    )
    (landing / "sessions_broken.csv").write_text("session_id;tutor_id\n1;2\n", encoding="utf-8")


def read_outbox(settings: Settings) -> list[EmailMessage]:
    files = sorted(settings.outbox_dir.glob("*.eml"))
    return [
        email.message_from_bytes(f.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for f in files
    ]


def scores_by_tutor(url: str) -> dict[str, dict[str, object]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM tutor_scores")).mappings().all()
    engine.dispose()
    return {r["tutor_id"]: dict(r) for r in rows}


def assert_hand_computed(scores: dict[str, dict[str, object]]) -> None:
    assert set(scores) == {"A", "B", "C", "D"}
    a = scores["A"]
    assert (a["total_sessions_7d"], a["tutor_reschedules_7d"], a["no_shows_7d"]) == (4, 1, 1)
    assert (a["total_sessions_30d"], a["tutor_reschedules_30d"]) == (6, 2)
    assert (a["total_sessions_90d"], a["tutor_reschedules_90d"]) == (7, 2)
    assert a["reschedule_rate_7d"] == pytest.approx(0.25)
    assert a["reschedule_rate_30d"] == pytest.approx(2 / 6)
    assert a["no_show_rate_30d"] == pytest.approx(1 / 6)
    assert a["reschedule_rate_30d_lower95"] == pytest.approx(wilson_lower_bound_scalar(2, 6))
    assert a["is_high_risk"] and a["risk_status"] == "high"  # 30d: 6 >= 5 sessions, 33% > 15%
    assert a["risk_threshold"] == pytest.approx(0.15) and a["min_sessions"] == 5

    b = scores["B"]
    assert (b["total_sessions_7d"], b["tutor_reschedules_7d"]) == (6, 0)
    assert b["reschedule_rate_7d"] == 0.0 and b["risk_status"] == "ok"

    c = scores["C"]
    assert c["reschedule_rate_7d"] == 1.0
    assert not c["is_high_risk"] and c["risk_status"] == "insufficient_data"

    d = scores["D"]
    assert d["total_sessions_30d"] == 0
    assert d["reschedule_rate_30d"] is None and d["reschedule_rate_7d"] is None  # empty: null
    assert (d["total_sessions_90d"], d["tutor_reschedules_90d"]) == (5, 5)
    assert d["is_high_risk"]


def assert_digest(settings: Settings) -> None:
    messages = read_outbox(settings)
    assert len(messages) == 1
    msg = messages[0]
    assert msg["To"] == "admin@example.com"
    assert "2 high risk" in msg["Subject"]
    html = msg.get_body(preferencelist=("html",))
    text = msg.get_body(preferencelist=("plain",))
    assert html is not None and text is not None
    html_body, text_body = html.get_content(), text.get_content()
    for body in (html_body, text_body):
        assert "(A)" in body or ">A<" in body
        assert "D" in body
    assert "Ana &lt;b&gt;Bold&lt;/b&gt;" in html_body  # autoescaped
    assert "<b>Bold</b>" not in html_body
    assert "Ana <b>Bold</b> (A)" in text_body
    assert "sessions_broken.csv" in text_body  # data-quality note
    assert 'style="' in html_body  # CSS inlined for mail clients


def test_pipeline_end_to_end_on_embedded_defaults(home: Settings) -> None:
    build_drops(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=3)
    assert summary.success, summary.render()
    # Sent now for sessions of a past day, the email is months late: the latency check says so.
    assert [c.split(":")[0] for c in summary.failed_checks] == [
        "email_reports email_delivery_latency"
    ]
    assert "check failed: email_reports email_delivery_latency" in summary.render()
    assert summary.value("landing_drops", "files_loaded") == 3
    assert summary.value("landing_drops", "files_quarantined") == 1
    assert summary.value("tutor_scores_current", "tutors_scored") == 4
    assert summary.value("email_reports", "emails_sent") == 1

    # The bad file is quarantined with a reason; the good ones are archived.
    reason = (home.quarantine_dir / "sessions_broken.csv.reason.txt").read_text()
    assert "missing required column" in reason and "comma-separated" in reason
    assert sorted(p.name for p in home.archive_dir.glob("*.csv")) == [
        "reschedules_20260301T1100.csv",
        "sessions_20260301T1100.csv",
        "tutors_20260301.csv",
    ]
    assert list(home.landing_dir.glob("*.csv")) == []

    assert_hand_computed(scores_by_tutor(home.database_url))
    assert_digest(home)

    # History: one row per tutor per day, partition D as of the end of D.
    with duckdb.connect(str(home.warehouse), read_only=True) as con:
        days = con.sql("SELECT count(*), count(DISTINCT as_of) FROM tutor_scores_daily").fetchall()[
            0
        ]
    assert days[1] == 3

    # A second run with nothing new: no file, no change, no second email.
    again = run_pipeline(as_of=T, history_days=3)
    assert again.success
    assert again.value("landing_drops", "files_loaded") == 0
    assert again.value("email_reports", "emails_sent") == 0
    assert len(read_outbox(home)) == 1


def test_the_whole_run_is_a_run_per_stage_and_a_failed_stage_skips_what_needs_it(
    home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Landing, the daily range and the snapshot run one after the other, as a deployment
    runs them; the daily scoring breaking leaves the snapshot published and sent, and the
    dashboard (which charts the history) as it was."""
    build_drops(home.landing_dir)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("daily scoring broke")

    monkeypatch.setattr(score_assets, "assess_days_by_chunk", broken)
    monkeypatch.delenv(PLANNED_ONCE_PER_ASSET, raising=False)
    with dg.instance_for_test() as instance:
        summary = run_pipeline(as_of=T, history_days=3, instance=instance)
        jobs = [instance.get_run_by_id(run_id) for run_id in summary.run_ids]
        planned = _events_by_asset(
            instance, summary.run_ids, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
        )
    assert not summary.success
    assert summary.errors == ["tutor_scores_daily: RuntimeError: daily scoring broke"]
    assert [run and run.tags.get("dagster/asset_partition_range_end") for run in jobs] == [
        None,
        "2026-02-28",
        None,
    ]
    assert summary.value("tutor_scores_current", "tutors_scored") == 4
    assert summary.value("email_reports", "emails_sent") == 1
    assert "dashboard_site" not in summary.metadata
    assert not home.site_dir.exists() or not any(home.site_dir.iterdir())
    # The days are planned for the daily assets only (not 3 times for every other asset), and
    # on a persistent instance one event per day, which the UI marks failed when a run fails.
    assert planned == {
        "landing_drops": 1,
        "tutor_daily_activity": 3,
        "tutor_scores_daily": 3,
        "tutor_score_history": 3,
        "tutor_scores_current": 1,
        "tutor_scores": 1,
        "email_reports": 1,
    }


def test_a_run_says_which_checks_failed_beside_a_run_that_succeeded(
    home: Settings, due_partition: date
) -> None:
    """On an instance the UI reads, a run of past days leaves yesterday's partition missing:
    the run succeeds, and its summary says the partition check is red and why."""
    build_drops(home.landing_dir)
    with dg.instance_for_test() as instance:
        summary = run_pipeline(as_of=T, history_days=1, instance=instance)
    assert summary.success, summary.render()
    lines = [
        line
        for line in summary.render().splitlines()
        if "check failed" in line and "yesterday_materialized" in line
    ]
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "tutor_daily_activity yesterday_materialized",
        "tutor_score_history yesterday_materialized",
        "tutor_scores_daily yesterday_materialized",
    ]
    assert all(f"partition {due_partition} was due by" in line for line in lines)


def _events_by_asset(
    instance: dg.DagsterInstance, run_ids: list[str], kind: dg.DagsterEventType
) -> Counter[str]:
    return Counter(
        e.dagster_event.asset_key.to_user_string()
        for run_id in run_ids
        for e in instance.all_logs(run_id, of_type=kind)
        if e.dagster_event and e.dagster_event.asset_key
    )


@pytest.mark.parametrize(("preset", "planned_per_asset"), [(None, 1), ("0", 3)])
def test_a_throwaway_instance_plans_a_range_once_per_asset_unless_the_operator_says_otherwise(
    home: Settings, monkeypatch: pytest.MonkeyPatch, preset: str | None, planned_per_asset: int
) -> None:
    """``tutor-scoring run`` without DAGSTER_HOME: nobody will read the days' planned marks,
    so they are one event per asset (unless the operator set the flag: then as set); every
    day is still materialized, and the flag set by the run does not outlive it."""
    if preset is None:
        monkeypatch.delenv(PLANNED_ONCE_PER_ASSET, raising=False)
    else:
        monkeypatch.setenv(PLANNED_ONCE_PER_ASSET, preset)
    build_drops(home.landing_dir)
    instance = dg.DagsterInstance.ephemeral()
    summary = run_pipeline(as_of=T, history_days=3, instance=instance)
    assert summary.success, summary.render()
    daily = ("tutor_scores_daily", "tutor_score_history")
    planned = _events_by_asset(
        instance, summary.run_ids, dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
    )
    done = _events_by_asset(instance, summary.run_ids, dg.DagsterEventType.ASSET_MATERIALIZATION)
    assert {name: planned[name] for name in daily} == dict.fromkeys(daily, planned_per_asset)
    assert {name: done[name] for name in daily} == dict.fromkeys(daily, 3)
    assert os.environ.get(PLANNED_ONCE_PER_ASSET) == preset


def test_pipeline_publishes_to_postgres(
    home: Settings, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    build_drops(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=2)
    assert summary.success, summary.render()
    scores = scores_by_tutor(pg_url)
    assert_hand_computed(scores)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        tutors = dict(conn.execute(sa.text("SELECT tutor_id, name FROM tutors")).all())
        ledger = conn.execute(sa.text("SELECT status, report_kind FROM email_reports")).all()
        history = conn.execute(sa.text("SELECT count(*) FROM tutor_score_history")).scalar()
    engine.dispose()
    assert tutors["A"] == "Ana <b>Bold</b>" and tutors["D"] is None
    assert ledger == [("sent", "digest")]
    assert history and history > 0
    assert_digest(home)


def _console_script() -> str:
    found = shutil.which("tutor-scoring", path=str(Path(sys.executable).parent))
    assert found, "the tutor-scoring console script is not installed (pip install -e .)"
    return found


def test_cli_run_prints_a_summary_and_fails_loudly(home: Settings, tmp_path: Path) -> None:
    build_drops(home.landing_dir)
    env = {**os.environ, "TUTOR_SCORING_HOME": str(home.home)}
    done = subprocess.run(
        [_console_script(), "run", "--as-of", "2026-03-01T12:00:00Z", "--history-days", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "files loaded:      3 (1 quarantined, 0 duplicates, 0 skipped)" in done.stdout
    assert "tutors scored:     4" in done.stdout
    assert "high-risk tutors:  2" in done.stdout
    assert "emails sent:       1" in done.stdout
    assert "warning" not in done.stdout
    assert_hand_computed(scores_by_tutor(home.database_url))

    # A store that refuses us: non-zero exit, the reason on one line, no retry storm.
    bad = {**env, "DATABASE_URL": "sqlite+nosuchdriver:///x.sqlite"}
    failed = subprocess.run(
        [_console_script(), "run", "--as-of", "2026-03-01T12:00:00Z", "--history-days", "1"],
        capture_output=True,
        text=True,
        env=bad,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout
    assert "DATABASE_URL is not a usable SQLAlchemy URL" in failed.stdout

    usage = subprocess.run(
        [_console_script(), "run", "--as-of", "yesterday"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2 and "not an ISO 8601 timestamp" in usage.stderr


def test_a_landing_folder_that_is_not_there_is_said_not_passed_over(home: Settings) -> None:
    """A typo in TUTOR_SCORING_LANDING_DIR: the run still succeeds (a new deployment may have
    had no drop yet), but its summary and the run log say nothing could be loaded."""
    assert not home.landing_dir.exists()
    summary = run_pipeline(as_of=datetime(2026, 3, 1, 12, tzinfo=UTC), history_days=1)
    assert summary.success
    assert (
        f"warning: the landing folder {home.landing_dir} does not exist, so nothing was loaded"
        in summary.render()
    )
