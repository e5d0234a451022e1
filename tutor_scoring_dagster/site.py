"""Serving store -> a static dashboard site: an index of every tutor and a page per tutor.

The site is plain files (HTML, one stylesheet, two small scripts) that work from ``file://``
with no server and no outside resources. Templates live in ``reports/site/``; all data is
escaped. Everything per row (chart paths and labels, cell text, the rows of the index's and the
pages' tables) is computed and escaped for all tutors at once in Polars, so the per-tutor work
left is one short template render and one file comparison. The time of the snapshot is kept
out of tutor pages (``as-of.js`` shows it), so an hourly build rewrites only the pages of
tutors whose numbers changed. Each file is replaced through a temporary file and an atomic
rename, tutor pages before the index that links to them, so a reader never sees a half-written
file or a dangling link.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, partial
from pathlib import Path
from typing import Any, Final

import jinja2
import polars as pl
from markupsafe import Markup
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.assessment import flagged_since
from tutor_scoring_dagster.config import load_settings
from tutor_scoring_dagster.paths import REPORTS_DIR
from tutor_scoring_dagster.schemas import FLAGGED_TIERS, RISK_STATUSES, RISK_TIERS, WINDOWS_DAYS
from tutor_scoring_dagster.store import site_reads

SITE_TEMPLATES: Final = REPORTS_DIR / "site"
STATIC_FILES: Final = ("site.css", "site.js")
TUTOR_PAGES: Final = "tutors"
RISK_ORDER: Final = {status: rank for rank, status in enumerate(RISK_STATUSES)}
"""Index order and sort key of a risk status: high first."""
TIER_ORDER: Final = {tier: rank for rank, tier in enumerate(RISK_TIERS)}
"""Sort key of a risk tier: high, watch, ok, insufficient data."""

DASH: Final = "\u2013"
_SAFE_SLUG: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Chart:
    """Geometry of a tutor's chart, in SVG user units."""

    width: int = 760
    height: int = 260
    left: int = 48
    right: int = 48
    top: int = 12
    bottom: int = 30

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    @property
    def base(self) -> int:
        """The y of the plot's bottom edge (rate 0, no sessions)."""
        return self.top + self.plot_height


CHART: Final = Chart()
TICKS: Final = (0.0, 0.5, 1.0)
"""Where the charts' axes have labels, as fractions of the axis (bottom to top)."""
TICK_YS: Final = tuple(round(CHART.base - CHART.plot_height * f + 4, 1) for f in TICKS)
"""The y of each tick's label (its baseline, just below the tick)."""


@dataclass(frozen=True)
class SiteData:
    """Everything the site shows, read from the serving store in one go."""

    scores: pl.DataFrame
    history: pl.DataFrame
    sessions: pl.DataFrame
    reschedules: pl.DataFrame
    first_day: date | None
    last_day: date | None
    reschedules_since: date
    reschedules_per_tutor: int
    drivers: pl.DataFrame = field(default_factory=pl.DataFrame)
    """The current snapshot's risk drivers (``tutor_risk_drivers``), strongest first."""


@dataclass(frozen=True)
class SiteStats:
    """What one build of the site wrote."""

    index: Path
    tutors: int
    high_risk: int
    written: int
    unchanged: int
    removed: int


def default_site_dir() -> Path:
    """Where the site is written: TUTOR_SCORING_SITE_DIR, else ``<TUTOR_SCORING_HOME>/site``."""
    return load_settings().site_dir


def read_site_data(
    engine: Engine, *, chart_days: int = 180, reschedules_per_tutor: int = 100
) -> SiteData:
    """The current snapshot and, over the last ``chart_days`` days of score history, each
    tutor's daily rates and sessions and newest ``reschedules_per_tutor`` reschedules."""
    # Every read sees one snapshot of the store: a landing run publishing meanwhile cannot
    # give the pages history or drivers of another snapshot than their scores.
    with _one_snapshot(engine) as (conn, snapshot):
        scores = site_reads.current_snapshot(conn)
        newest = site_reads.newest_history_day(conn)
        as_of = scores.get_column("as_of").max()
        if newest is not None:
            last_day = newest
        elif isinstance(as_of, datetime):
            last_day = (as_of - timedelta(days=1)).date()  # as of midnight: the day before
        else:
            last_day = datetime.now(UTC).date()
        first_day = last_day - timedelta(days=chart_days - 1)
        since = datetime.combine(first_day, time(0), tzinfo=UTC)
        history, sessions, reschedules, drivers = _read_all(
            engine,
            conn,
            snapshot,
            [
                partial(site_reads.score_history, since=first_day),
                partial(site_reads.daily_sessions, since=since),
                partial(site_reads.reschedules_since, since=since),
                site_reads.current_drivers,
            ],
        )
    # History day D is the snapshot at the end of D: later sessions are not on the chart.
    sessions = sessions.filter(pl.col("day") <= last_day)
    # A chart starts at the first stored day when the history is shorter than chart_days.
    stored_first = history.get_column("score_date").min()
    chart_first = max(first_day, stored_first) if isinstance(stored_first, date) else None
    return SiteData(
        scores=scores,
        history=history,
        sessions=sessions,
        reschedules=reschedules,
        first_day=chart_first,
        last_day=last_day if chart_first else None,
        reschedules_since=first_day,
        reschedules_per_tutor=reschedules_per_tutor,
        drivers=drivers,
    )


@contextmanager
def _one_snapshot(engine: Engine) -> Iterator[tuple[Connection, str | None]]:
    """A connection whose reads all see one snapshot of the store and, on Postgres, the id of
    that snapshot, for other connections to read it too (as pg_dump's parallel workers do)."""
    with engine.connect() as conn:
        if engine.dialect.name != "postgresql":
            yield conn, None
            return
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        snapshot = str(conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar())
        if not re.fullmatch(r"[0-9A-Fa-f-]+", snapshot):  # formatted into SQL below
            raise ValueError(f"unexpected snapshot id from the server: {snapshot!r}")
        yield conn, snapshot


def _read_all(
    engine: Engine,
    conn: Connection,
    snapshot: str | None,
    reads: list[Callable[[Connection], pl.DataFrame]],
) -> list[pl.DataFrame]:
    """The frames of ``reads`` in the snapshot ``conn`` sees: with a ``snapshot`` id
    (Postgres) at the same time, each on a connection of its own that imports it (the server
    runs one query while this process converts another's rows); else one after the other on
    ``conn`` (an in-memory SQLite database is one connection)."""
    if snapshot is None:
        return [read(conn) for read in reads]

    def on_own_connection(read: Callable[[Connection], pl.DataFrame]) -> pl.DataFrame:
        with engine.connect() as own:
            own.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # A server-made id of hex digits and dashes (checked); SET takes no parameters.
            own.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # noqa: S608, RUF100
            return read(own)

    with ThreadPoolExecutor(max_workers=len(reads), thread_name_prefix="site-read") as pool:
        return list(pool.map(on_own_connection, reads))


def html_escape(text: pl.Expr) -> pl.Expr:
    """Text made safe inside HTML, exactly as Jinja's autoescape (markupsafe) makes it."""
    return text.str.replace_many(
        ["&", "<", ">", '"', "'"], ["&amp;", "&lt;", "&gt;", "&#34;", "&#39;"]
    )


RESCHEDULE_ROW: Final = (
    '<tr class="by-{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
    '<td class="num">{}</td></tr>'
)
"""A row of a tutor page's reschedule table (its header is in ``tutor.html.j2``)."""


def reschedule_tables(frame: pl.DataFrame, per_tutor: int) -> pl.DataFrame:
    """Per tutor: the rows of the reschedule table as HTML (``reschedule_rows``, the newest
    ``per_tutor`` reschedules, newest first), how many it shows and how many there are.

    Rendered for all tutors at once here rather than row by row in Jinja: at 10,000 tutors
    the per-cell template work was most of the site's build time. Every value is escaped.
    """
    minute = "%Y-%m-%d %H:%M"
    dash = pl.lit(DASH)
    cells = [
        pl.col("initiator"),  # the row's class: student-initiated rows are greyed
        *(
            pl.col(c).dt.strftime(minute).fill_null(dash)
            for c in ("cancelled_at", "original_time", "new_time")
        ),
        pl.col("initiator"),
        pl.col("reason").fill_null(""),
        pl.col("reason_code").fill_null(""),
        pl.col("hours_before_session").round(1).cast(pl.String).fill_null(dash),
    ]
    row = pl.format(RESCHEDULE_ROW, *(html_escape(cell) for cell in cells))
    # Reschedules made at the same instant in the order of their sessions, whatever order the
    # database returned them in (it varies from plan to plan), so a page changes only with
    # its data.
    ties = ["session_id"] if "session_id" in frame.columns else []
    return (
        frame.sort(
            ["tutor_id", "cancelled_at", *ties],
            descending=[False, True, *(False for _ in ties)],
            nulls_last=True,
        )
        .with_columns(pl.len().over("tutor_id").alias("reschedules_total"))
        .filter(pl.int_range(pl.len()).over("tutor_id") < per_tutor)
        .group_by("tutor_id", maintain_order=True)
        .agg(
            row.str.join("\n").alias("reschedule_rows"),
            pl.len().alias("reschedules_shown"),
            pl.col("reschedules_total").first(),
        )
    )


def tutor_slugs(tutor_ids: list[str]) -> list[str]:
    """A file name (without ``.html``) for each tutor's page: the id itself when it is a
    plain name, otherwise a readable part plus a hash of the id. Ids may hold any text, and
    two ids differing only in case would share a file on a case-insensitive disk, so those get
    the hash too."""
    folded = Counter(tid.lower() for tid in tutor_ids)
    slugs = []
    for tid in tutor_ids:
        if _SAFE_SLUG.fullmatch(tid) and folded[tid.lower()] == 1:
            slugs.append(tid)
            continue
        readable = re.sub(r"[^A-Za-z0-9_-]+", "-", tid).strip("-")[:40]
        digest = hashlib.sha256(tid.encode("utf-8")).hexdigest()[:10]
        slugs.append(f"{readable}-{digest}" if readable else digest)
    return slugs


def chart_paths(data: SiteData, chart: Chart = CHART) -> pl.DataFrame:
    """Per tutor: SVG path data of each reschedule-rate line and of the daily-session bars,
    the rate axis maximum (``rate_max``), the session axis maximum (``sessions_max``) and the
    y of the threshold line. Computed for all tutors at once."""
    thresholds = data.scores.select("tutor_id", "risk_threshold")
    if data.first_day is None or data.last_day is None:
        return thresholds.with_columns(
            pl.lit(None, pl.String).alias("bars"),
            *(pl.lit(None, pl.String).alias(f"line_{w}d") for w in WINDOWS_DAYS),
            pl.lit(1.0).alias("rate_max"),
            pl.lit(0, pl.Int64).alias("sessions_max"),
            pl.lit(None, pl.Float64).alias("threshold_y"),
            pl.lit(None, pl.List(pl.String)).alias("rate_ticks"),
            pl.lit(None, pl.List(pl.String)).alias("session_ticks"),
        ).drop("risk_threshold")
    days = (data.last_day - data.first_day).days + 1
    slot = chart.plot_width / days
    first = pl.lit(data.first_day, pl.Date)

    history = data.history.filter(pl.col("score_date") >= first).with_columns(
        (pl.col("score_date") - first).dt.total_days().alias("i")
    )
    rates = list(site_reads.HISTORY_RATES)
    scale = (
        history.group_by("tutor_id")
        .agg(pl.max_horizontal(*(pl.col(r).max() for r in rates)).alias("highest"))
        .join(thresholds, on="tutor_id", how="full", coalesce=True)
        .with_columns(
            # Room above the threshold line, rounded up to a 10% step.
            (
                (
                    pl.max_horizontal(
                        pl.col("highest").fill_null(0), pl.col("risk_threshold").fill_null(0) * 1.5
                    )
                    * 10
                    - 1e-9
                ).ceil()
                / 10
            )
            .clip(0.1, 1.0)
            .alias("rate_max")
        )
        .with_columns(
            (
                chart.top + chart.plot_height * (1 - pl.col("risk_threshold") / pl.col("rate_max"))
            ).alias("threshold_y")
        )
        .select("tutor_id", "rate_max", "threshold_y")
        # A number per tutor: sorting a million points by it beats sorting by the id's text.
        .with_columns(pl.int_range(pl.len()).alias("k"))
    )

    points = (
        history.join(scale, on="tutor_id", how="left")
        .sort("k", "i")
        .with_columns(
            (pl.col("k") == pl.col("k").shift(1)).alias("same_tutor"),
            (pl.col("i") - pl.col("i").shift(1) == 1).alias("next_day"),
            # As text once, not once per line.
            (chart.left + (pl.col("i") + 0.5) * slot).round(1).cast(pl.String).alias("x"),
        )
    )
    lines = []
    for w, rate in zip(WINDOWS_DAYS, rates, strict=True):
        y = (chart.top + chart.plot_height * (1 - pl.col(rate) / pl.col("rate_max"))).round(1)
        # A line continues from the tutor's point of the day before; a gap starts a new one.
        continues = pl.col("same_tutor") & pl.col("next_day") & pl.col(rate).shift(1).is_not_null()
        command = pl.when(continues).then(pl.lit("L")).otherwise(pl.lit("M"))
        lines.append(
            pl.when(pl.col(rate).is_not_null())
            .then(pl.format("{}{},{}", command, pl.col("x"), y))
            .alias(f"line_{w}d")
        )
    line_paths = (
        points.select("tutor_id", *lines)
        .group_by("tutor_id")
        .agg(pl.col(f"line_{w}d").drop_nulls().str.join(" ") for w in WINDOWS_DAYS)
    )

    sessions = (
        data.sessions.filter(pl.col("day") >= first)
        .join(scale.select("tutor_id", "k"), on="tutor_id", how="inner")
        .with_columns(
            (pl.col("day") - first).dt.total_days().alias("i"),
            pl.col("sessions").max().over("tutor_id").alias("sessions_max"),
        )
    )
    height = (chart.plot_height * pl.col("sessions") / pl.col("sessions_max")).round(1)
    height = height.cast(pl.String)  # once, for the two places it goes
    bar_x = (pl.lit(chart.left) + (pl.col("i") + 0.15) * slot).round(1)
    bar = pl.format(
        "M{},{}v-{}h{}v{}z", bar_x, pl.lit(chart.base), height, round(slot * 0.7, 2), height
    )
    bars = (
        sessions.sort("k", "i")
        .group_by("tutor_id")
        .agg(bar.str.join("").alias("bars"), pl.col("sessions_max").first())
    )

    def session_tick(f: float) -> pl.Expr:
        value = (pl.col("sessions_max") * f).round(1)
        whole = value.cast(pl.Int64).cast(pl.String)  # no needless ".0"
        return pl.when(value == value.floor()).then(whole).otherwise(value.cast(pl.String))

    return (
        scale.drop("k")
        .join(line_paths, on="tutor_id", how="left")
        .join(bars, on="tutor_id", how="left")
        .with_columns(pl.col("sessions_max").fill_null(0))
        .with_columns(
            # Tick labels, bottom to top; rate_max is a 10% step, so whole percents suffice.
            pl.concat_list(
                pl.format("{}%", (pl.col("rate_max") * f * 100).round(0).cast(pl.Int64))
                for f in TICKS
            ).alias("rate_ticks"),
            pl.concat_list(session_tick(f) for f in TICKS).alias("session_ticks"),
        )
    )


def x_axis_labels(data: SiteData, chart: Chart = CHART, count: int = 6) -> list[dict[str, Any]]:
    """Evenly spaced dates under the chart (the same for every tutor)."""
    if data.first_day is None or data.last_day is None:
        return []
    days = (data.last_day - data.first_day).days + 1
    slot = chart.plot_width / days
    step = max(1, math.ceil((days - 1) / (count - 1))) if days > 1 else 1
    picks = sorted({*range(0, days, step), days - 1})
    if len(picks) > 1 and picks[-1] - picks[-2] < step / 2:
        picks.pop(-2)  # the last label would crowd its neighbour
    return [
        {
            "x": round(chart.left + (i + 0.5) * slot, 1),
            "label": _short_date(data.first_day + timedelta(days=i)),
        }
        for i in picks
    ]


@cache
def site_env() -> jinja2.Environment:
    """The Jinja2 environment over ``reports/site/`` (autoescaped, undefined names fail)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(SITE_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        auto_reload=False,  # templates change with a deployment, not during a build
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = _pct
    env.filters["utc"] = _utc_text
    env.globals["status_label"] = _status_label
    env.filters["flagged_since"] = flagged_since
    return env


def _short_date(day: date) -> str:
    return f"{day:%b} {day.day}"  # "Feb 3" (strftime's %-d is not portable)


def _pct(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value * 100:.{digits}f}%"


def _utc_text(value: datetime | None) -> str:
    return DASH if value is None else f"{value:%Y-%m-%d %H:%M}"


def _status_label(status: str) -> str:
    return status.replace("_", " ")


def render_site(data: SiteData, out_dir: Path) -> SiteStats:
    """Write the site for ``data`` into ``out_dir``, touching only files whose content changed."""
    env = site_env()
    pages_dir = out_dir / TUTOR_PAGES
    pages_dir.mkdir(parents=True, exist_ok=True)
    written = unchanged = 0

    def put(path: Path, content: bytes) -> None:
        nonlocal written, unchanged
        if write_if_changed(path, content):
            written += 1
        else:
            unchanged += 1

    for name in STATIC_FILES:
        put(out_dir / name, (SITE_TEMPLATES / name).read_bytes())

    tutors = _tutor_rows(data)
    newest = data.scores.get_column("as_of").max()
    as_of = newest if isinstance(newest, datetime) else None
    common = {
        "as_of": as_of,
        "first_day": data.first_day,
        "last_day": data.last_day,
        "statuses": RISK_STATUSES,
    }
    page = env.get_template("tutor.html.j2")
    # What every chart shares (grid, dates) is rendered once, not once per tutor.
    axes = Markup(
        env.get_template("chart_axes.html.j2").render(
            chart=CHART, ticks=TICKS, x_labels=x_axis_labels(data)
        )
    )
    for tutor in tutors:
        html = page.render(
            **common,
            tutor=tutor,
            chart=CHART,
            axes=axes,
            reschedules_since=data.reschedules_since,
        )
        put(pages_dir / f"{tutor['slug']}.html", html.encode("utf-8"))

    as_of_text = f"Scores as of {_utc_text(as_of)} UTC" if as_of else "No scores published yet"
    put(out_dir / "as-of.js", env.get_template("as-of.js.j2").render(text=as_of_text).encode())

    counts = {s: 0 for s in RISK_STATUSES}
    for tutor in tutors:
        counts[tutor["risk_status"]] += 1
    index_html = env.get_template("index.html.j2").render(
        **common,
        tutors=tutors,
        index_rows=Markup("\n".join(t["index_row"] for t in tutors)),
        counts=counts,
        rule=_rule(data.scores),
        flagged=_flagged_first(tutors),
    )
    index = out_dir / "index.html"
    put(index, index_html.encode("utf-8"))

    # Only after the index stops linking to them: pages of tutors no longer in the snapshot.
    keep = {f"{t['slug']}.html" for t in tutors}
    removed = 0
    for stale in pages_dir.glob("*.html"):
        if stale.name not in keep:
            stale.unlink()
            removed += 1
    return SiteStats(
        index=index,
        tutors=len(tutors),
        high_risk=counts.get("high", 0),
        written=written,
        unchanged=unchanged,
        removed=removed,
    )


def build_site(
    engine: Engine, out_dir: Path, *, chart_days: int = 180, reschedules_per_tutor: int = 100
) -> SiteStats:
    """Read the serving store and (re)write the dashboard site in ``out_dir``."""
    data = read_site_data(
        engine, chart_days=chart_days, reschedules_per_tutor=reschedules_per_tutor
    )
    return render_site(data, out_dir)


def write_if_changed(path: Path, content: bytes) -> bool:
    """Replace ``path`` with ``content`` atomically, unless it holds exactly that already.
    Returns whether the file was written."""
    try:
        if path.read_bytes() == content:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # No fsync: atomicity for readers needs only the rename; a crash just rebuilds.
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _tutor_rows(data: SiteData) -> list[dict[str, Any]]:
    """One dict per tutor, in index order: the score row, the text of its cells (the rows of
    the index's and its page's tables as HTML, and ``window_rates``: each window's rate), its
    chart and its page's name."""
    scores = data.scores
    if scores.height == 0:
        return []
    rows = (
        scores.join(chart_paths(data), on="tutor_id", how="left")
        .join(
            reschedule_tables(data.reschedules, data.reschedules_per_tutor),
            on="tutor_id",
            how="left",
        )
        .join(_driver_lists(data.drivers), on="tutor_id", how="left")
        .with_columns(
            pl.col("reschedules_shown", "reschedules_total").fill_null(0),
            pl.col("risk_tier")
            .replace_strict(TIER_ORDER, return_dtype=pl.Int64)
            .alias("tier_rank"),
            _pct_text(pl.col("risk_probability")).alias("probability_text"),
            pl.col("risk_status").replace_strict(RISK_ORDER, return_dtype=pl.Int64).alias("rank"),
            pl.coalesce(pl.col("name"), pl.col("tutor_id")).alias("display_name"),
            pl.concat_list(_window_cells(w) for w in WINDOWS_DAYS).alias("windows"),
            _change_text("reschedule_rate_30d_change_7d").alias("change_text"),
            pl.col("reschedule_rate_30d_change_7d").cast(pl.String).fill_null("").alias("change_v"),
        )
        .sort(
            ["rank", "reschedule_rate_30d", "tutor_id"],
            descending=[False, True, False],
            nulls_last=True,
        )
    )
    rows = rows.with_columns(pl.Series("slug", tutor_slugs(rows.get_column("tutor_id").to_list())))
    rows = rows.with_columns(
        _index_row().alias("index_row"),
        _score_rows().alias("score_rows"),
        _chart_ticks().alias("chart_ticks"),
        pl.col("windows").list.eval(pl.element().struct.field("rate")).alias("window_rates"),
    ).drop("windows")  # all in the HTML above: not made into a dict per window
    return [_row(row) for row in rows.to_dicts()]


INDEX_ROW: Final = (
    '<tr data-status="{}"><td><a href="tutors/{}.html">{}</a>{}<small>{}</small></td>'
    '<td data-v="{}"><span class="badge badge-{}">{}</span></td>'
    '<td data-v="{}"><span class="badge badge-{}">{}</span></td>'
    + '<td class="num" data-v="{}">{}<small>{}/{}</small></td>'
    * len(WINDOWS_DAYS)
    + '<td class="num" data-v="{}">{}</td><td class="num" data-v="{}">{}</td>'
    '<td class="num" data-v="{}">{}<small>{}/{}</small></td></tr>'
)
"""A row of the index's table of tutors (its header is in ``index.html.j2``)."""

SCORE_ROW: Final = (
    '<tr><td>{} days</td><td class="num">{}</td><td class="num">{}</td><td class="num{}">{}</td>'
    '<td class="num">{}</td><td class="num">{}</td><td class="num">{}</td></tr>'
)
"""A row of a tutor page's table of windows (its header is in ``tutor.html.j2``)."""


def _text(value: pl.Expr) -> pl.Expr:
    """``value`` as Jinja prints it (``str``) and escapes it; not for floats or nulls."""
    return html_escape(value.cast(pl.String))


def _window(i: int, name: str) -> pl.Expr:
    """Field ``name`` of the ``i``-th window cell (``_window_cells``), as escaped text."""
    return _text(pl.col("windows").list.get(i).struct.field(name))


def _index_row() -> pl.Expr:
    """Each tutor's row of the index as HTML, every value escaped.

    Rendered for all tutors at once rather than cell by cell in Jinja (as the reschedule rows):
    the per-cell template work was most of the index's build time."""
    status, tier = pl.col("risk_status"), pl.col("risk_tier")
    inactive = (
        pl.when(pl.col("is_active") == False)  # noqa: E712 (null: not known to be inactive)
        .then(pl.lit(" <em>inactive</em>"))
        .otherwise(pl.lit(""))
    )
    cells = [
        *(_text(c) for c in (status, pl.col("slug"), pl.col("display_name"))),
        inactive,
        *(_text(pl.col(c)) for c in ("tutor_id", "rank", "risk_status")),
        _text(status.str.replace_all("_", " ")),  # as status_label
        *(_text(pl.col(c)) for c in ("tier_rank", "risk_tier")),
        _text(tier.str.replace_all("_", " ")),
    ]
    for i in range(len(WINDOWS_DAYS)):
        cells += [_window(i, f) for f in ("rate_v", "rate", "moved", "sessions")]
    cells += [
        _text(pl.col(c))
        for c in ("change_v", "change_text", "total_sessions_30d", "total_sessions_30d")
    ]
    cells += [_window(1, f) for f in ("no_show_rate_v", "no_show_rate", "no_shows", "sessions")]
    return pl.format(INDEX_ROW, *cells)


def _chart_ticks(chart: Chart = CHART) -> pl.Expr:
    """Each tutor chart's axis labels as SVG: the rate's on the left, the sessions' (when the
    tutor has any) on the right, bottom to top."""
    ticks = []
    for i, y in enumerate(TICK_YS):
        rate = f'  <text class="axis" x="{chart.left - 6}" y="{y}" text-anchor="end">{{}}</text>\n'
        sessions = f'<text class="axis" x="{chart.width - chart.right + 6}" y="{y}">{{}}</text>'
        ticks += [
            pl.format(rate, html_escape(pl.col("rate_ticks").list.get(i))),
            pl.when(pl.col("sessions_max") != 0)
            .then(pl.format(sessions, html_escape(pl.col("session_ticks").list.get(i))))
            .otherwise(pl.lit("")),
        ]
    return pl.concat_str(ticks)


def _score_rows() -> pl.Expr:
    """Each tutor page's rows of the table of windows as HTML, one line per window."""
    rows = [
        pl.format(
            SCORE_ROW,
            _window(i, "days"),
            _window(i, "sessions"),
            _window(i, "moved"),
            pl.when(pl.col("windows").list.get(i).struct.field("over"))
            .then(pl.lit(" over"))
            .otherwise(pl.lit("")),
            *(_window(i, f) for f in ("rate", "lower95", "no_shows", "no_show_rate")),
        )
        for i in range(len(WINDOWS_DAYS))
    ]
    return pl.concat_str(rows, separator="\n")


class _Row(dict[str, Any]):
    """A tutor's row whose fields templates read as attributes (Jinja tries an attribute before
    an item: on a plain dict, every field read raised and caught an AttributeError first)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _row(fields: dict[str, Any]) -> _Row:
    """``fields`` as a template row (its drivers too)."""
    row = _Row(fields)
    if fields.get("drivers"):
        row["drivers"] = [_Row(d) for d in fields["drivers"]]
    return row


def _flagged_first(tutors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``watch`` and ``high`` tutors in the order to act on them: newly flagged first,
    then the most recent warnings, ``high`` before ``watch``, then the most probable."""
    flagged = [t for t in tutors if t["risk_tier"] in FLAGGED_TIERS]
    return sorted(
        flagged,
        key=lambda t: (
            not t["newly_flagged"],
            -t["watch_since"].timestamp(),
            TIER_ORDER[t["risk_tier"]],
            -(t["risk_probability"] or 0.0),
            t["tutor_id"],
        ),
    )


def _driver_lists(drivers: pl.DataFrame) -> pl.DataFrame:
    """Per tutor, the driver rows as a list (``drivers``) for the tutor page's table."""
    if drivers.is_empty():
        return pl.DataFrame(schema={"tutor_id": pl.String(), "drivers": pl.List(pl.Null())})
    return drivers.group_by("tutor_id", maintain_order=True).agg(
        pl.struct(
            "driver",
            "description",
            _pct_text(pl.col("tutor_value")).alias("tutor_value"),
            _pct_text(pl.col("population_value")).alias("population_value"),
            pl.format("{}x", pl.col("lift").round(1)).fill_null(pl.lit(DASH)).alias("lift"),
        ).alias("drivers")
    )


def _pct_text(value: pl.Expr) -> pl.Expr:
    """A fraction as a percentage with one decimal ("12.5%"), a dash when null."""
    percent = (value * 100).round(1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return pl.format("{}%", percent).fill_null(pl.lit(DASH))


def _change_text(column: str) -> pl.Expr:
    points = (pl.col(column) * 100).round(1) + 0.0
    sign = pl.when(points >= 0).then(pl.lit("+")).otherwise(pl.lit(""))
    return pl.format("{}{} pts", sign, points).fill_null(pl.lit(DASH))


def _window_cells(w: int) -> pl.Expr:
    """Everything the pages show of one window, as text (``*_v``: the raw value to sort by)."""
    rate, no_show = pl.col(f"reschedule_rate_{w}d"), pl.col(f"no_show_rate_{w}d")
    return pl.struct(
        pl.lit(w).alias("days"),
        pl.col(f"total_sessions_{w}d").alias("sessions"),
        pl.col(f"tutor_reschedules_{w}d").alias("moved"),
        pl.col(f"no_shows_{w}d").alias("no_shows"),
        _pct_text(rate).alias("rate"),
        rate.cast(pl.String).fill_null("").alias("rate_v"),
        _pct_text(pl.col(f"reschedule_rate_{w}d_lower95")).alias("lower95"),
        _pct_text(no_show).alias("no_show_rate"),
        no_show.cast(pl.String).fill_null("").alias("no_show_rate_v"),
        (rate > pl.col("risk_threshold")).fill_null(False).alias("over"),
    )


def _rule(scores: pl.DataFrame) -> dict[str, Any]:
    """The risk rule the snapshot was judged by (every row keeps it; they agree)."""
    if scores.height == 0:
        return {"threshold": None, "min_sessions": None}
    return {
        "threshold": scores.get_column("risk_threshold").max(),
        "min_sessions": scores.get_column("min_sessions").max(),
    }
