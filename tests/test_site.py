"""The dashboard site: rendered from a real pipeline run, parsed back, and driven in Chromium.

Browser tests skip with a loud reason where Debian's chromium is missing, except when
TUTOR_SCORING_REQUIRE_CHROMIUM=1, where they fail instead. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import markupsafe
import numpy as np
import polars as pl
import pytest
from drops import HandDrop
from playwright.sync_api import Browser, Page, sync_playwright

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.defs.resources import default_resources
from tutor_scoring_dagster.defs.site.assets import dashboard_site
from tutor_scoring_dagster.site import (
    SiteData,
    build_site,
    chart_paths,
    default_site_dir,
    html_escape,
    read_site_data,
    render_site,
    reschedule_tables,
    tutor_slugs,
    write_if_changed,
)
from tutor_scoring_dagster.store.publish import create_store_engine

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "site"
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_CHROMIUM = os.environ.get("TUTOR_SCORING_REQUIRE_CHROMIUM") == "1"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

NAMES = {"A": "Ana <b>Bold</b>", "B": "Ben & <Co>", "C": "Cid"}
ODD_ID = "d/é <x>"  # no tutors export: shown by its id, which is not a safe file name
EXPECTED_STATUS = {"A": "high", "B": "ok", "C": "insufficient_data", ODD_ID: "high"}
EVIL_REASON = '<script>alert("x")</script> car broke'


def build_drops(landing: Path) -> None:
    """Four tutors over the 14 days before T, one of each risk status plus an odd id."""
    drop = HandDrop(moved_for=timedelta(days=1), notice=timedelta(hours=6))

    def session(tutor: str, at: datetime, status: str, moved_by: str | None = None) -> None:
        reason = EVIL_REASON if tutor == "B" else None
        drop.session(f"{tutor}-{len(drop.sessions)}", tutor, at, status, moved_by, reason=reason)

    for day in range(1, 15):
        at = T - timedelta(days=day, hours=2)
        # A: every other session moved by the tutor.
        session("A", at, "rescheduled" if day % 2 else "completed", "tutor" if day % 2 else None)
        session("A", at - timedelta(hours=3), "completed")
        # B: reliable; one reschedule asked for by the student.
        session("B", at, "completed", "student" if day == 3 else None)
        # The odd id: moved by the tutor, a few days only.
        if day <= 6:
            session(ODD_ID, at, "rescheduled", "tutor")
    for day in (2, 5):  # C: too few sessions to judge
        session("C", T - timedelta(days=day), "rescheduled", "tutor")

    drop.write(
        landing,
        tutors=[{"tutor_id": k, "name": v, "email": f"{k}@example.com"} for k, v in NAMES.items()],
    )


@pytest.fixture
def published(home: Settings) -> Settings:
    """A serving store filled by a real pipeline run over small drops."""
    build_drops(home.landing_dir)
    summary = run_pipeline(as_of=T, history_days=10)
    assert summary.success, summary.render()
    return home


@dataclass
class Row:
    status: str = ""
    href: str = ""
    name: str = ""
    badges: list[str] = field(default_factory=list)
    tier: list[str] = field(default_factory=list)


class IndexParser(HTMLParser):
    """The tutor rows of index.html's table of all tutors: status, link, link text, the
    status badge's classes and the risk tier badge's."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] = []
        self._in_table = False
        self._in_body = False
        self._in_link = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_table = a.get("id") == "tutors"
        elif tag == "tbody" and self._in_table:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append(Row(status=a.get("data-status") or ""))
        elif tag == "a" and self._in_body and self.rows and not self.rows[-1].href:
            self.rows[-1].href = a.get("href") or ""
            self._in_link = True
        elif tag == "span" and self._in_body and "badge" in (a.get("class") or "").split():
            row = self.rows[-1]
            if row.badges:
                row.tier += (a.get("class") or "").split()
            else:
                row.badges += (a.get("class") or "").split()

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "a":
            self._in_link = False

    def handle_data(self, data: str) -> None:
        if self._in_link:
            self.rows[-1].name += data


class TagCounter(HTMLParser):
    """How often each tag occurs, and the text of the whole document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_index(site: Path) -> list[Row]:
    parser = IndexParser()
    parser.feed((site / "index.html").read_text(encoding="utf-8"))
    return parser.rows


def parse_page(path: Path) -> TagCounter:
    parser = TagCounter()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_site_from_a_pipeline_run(published: Settings, tmp_path: Path) -> None:
    site = tmp_path / "site"
    engine = create_store_engine(published.database_url)
    stats = build_site(engine, site)
    assert (stats.tutors, stats.high_risk) == (4, 2)
    assert stats.written == 4 + 4 and stats.unchanged == 0  # pages, index, css, 2 scripts

    rows = parse_index(site)
    by_name = {r.name: r for r in rows}
    assert len(rows) == 4 and set(by_name) == {*NAMES.values(), ODD_ID}
    for tutor, status in EXPECTED_STATUS.items():
        row = by_name[NAMES.get(tutor, ODD_ID)]
        assert row.status == status
        assert row.badges == ["badge", f"badge-{status}"]
    assert [r.status for r in rows][:2] == ["high", "high"]  # riskiest first

    raw = (site / "index.html").read_text(encoding="utf-8")
    assert "Ana &lt;b&gt;Bold&lt;/b&gt;" in raw and "<b>Bold</b>" not in raw
    assert "Ben &amp; &lt;Co&gt;" in raw

    for row in rows:
        page = site / row.href
        assert page.parent == site / "tutors" and page.is_file(), row.href
        parsed = parse_page(page)
        assert parsed.tags.get("svg") == 1, row.href
        assert parsed.tags.get("script") == 1  # as-of.js only
    ana = parse_page(site / by_name[NAMES["A"]].href)
    assert ana.tags["path"] >= 4  # bars and three rate lines
    text = "".join(ana.text)
    assert "<i>flat tyre</i>" in text  # a reason, shown as text
    ben = (site / by_name[NAMES["B"]].href).read_text(encoding="utf-8")
    assert "<script>" not in ben and "&lt;script&gt;alert(" in ben

    # Nothing changed in the store: nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in site.rglob("*")}
    again = build_site(engine, site)
    assert again.written == 0 and again.unchanged == stats.written and again.removed == 0
    assert {p: p.stat().st_mtime_ns for p in site.rglob("*")} == mtimes
    assert not list(site.rglob(".*.tmp"))
    engine.dispose()


def test_site_reads_sqlite_and_postgres_alike(
    home: Settings, store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", store_url)
    build_drops(home.landing_dir)
    assert run_pipeline(as_of=T, history_days=10).success
    engine = create_store_engine(store_url)
    data = read_site_data(engine)
    engine.dispose()
    assert data.scores.height == 4 and data.scores.schema["as_of"] == pl.Datetime("us", "UTC")
    assert data.scores.get_column("as_of").unique().to_list() == [T]
    assert (data.first_day, data.last_day) == (date(2026, 2, 19), date(2026, 2, 28))
    assert data.history.height == 10 + 10 + 5 + 6  # from each tutor's first session on
    ana = data.sessions.filter(pl.col("tutor_id") == "A").sort("day")
    assert ana.get_column("sessions").to_list() == [2] * 14  # two a day, by UTC day
    assert ana.get_column("day").to_list()[-1] == date(2026, 2, 28)  # not T's day
    moved = data.reschedules.filter(pl.col("tutor_id") == "A").sort("cancelled_at")
    assert moved.get_column("cancelled_at").to_list()[-1] == T - timedelta(days=1, hours=8)
    stats = render_site(data, tmp_path / "site")
    assert (stats.tutors, stats.high_risk) == (4, 2)


def test_pages_of_tutors_gone_from_the_snapshot_are_removed(
    published: Settings, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    engine = create_store_engine(published.database_url)
    data = read_site_data(engine)
    engine.dispose()
    render_site(data, site)
    fewer = replace(data, scores=data.scores.filter(pl.col("tutor_id") != "C"))
    stats = render_site(fewer, site)
    assert stats.removed == 1 and stats.tutors == 3
    assert not (site / "tutors" / "C.html").exists()
    assert stats.written == 1  # the index; the other tutors' pages are unchanged


def test_a_new_hour_alone_rewrites_the_index_and_as_of_only(
    published: Settings, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    engine = create_store_engine(published.database_url)
    data = read_site_data(engine)
    engine.dispose()
    render_site(data, site)
    later = data.scores.with_columns(pl.col("as_of") + timedelta(hours=1))
    stats = render_site(replace(data, scores=later), site)
    assert stats.written == 2 and stats.unchanged == 4 + 2
    assert "13:00 UTC" in (site / "as-of.js").read_text(encoding="utf-8")


def test_asset_links_to_the_site(published: Settings, tmp_path: Path) -> None:
    site = tmp_path / "elsewhere"
    result = dg.materialize(
        [dashboard_site],
        resources=default_resources(),
        run_config={"ops": {"dashboard_site": {"config": {"site_dir": str(site)}}}},
    )
    assert result.success
    meta = result.asset_materializations_for_node("dashboard_site")[0].metadata
    assert meta["tutors"].value == 4 and meta["high_risk"].value == 2
    assert meta["index"].value == str((site / "index.html").resolve())
    assert meta["url"].value == (site / "index.html").resolve().as_uri()


def test_site_dir_defaults_under_home(home: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUTOR_SCORING_SITE_DIR", raising=False)
    assert default_site_dir() == home.home / "site"
    monkeypatch.setenv("TUTOR_SCORING_SITE_DIR", "/srv/dashboard")
    assert default_site_dir() == Path("/srv/dashboard")


def test_an_empty_store_renders_an_empty_index(home: Settings, tmp_path: Path) -> None:
    from tutor_scoring_dagster.store.migrate import upgrade

    engine = create_store_engine(home.database_url)
    upgrade(engine)
    stats = build_site(engine, tmp_path / "site")
    engine.dispose()
    assert (stats.tutors, stats.high_risk) == (0, 0)
    assert "No scores have been published" in stats.index.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (["T00041", "tutor_7", "x-1"], ["T00041", "tutor_7", "x-1"]),
        (["a/b"], ["a-b-"]),
        (["../etc"], ["etc-"]),
        (["A", "a"], ["A-", "a-"]),  # one file each, also on a case-insensitive disk
        (["<>"], [""]),
    ],
)
def test_tutor_slugs_are_safe_file_names(ids: list[str], expected: list[str]) -> None:
    slugs = tutor_slugs(ids)
    assert len(set(slugs)) == len(slugs)
    for slug, prefix in zip(slugs, expected, strict=True):
        assert slug.startswith(prefix)
        assert slug.replace("-", "").replace("_", "").isalnum() and slug.isascii()
        assert len(slug) <= 64


def test_chart_lines_break_where_the_history_has_a_gap() -> None:
    first = date(2026, 2, 1)
    days = [first + timedelta(days=i) for i in (0, 1, 2, 4, 5)]
    history = pl.DataFrame(
        {
            "tutor_id": ["A"] * 5,
            "score_date": days,
            "reschedule_rate_7d": [0.1, None, 0.2, 0.3, 0.3],
            "reschedule_rate_30d": [0.1, 0.1, 0.1, 0.1, 0.1],
            "reschedule_rate_90d": [0.05] * 5,
        }
    )
    scores = pl.DataFrame({"tutor_id": ["A"], "risk_threshold": [0.15]})
    sessions = pl.DataFrame(
        {"tutor_id": ["A", "A"], "day": [first, days[-1]], "sessions": [2, 4]},
        schema={"tutor_id": pl.String, "day": pl.Date, "sessions": pl.Int64},
    )
    data = SiteData(
        scores=scores,
        history=history,
        sessions=sessions,
        reschedules=pl.DataFrame(),
        first_day=first,
        last_day=days[-1],
        reschedules_since=first,
        reschedules_per_tutor=10,
    )
    chart = chart_paths(data).row(0, named=True)
    assert chart["line_7d"].count("M") == 3  # a null day, then a missing day
    assert chart["line_30d"].count("M") == 2 and chart["line_30d"].count("L") == 3
    assert chart["bars"].count("M") == 2 and chart["sessions_max"] == 4
    assert chart["rate_max"] == pytest.approx(0.3)  # the highest rate, in 10% steps
    assert 0 < chart["threshold_y"] < 260


@pytest.mark.parametrize(
    "text", ["", "plain", "<script>alert('x')</script>", 'a & b "c" <d>', "&amp; é \u2013 &#39;"]
)
def test_vectorized_escaping_matches_jinja(text: str) -> None:
    escaped = pl.select(html_escape(pl.lit(text))).item()
    assert escaped == str(markupsafe.escape(text))


def test_reschedule_tables_keep_the_newest_rows_per_tutor() -> None:
    at = datetime(2026, 2, 1, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "tutor_id": ["A", "A", "A", "B"],
            "cancelled_at": [at, at + timedelta(days=2), at + timedelta(days=1), at],
            "original_time": [at, None, at, at],
            "new_time": [None, None, None, None],
            "initiator": ["tutor", "student", "tutor", "tutor"],
            "reason": ["<b>late</b>", None, "x", "y"],
            "reason_code": ["other", None, "other", "other"],
            "hours_before_session": [1.25, None, 3.0, 4.0],
        },
        schema_overrides={"new_time": pl.Datetime("us", "UTC")},
    )
    tables = {r["tutor_id"]: r for r in reschedule_tables(frame, per_tutor=2).to_dicts()}
    a = tables["A"]
    assert (a["reschedules_shown"], a["reschedules_total"]) == (2, 3)
    rows = a["reschedule_rows"].split("\n")
    assert rows[0].startswith('<tr class="by-student"><td>2026-02-03 00:00</td><td>\u2013</td>')
    assert "<td>x</td>" in rows[1] and "late" not in a["reschedule_rows"]  # the oldest is cut
    assert tables["B"]["reschedules_shown"] == 1
    b = reschedule_tables(frame.with_columns(pl.lit("<b>late</b>").alias("reason")), 5)
    assert "&lt;b&gt;late&lt;/b&gt;" in b.row(0, named=True)["reschedule_rows"]


def test_write_if_changed_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "page.html"
    assert write_if_changed(target, b"one")
    assert not write_if_changed(target, b"one")
    assert write_if_changed(target, b"two") and target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


# Chromium, driven by Playwright, from file:// (as an operator opens the folder).


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"CHROMIUM NOT AVAILABLE at {CHROMIUM} (apt-get install chromium)"
        if REQUIRE_CHROMIUM:
            pytest.fail(message + "; TUTOR_SCORING_REQUIRE_CHROMIUM=1 requires it", pytrace=False)
        pytest.skip(message + "; browser tests SKIPPED")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _column(page: Page, index: int) -> list[tuple[str, bool, str]]:
    """(status, hidden, sort value of column ``index``) of each row, in DOM order."""
    rows: list[tuple[str, bool, str]] = page.eval_on_selector_all(
        "#tutors tbody tr",
        "(rows, i) => rows.map(r => [r.dataset.status, r.hidden,"
        " r.cells[i].getAttribute('data-v') ?? r.cells[i].querySelector('a').textContent])",
        index,
    )
    return rows


@pytest.mark.chromium
def test_dashboard_in_chromium(published: Settings, tmp_path: Path, browser: Browser) -> None:
    site = tmp_path / "site"
    engine = create_store_engine(published.database_url)
    stats = build_site(engine, site)
    engine.dispose()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(stats.index.as_uri())
    assert page.locator("#tutors tbody tr").count() == 4
    page.screenshot(path=str(ARTIFACTS / "index.png"), full_page=True)

    # Sorting: numbers open highest first, a second click reverses; empty values stay last.
    header = page.locator("#tutors thead th").nth(4)  # 30-day rate (after status and tier)
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    values = [v for _, _, v in _column(page, 4)]
    numbers = [float(v) for v in values if v]
    assert numbers == sorted(numbers, reverse=True) and values[len(numbers) :] == [""] * (
        len(values) - len(numbers)
    )
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    values = [v for _, _, v in _column(page, 4)]
    assert [float(v) for v in values if v] == sorted(numbers)
    name_header = page.locator("#tutors thead th").nth(0)
    name_header.locator("button").click()
    names = [v for _, _, v in _column(page, 0)]
    assert names == sorted(names, key=str.lower) and names[0] == NAMES["A"]

    # Filtering by risk status, then by text.
    page.select_option("#risk-filter", "high")
    rows = _column(page, 0)
    assert sorted(v for status, hidden, v in rows if not hidden) == sorted([NAMES["A"], ODD_ID])
    assert all(status == "high" for status, hidden, _ in rows if not hidden)
    assert page.locator("#shown").text_content() == "2 of 4 tutors"
    page.screenshot(path=str(ARTIFACTS / "index-high-risk.png"), full_page=True)
    page.select_option("#risk-filter", "insufficient_data")
    assert [v for _, hidden, v in _column(page, 0) if not hidden] == [NAMES["C"]]
    page.select_option("#risk-filter", "")
    page.fill("#search", "bold")
    assert [v for _, hidden, v in _column(page, 0) if not hidden] == [NAMES["A"]]
    page.fill("#search", "nobody")
    assert page.locator("#none-shown").is_visible()
    page.fill("#search", "")
    assert page.locator("#tutors tbody tr:not([hidden])").count() == 4

    # A tutor's page, reached by its link: the chart and the reschedules.
    page.locator("#tutors").get_by_role("link", name=NAMES["A"]).click()
    page.wait_for_load_state()
    assert page.url.endswith("/tutors/A.html")
    chart = page.locator("svg.chart")
    assert chart.is_visible()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100
    for series in ("line-7d", "line-30d", "line-90d"):
        assert page.locator(f"svg.chart path.{series}").count() == 1, series
    assert page.locator("svg.chart path.bars").count() == 1
    assert page.locator("svg.chart line.threshold").count() == 1
    assert page.locator("table.reschedules tbody tr").count() == 7
    page.screenshot(path=str(ARTIFACTS / "tutor.png"), full_page=True)
    chart.screenshot(path=str(ARTIFACTS / "tutor-chart.png"))

    page.go_back()
    page.locator("#tutors").get_by_role("link", name=ODD_ID).click()
    page.wait_for_load_state()
    assert (page.locator("h1").text_content() or "").strip().startswith(ODD_ID)
    assert problems == []


def synthetic_site_data(tutors: int, days: int = 60, seed: int = 1) -> SiteData:
    """A snapshot of ``tutors`` tutors with ``days`` days of history, without a pipeline run."""
    rng = np.random.default_rng(seed)
    last = date(2026, 2, 28)
    first = last - timedelta(days=days - 1)
    ids = [f"T{i:05d}" for i in range(tutors)]
    base_rate = rng.beta(1.5, 10, tutors)
    columns: dict[str, object] = {
        "tutor_id": ids,
        "as_of": [datetime(2026, 3, 1, tzinfo=UTC)] * tutors,
    }
    for w in (7, 30, 90):
        total = rng.poisson(w * 0.8, tutors)
        moved = rng.binomial(total, base_rate)
        missed = rng.binomial(total - moved, 0.03)
        columns |= {
            f"total_sessions_{w}d": total,
            f"tutor_reschedules_{w}d": moved,
            f"no_shows_{w}d": missed,
        }
        for rate, count in (("reschedule_rate", moved), ("no_show_rate", missed)):
            value = np.where(total > 0, count / np.maximum(total, 1), np.nan)
            columns[f"{rate}_{w}d"] = value
            columns[f"{rate}_{w}d_lower95"] = value * 0.6
    scores = pl.DataFrame(columns).fill_nan(None)
    high = (pl.col("reschedule_rate_30d") > 0.15) & (pl.col("total_sessions_30d") >= 5)
    scores = scores.with_columns(
        pl.lit(rng.normal(0, 0.03, tutors)).alias("reschedule_rate_30d_change_7d"),
        high.fill_null(False).alias("is_high_risk"),
        pl.when(high)
        .then(pl.lit("high"))
        .when(pl.col("total_sessions_90d") < 5)
        .then(pl.lit("insufficient_data"))
        .otherwise(pl.lit("ok"))
        .alias("risk_status"),
        pl.lit(0.15).alias("risk_threshold"),
        pl.lit(5).alias("min_sessions"),
        pl.format("Tutor <{}> & co", pl.col("tutor_id")).alias("name"),
        pl.lit(True).alias("is_active"),
    )
    # Risk tiers: high-risk tutors confirmed, every seventh other one on watch since yesterday.
    watch = ~high.fill_null(False) & (pl.int_range(pl.len()) % 7 == 0)
    flagged = high.fill_null(False) | watch
    scores = scores.with_columns(
        pl.when(high.fill_null(False))
        .then(pl.lit("high"))
        .when(watch)
        .then(pl.lit("watch"))
        .otherwise(pl.col("risk_status"))
        .alias("risk_tier"),
        pl.lit(rng.uniform(0, 1, tutors)).alias("risk_probability"),
        pl.lit(rng.uniform(0, 4, tutors)).alias("cusum_statistic"),
        pl.when(flagged).then(pl.col("as_of") - pl.duration(days=1)).alias("watch_since"),
        pl.lit(False).alias("newly_flagged"),
        pl.lit(2.0).alias("prior_alpha"),
        pl.lit(18.0).alias("prior_beta"),
        pl.when(flagged).then(pl.lit("<b>short notice</b>")).alias("top_drivers"),
        pl.when(flagged).then(pl.lit("Talk & agree a plan")).alias("recommended_action"),
    )
    day_list = [first + timedelta(days=d) for d in range(days)]
    history = pl.DataFrame(
        {
            "tutor_id": np.repeat(ids, days),
            "score_date": day_list * tutors,
            **{
                f"reschedule_rate_{w}d": np.clip(
                    np.repeat(base_rate, days) + rng.normal(0, 0.04 / w**0.5, tutors * days), 0, 1
                )
                for w in (7, 30, 90)
            },
        }
    )
    sessions = pl.DataFrame(
        {
            "tutor_id": np.repeat(ids, days),
            "day": day_list * tutors,
            "sessions": rng.poisson(1.2, tutors * days),
        }
    ).filter(pl.col("sessions") > 0)
    at = datetime.combine(last, datetime.min.time(), tzinfo=UTC)
    reschedules = pl.DataFrame(
        {
            "tutor_id": ids,
            "cancelled_at": [at] * tutors,
            "original_time": [at + timedelta(hours=30)] * tutors,
            "new_time": [at + timedelta(days=3)] * tutors,
            "initiator": ["tutor"] * tutors,
            "reason": ["<b>car</b> trouble"] * tutors,
            "reason_code": ["other"] * tutors,
            "hours_before_session": [30.0] * tutors,
        }
    )
    return SiteData(
        scores=scores,
        history=history,
        sessions=sessions,
        reschedules=reschedules,
        first_day=first,
        last_day=last,
        reschedules_since=first,
        reschedules_per_tutor=100,
    )


@pytest.mark.chromium
def test_a_long_index_is_paged_and_sorted_as_a_whole(tmp_path: Path, browser: Browser) -> None:
    data = synthetic_site_data(450)
    stats = render_site(data, tmp_path / "site")
    assert stats.tutors == 450
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(stats.index.as_uri())

    visible = page.locator("#tutors tbody tr:not([hidden])")
    assert page.locator("#tutors tbody tr").count() == 450 and visible.count() == 200
    assert page.locator("#shown").text_content() == "450 tutors, the first 200 shown"
    assert page.locator("#more").text_content() == "Show 200 more"

    # Sorting orders every row, also those not displayed.
    header = page.locator("#tutors thead th").nth(3)  # 7-day rate (after status and tier)
    header.locator("button").click()
    rates = data.scores.get_column("reschedule_rate_7d").drop_nulls()
    first_shown = float(visible.first.locator("td").nth(3).get_attribute("data-v") or "nan")
    assert first_shown == pytest.approx(rates.max()) and visible.count() == 200
    header.locator("button").click()
    first_shown = float(visible.first.locator("td").nth(3).get_attribute("data-v") or "nan")
    assert first_shown == pytest.approx(rates.min())

    page.locator("#more").click()
    assert visible.count() == 400 and page.locator("#more").text_content() == "Show 50 more"
    page.locator("#all").click()
    assert visible.count() == 450 and page.locator("#more").is_hidden()

    page.select_option("#risk-filter", "high")
    high = int((data.scores.get_column("risk_status") == "high").sum())
    assert visible.count() == min(high, 200)
    assert page.locator("#shown").text_content().startswith(f"{high} of 450 tutors")  # type: ignore[union-attr]
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "index-paged.png"))
    page.locator("#tutors tbody tr:not([hidden]) a").first.click()
    page.wait_for_load_state()
    assert page.locator("svg.chart path.line-30d").count() == 1
    assert page.locator("#as-of").text_content() == "Scores as of 2026-03-01 00:00 UTC"
    page.screenshot(path=str(ARTIFACTS / "tutor-synthetic.png"), full_page=True)
    assert problems == []
