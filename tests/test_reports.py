"""Reports end to end on a small hand-made store: who is named, that the numbers match the
store, that nothing is sent twice, and that the sensor launches only due work."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from drops import HandDrop

from tutor_scoring_dagster.config import SETTINGS, Settings
from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.defs.publish.assets import tutor_scores
from tutor_scoring_dagster.defs.reports.assets import email_reports
from tutor_scoring_dagster.defs.reports.checks import email_delivery_latency
from tutor_scoring_dagster.defs.reports.sensors import report_sensor
from tutor_scoring_dagster.defs.resources import ServingStoreResource, default_resources
from tutor_scoring_dagster.defs.scores.assets import tutor_scores_current
from tutor_scoring_dagster.reports import (
    ReportConfig,
    ReportSettings,
    alert_key,
    digest_key,
    find_due_work,
    parse_key,
    report_config,
    session_batch_key,
)
from tutor_scoring_dagster.scoring import RiskRule, wilson_lower_bound_scalar
from tutor_scoring_dagster.store import ledger
from tutor_scoring_dagster.store.migrate import ensure_current
from tutor_scoring_dagster.store.publish import create_store_engine

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
INJECTED_NAME = "Zoë <script>alert('x')</script>"
INJECTED_REASON = '<img src=x onerror="alert(1)">flat tyre'


def default_report_config(backend: str = "outbox") -> ReportConfig:
    """The reports' configuration at the default settings and rule, sent through ``backend``
    from reports@example.com to admin@example.com."""
    return report_config(
        RiskRule(),
        ReportSettings(),
        backend=backend,
        sender_address="reports@example.com",
        recipients=("admin@example.com",),
    )


def scenario_drop() -> HandDrop:
    """A drop of this module's scenarios: sessions moved two days later, with 30 hours'
    notice unless a session says otherwise, for a schedule conflict."""
    return HandDrop(notice=timedelta(hours=30), reason="schedule conflict")


def build_scenario(landing: Path) -> None:
    """Four tutors as of T:
    - Z (chronic): every third session over 60 days moved by the tutor; high risk for weeks.
    - B: 30 days of clean sessions, then two tutor reschedules in the last day: newly high.
    - C: clean, ok.
    - R: one tutor reschedule of five sessions (high a day ago), then two more held sessions:
      recovered.
    """
    d = scenario_drop()
    for i in range(30):
        at = T - timedelta(days=2 * i + 1, hours=2)
        d.session(
            f"Z{i:02d}",
            "Z",
            at,
            "rescheduled" if i % 3 == 0 else "completed",
            moved_by="tutor" if i % 3 == 0 else None,
            reason="personal",
        )
    for i in range(2, 31):
        d.session(f"B{i:02d}", "B", T - timedelta(days=i, hours=1))
    d.session(
        "B-late1",
        "B",
        T - timedelta(hours=3),
        "rescheduled",
        moved_by="tutor",
        reason=INJECTED_REASON,
        notice_h=2,
    )
    d.session(
        "B-late2",
        "B",
        T - timedelta(hours=20),
        "rescheduled",
        moved_by="tutor",
        reason="car broke down",
        notice_h=5.5,
    )
    d.session(
        "B-student",
        "B",
        T - timedelta(days=3, hours=4),
        "rescheduled",
        moved_by="student",
        reason="exam",
    )
    for i in range(1, 20):
        d.session(f"C{i:02d}", "C", T - timedelta(days=i, hours=3))
    d.session("R1", "R", T - timedelta(days=6), "rescheduled", moved_by="tutor")
    for i in range(2, 6):
        d.session(f"R{i}", "R", T - timedelta(days=i))
    d.session("R6", "R", T - timedelta(hours=10))
    d.session("R7", "R", T - timedelta(hours=5))
    d.write(
        landing,
        "20260301T1100",
        tutors=[
            {"tutor_id": "Z", "name": INJECTED_NAME, "email": "z@example.com"},
            {"tutor_id": "B", "name": "Ben & <b>Co</b>", "email": "b@example.com"},
            {"tutor_id": "C", "name": "Cara", "email": "c@example.com"},
            {"tutor_id": "R", "name": "Rui", "email": "r@example.com"},
        ],
    )
    (landing / "sessions_broken.csv").write_text("session_id;tutor_id\n1;2\n", encoding="utf-8")


def read_outbox(outbox: Path) -> dict[str, EmailMessage]:
    """Messages in the outbox by idempotency key."""
    out = {}
    for f in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out[str(msg["X-Tutor-Scoring-Key"])] = msg
    return out


def bodies(msg: EmailMessage) -> tuple[str, str]:
    html, text = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html is not None and text is not None
    return html.get_content(), text.get_content()


def publish_only(as_of: datetime, instance: dg.DagsterInstance | None = None) -> None:
    """Ingest, score and publish as of ``as_of`` without sending reports (the sensor's job)."""
    result = dg.materialize(
        [landing_drops, tutor_scores_current, tutor_scores],
        resources=default_resources(),
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"tutor_scores_current": {"config": {"as_of": as_of.isoformat()}}}},
    )
    assert result.success


def store_scores(url: str) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM tutor_scores")).mappings().all()
    engine.dispose()
    return {r["tutor_id"]: dict(r) for r in rows}


def serving_store() -> ServingStoreResource:
    """The serving store resource, configured from the environment like a deployment's."""
    return ServingStoreResource(database_url=None, horizon_days=None)


def check_latency() -> dg.AssetCheckResult:
    result = email_delivery_latency(serving_store=serving_store())
    assert isinstance(result, dg.AssetCheckResult)
    return result


def pct(value: float) -> str:
    return f"{value * 100:.1f}%"


@pytest.fixture
def engine(home: Settings) -> Iterator[sa.Engine]:
    engine = create_store_engine(home.database_url)
    yield engine
    engine.dispose()


# --- content -----------------------------------------------------------------------------------


def test_digest_and_alert_name_the_right_tutors_with_the_store_numbers(
    home: Settings, engine: sa.Engine
) -> None:
    build_scenario(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=35)
    assert summary.success, summary.render()
    assert summary.value("email_reports", "emails_sent") == 2

    messages = read_outbox(home.outbox_dir)
    assert sorted(messages) == ["alert:B:2026-03-01", "digest:2026-03-01T12:00Z"]
    scores = store_scores(home.database_url)
    digest, alert = messages["digest:2026-03-01T12:00Z"], messages["alert:B:2026-03-01"]

    # Digest: Z is chronic, B newly high, R recovered; C (ok all along) is not named.
    assert digest["Subject"] == (
        "Tutor risk digest 2026-03-01 12:00 UTC: 2 high risk, 1 new, 1 recovered"
    )
    html, text = bodies(digest)
    newly = text.split("Newly high risk (1)")[1].split("No longer high risk")[0]
    recovered = text.split("No longer high risk (1)")[1].split("All high-risk tutors")[0]
    high = text.split("All high-risk tutors (2):")[1].split("Data quality")[0]
    assert "(B)" in newly and "(Z)" not in newly and "(R)" not in newly
    assert "- Rui (R):" in recovered
    assert "- Ben & <b>Co</b> (B):" in high and f"- {INJECTED_NAME} (Z):" in high
    assert "Cara" not in text and "Cara" not in html
    # The numbers are the store's.
    for tutor in ("B", "Z"):
        r = scores[tutor]
        line = next(x for x in high.splitlines() if f"({tutor}):" in x)
        assert f"7d {pct(r['reschedule_rate_7d'])} ({r['tutor_reschedules_7d']}/" in line
        assert (
            f"30d {pct(r['reschedule_rate_30d'])} "
            f"({r['tutor_reschedules_30d']}/{r['total_sessions_30d']}, "
            f">= {pct(r['reschedule_rate_30d_lower95'])})" in line
        )
        assert f"{r['reschedule_rate_30d_change_7d'] * 100:+.1f} pts vs 7 days ago" in line
    assert scores["B"]["reschedule_rate_7d_lower95"] == pytest.approx(
        wilson_lower_bound_scalar(2, 8)
    )
    with engine.connect() as conn:
        n_sessions = conn.execute(sa.text("SELECT count(*) FROM sessions")).scalar()
    assert f"Processed so far: {n_sessions} sessions of 4 tutors" in text
    assert "quarantined sessions_broken.csv" in text and "sessions_broken.csv" in html
    # 30-day trend from the daily history, as text and as table-cell bars.
    assert "30-day rate by week: 2026-02-07 0.0%, 2026-02-14 0.0%" in newly
    assert "now 6.5%" in newly

    # Alert: who, why, and the recent reschedules with who moved them and how early.
    assert alert["Subject"] == (
        "High-risk tutor: Ben & <b>Co</b> (B), 7-day reschedule rate 25.0% (2/8)"
    )
    a_html, a_text = bodies(alert)
    assert "- 7-day window: 2 of 8 sessions rescheduled by the tutor (25.0%" in a_text
    assert "2 of the tutor's 2 reschedules below came less than 24 hours" in a_text
    assert "2026-03-01 09:00 UTC: by tutor, 2.0 h notice" in a_text
    assert '2026-02-28 16:00 UTC: by tutor, 5.5 h notice, "car broke down"' in a_text
    assert '2026-02-26 08:00 UTC: by student, 30 h notice, "exam"' in a_text
    assert INJECTED_REASON in a_text  # plain text keeps it as written

    # Email-safe HTML: escaped, CSS inlined, tables not flexbox, no script, SVG or images.
    for body in (html, a_html):
        assert "<script" not in body and "<img" not in body and "<svg" not in body
        assert "<style" not in body and "flex" not in body
        assert 'style="' in body and "<table" in body
        assert "PER_SESSION_REPORTS" in body and "DIGEST_WHEN_NOTHING_NEW" in body
    # (CSS inlining re-serializes the HTML: quotes in text need no escaping there.)
    assert "Zoë &lt;script&gt;alert('x')&lt;/script&gt;" in html
    assert "Ben &amp; &lt;b&gt;Co&lt;/b&gt;" in html
    assert '&lt;img src=x onerror="alert(1)"&gt;flat tyre' in a_html
    assert a_html.count("height: 1px; width: 5px;") > 10  # the 8-week bars, one per day

    # The ledger: each sent once, with the newest session it covers.
    rows = ledger.entries(engine)
    assert {(e.idempotency_key, e.status, e.attempts) for e in rows} == {
        ("alert:B:2026-03-01", "sent", 1),
        ("digest:2026-03-01T12:00Z", "sent", 1),
    }
    assert all(e.newest_session_time == T - timedelta(hours=3) for e in rows)
    assert all(e.covers_as_of == T for e in rows)


def test_digest_lists_tutors_to_act_on_with_tier_drivers_and_action_newly_flagged_first(
    home: Settings,
) -> None:
    build_scenario(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=35)
    assert summary.success, summary.render()
    scores = store_scores(home.database_url)
    # Z moves every third session for two months: confirmed high risk, with drivers and an action.
    assert scores["Z"]["risk_tier"] == "high" and scores["Z"]["risk_probability"] > 0.9
    assert scores["Z"]["top_drivers"] and scores["Z"]["recommended_action"]
    assert scores["C"]["risk_tier"] in ("ok", "insufficient_data")
    flagged = sorted(
        (r for r in scores.values() if r["risk_tier"] in ("high", "watch")),
        key=lambda r: (not r["newly_flagged"], r["tutor_id"] != "Z"),
    )
    html, text = bodies(read_outbox(home.outbox_dir)["digest:2026-03-01T12:00Z"])
    section = text.split(f"Tutors to act on ({len(flagged)})")[1].split("Newly high risk")[0]
    listed = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(listed) == len(flagged)
    # Newly flagged tutors come first; each line carries the store's tier, drivers and action.
    order = [m.group(1) for m in (re.search(r"\((\w+)\): (?:high|watch)", x) for x in listed) if m]
    newly = {r["tutor_id"] for r in flagged if r["newly_flagged"]}
    assert len(order) == len(listed) and set(order[: len(newly)]) == newly
    for r in flagged:
        line = next(x for x in listed if f"({r['tutor_id']}):" in x)
        assert f": {r['risk_tier']}" in line
        assert (", NEW" in line) == bool(r["newly_flagged"])
        assert f"Why: {r['top_drivers']}" in section
        assert f"Action: {r['recommended_action']}" in section
    assert "Cara" not in section
    assert '<span class="badge-high" style="background: #c0392b;' in html  # inlined CSS
    assert "Recommended action" in html and str(scores["Z"]["recommended_action"]) in html


def test_next_digest_says_what_changed_since_the_last_one(home: Settings) -> None:
    build_scenario(home.landing_dir)
    assert run_pipeline(as_of=T, history_days=35).success
    d = scenario_drop()
    d.session("C-new1", "C", T + timedelta(minutes=10))
    d.session("C-new2", "C", T + timedelta(minutes=30))
    d.write(home.landing_dir, "20260301T1245")

    later = T + timedelta(hours=1)
    summary = run_pipeline(as_of=later, history_days=2)
    assert summary.success, summary.render()
    assert summary.value("email_reports", "emails_sent") == 1  # no second alert for B
    messages = read_outbox(home.outbox_dir)
    assert sorted(messages) == [
        "alert:B:2026-03-01",
        "digest:2026-03-01T12:00Z",
        "digest:2026-03-01T13:00Z",
    ]
    msg = messages["digest:2026-03-01T13:00Z"]
    assert msg["Subject"] == "Tutor risk digest 2026-03-01 13:00 UTC: 2 high risk"
    _, text = bodies(msg)
    assert "Processed since the last digest" in text
    assert ": 2 sessions of 1 tutors (2 completed); 0 reschedules." in text
    assert "0 newly high risk, 0 recovered" in text
    assert "Newly high risk (" not in text and "No longer high risk (" not in text
    assert "Data quality since the last digest: 1 files loaded, 0 quarantined" in text

    again = run_pipeline(as_of=later, history_days=1)
    assert again.success and again.value("email_reports", "emails_sent") == 0
    assert len(read_outbox(home.outbox_dir)) == 3


# --- the sensor ------------------------------------------------------------------------------


def tick(instance: dg.DagsterInstance) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(
        instance=instance, resources={"serving_store": serving_store()}
    )
    result = report_sensor(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def test_sensor_launches_due_work_once_and_nothing_when_nothing_is_new(home: Settings) -> None:
    with dg.instance_for_test() as instance:
        skipped = tick(instance)  # no store yet
        assert isinstance(skipped, dg.SkipReason)

        build_scenario(home.landing_dir)
        assert run_pipeline(as_of=T, history_days=2).success
        assert len(read_outbox(home.outbox_dir)) == 2
        # Two ticks with no new data: nothing due, nothing launched.
        for _ in range(2):
            result = tick(instance)
            assert isinstance(result, dg.SkipReason)
            assert "no report work is due" in str(result.skip_message)

        # A new snapshot with news: one run for its digest, named by its key and attempt.
        d = scenario_drop()
        d.session("C-new", "C", T + timedelta(minutes=20))
        d.write(home.landing_dir, "20260301T1245")
        later = T + timedelta(hours=1)
        publish_only(later, instance)
        first, second = tick(instance), tick(instance)
        assert isinstance(first, dg.SensorResult) and isinstance(second, dg.SensorResult)
        [request] = first.run_requests or []
        assert request.run_key is not None
        assert request.run_key.endswith(" digest:2026-03-01T13:00Z#1")
        # The next tick asks for the same run key, which Dagster does not launch twice.
        assert [r.run_key for r in second.run_requests or []] == [request.run_key]
        keys = request.run_config["ops"]["email_reports"]["config"]["keys"]
        assert keys == ["digest:2026-03-01T13:00Z"]

        run = dg.materialize(
            [email_reports],
            resources=default_resources(),
            instance=instance,
            run_config=request.run_config,
        )
        assert run.success
        assert sorted(read_outbox(home.outbox_dir))[-1] == "digest:2026-03-01T13:00Z"
        assert isinstance(tick(instance), dg.SkipReason)
        assert len(read_outbox(home.outbox_dir)) == 3

        # Nothing loadable arrives, only a broken file: that is news the digest must carry.
        (home.landing_dir / "sessions_bad.csv").write_text("nope\n1\n", encoding="utf-8")
        publish_only(T + timedelta(hours=2), instance)
        result = tick(instance)
        assert isinstance(result, dg.SensorResult)
        [request] = result.run_requests or []
        assert (request.run_key or "").endswith(" digest:2026-03-01T14:00Z#1")


def test_definitions_wire_the_sensor_job_and_check() -> None:
    from tutor_scoring_dagster.definitions import defs

    sensor = defs.resolve_sensor_def("report_sensor")
    assert sensor.minimum_interval_seconds == 300
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_job_def("email_reports_job").name == "email_reports_job"
    assert dg.AssetCheckKey(dg.AssetKey("email_reports"), "email_delivery_latency") in (
        defs.resolve_asset_graph().asset_check_keys
    )


# --- settings -----------------------------------------------------------------------------


def test_digest_when_nothing_new_is_configurable(home: Settings, engine: sa.Engine) -> None:
    build_scenario(home.landing_dir)
    assert run_pipeline(as_of=T, history_days=1).success
    publish_only(T + timedelta(hours=1))  # a new snapshot, but no new data
    now = datetime.now(UTC)
    quiet = find_due_work(engine, now=now, settings=ReportSettings())
    assert not quiet
    chatty = find_due_work(
        engine, now=now, settings=ReportSettings.from_env({"DIGEST_WHEN_NOTHING_NEW": "true"})
    )
    assert chatty.keys == ["digest:2026-03-01T13:00Z"]


def test_report_settings_default_to_the_settings_table() -> None:
    """One source of defaults: config.SETTINGS (which the README's table is made from)."""
    defaults = {s.env: s.default for s in SETTINGS}
    d = ReportSettings()
    assert ReportSettings.from_env({}) == d
    assert d.digest_max_rows == int(defaults["DIGEST_MAX_ROWS"] or 0)
    assert d.max_attempts == int(defaults["EMAIL_MAX_ATTEMPTS"] or 0)
    assert d.pending_lease == timedelta(minutes=int(defaults["EMAIL_PENDING_LEASE_MINUTES"] or 0))
    assert d.tutor_alerts is (defaults["TUTOR_ALERTS"] == "true")


def test_report_settings_from_env() -> None:
    assert ReportSettings.from_env({}) == ReportSettings()
    s = ReportSettings.from_env(
        {
            "PER_SESSION_REPORTS": "yes",
            "SESSION_REPORT_BATCH_SIZE": "25",
            "TUTOR_ALERTS": "0",
            "EMAIL_MAX_ATTEMPTS": "4",
            "EMAIL_PENDING_LEASE_MINUTES": "3",
            "REPORT_LATENCY_TARGET_MINUTES": "30",
        }
    )
    assert (s.per_session_reports, s.session_batch_size, s.tutor_alerts) == (True, 25, False)
    assert (s.max_attempts, s.pending_lease, s.latency_target) == (
        4,
        timedelta(minutes=3),
        timedelta(minutes=30),
    )
    with pytest.raises(ValueError, match="PER_SESSION_REPORTS"):
        ReportSettings.from_env({"PER_SESSION_REPORTS": "maybe"})
    with pytest.raises(ValueError, match="SESSION_REPORT_BATCH_SIZE"):
        ReportSettings.from_env({"SESSION_REPORT_BATCH_SIZE": "0"})


def test_per_session_reports_cover_each_session_exactly_once(
    home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PER_SESSION_REPORTS", "true")
    monkeypatch.setenv("SESSION_REPORT_BATCH_SIZE", "40")
    build_scenario(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=1)
    assert summary.success, summary.render()
    batches = {k: m for k, m in read_outbox(home.outbox_dir).items() if k.startswith("sessions:")}
    assert len(batches) == 3  # 88 sessions, about 40 a message
    seen: list[str] = []
    for msg in batches.values():
        html, text = bodies(msg)
        lines = [x for x in text.splitlines() if x.startswith("- 2026-")]
        seen += [x.split(" UTC ")[1].split(":")[0] for x in lines]
        assert "Their tutors' current scores" in text
        assert "&lt;script&gt;" in html or "Zoë" not in html
    engine = sa.create_engine(home.database_url)
    with engine.connect() as conn:
        stored = sorted(conn.execute(sa.text("SELECT session_id FROM sessions")).scalars())
    engine.dispose()
    assert sorted(seen) == stored  # every session once, none twice

    d = scenario_drop()
    d.session(
        "C-new1",
        "C",
        T + timedelta(minutes=10),
        "rescheduled",
        moved_by="tutor",
        reason="<b>ill</b>",
        notice_h=1,
    )
    d.session("C-new2", "C", T + timedelta(minutes=30))
    d.write(home.landing_dir, "20260301T1245")
    assert run_pipeline(as_of=T + timedelta(hours=1), history_days=1).success
    new = {k: m for k, m in read_outbox(home.outbox_dir).items() if k.startswith("sessions:")}
    [(key, msg)] = [(k, m) for k, m in new.items() if k not in batches]
    assert key.endswith(":1of1")
    assert msg["Subject"].startswith("Session report: 2 sessions processed up to")
    html, text = bodies(msg)
    assert "C-new1" in text and "C-new2" in text and "rescheduled by tutor, 1.0 h notice" in text
    assert "&lt;b&gt;ill&lt;/b&gt;" in html and "<b>ill</b>" not in html


# --- keys and the ledger ------------------------------------------------------------------------


@pytest.mark.parametrize("tutor_id", ["T-1", "a:b c/é", "x%y"])
def test_keys_round_trip(tutor_id: str) -> None:
    day = datetime(2026, 3, 1).date()
    parsed = parse_key(alert_key(tutor_id, day))
    assert (parsed.kind, parsed.tutor_id, parsed.day) == ("alert", tutor_id, day)
    upto = datetime(2026, 3, 1, 12, 5, 1, 123456, tzinfo=UTC)
    parsed = parse_key(session_batch_key(upto, 2, 3))
    assert (parsed.kind, parsed.upto, parsed.part, parsed.parts) == ("sessions", upto, 2, 3)
    assert parse_key(digest_key(T)).kind == "digest"
    for bad in ("hello", "alert:x", "sessions:2026:3of2"):
        with pytest.raises(ValueError):
            parse_key(bad)


def test_every_snapshot_of_an_hour_shares_one_digest_key() -> None:
    # Landing runs publish a snapshot per drop; the digest stays one per hour.
    assert digest_key(T) == digest_key(T + timedelta(minutes=2)) == "digest:2026-03-01T12:00Z"
    assert digest_key(T + timedelta(minutes=59, seconds=59)) == digest_key(T)
    assert digest_key(T + timedelta(hours=1)) == "digest:2026-03-01T13:00Z"


def test_claims_are_exclusive_retried_with_backoff_and_closed(store_url: str) -> None:
    engine = sa.create_engine(store_url)
    ensure_current(engine)
    now = T
    kw: dict[str, Any] = {"kind": "alert", "recipients": ("a@x.org",), "covers_as_of": T}
    first = ledger.claim(engine, key="k1", now=now, **kw)
    assert first is not None and first.previous_status is None
    assert ledger.claim(engine, key="k1", now=now, **kw) is None  # in flight: not twice

    failed = ledger.mark_failed(engine, first, error="SMTP 451", now=now, max_attempts=3)
    assert failed.status == "failed" and failed.next_attempt_at == now + timedelta(minutes=5)
    assert failed.error_message == "attempt 1 of 3 failed: SMTP 451"
    assert ledger.claim(engine, key="k1", now=now + timedelta(minutes=4), **kw) is None
    second = ledger.claim(engine, key="k1", now=now + timedelta(minutes=5), **kw)
    assert second is not None and second.entry.attempts == 2
    failed = ledger.mark_failed(
        engine, second, error="SMTP 451", now=now + timedelta(minutes=5), max_attempts=3
    )
    assert failed.next_attempt_at == now + timedelta(minutes=15)  # doubled

    # A claim never recorded is an unknown outcome once its lease ends.
    third = ledger.claim(engine, key="k1", now=now + timedelta(minutes=15), **kw)
    assert third is not None
    assert ledger.claim(engine, key="k1", now=now + timedelta(minutes=20), **kw) is None
    later = now + timedelta(minutes=26)
    assert ledger.retry_candidates(engine, later)[0].idempotency_key == "k1"
    # ... but out of attempts (3): closed as given up, not sent again.
    assert ledger.claim(engine, key="k1", now=later, max_attempts=3, **kw) is None
    closed = ledger.get(engine, "k1")
    assert closed is not None and closed.final and closed.next_attempt_at is None
    assert (closed.error_message or "").startswith("gave up after 3 attempts; outcome unknown")
    assert ledger.retry_candidates(engine, later) == []

    # Sent is final.
    other = ledger.claim(engine, key="k2", now=now, **kw)
    assert other is not None
    ledger.mark_sent(engine, other, provider_message_id="<id>", now=now)
    assert ledger.claim(engine, key="k2", now=now + timedelta(days=1), **kw) is None
    engine.dispose()


def test_delivery_latency_p95_and_its_check(
    home: Settings, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_current(engine)
    now = datetime.now(UTC)
    assert ledger.delivery_latency_p95(engine, now - timedelta(days=1)) is None
    result = check_latency()
    assert result.passed

    # 20 reports: 18 within 10 minutes, 2 after 2 hours; p95 (nearest rank 19) is 2 hours.
    for i in range(20):
        lag = timedelta(hours=2) if i >= 18 else timedelta(minutes=10)
        c = ledger.claim(
            engine,
            key=f"digest:{i}",
            kind="digest",
            recipients=("a@x.org",),
            covers_as_of=now,
            now=now - lag,
        )
        assert c is not None
        ledger.describe(engine, f"digest:{i}", subject="s", newest_session_time=now - lag)
        ledger.mark_sent(engine, c, provider_message_id="", now=now)
    old = ledger.claim(
        engine, key="old", kind="digest", recipients=("a@x.org",), covers_as_of=now, now=now
    )
    assert old is not None
    ledger.describe(engine, "old", subject="s", newest_session_time=now - timedelta(days=3))
    ledger.mark_sent(engine, old, provider_message_id="", now=now - timedelta(days=2))

    assert ledger.delivery_latency_p95(engine, now - timedelta(days=1)) == timedelta(hours=2)
    assert ledger.delivery_latency_p95(engine, now - timedelta(minutes=1)) == timedelta(hours=2)
    failing = check_latency()
    assert not failing.passed
    assert failing.metadata["p95_minutes"].value == 120.0
    monkeypatch.setenv("REPORT_LATENCY_TARGET_MINUTES", "180")
    assert check_latency().passed
