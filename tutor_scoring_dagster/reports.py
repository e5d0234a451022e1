"""Serving store -> email: render reports with Jinja2 and deliver each exactly once.

Templates live in ``reports/`` and share ``base.html.j2``; HTML is autoescaped, its CSS
inlined for mail clients, and every message has a plain-text alternative.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final

import css_inline
import duckdb
import jinja2
from sqlalchemy.engine import Engine

from tutor_scoring_dagster.delivery import (
    DeliveryError,
    EmailSender,
    OutgoingEmail,
    send_with_retries,
)
from tutor_scoring_dagster.paths import REPORTS_DIR, load_sql
from tutor_scoring_dagster.scoring import RiskRule, as_utc
from tutor_scoring_dagster.store import ledger
from tutor_scoring_dagster.store.reads import current_scores, newest_session_time
from tutor_scoring_dagster.warehouse import query_frame

log = logging.getLogger(__name__)

DIGEST: Final = "digest"


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


@dataclass
class DeliveryOutcome:
    """What happened to each report handed to :func:`deliver`."""

    sent: list[str] = field(default_factory=list)
    already_sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@cache
def template_env() -> jinja2.Environment:
    """The Jinja2 environment over ``reports/`` (HTML autoescaped, undefined names fail)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPORTS_DIR),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """Render ``reports/<template>`` with ``context``."""
    return template_env().get_template(template).render(**context)


def inline_css(html: str) -> str:
    """Move the ``<style>`` rules onto the elements, as mail clients need."""
    return css_inline.inline(html)


def read_data_quality(con: duckdb.DuckDBPyConnection, since: datetime | None) -> DataQuality:
    """Files loaded and quarantined, and rows rejected, since ``since`` (None: ever)."""
    params = {"since": since or datetime(1970, 1, 1, tzinfo=UTC)}
    loaded = query_frame(con, load_sql("loaded_files_since_select"), params)
    quarantined = query_frame(con, load_sql("quarantined_files_since_select"), params)
    return DataQuality(
        files_loaded=loaded.height,
        files_quarantined=quarantined.height,
        rows_rejected=int(loaded.get_column("rows_rejected").sum() or 0),
        quarantined=quarantined.to_dicts(),
    )


def digest_key(as_of: datetime) -> str:
    """The idempotency key of the digest of the snapshot as of ``as_of``."""
    return f"{DIGEST}:{as_utc(as_of):%Y-%m-%dT%H:%MZ}"


def render_digest(
    scores: list[dict[str, Any]],
    *,
    as_of: datetime,
    rule: RiskRule,
    quality: DataQuality,
    newest_session: datetime | None,
) -> Report:
    """The digest of one snapshot: who is high risk, who changed, and data quality."""
    key = digest_key(as_of)
    high = [r for r in scores if r["is_high_risk"]]
    newly = [r for r in high if r["newly_high_risk"]]
    recovered = [r for r in scores if r["no_longer_high_risk"]]
    subject = f"Tutor risk digest {as_utc(as_of):%Y-%m-%d %H:%M} UTC: {len(high)} high risk"
    if newly:
        subject += f", {len(newly)} new"
    context = {
        "subject": subject,
        "title": "Tutor risk digest",
        "subtitle": f"Scores as of {as_utc(as_of):%Y-%m-%d %H:%M} UTC",
        "as_of": as_utc(as_of),
        "rule": rule,
        "idempotency_key": key,
        "summary": {
            "tutors": len(scores),
            "high_risk": len(high),
            "newest_session_time": newest_session,
        },
        "newly_high": newly,
        "recovered": recovered,
        "high_risk": high,
        "quality": quality,
    }
    return Report(
        kind=DIGEST,
        idempotency_key=key,
        subject=subject,
        html=inline_css(render("digest.html.j2", **context)),
        text=render("digest.txt.j2", **context),
        covers_as_of=as_utc(as_of),
        newest_session_time=newest_session,
    )


def due_digest(engine: Engine, con: duckdb.DuckDBPyConnection, rule: RiskRule) -> Report | None:
    """The digest of the store's current snapshot, unless it was sent already."""
    scores = current_scores(engine)
    if not scores:
        return None
    as_of = as_utc(scores[0]["as_of"])
    entry = ledger.get(engine, digest_key(as_of))
    if entry is not None and entry.status == "sent":
        return None
    previous = ledger.last_sent(engine, DIGEST)
    return render_digest(
        scores,
        as_of=as_of,
        rule=rule,
        quality=read_data_quality(con, previous and as_utc(previous)),
        newest_session=newest_session_time(engine, as_of),
    )


def deliver(
    engine: Engine,
    sender: EmailSender,
    reports: list[Report],
    *,
    sender_address: str,
    recipients: tuple[str, ...],
    attempts: int = 3,
) -> DeliveryOutcome:
    """Send each report at most once per idempotency key, recording every outcome."""
    outcome = DeliveryOutcome()
    for report in reports:
        entry = ledger.claim(
            engine,
            key=report.idempotency_key,
            kind=report.kind,
            subject=report.subject,
            recipients=recipients,
            covers_as_of=report.covers_as_of,
            newest_session_time=report.newest_session_time,
            now=datetime.now(UTC),
        )
        if entry.status == "sent":
            outcome.already_sent.append(report.idempotency_key)
            continue
        message = OutgoingEmail(
            idempotency_key=report.idempotency_key,
            subject=report.subject,
            sender=sender_address,
            recipients=recipients,
            html=report.html,
            text=report.text,
        )
        try:
            provider_id = send_with_retries(sender, message, attempts=attempts)
        except DeliveryError as exc:
            ledger.mark_failed(engine, report.idempotency_key, error=str(exc))
            outcome.failed[report.idempotency_key] = str(exc)
            log.error("could not send %s: %s", report.idempotency_key, exc)
            continue
        ledger.mark_sent(
            engine, report.idempotency_key, provider_message_id=provider_id, now=datetime.now(UTC)
        )
        outcome.sent.append(report.idempotency_key)
    return outcome
