"""Reports as people see them: a digest and a tutor alert from a generated data set, rendered
by headless Chromium to PNG files kept under test-artifacts/reports/ (not in git)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from drops import one_file_per_entity
from test_reports import bodies, default_report_config, read_outbox

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.reports import render_alert
from tutor_scoring_dagster.store.reads import current_scores
from tutor_scoring_dagster.store.report_reads import utc

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "reports"
REQUIRE_CHROMIUM = os.environ.get("TUTOR_SCORING_REQUIRE_CHROMIUM") == "1"
END = date(2026, 3, 1)


def chromium() -> str:
    """Debian's chromium, or a skip (a failure where TUTOR_SCORING_REQUIRE_CHROMIUM=1)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "CHROMIUM NOT INSTALLED (apt-get install -y chromium): report screenshots"
        if REQUIRE_CHROMIUM:
            pytest.fail(message + " are required (TUTOR_SCORING_REQUIRE_CHROMIUM=1)")
        pytest.skip(message + " SKIPPED")
    return found


def screenshot(browser: str, html: Path, png: Path, profile: Path) -> tuple[int, int]:
    """Render ``html`` to ``png`` at 800 px wide; returns the PNG's size."""
    png.unlink(missing_ok=True)
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=800,1200",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


@pytest.mark.chromium
def test_digest_and_alert_render_in_chromium(home: Settings, tmp_path: Path) -> None:
    browser = chromium()
    generated = generate_drops(
        tmp_path / "generated",
        tutors=40,
        days=75,
        sessions_per_day=160,
        end=END,
        drops_per_day=1,
        ground_truth_path=tmp_path / "truth.csv",
    )
    # One file per entity: ingesting 75 daily drops would triple the test's time.
    one_file_per_entity(generated.files, home.landing_dir)
    as_of = datetime(END.year, END.month, END.day, 12, tzinfo=UTC)
    summary = run_pipeline(as_of=as_of, history_days=56)
    assert summary.success, summary.render()
    messages = read_outbox(home.outbox_dir)
    digest_html, _ = bodies(messages["digest:2026-03-01T12:00Z"])

    # The alert of the tutor with the highest 30-day rate (an alert may or may not be due).
    engine = sa.create_engine(home.database_url)
    worst = next(r for r in current_scores(engine) if r["is_high_risk"])
    config = default_report_config()
    alert = render_alert(
        engine,
        key=f"alert:{worst['tutor_id']}:2026-03-01",
        tutor_id=worst["tutor_id"],
        day=END,
        as_of=utc(worst["as_of"]) or as_of,
        config=config,
    )
    engine.dispose()
    assert alert is not None

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, html in (("digest", digest_html), ("alert", alert.html)):
        page = ARTIFACTS / f"{name}.html"
        page.write_text(html, encoding="utf-8")
        width, height = screenshot(browser, page, ARTIFACTS / f"{name}.png", tmp_path / name)
        assert (width, height) == (800, 1200)
        # A blank page compresses to almost nothing; a rendered report does not.
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 40_000
