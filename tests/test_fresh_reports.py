"""Fresh reports: a drop reaches stakeholders when it lands, not at the next top of the hour.

The landing sensor's run loads the drop, scores the snapshot as of the minute it runs,
publishes it and sends what is due: a tutor alert at once, the digest at most once an hour.
Sensors are evaluated against a real `dg.instance_for_test()` and the runs they request are
executed in-process with the code location's job, as the daemon would launch them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from drops import HandDrop
from test_ingest_sensor import Watcher
from test_reports import (
    T,
    bodies,
    build_scenario,
    default_report_config,
    publish_only,
    read_outbox,
    scenario_drop,
)

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.definitions import defs
from tutor_scoring_dagster.defs.publish.assets import tutor_scores
from tutor_scoring_dagster.defs.resources import default_resources
from tutor_scoring_dagster.defs.scores.assets import resolve_as_of, tutor_scores_current
from tutor_scoring_dagster.delivery import DeliveryError, OutboxSender, OutgoingEmail
from tutor_scoring_dagster.reports import (
    ReportSettings,
    alert_key,
    crossing_day,
    deliver_due,
    digest_key,
    find_due_work,
)
from tutor_scoring_dagster.store import ledger
from tutor_scoring_dagster.store.publish import create_store_engine
from tutor_scoring_dagster.store.report_reads import snapshot_as_of


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def engine(home: Settings) -> Iterator[sa.Engine]:
    engine = create_store_engine(home.database_url)
    yield engine
    engine.dispose()


def minute(instant: datetime) -> datetime:
    return instant.replace(second=0, microsecond=0)


def history(at: datetime) -> HandDrop:
    """Tutors B and C with a month of clean sessions before ``at``: nobody is at risk."""
    d = scenario_drop()
    for i in range(2, 31):
        d.session(f"B{i:02d}", "B", at - timedelta(days=i, hours=1))
    for i in range(1, 20):
        d.session(f"C{i:02d}", "C", at - timedelta(days=i, hours=3))
    d.session("B-student", "B", at - timedelta(days=3, hours=4), "rescheduled", "student")
    return d


def late_moves(at: datetime) -> HandDrop:
    """B moves two sessions within the day before ``at``: B newly crosses the risk rule."""
    d = scenario_drop()
    d.session("B-late1", "B", at - timedelta(hours=3), "rescheduled", "tutor", notice_h=2)
    d.session("B-late2", "B", at - timedelta(hours=20), "rescheduled", "tutor", notice_h=5)
    return d


def hand_over(watcher: Watcher) -> list[dg.RunRequest]:
    """Sensor ticks until the drop is handed over (a file needs two equal sightings)."""
    for _ in range(3):
        requests = watcher.requested()
        if requests:
            return requests
    raise AssertionError("the landing sensor never handed the drop over")


def run_requested(
    requests: list[dg.RunRequest],
    instance: dg.DagsterInstance,
    as_of: datetime | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Each requested run of the code location's landing job, as the daemon would launch it.
    ``as_of`` pins the snapshot's instant (a simulated clock); None: the step's own minute."""
    job = defs.resolve_job_def("landing_ingest_job")
    results = []
    for request in requests:
        config: dict[str, Any] = {"ops": dict(request.run_config["ops"])}
        if as_of is not None:
            config["ops"]["tutor_scores_current"] = {"config": {"as_of": as_of.isoformat()}}
        result = job.execute_in_process(run_config=config, instance=instance, tags=request.tags)
        assert result.success
        results.append(result)
    return results


def digests(outbox: Path) -> list[str]:
    return sorted(k for k in read_outbox(outbox) if k.startswith("digest:"))


def test_a_mid_hour_drop_is_emailed_as_an_alert_without_waiting_for_the_hour(
    home: Settings, instance: dg.DagsterInstance, engine: sa.Engine
) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    started = datetime.now(UTC)
    drop = history(started)
    moves = late_moves(started)
    drop.sessions += moves.sessions
    drop.reschedules += moves.reschedules
    drop.write(landing, "now")

    requests = hand_over(Watcher(instance, landing))
    # The drop's two files, seen on the same tick, go to one run: one snapshot with both.
    (request,) = requests
    paths = request.run_config["ops"]["landing_drops"]["config"]["paths"]
    assert sorted(Path(p).name for p in paths) == ["reschedules_now.csv", "sessions_now.csv"]
    # Nothing in the request fixes the instant: each run resolves it when it scores.
    assert all("tutor_scores_current" not in r.run_config["ops"] for r in requests)
    results = run_requested(requests, instance)
    finished = datetime.now(UTC)

    as_of = snapshot_as_of(engine)
    assert as_of is not None and minute(started) <= as_of <= minute(finished)
    outbox = read_outbox(home.outbox_dir)
    alert = outbox[alert_key("B", crossing_day(as_of))]
    assert "High-risk tutor" in str(alert["Subject"]) and "(B)" in str(alert["Subject"])
    _, text = bodies(alert)
    assert f"crossed the risk rule on {crossing_day(as_of).isoformat()}" in text
    # Only landing runs ran: no hourly schedule was needed, and the hour has one digest.
    assert {r.job_name for r in instance.get_runs()} == {"landing_ingest_job"}
    assert len(digests(home.outbox_dir)) <= 1
    # The email step ran in the same run as the publish that made the alert due.
    last = {e.asset_key.to_user_string() for e in results[-1].get_asset_materialization_events()}
    assert {"tutor_scores_current", "tutor_scores", "email_reports"} <= last


def test_two_drops_in_one_hour_send_one_digest_and_every_alert(
    home: Settings, instance: dg.DagsterInstance, engine: sa.Engine
) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    watcher = Watcher(instance, landing)
    # 12:02: a month of clean history. Scored as of the run's minute (pinned: a simulated clock).
    history(T).write(landing, "1202")
    run_requested(hand_over(watcher), instance, as_of=T + timedelta(minutes=2))
    assert sorted(read_outbox(home.outbox_dir)) == ["digest:2026-03-01T12:00Z"]
    # 12:40: B's late moves. B is alerted at once; the hour's digest is not sent again.
    late_moves(T).write(landing, "1240")
    run_requested(hand_over(watcher), instance, as_of=T + timedelta(minutes=40))
    assert sorted(read_outbox(home.outbox_dir)) == [
        "alert:B:2026-03-01",
        "digest:2026-03-01T12:00Z",
    ]
    # The report sensor's safety net finds nothing left to send for this hour.
    work = find_due_work(engine, now=T + timedelta(minutes=41), settings=ReportSettings())
    assert not work
    # 13:00, the hourly schedule's snapshot: the next hour's digest says what changed.
    publish_only(T + timedelta(hours=1), instance)
    work = find_due_work(engine, now=T + timedelta(hours=1), settings=ReportSettings())
    assert work.keys == ["digest:2026-03-01T13:00Z"]
    entry = ledger.get(engine, "digest:2026-03-01T12:00Z")
    assert entry is not None and entry.status == "sent"
    assert entry.covers_as_of == T + timedelta(minutes=2)


class Down:
    """A backend that is down: every send fails."""

    name = "down"
    sends_message_id = True

    def send(self, email: OutgoingEmail) -> str:
        raise DeliveryError("connection refused", retryable=True)


def deliver(engine: sa.Engine, sender: Any, at: datetime) -> list[str]:
    """One report run at ``at``: what it sent."""
    config = default_report_config(sender.name)
    work = find_due_work(engine, now=at, settings=ReportSettings())
    outcome = deliver_due(engine, sender, work, config=config, now=lambda: at, sleep=lambda s: None)
    return outcome.sent


def test_a_failed_digest_is_retried_within_its_hour_on_the_newer_snapshot(
    home: Settings, engine: sa.Engine
) -> None:
    build_scenario(home.landing_dir)
    publish_only(T + timedelta(minutes=2))
    assert deliver(engine, Down(), T + timedelta(minutes=3)) == []
    assert ledger.get(engine, digest_key(T)) is not None
    # A landing run publishes 12:30 before the retry is due; the retry keeps the hour's key
    # and renders the snapshot the store holds now.
    publish_only(T + timedelta(minutes=30))
    outbox = OutboxSender(home.outbox_dir)
    sent = deliver(engine, outbox, T + timedelta(minutes=31))  # its backoff (5 min) has passed
    assert sorted(sent) == ["alert:B:2026-03-01", "digest:2026-03-01T12:00Z"]
    digest = read_outbox(home.outbox_dir)["digest:2026-03-01T12:00Z"]
    assert "2026-03-01 12:30 UTC" in str(digest["Subject"])
    entry = ledger.get(engine, digest_key(T))
    assert entry is not None and entry.attempts == 2
    assert entry.covers_as_of == T + timedelta(minutes=30)
    assert deliver(engine, outbox, T + timedelta(minutes=50)) == []  # once per key


def test_a_failed_digest_of_a_past_hour_is_covered_by_the_next_hours_digest(
    home: Settings, engine: sa.Engine
) -> None:
    build_scenario(home.landing_dir)
    publish_only(T + timedelta(minutes=2))
    deliver(engine, Down(), T + timedelta(minutes=3))
    publish_only(T + timedelta(hours=1))
    work = find_due_work(engine, now=T + timedelta(hours=1), settings=ReportSettings())
    assert work.superseded == {"digest:2026-03-01T12:00Z": "digest:2026-03-01T13:00Z"}
    assert "digest:2026-03-01T13:00Z" in work.keys


def test_the_as_of_is_resolved_when_the_step_runs_and_never_goes_back() -> None:
    newest = datetime(2026, 3, 1, 11, 2, tzinfo=UTC)
    now = datetime(2026, 3, 1, 11, 3, 40, tzinfo=UTC)
    # The landing runs' minute and the hourly schedule's hour.
    assert resolve_as_of("", "minute", now=now) == datetime(2026, 3, 1, 11, 3, tzinfo=UTC)
    assert resolve_as_of("", "hour", now=now) == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    # An hourly run that queued behind a landing run's 11:02 snapshot keeps 11:02.
    assert resolve_as_of("", "hour", now=now, newest=newest) == newest
    assert resolve_as_of("", "minute", now=now, newest=newest) == minute(now)
    # A given instant is exact (backfills, `tutor-scoring run --as-of`), and a snapshot in
    # the future (a test's, a mistake's) does not hold the clock back.
    assert resolve_as_of("2026-01-01T00:00:00Z", "minute", now=now, newest=newest) == datetime(
        2026, 1, 1, tzinfo=UTC
    )
    future = now + timedelta(days=1)
    assert resolve_as_of("", "hour", now=now, newest=future) == datetime(2026, 3, 1, 11, tzinfo=UTC)


def test_a_queued_hourly_snapshot_never_overwrites_a_newer_landing_snapshot(
    home: Settings, instance: dg.DagsterInstance, engine: sa.Engine
) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    history(datetime.now(UTC)).write(landing, "now")
    run_requested(hand_over(Watcher(instance, landing)), instance)
    fresh = snapshot_as_of(engine)
    assert fresh is not None
    # The hourly schedule's run, queued behind it (the warehouse pool), scores and publishes
    # after it: it resolves the start of the hour, which is older, so it holds the newer one.
    result = dg.materialize(
        [tutor_scores_current, tutor_scores],
        resources=default_resources(),
        instance=instance,
    )
    assert result.success
    assert snapshot_as_of(engine) == fresh
    (scored,) = [
        e.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("tutor_scores_current")
    ]
    assert scored["as_of"].value == fresh.isoformat()
    if fresh.minute:  # (in minute 0 the hour and the minute are the same instant)
        assert scored["as_of_rule"].value == "held at the newer snapshot already scored"


def test_a_digest_found_before_a_publish_of_the_same_hour_renders_the_newer_snapshot(
    home: Settings, engine: sa.Engine
) -> None:
    build_scenario(home.landing_dir)
    publish_only(T + timedelta(minutes=2))
    at = T + timedelta(minutes=3)
    work = find_due_work(engine, now=at, settings=ReportSettings())
    assert digest_key(T) in work.keys
    publish_only(T + timedelta(minutes=3))  # a landing run lands between finding and sending
    config = default_report_config()
    outcome = deliver_due(engine, OutboxSender(home.outbox_dir), work, config=config)
    assert digest_key(T) in outcome.sent and not outcome.closed
    digest = read_outbox(home.outbox_dir)[digest_key(T)]
    assert "2026-03-01 12:03 UTC" in str(digest["Subject"])
