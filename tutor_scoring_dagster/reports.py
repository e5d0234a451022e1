"""Serving store -> email: find the report work that is due, render it with Jinja2, and
deliver each message exactly once per idempotency key (DESIGN.md, "Reports and email").

Three kinds of report, each a template pair in ``reports/`` sharing ``base.html.j2``:

- the **digest**, at most one an hour (key ``digest:<hour of the snapshot>``), to
  ADMIN_EMAIL: what was processed and who changed risk since the last digest, the high-risk
  list, data quality;
- a **high-risk alert** per tutor that newly crosses the risk rule
  (``alert:<tutor>:<day it crossed>``), with the tutor's recent reschedules and trend;
- **session reports** (off by default): the sessions published since the last batch with their
  tutors' current scores, split in parts of about ``session_batch_size``
  (``sessions:<published up to>:<part>of<parts>``).

HTML is autoescaped and its CSS inlined for mail clients; every message has a plain-text
alternative. :func:`find_due_work` reads only the serving store (cheap enough for a sensor);
:func:`deliver_due` claims, renders, sends and records each due key (see ``store/ledger.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any, Final
from urllib.parse import quote, unquote

import css_inline
import duckdb
import jinja2
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tutor_scoring_dagster.assessment import flagged_since
from tutor_scoring_dagster.config import number, setting_default, yes_or_no
from tutor_scoring_dagster.delivery import (
    DeliveryError,
    EmailSender,
    OutgoingEmail,
    message_id_for,
    send_with_retries,
)
from tutor_scoring_dagster.paths import REPORTS_DIR, load_sql
from tutor_scoring_dagster.schemas import FLAGGED_TIERS, WINDOWS_DAYS
from tutor_scoring_dagster.scoring import RiskRule, as_utc, floor_to_hour, score_as_of
from tutor_scoring_dagster.store import ledger
from tutor_scoring_dagster.store import report_reads as rr
from tutor_scoring_dagster.store.reads import current_scores
from tutor_scoring_dagster.warehouse import query_frame

log = logging.getLogger(__name__)

DIGEST: Final = "digest"
ALERT: Final = "alert"
SESSIONS: Final = "sessions"
KINDS: Final = (ALERT, SESSIONS, DIGEST)
"""Report kinds in the order a run sends them: the digest last, after the alerts it sums up."""

DIGEST_RENDER_TRIES: Final = 3
"""Times a digest is rendered again when a publish of the same hour lands while it renders."""
ALERT_DEDUP: Final = timedelta(hours=24)
"""A tutor gets at most one alert per crossing the snapshot flags (its flag looks back a day)."""
FIRST_SESSION_BATCH: Final = timedelta(hours=24)
"""How far back the first session report reaches when session reports are switched on."""
TREND_DAYS_ALERT: Final = 56
TREND_DAYS_DIGEST: Final = 28
CHART_HEIGHT_PX: Final = 40
QUARANTINE_LISTED: Final = 20


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "")
    return yes_or_no(value, name) if value.strip() else default


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    value = env.get(name, "")
    if not value.strip():
        return default
    whole = number(value, name, int)
    if whole < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {whole}")
    return whole


def _default_bool(name: str) -> bool:
    return yes_or_no(setting_default(name), name)


@dataclass(frozen=True)
class ReportSettings:
    """What reports are sent, and how hard delivery tries (environment variables in
    :meth:`from_env`)."""

    # Defaults are config.SETTINGS's, the one table of settings (and of the README's).
    digest_when_nothing_new: bool = _default_bool("DIGEST_WHEN_NOTHING_NEW")
    """DIGEST_WHEN_NOTHING_NEW: send a digest for every new snapshot, even with no news."""
    tutor_alerts: bool = _default_bool("TUTOR_ALERTS")
    """TUTOR_ALERTS: an alert per tutor who newly crosses the risk rule."""
    per_session_reports: bool = _default_bool("PER_SESSION_REPORTS")
    """PER_SESSION_REPORTS: batched reports of every session processed (the old system's)."""
    session_batch_size: int = int(setting_default("SESSION_REPORT_BATCH_SIZE"))
    """SESSION_REPORT_BATCH_SIZE: sessions per session-report message, about."""
    digest_max_rows: int = int(setting_default("DIGEST_MAX_ROWS"))
    """DIGEST_MAX_ROWS: tutors listed per digest section (the rest are counted)."""
    max_attempts: int = int(setting_default("EMAIL_MAX_ATTEMPTS"))
    """EMAIL_MAX_ATTEMPTS: claims of one key (each up to 3 sends) before giving up."""
    pending_lease: timedelta = timedelta(
        minutes=int(setting_default("EMAIL_PENDING_LEASE_MINUTES"))
    )
    """EMAIL_PENDING_LEASE_MINUTES: a claim older than this, never recorded, is an unknown
    outcome and is resent (same key; same Message-ID over SMTP and in the outbox)."""
    latency_target: timedelta = timedelta(
        minutes=int(setting_default("REPORT_LATENCY_TARGET_MINUTES"))
    )
    """REPORT_LATENCY_TARGET_MINUTES: p95 from session time to delivery the check allows."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReportSettings:
        """Settings from ``environ`` (default: the process environment); unset means default."""
        env = os.environ if environ is None else environ
        d = cls()
        return cls(
            digest_when_nothing_new=_env_bool(
                env, "DIGEST_WHEN_NOTHING_NEW", d.digest_when_nothing_new
            ),
            tutor_alerts=_env_bool(env, "TUTOR_ALERTS", d.tutor_alerts),
            per_session_reports=_env_bool(env, "PER_SESSION_REPORTS", d.per_session_reports),
            session_batch_size=_env_int(env, "SESSION_REPORT_BATCH_SIZE", d.session_batch_size, 1),
            digest_max_rows=_env_int(env, "DIGEST_MAX_ROWS", d.digest_max_rows, 1),
            max_attempts=_env_int(env, "EMAIL_MAX_ATTEMPTS", d.max_attempts, 1),
            pending_lease=timedelta(
                minutes=_env_int(
                    env, "EMAIL_PENDING_LEASE_MINUTES", int(d.pending_lease.seconds // 60), 1
                )
            ),
            latency_target=timedelta(
                minutes=_env_int(
                    env,
                    "REPORT_LATENCY_TARGET_MINUTES",
                    int(d.latency_target.total_seconds() // 60),
                    1,
                )
            ),
        )


# Keys


def digest_key(as_of: datetime) -> str:
    """The idempotency key of the digest that a snapshot as of ``as_of`` may carry: the hour
    the snapshot falls in. Landing runs publish a snapshot per drop (alerts go with any of
    them), but the digest stays hourly: one key, so at most one message, per hour."""
    return f"{DIGEST}:{floor_to_hour(as_of):%Y-%m-%dT%H:%MZ}"


def history_last_day(as_of: datetime) -> date:
    """The newest day the daily score history can hold at ``as_of`` (day D is as of the end of
    D)."""
    return as_utc(as_of).date() - timedelta(days=1)


def crossing_day(as_of: datetime) -> date:
    """The day whose data a snapshot as of ``as_of`` closes (midnight belongs to the day
    before, as for daily partitions)."""
    return (as_utc(as_of) - timedelta(microseconds=1)).date()


def alert_key(tutor_id: str, day: date) -> str:
    """The idempotency key of the alert that ``tutor_id`` crossed the risk rule on ``day``."""
    return f"{ALERT}:{quote(tutor_id, safe='')}:{day.isoformat()}"


def session_batch_key(upto: datetime, part: int, parts: int) -> str:
    """The key of part ``part`` of ``parts`` of the sessions published up to ``upto``."""
    return f"{SESSIONS}:{as_utc(upto):%Y-%m-%dT%H:%M:%S.%fZ}:{part}of{parts}"


@dataclass(frozen=True)
class ParsedKey:
    """What an idempotency key names."""

    kind: str
    tutor_id: str | None = None
    day: date | None = None
    upto: datetime | None = None
    part: int = 1
    parts: int = 1


_SESSION_KEY = re.compile(r"^sessions:(?P<upto>[0-9T:.\-]+)Z:(?P<part>\d+)of(?P<parts>\d+)$")


def parse_key(key: str) -> ParsedKey:
    """Split an idempotency key made by this module; raises ValueError for any other."""
    kind, _, rest = key.partition(":")
    if kind == DIGEST and rest:
        return ParsedKey(DIGEST)
    if kind == ALERT and rest.count(":") == 1:
        tutor, _, day = rest.partition(":")
        return ParsedKey(ALERT, tutor_id=unquote(tutor), day=date.fromisoformat(day))
    if (m := _SESSION_KEY.match(key)) is not None:
        part, parts = int(m["part"]), int(m["parts"])
        if 1 <= part <= parts:
            upto = datetime.fromisoformat(m["upto"]).replace(tzinfo=UTC)
            return ParsedKey(SESSIONS, upto=upto, part=part, parts=parts)
    raise ValueError(f"not a report key: {key!r}")


def batch_part(session_id: str, parts: int) -> int:
    """Which part (1-based) of a session batch a session belongs to: fixed by its id, so a
    retry renders the same part again."""
    return zlib.crc32(session_id.encode("utf-8")) % parts + 1


# Due work


@dataclass(frozen=True)
class DueReport:
    """One message that should be sent now."""

    key: str
    kind: str
    attempt: int
    """The attempt this would be (1: first); part of the sensor's run key, so a retry is new
    work while the same attempt is never launched twice."""
    covers_as_of: datetime | None


@dataclass
class DueWork:
    """Everything a report run should do now."""

    as_of: datetime | None
    reports: list[DueReport] = field(default_factory=list)
    superseded: dict[str, str] = field(default_factory=dict)
    """Unsent key -> the key whose report covers it instead (closed without sending)."""

    @property
    def keys(self) -> list[str]:
        """The due keys, in sending order."""
        return [r.key for r in self.reports]

    def __bool__(self) -> bool:
        return bool(self.reports or self.superseded)

    def only(self, keys: Iterable[str]) -> DueWork:
        """This work restricted to ``keys`` (what a sensor asked a run to do)."""
        wanted = set(keys)
        return DueWork(
            as_of=self.as_of,
            reports=[r for r in self.reports if r.key in wanted],
            superseded={k: v for k, v in self.superseded.items() if k in wanted},
        )

    def run_key(self, now: datetime) -> str:
        """A run key naming this work: the due keys with their attempt numbers, plus the hour,
        so the same work is launched at most once an hour (again only if a run died before
        claiming it)."""
        items = [f"{r.key}#{r.attempt}" for r in self.reports]
        items += [f"{k}>{v}" for k, v in sorted(self.superseded.items())]
        text = ",".join(items)
        if len(text) > 400:
            text = f"{len(items)} items sha256:{hashlib.sha256(text.encode()).hexdigest()[:24]}"
        return f"{as_utc(now):%Y-%m-%dT%HZ} {text}"


IngestNews = Callable[[datetime | None], bool]
"""Whether ingest quarantined files or rejected rows since an instant (None: ever)."""


def find_due_work(
    engine: Engine,
    *,
    now: datetime,
    settings: ReportSettings,
    ingest_news: IngestNews | None = None,
) -> DueWork:
    """What reports are due now: retries and stale claims, alerts for tutors who newly crossed
    the rule, session batches (if on), and the digest of a new snapshot when it has news.

    Reads only the serving store's ledger and current snapshot, so a sensor can call it.
    """
    as_of = rr.snapshot_as_of(engine)
    work = DueWork(as_of=as_of)
    due: dict[str, DueReport] = {}
    current_digest = digest_key(as_of) if as_of is not None else None

    for entry in ledger.retry_candidates(engine, now):
        if entry.report_kind == DIGEST and entry.idempotency_key != current_digest:
            # Digests describe the current snapshot; the next one says what this one would.
            work.superseded[entry.idempotency_key] = current_digest or "the next digest"
            continue
        due[entry.idempotency_key] = DueReport(
            entry.idempotency_key, entry.report_kind, entry.attempts + 1, entry.covers_as_of
        )

    if as_of is not None and settings.tutor_alerts:
        flagged = rr.newly_high_risk_tutors(engine)
        if flagged:
            recent = ledger.keys_covering_since(engine, ALERT, as_of - ALERT_DEDUP)
            alerted = {_alerted_tutor(k) for k in recent}
            day = crossing_day(as_of)
            for tutor_id in flagged:
                key = alert_key(tutor_id, day)
                if tutor_id not in alerted and key not in due:
                    due[key] = DueReport(key, ALERT, 1, as_of)

    if as_of is not None and settings.per_session_reports:
        upto = rr.newest_session_update(engine)
        after = ledger.newest_covered(engine, SESSIONS)
        if upto is not None:
            after = after or upto - FIRST_SESSION_BATCH
            count = rr.count_sessions_updated(engine, after, upto) if upto > after else 0
            parts = math.ceil(count / settings.session_batch_size)
            for part in range(1, parts + 1):
                key = session_batch_key(upto, part, parts)
                due.setdefault(key, DueReport(key, SESSIONS, 1, upto))

    if current_digest is not None and as_of is not None and current_digest not in due:
        newest = ledger.newest_covered(engine, DIGEST)
        if (newest is None or newest < as_of) and ledger.get(engine, current_digest) is None:
            previous = ledger.last_sent(engine, DIGEST)
            since = previous.created_at if previous else None
            if settings.digest_when_nothing_new or _digest_has_news(
                engine, since, due, ingest_news
            ):
                due[current_digest] = DueReport(current_digest, DIGEST, 1, as_of)

    work.reports = sorted(due.values(), key=lambda r: (KINDS.index(r.kind), r.key))
    return work


def _alerted_tutor(key: str) -> str | None:
    try:
        return parse_key(key).tutor_id
    except ValueError:  # a key this code did not make: it names no tutor
        return None


def _digest_has_news(
    engine: Engine,
    since: datetime | None,
    due: Mapping[str, DueReport],
    ingest_news: IngestNews | None,
) -> bool:
    if any(r.kind == ALERT for r in due.values()):
        return True
    if ledger.count_created_since(engine, ALERT, since):
        return True
    upto = rr.newest_update(engine)
    if upto is not None and (since is None or upto > since):
        return True
    return ingest_news is not None and ingest_news(since)


# Rendering


@dataclass(frozen=True)
class DataQuality:
    """What ingest did since a point in time, for the digest's data-quality notes."""

    files_loaded: int = 0
    files_quarantined: int = 0
    rows_rejected: int = 0
    quarantined: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """A rendered report, ready to send."""

    kind: str
    idempotency_key: str
    subject: str
    html: str
    text: str
    covers_as_of: datetime | None
    newest_session_time: datetime | None


@dataclass(frozen=True)
class ReportConfig:
    """How reports are configured, for their footers and addressing."""

    rule: RiskRule
    settings: ReportSettings
    backend: str
    sender_address: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class TrendBar:
    """One bar of a trend chart."""

    label: str
    value: float | None
    height: int
    above: bool


@dataclass(frozen=True)
class Trend:
    """A tutor's 30-day reschedule rate per day, ending with the current snapshot."""

    bars: list[TrendBar]
    scale_max: float
    weekly: list[tuple[str, float | None]]
    days_with_history: int


def build_trend(
    history: Mapping[date, float | None],
    *,
    last_day: date,
    days: int,
    current: float | None,
    threshold: float,
    height: int = CHART_HEIGHT_PX,
) -> Trend:
    """The chart data of ``days`` daily values up to ``last_day`` plus the current value."""
    day_list = [last_day - timedelta(days=i) for i in range(days - 1, -1, -1)]
    points: list[tuple[str, float | None]] = [(d.isoformat(), history.get(d)) for d in day_list]
    points.append(("now", current))
    known = [v for _, v in points if v is not None]
    # Round the scale up to a tenth, and never below the threshold, so bars compare.
    scale = max(0.1, math.ceil(max([threshold, *known]) * 10) / 10)
    bars = [
        TrendBar(
            label=label,
            value=value,
            height=0 if value is None else max(1, round(value / scale * height)),
            above=value is not None and value > threshold,
        )
        for label, value in points
    ]
    # One value a week, ending with the last day, then the current value.
    weekly = [*[points[i] for i in range(len(points) - 2, -1, -7)][::-1], points[-1]]
    return Trend(
        bars=bars,
        scale_max=scale,
        weekly=weekly,
        days_with_history=sum(1 for d in day_list if history.get(d) is not None),
    )


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return "-" if value is None else f"{as_utc(value):{fmt}} UTC"


def _hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} h" if abs(value) >= 10 else f"{value:.1f} h"


def bar_segments(value: float | None, threshold: float, width: int = 100) -> list[tuple[int, str]]:
    """A rate as a horizontal bar of table cells, ``(width px, colour)`` from the left, with a
    dark 2 px mark where the threshold is."""
    filled = min(width, round((value or 0) * width))
    mark = min(width - 2, round(threshold * width))
    fill = "#c0392b" if (value or 0) > threshold else "#4a7ab5"
    track = "#e4e7eb"
    cuts = [
        (0, min(filled, mark), fill),
        (min(filled, mark), mark, track),
        (mark, mark + 2, "#1f2933"),
        (mark + 2, max(filled, mark + 2), fill),
        (max(filled, mark + 2), width, track),
    ]
    return [(end - start, colour) for start, end, colour in cuts if end > start]


@cache
def template_env() -> jinja2.Environment:
    """The Jinja2 environment over ``reports/`` (HTML autoescaped, undefined names fail)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPORTS_DIR),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=_pct, when=_when, hours=_hours, bar_segments=bar_segments, flagged_since=flagged_since
    )
    return env


def render(template: str, **context: Any) -> str:
    """Render ``reports/<template>`` with ``context``."""
    return template_env().get_template(template).render(**context)


def inline_css(html: str) -> str:
    """Move the ``<style>`` rules onto the elements, as mail clients need."""
    return css_inline.inline(html)


def _one_line(text: str, limit: int = 300) -> str:
    # Subjects are headers: names with line breaks must not break them.
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _render_pair(name: str, context: dict[str, Any]) -> tuple[str, str]:
    return inline_css(render(f"{name}.html.j2", **context)), render(f"{name}.txt.j2", **context)


def _common(config: ReportConfig, key: str, subject: str) -> dict[str, Any]:
    return {
        "subject": subject,
        "rule": config.rule,
        "settings": config.settings,
        "backend": config.backend,
        "recipients": config.recipients,
        "idempotency_key": key,
    }


def read_data_quality(con: duckdb.DuckDBPyConnection, since: datetime | None) -> DataQuality:
    """Files loaded and quarantined, and rows rejected, since ``since`` (None: ever)."""
    params: dict[str, object] = {"since": since or datetime(1970, 1, 1, tzinfo=UTC)}
    loaded = query_frame(con, load_sql("loaded_files_since_select"), params)
    quarantined = query_frame(con, load_sql("quarantined_files_since_select"), params)
    return DataQuality(
        files_loaded=loaded.height,
        files_quarantined=quarantined.height,
        rows_rejected=int(loaded.get_column("rows_rejected").sum() or 0),
        quarantined=quarantined.to_dicts(),
    )


def high_risk_as_of(con: duckdb.DuckDBPyConnection, as_of: datetime, rule: RiskRule) -> set[str]:
    """Tutors who were high risk as of ``as_of``, scored again from the warehouse."""
    scores = score_as_of(con, as_of, rule)
    return set(scores.filter(scores.get_column("is_high_risk")).get_column("tutor_id").to_list())


def trigger_lines(row: Mapping[str, Any]) -> list[str]:
    """Which windows put a tutor over the rule it was judged by, in words."""
    lines = []
    for w in WINDOWS_DAYS:
        n, k = row[f"total_sessions_{w}d"], row[f"tutor_reschedules_{w}d"]
        if n >= row["min_sessions"] and k > row["risk_threshold"] * n:
            lines.append(
                f"{w}-day window: {k} of {n} sessions rescheduled by the tutor "
                f"({_pct(k / n)}, at least {_pct(row[f'reschedule_rate_{w}d_lower95'])} "
                "with 95% confidence)"
            )
    return lines


def _trends(
    engine: Engine,
    rows: Sequence[Mapping[str, Any]],
    *,
    last_day: date,
    days: int,
    threshold: float,
) -> dict[str, Trend]:
    ids = [r["tutor_id"] for r in rows]
    history = rr.score_history(
        engine, ids, first_day=last_day - timedelta(days=days - 1), last_day=last_day
    )
    return {
        r["tutor_id"]: build_trend(
            history.get(r["tutor_id"], {}),
            last_day=last_day,
            days=days,
            current=r["reschedule_rate_30d"],
            threshold=threshold,
        )
        for r in rows
    }


class SnapshotMoved(Exception):
    """The store's snapshot is no longer the one a digest was asked for."""


def flagged_first(scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``watch`` and ``high`` tutors of a snapshot, in the order to act on them: newly
    flagged first, then the most recent warnings, ``high`` before ``watch``, then the most
    probable."""
    flagged = [r for r in scores if r.get("risk_tier") in FLAGGED_TIERS]
    return sorted(
        flagged,
        key=lambda r: (
            not r["newly_flagged"],
            -(as_utc(r["watch_since"]).timestamp() if r["watch_since"] else 0.0),
            FLAGGED_TIERS.index(r["risk_tier"]),
            -(r["risk_probability"] or 0.0),
            r["tutor_id"],
        ),
    )


def render_digest(
    engine: Engine,
    con: duckdb.DuckDBPyConnection | None,
    *,
    as_of: datetime,
    config: ReportConfig,
    previous: ledger.LedgerEntry | None,
) -> Report:
    """The digest of the current snapshot (as of ``as_of``), relative to ``previous``, the
    last digest sent: what was processed since, who became high risk or recovered since, the
    high-risk list, and data-quality notes."""
    key = digest_key(as_of)
    since = previous.created_at if previous else None
    scores = [dict(r) for r in current_scores(engine)]
    for r in scores:
        r["as_of"] = as_utc(r["as_of"])
    if any(r["as_of"] != as_utc(as_of) for r in scores):
        # A publish landed since the work was found: this key would name the wrong snapshot.
        raise SnapshotMoved(f"{ledger.SUPERSEDED}: the store moved on from {key}")
    high = [r for r in scores if r["is_high_risk"]]
    if previous is not None and previous.covers_as_of is not None and con is not None:
        before = high_risk_as_of(con, previous.covers_as_of, config.rule)
        newly = [r for r in high if r["tutor_id"] not in before]
        recovered = [r for r in scores if not r["is_high_risk"] and r["tutor_id"] in before]
        change_basis = f"since the last digest (scores as of {_when(previous.covers_as_of)})"
    else:
        newly = [r for r in high if r["newly_high_risk"]]
        recovered = [r for r in scores if r["no_longer_high_risk"]]
        change_basis = "in the 24 hours before this snapshot (first digest)"
    flagged = flagged_first(scores)
    limit = config.settings.digest_max_rows
    shown = {"newly": newly[:limit], "recovered": recovered[:limit], "high": high[:limit]}
    trends = _trends(
        engine,
        [*shown["newly"], *shown["recovered"], *shown["high"]],
        last_day=history_last_day(as_of),
        days=TREND_DAYS_DIGEST,
        threshold=config.rule.threshold,
    )
    processed = rr.processed_since(engine, since)
    quality = read_data_quality(con, since) if con is not None else None
    newest = rr.newest_session_before(engine, as_of)
    subject = f"Tutor risk digest {as_utc(as_of):%Y-%m-%d %H:%M} UTC: {len(high)} high risk"
    if newly:
        subject += f", {len(newly)} new"
    if recovered:
        subject += f", {len(recovered)} recovered"
    context = {
        **_common(config, key, subject),
        "title": "Tutor risk digest",
        "subtitle": f"Scores as of {as_utc(as_of):%Y-%m-%d %H:%M} UTC",
        "as_of": as_utc(as_of),
        "since": since,
        "change_basis": change_basis,
        "summary": {
            "tutors": len(scores),
            "high_risk": len(high),
            "flagged": len(flagged),
            "newest_session_time": newest,
        },
        "flagged": flagged[:limit],
        "flagged_more": max(0, len(flagged) - limit),
        "processed": processed,
        "newly_high": shown["newly"],
        "newly_more": len(newly) - len(shown["newly"]),
        "recovered": shown["recovered"],
        "recovered_more": len(recovered) - len(shown["recovered"]),
        "high_risk": shown["high"],
        "high_more": len(high) - len(shown["high"]),
        "trends": trends,
        "quality": quality,
        "quarantine_listed": QUARANTINE_LISTED,
    }
    html, text = _render_pair("digest", context)
    return Report(DIGEST, key, _one_line(subject), html, text, as_utc(as_of), newest)


def render_alert(
    engine: Engine,
    *,
    key: str,
    tutor_id: str,
    day: date,
    as_of: datetime,
    config: ReportConfig,
) -> Report | None:
    """The alert that ``tutor_id`` crossed the risk rule on ``day``, with the current
    snapshot's scores, the last weeks' trend and the recent reschedules (None: the tutor is
    no longer in the snapshot)."""
    row = rr.tutor_scores_of(engine, [tutor_id]).get(tutor_id)
    if row is None:
        return None
    name = row["name"] or tutor_id
    trend = _trends(
        engine,
        [row],
        last_day=history_last_day(as_of),
        days=TREND_DAYS_ALERT,
        threshold=config.rule.threshold,
    )[tutor_id]
    moves = rr.recent_reschedules(
        engine, tutor_id, since=as_of - timedelta(days=30), before=as_of, limit=25
    )
    triggers = trigger_lines(row)
    tutor_moves = [m for m in moves if m["initiator"] == "tutor"]
    late = [
        m
        for m in tutor_moves
        if m["hours_before_session"] is not None and m["hours_before_session"] < 24
    ]
    worst = max(
        (w for w in WINDOWS_DAYS if row[f"reschedule_rate_{w}d"] is not None),
        key=lambda w: (row[f"reschedule_rate_{w}d"], -w),
        default=30,
    )
    # One decimal: 2/13 is 15.4%, which rounded to 15% would read as at the threshold.
    subject = (
        f"High-risk tutor: {name} ({tutor_id}), {worst}-day reschedule rate "
        f"{_pct(row[f'reschedule_rate_{worst}d'], 1)} "
        f"({row[f'tutor_reschedules_{worst}d']}/{row[f'total_sessions_{worst}d']})"
    )
    context = {
        **_common(config, key, subject),
        "title": "Tutor newly high risk",
        "subtitle": f"{name} ({tutor_id}) crossed the risk rule on {day.isoformat()}",
        "as_of": as_utc(as_of),
        "day": day,
        "tutor": row,
        "name": name,
        "triggers": triggers,
        "still_high": bool(row["is_high_risk"]),
        "trend": trend,
        "trend_days": TREND_DAYS_ALERT,
        "reschedules": moves,
        "tutor_moves": len(tutor_moves),
        "late_tutor_moves": len(late),
    }
    html, text = _render_pair("alert", context)
    newest = rr.newest_session_before(engine, as_of)
    return Report(ALERT, key, _one_line(subject), html, text, as_utc(as_of), newest)


def render_session_batch(
    engine: Engine,
    *,
    key: str,
    after: datetime,
    upto: datetime,
    part: int,
    parts: int,
    config: ReportConfig,
) -> Report | None:
    """Part ``part`` of ``parts`` of the sessions published in ``(after, upto]``, each with
    its reschedules and its tutor's current scores (None: no session left in this part)."""
    sessions = [
        s
        for s in rr.sessions_updated(engine, after, upto)
        if batch_part(s["session_id"], parts) == part
    ]
    if not sessions:
        return None
    tutors = rr.tutor_scores_of(engine, {s["tutor_id"] for s in sessions})
    tutor_rows = sorted(
        tutors.values(), key=lambda r: (not r["is_high_risk"], r["name"] or "", r["tutor_id"])
    )
    newest = max(s["scheduled_time"] for s in sessions)
    subject = (
        f"Session report: {len(sessions)} sessions processed up to "
        f"{as_utc(upto):%Y-%m-%d %H:%M} UTC" + (f" (part {part} of {parts})" if parts > 1 else "")
    )
    context = {
        **_common(config, key, subject),
        "title": "Session report",
        "subtitle": f"Sessions processed {_when(after)} to {_when(upto)}"
        + (f", part {part} of {parts}" if parts > 1 else ""),
        "sessions": sessions,
        "tutors": tutor_rows,
        "tutor_by_id": tutors,
    }
    html, text = _render_pair("sessions", context)
    return Report(SESSIONS, key, _one_line(subject), html, text, as_utc(upto), newest)


# Delivery


@dataclass
class DeliveryOutcome:
    """What happened to each due key handed to :func:`deliver_due`."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Keys another run holds, already sent, or not due after all."""
    failed: dict[str, str] = field(default_factory=dict)
    closed: dict[str, str] = field(default_factory=dict)
    """Keys closed without sending (superseded, or nothing left to report), and why."""
    resent_unknown: list[str] = field(default_factory=list)
    """Keys resent after an attempt with an unknown outcome (possible duplicates)."""


class _Gone(Exception):
    """The report has nothing left to say; close its key without sending."""


def _render_due(
    engine: Engine,
    due: DueReport,
    *,
    config: ReportConfig,
    as_of: datetime | None,
    warehouse: Callable[[], duckdb.DuckDBPyConnection | None],
) -> Report:
    parsed = parse_key(due.key)
    if parsed.kind == DIGEST:
        # The hour's digest describes whichever snapshot of that hour the store holds when it
        # renders: a landing run may publish a newer one between finding and rendering.
        for _ in range(DIGEST_RENDER_TRIES):
            if as_of is None or due.key != digest_key(as_of):
                raise _Gone(f"{ledger.SUPERSEDED} by {digest_key(as_of) if as_of else 'none'}")
            try:
                return render_digest(
                    engine,
                    warehouse(),
                    as_of=as_of,
                    config=config,
                    previous=ledger.last_sent(engine, DIGEST),
                )
            except SnapshotMoved:
                as_of = rr.snapshot_as_of(engine)
        # Still moving: fail this attempt, so the sensor retries it (within the hour) later.
        raise SnapshotMoved(f"the snapshot kept moving while {due.key} rendered")
    if parsed.kind == ALERT:
        assert parsed.tutor_id is not None and parsed.day is not None
        if as_of is None:
            raise _Gone("no snapshot to report on")
        report = render_alert(
            engine,
            key=due.key,
            tutor_id=parsed.tutor_id,
            day=parsed.day,
            as_of=as_of,
            config=config,
        )
        if report is None:
            raise _Gone(f"tutor {parsed.tutor_id!r} is no longer in the snapshot")
        return report
    assert parsed.upto is not None
    previous = ledger.previous_covered(engine, SESSIONS, before=parsed.upto)
    batch = render_session_batch(
        engine,
        key=due.key,
        after=previous or parsed.upto - FIRST_SESSION_BATCH,
        upto=parsed.upto,
        part=parsed.part,
        parts=parsed.parts,
        config=config,
    )
    if batch is None:
        raise _Gone("no session left in this part (each was published again since)")
    return batch


def _record_sent(
    engine: Engine,
    claim: ledger.Claim,
    provider_id: str,
    now: Callable[[], datetime],
    sleep: Callable[[float], None],
) -> None:
    # The message is out: a store blip here must not turn it into an unknown outcome.
    for attempt in range(3):
        try:
            ledger.mark_sent(engine, claim, provider_message_id=provider_id, now=now())
            return
        except sa.exc.OperationalError:
            if attempt == 2:
                raise
            sleep(2.0**attempt)


def deliver_due(
    engine: Engine,
    sender: EmailSender,
    work: DueWork,
    *,
    config: ReportConfig,
    warehouse: Callable[[], duckdb.DuckDBPyConnection | None] = lambda: None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    send_attempts: int = 3,
    base_delay_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryOutcome:
    """Claim, render, send and record each due report; close superseded keys.

    A key is sent only by the run that claims it, and only when the ledger does not already
    record it as sent. A failure is recorded with its error and retried on a later tick
    (``ledger.retry_delay``) until ``config.settings.max_attempts``. ``warehouse`` opens the
    DuckDB connection a digest reads its data-quality notes from (None: none).
    """
    settings = config.settings
    outcome = DeliveryOutcome()
    for key, by in work.superseded.items():
        if ledger.supersede(engine, key, by=by, now=now()):
            outcome.closed[key] = f"{ledger.SUPERSEDED} by {by}"
    # Read once, before anything is claimed: a store without it fails the run, not each report.
    installation = ledger.installation_id(engine) if work.reports else ""
    for due in work.reports:
        message_id = message_id_for(due.key, installation)  # a bad id fails the run here
        claim = ledger.claim(
            engine,
            key=due.key,
            kind=due.kind,
            recipients=config.recipients,
            covers_as_of=due.covers_as_of,
            now=now(),
            lease=settings.pending_lease,
            max_attempts=settings.max_attempts,
            # Recorded only where it is the message's: SendGrid assigns its own.
            message_id=message_id if sender.sends_message_id else None,
        )
        if claim is None:
            outcome.skipped.append(due.key)
            continue
        try:
            report = _render_due(engine, due, config=config, as_of=work.as_of, warehouse=warehouse)
            message = OutgoingEmail(
                idempotency_key=report.idempotency_key,
                subject=report.subject,
                sender=config.sender_address,
                recipients=config.recipients,
                html=report.html,
                text=report.text,
                # The first attempt's, recorded with its claim: a resend keeps it.
                message_id=claim.entry.provider_message_id or message_id,
            )
        except _Gone as gone:
            ledger.close(engine, claim, reason=str(gone))
            outcome.closed[due.key] = str(gone)
            continue
        except Exception as exc:  # one broken report must not hold back the others
            error = f"could not render: {type(exc).__name__}: {exc}"
            ledger.mark_failed(
                engine, claim, error=error, now=now(), max_attempts=settings.max_attempts
            )
            outcome.failed[due.key] = error
            log.exception("could not render %s", due.key)
            continue
        ledger.describe(
            engine,
            due.key,
            subject=report.subject,
            newest_session_time=report.newest_session_time,
            covers_as_of=report.covers_as_of,
        )
        if claim.outcome_unknown:
            log.warning("%s: resending after an attempt with an unknown outcome", due.key)
            outcome.resent_unknown.append(due.key)
        try:
            provider_id = send_with_retries(
                sender, message, attempts=send_attempts, base_delay_s=base_delay_s, sleep=sleep
            )
        except DeliveryError as exc:
            entry = ledger.mark_failed(
                engine, claim, error=str(exc), now=now(), max_attempts=settings.max_attempts
            )
            outcome.failed[due.key] = entry.error_message or str(exc)
            log.error("could not send %s: %s", due.key, exc)
            continue
        _record_sent(engine, claim, provider_id, now, sleep)
        outcome.sent.append(due.key)
    return outcome


def report_config(
    rule: RiskRule,
    settings: ReportSettings,
    *,
    backend: str,
    sender_address: str,
    recipients: Sequence[str],
) -> ReportConfig:
    """A :class:`ReportConfig` (recipients as a tuple)."""
    return ReportConfig(
        rule=rule,
        settings=settings,
        backend=backend,
        sender_address=sender_address,
        recipients=tuple(recipients),
    )
