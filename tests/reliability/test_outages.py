"""Outages: the serving store unreachable or lost in the middle of a publish, and the email
provider timing out, throttling, failing or refusing the key.

Dagster's retry waits (10 s, 30 s, 70 s) pass on a fast clock (`FastClock`); waits inside the
email client are real but short (1-2 s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.definitions import defs
from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.defs.publish.assets import tutor_scores
from tutor_scoring_dagster.defs.resources import default_resources
from tutor_scoring_dagster.defs.scores.assets import tutor_scores_current
from tutor_scoring_dagster.delivery import SendGridSender
from tutor_scoring_dagster.reports import (
    ReportSettings,
    deliver_due,
    find_due_work,
    report_config,
)
from tutor_scoring_dagster.scoring import RiskRule
from tutor_scoring_dagster.store import publish
from tutor_scoring_dagster.store.publish import create_store_engine

from ._support import (
    HISTORY_DAYS,
    FakeSendGrid,
    FastClock,
    Reply,
    T,
    build_drops,
    environment,
    expire_retry_waits,
    fake_sendgrid,
    isolated_env,
    ledger_rows,
    newly_risky_drops,
    settings_for,
    store_state,
)

DOWN_URL = "postgresql+psycopg://someone:pw-not-shown@127.0.0.1:1/scores"


def _events(instance: dg.DagsterInstance, run_ids: list[str], kind: str) -> list[Any]:
    """The events of ``kind`` in the runs of one ``run_pipeline`` call."""
    return [
        r.dagster_event
        for run_id in run_ids
        for r in instance.all_logs(run_id)
        if r.dagster_event is not None and r.dagster_event.event_type_value == kind
    ]


def _cause(error: Any) -> str:
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return str(error.message).strip()


# --- the serving store -----------------------------------------------------------------


def test_publish_assets_retry_with_backoff_and_reports_rely_on_their_ledger() -> None:
    for name in ("tutor_scores", "tutor_score_history"):
        policy = defs.resolve_assets_def(name).op.retry_policy
        assert policy is not None, f"{name} has no RetryPolicy"
        assert policy.max_retries >= 2 and policy.delay and policy.delay >= 5
        assert policy.backoff == dg.Backoff.EXPONENTIAL
    # A report run must not resend on a Dagster retry: the ledger schedules its retries.
    assert defs.resolve_assets_def("email_reports").op.retry_policy is None


@pytest.fixture(scope="module")
def store_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One whole run with the serving store's server down (connection refused)."""
    home = tmp_path_factory.mktemp("down") / "home"
    build_drops(settings_for(home).landing_dir)
    clock = FastClock()
    with (
        environment(**isolated_env(home, DATABASE_URL=DOWN_URL)),
        pytest.MonkeyPatch.context() as mp,
        dg.instance_for_test() as instance,
    ):
        clock.install(mp)
        summary = run_pipeline(as_of=T, history_days=HISTORY_DAYS, instance=instance)
        yield {
            "summary": summary,
            "retries": _events(instance, summary.run_ids, "STEP_UP_FOR_RETRY"),
            "failures": _events(instance, summary.run_ids, "STEP_FAILURE"),
            "home": home,
        }


def test_an_unreachable_store_fails_publishing_after_retries_with_backoff(
    store_down: dict[str, Any],
) -> None:
    summary = store_down["summary"]
    assert not summary.success
    waits: dict[str, list[int]] = {}
    for event in store_down["retries"]:
        waits.setdefault(event.step_key, []).append(event.event_specific_data.seconds_to_wait)
    assert set(waits) == {"tutor_scores", "tutor_score_history"}
    for step, seconds in waits.items():
        assert len(seconds) == 3 and seconds == sorted(seconds) and seconds[0] >= 5, (step, seconds)
    failed = {e.step_key: _cause(e.event_specific_data.error) for e in store_down["failures"]}
    assert set(failed) == {"tutor_scores", "tutor_score_history"}  # the rest ran
    for message in failed.values():
        assert "\n" not in message and "pw-not-shown" not in message
        assert "cannot reach the serving store at postgresql+psycopg://someone:***@127.0.0.1:1" in (
            message
        )
    # Ingest and scoring went through; the reports waited (they read the store).
    assert summary.value("tutor_scores_current", "tutors_scored") > 0
    assert "email_reports" not in summary.metadata


def test_the_run_summary_says_why_publishing_failed(store_down: dict[str, Any]) -> None:
    errors = store_down["summary"].errors
    assert errors and all("cannot reach the serving store" in e for e in errors), errors


@pytest.mark.postgres
def test_a_connection_lost_mid_publish_leaves_no_partial_state_and_the_retry_completes(
    home: Settings, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    build_drops(home.landing_dir)
    assert run_pipeline(as_of=T, history_days=HISTORY_DAYS).success
    before = store_state(pg_url)

    # New data, then the database connection dies in the middle of the next publish.
    newly_risky_drops(home.landing_dir, tutors=("Z3",))
    (home.landing_dir / "sessions_20260301T1130.csv").rename(
        home.landing_dir / "sessions_20260301T1230.csv"
    )
    (home.landing_dir / "reschedules_20260301T1130.csv").rename(
        home.landing_dir / "reschedules_20260301T1230.csv"
    )
    real_merge = publish._merge
    calls: list[str] = []
    during: list[dict[str, Any]] = []

    def merge(conn: Any, table: Any, stage: Any, now: Any) -> int:
        calls.append(table.name)
        if len(calls) == 2:
            try:
                conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
            finally:
                during.append(store_state(pg_url))  # what a reader sees meanwhile
        return real_merge(conn, table, stage, now)

    monkeypatch.setattr(publish, "_merge", merge)
    FastClock().install(monkeypatch)
    later = T + timedelta(hours=1)
    with dg.instance_for_test() as instance:
        summary = run_pipeline(as_of=later, history_days=HISTORY_DAYS, instance=instance)
        retries = _events(instance, summary.run_ids, "STEP_UP_FOR_RETRY")
    assert summary.success, summary.render()
    assert len(retries) == 1, [r.step_key for r in retries]
    assert "cannot reach the serving store" in _cause(retries[0].event_specific_data.error)
    assert during == [before], "a reader saw part of the failed publish"

    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        as_of = set(conn.execute(sa.text("SELECT DISTINCT as_of FROM tutor_scores")).scalars())
        z3 = conn.execute(sa.text("SELECT count(*) FROM sessions WHERE tutor_id = 'Z3'")).scalar()
    engine.dispose()
    assert {a.astimezone(UTC) for a in as_of} == {later} and z3 == 7
    again = run_pipeline(as_of=later, history_days=HISTORY_DAYS)
    assert again.value("tutor_scores", "tutor_scores_written") == 0  # nothing half-done


# --- the email provider ----------------------------------------------------------------


@pytest.fixture
def sendgrid(home: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSendGrid]:
    with fake_sendgrid() as fake:
        monkeypatch.setenv("EMAIL_SERVICE", "sendgrid")
        monkeypatch.setenv("SENDGRID_API_KEY", "SG.outage-test-key")
        monkeypatch.setenv("SENDGRID_HOST", fake.url)
        yield fake


def test_throttling_and_server_errors_are_retried_and_each_report_delivered_once(
    home: Settings, sendgrid: FakeSendGrid
) -> None:
    build_drops(home.landing_dir)
    # The first report: a 503, then accepted; the second: throttled (429), then accepted.
    sendgrid.script += [Reply(503), Reply(202), Reply(429, {"Retry-After": "1"})]
    summary = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert summary.success, summary.render()
    accepted = sendgrid.accepted()
    assert len(accepted) >= 3 and set(accepted.values()) == {1}, accepted
    assert sorted(sendgrid.attempts().values())[-2:] == [2, 2]  # each retried once
    assert {r["status"] for r in ledger_rows(home.database_url)} == {"sent"}
    again = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert again.value("email_reports", "emails_sent") == 0
    assert sendgrid.accepted() == accepted


def test_a_timing_out_provider_is_retried_and_each_report_delivered_once(
    home: Settings, sendgrid: FakeSendGrid
) -> None:
    build_drops(home.landing_dir)
    published = dg.materialize(
        [landing_drops, tutor_scores_current, tutor_scores],
        resources=default_resources(),
        run_config={"ops": {"tutor_scores_current": {"config": {"as_of": T.isoformat()}}}},
    )
    assert published.success
    # The first request hangs past the client's timeout (and is never accepted); the
    # client's retry goes through.
    sendgrid.script += [Reply(503, delay=1.5)]
    sender = SendGridSender("SG.outage-test-key", host=sendgrid.url, timeout=0.5)
    settings = ReportSettings()
    config = report_config(
        RiskRule(),
        settings,
        backend=sender.name,
        sender_address="reports@example.com",
        recipients=("ops@example.com",),
    )
    engine = create_store_engine(home.database_url)
    try:
        work = find_due_work(engine, now=datetime.now(UTC), settings=settings)
        assert len(work.keys) >= 3
        with ExitStack() as stack:
            outcome = deliver_due(
                engine,
                sender,
                work,
                config=config,
                warehouse=lambda: stack.enter_context(warehouse.connect(home.warehouse)),
                base_delay_s=0.1,
            )
    finally:
        engine.dispose()
    assert outcome.failed == {} and sorted(outcome.sent) == sorted(work.keys)
    first = sendgrid.requests[0]
    assert not first["answered"] and sendgrid.attempts()[first["key"]] == 2
    assert sorted(sendgrid.accepted()) == sorted(work.keys)
    assert set(sendgrid.accepted().values()) == {1}


def test_a_refused_key_fails_clearly_without_a_retry_storm_and_the_rest_runs(
    home: Settings, sendgrid: FakeSendGrid
) -> None:
    build_drops(home.landing_dir)
    sendgrid.script += [Reply(401), Reply(403)] + [Reply(401)] * 8
    first = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert not first.success
    assert first.errors and all(e.startswith(("email_reports:", "None:")) for e in first.errors), (
        first.errors
    )
    assert first.value("tutor_scores", "tutor_scores_rows") > 0  # published all the same
    tries = sendgrid.attempts()
    assert len(tries) >= 3 and set(tries.values()) == {1}, tries  # one try each, no storm
    rows = ledger_rows(home.database_url)
    assert {r["status"] for r in rows} == {"failed"}
    for r in rows:
        assert "check SENDGRID_API_KEY" in r["error_message"], r["error_message"]
        assert "\n" not in r["error_message"]
        assert r["next_attempt_at"] is not None  # tried again later, with backoff

    # Ticks before the backoff is over do not call the provider again.
    second = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert second.success and sendgrid.attempts() == tries

    # The key is fixed and the wait is over: each report is delivered, once.
    sendgrid.script.clear()
    expire_retry_waits(home.database_url)
    third = run_pipeline(as_of=T, history_days=HISTORY_DAYS)
    assert third.success, third.render()
    assert set(sendgrid.accepted()) == set(tries) and set(sendgrid.accepted().values()) == {1}
    assert {r["status"] for r in ledger_rows(home.database_url)} == {"sent"}
