"""The ledger of report emails (``email_reports``): what is due, sent, or failed, by key.

A message's idempotency key is recorded as ``pending`` before it is sent and as ``sent`` or
``failed`` after, so that no key is ever sent twice once its send was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tutor_scoring_dagster.store.tables import email_reports


@dataclass(frozen=True)
class LedgerEntry:
    """One report's row in the ledger."""

    idempotency_key: str
    status: str
    attempts: int
    error_message: str | None
    sent_at: datetime | None


def _entry(row: sa.Row[tuple[object, ...]] | None) -> LedgerEntry | None:
    if row is None:
        return None
    m = row._mapping
    return LedgerEntry(
        idempotency_key=m["idempotency_key"],
        status=m["status"],
        attempts=m["attempts"],
        error_message=m["error_message"],
        sent_at=m["sent_at"],
    )


def get(engine: Engine, key: str) -> LedgerEntry | None:
    """The ledger row of ``key``, if any."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(email_reports).where(email_reports.c.idempotency_key == key)
        ).first()
    return _entry(row)


def claim(
    engine: Engine,
    *,
    key: str,
    kind: str,
    subject: str,
    recipients: tuple[str, ...],
    covers_as_of: datetime | None,
    newest_session_time: datetime | None,
    now: datetime,
) -> LedgerEntry:
    """Record ``key`` as pending (once) and count an attempt, unless it was sent already."""
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(email_reports).where(email_reports.c.idempotency_key == key).with_for_update()
        ).first()
        if row is None:
            conn.execute(
                sa.insert(email_reports).values(
                    idempotency_key=key,
                    report_kind=kind,
                    subject=subject,
                    recipient_email=", ".join(recipients),
                    status="pending",
                    attempts=1,
                    covers_as_of=covers_as_of,
                    newest_session_time=newest_session_time,
                    created_at=now,
                )
            )
        elif row._mapping["status"] != "sent":
            conn.execute(
                sa.update(email_reports)
                .where(email_reports.c.idempotency_key == key)
                .values(status="pending", attempts=email_reports.c.attempts + 1)
            )
        row = conn.execute(
            sa.select(email_reports).where(email_reports.c.idempotency_key == key)
        ).first()
    entry = _entry(row)
    assert entry is not None
    return entry


def mark_sent(engine: Engine, key: str, *, provider_message_id: str, now: datetime) -> None:
    """Record that ``key`` was delivered."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where(email_reports.c.idempotency_key == key)
            .values(
                status="sent",
                sent_at=now,
                error_message=None,
                provider_message_id=provider_message_id,
            )
        )


def mark_failed(engine: Engine, key: str, *, error: str) -> None:
    """Record that sending ``key`` failed, and why."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where(email_reports.c.idempotency_key == key)
            .values(status="failed", error_message=error[:2000])
        )


def last_sent(engine: Engine, kind: str) -> datetime | None:
    """When the newest report of ``kind`` was sent."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.max(email_reports.c.sent_at)).where(
                (email_reports.c.report_kind == kind) & (email_reports.c.status == "sent")
            )
        ).scalar()
