"""The ledger of report emails (``email_reports``): one row per idempotency key.

A row moves ``pending`` (claimed; a send is in flight) -> ``sent`` or ``failed``. What
``next_attempt_at`` means depends on the status:

- ``pending``: when the claim expires. A pending row past it was claimed by a run that died
  (or lost the store) between claiming and recording the outcome: its outcome is unknown.
- ``failed``: when the next attempt is due (exponential backoff); NULL when nobody will try
  again (gave up after the maximum attempts, or superseded), which ``error_message`` says.
- ``sent``: NULL.

``attempts`` counts claims: each claim is one run's try, itself up to a few sends with
backoff (``delivery.send_with_retries``). A claim is a compare-and-set on the row, so two runs
never send the same key at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.store.report_reads import utc
from tutor_scoring_dagster.store.tables import email_reports, installation

PENDING: Final = "pending"
SENT: Final = "sent"
FAILED: Final = "failed"

GAVE_UP: Final = "gave up"
SUPERSEDED: Final = "superseded"
UNKNOWN_OUTCOME: Final = "outcome unknown"

DEFAULT_MAX_ATTEMPTS: Final = 8
DEFAULT_LEASE: Final = timedelta(minutes=10)
RETRY_BASE: Final = timedelta(minutes=5)
RETRY_CAP: Final = timedelta(hours=6)

_ERROR_CHARS: Final = 2000
_c = email_reports.c


@dataclass(frozen=True)
class LedgerEntry:
    """One report's row in the ledger."""

    idempotency_key: str
    report_kind: str
    status: str
    attempts: int
    subject: str
    recipient_email: str
    error_message: str | None
    provider_message_id: str | None
    """Until sent, the Message-ID the message goes out under (outbox, SMTP; None for SendGrid
    and for rows claimed by older code); once sent, the provider's id (SendGrid's
    ``X-Message-Id``, or that same Message-ID)."""
    covers_as_of: datetime | None
    newest_session_time: datetime | None
    created_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None

    @property
    def final(self) -> bool:
        """Sent, or failed with no attempt left."""
        return self.status == SENT or (self.status == FAILED and self.next_attempt_at is None)


@dataclass(frozen=True)
class Claim:
    """A run's right to send one key now."""

    entry: LedgerEntry
    previous_status: str | None
    """None for a new key; ``failed`` for a retry; ``pending`` when the previous attempt's
    outcome is unknown (the message may have gone out: resend it unchanged)."""
    kept_message_id: bool = True
    """Whether the Message-ID to send (``entry.provider_message_id``) is the one an earlier
    attempt recorded (always, unless that attempt was claimed by code that recorded none)."""

    @property
    def outcome_unknown(self) -> bool:
        """Whether an earlier attempt may already have delivered this message."""
        return self.previous_status == PENDING


def _entry(row: sa.Row[Any] | None) -> LedgerEntry | None:
    if row is None:
        return None
    m = row._mapping
    created = utc(m["created_at"])
    assert created is not None
    return LedgerEntry(
        idempotency_key=m["idempotency_key"],
        report_kind=m["report_kind"],
        status=m["status"],
        attempts=int(m["attempts"]),
        subject=m["subject"],
        recipient_email=m["recipient_email"],
        error_message=m["error_message"],
        provider_message_id=m["provider_message_id"],
        covers_as_of=utc(m["covers_as_of"]),
        newest_session_time=utc(m["newest_session_time"]),
        created_at=created,
        next_attempt_at=utc(m["next_attempt_at"]),
        sent_at=utc(m["sent_at"]),
    )


def _entries(rows: Sequence[sa.Row[Any]]) -> list[LedgerEntry]:
    return [e for e in (_entry(r) for r in rows) if e is not None]


def _unchanged_since(key: str, row: LedgerEntry) -> sa.ColumnElement[bool]:
    """The key's row still has the status and attempt count read as ``row``: the condition of
    a compare-and-set, so that of two runs racing on one key only one wins."""
    return (_c.idempotency_key == key) & (_c.status == row.status) & (_c.attempts == row.attempts)


def _select_key(key: str, *, for_update: bool = False) -> sa.Select[Any]:
    query = sa.select(email_reports).where(_c.idempotency_key == key)
    return query.with_for_update() if for_update else query


def get(engine: Engine, key: str) -> LedgerEntry | None:
    """The ledger row of ``key``, if any."""
    with engine.connect() as conn:
        return _entry(conn.execute(_select_key(key)).first())


def entries(engine: Engine, kind: str | None = None) -> list[LedgerEntry]:
    """Every row (of ``kind``), oldest first."""
    query = sa.select(email_reports).order_by(_c.id)
    if kind is not None:
        query = query.where(_c.report_kind == kind)
    with engine.connect() as conn:
        return _entries(conn.execute(query).all())


def retry_delay(attempts: int) -> timedelta:
    """How long after its ``attempts``-th failed claim a key is tried again (5 min doubling,
    capped at 6 h: 8 attempts span about 10 hours)."""
    return min(RETRY_CAP, RETRY_BASE * 2 ** max(0, attempts - 1))


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        email_reports
    )


def claim(
    engine: Engine,
    *,
    key: str,
    kind: str,
    recipients: Sequence[str],
    covers_as_of: datetime | None,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    message_id: str | None = None,
) -> Claim | None:
    """Record ``key`` as pending and hand the caller the right to send it, or return None
    when it must not be sent now: sent already, in flight elsewhere, not due yet, or out of
    attempts (a stale pending row out of attempts is closed as given up here).

    ``message_id`` (None for a backend that assigns its own) is recorded with the first claim
    of a key, or with a later one when none was recorded; every later claim keeps the recorded
    one, so a resend carries its first attempt's Message-ID even after the store's
    installation id was made again."""
    lease_until = now + lease
    with engine.begin() as conn:
        inserted = conn.execute(
            _insert(conn)
            .values(
                idempotency_key=key,
                report_kind=kind,
                subject=key,  # replaced by the real subject once rendered
                recipient_email=", ".join(recipients),
                status=PENDING,
                attempts=1,
                covers_as_of=covers_as_of,
                created_at=now,
                next_attempt_at=lease_until,
                provider_message_id=message_id,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(_c.id)
        )
        # RETURNING, not rowcount: drivers report -1 for an INSERT that returns rows.
        if inserted.first() is not None:
            entry = _entry(conn.execute(_select_key(key)).first())
            assert entry is not None
            return Claim(entry, None)
        row = _entry(conn.execute(_select_key(key, for_update=True)).first())
        if row is None or row.status == SENT or row.next_attempt_at is None:
            return None
        if row.next_attempt_at > now:
            return None  # in flight elsewhere, or backing off
        if row.attempts >= max_attempts:
            if row.status == PENDING:
                conn.execute(
                    sa.update(email_reports)
                    .where(_c.idempotency_key == key)
                    .values(
                        status=FAILED,
                        next_attempt_at=None,
                        error_message=f"{GAVE_UP} after {row.attempts} attempts; "
                        f"{UNKNOWN_OUTCOME} of the last one (claimed, never recorded)",
                    )
                )
            return None
        kept = bool(row.provider_message_id)
        note = row.error_message
        if row.status == PENDING:
            note = f"{UNKNOWN_OUTCOME} of attempt {row.attempts} (claimed, never recorded); " + (
                "resent with the same Message-ID" if kept else "resent with the same key"
            )
        # Compare-and-set on (status, attempts): of two runs racing here, one wins.
        updated = conn.execute(
            sa.update(email_reports)
            .where(_unchanged_since(key, row))
            .values(
                status=PENDING,
                attempts=row.attempts + 1,
                next_attempt_at=lease_until,
                recipient_email=", ".join(recipients),
                error_message=note,
                provider_message_id=row.provider_message_id if kept else message_id,
            )
        )
        if updated.rowcount != 1:
            return None
        entry = _entry(conn.execute(_select_key(key)).first())
    assert entry is not None
    return Claim(entry, row.status, kept_message_id=kept)


def describe(
    engine: Engine,
    key: str,
    *,
    subject: str,
    newest_session_time: datetime | None,
    covers_as_of: datetime | None = None,
) -> None:
    """Record what the claimed message says, before it is sent."""
    values: dict[str, Any] = {"subject": subject[:512], "newest_session_time": newest_session_time}
    if covers_as_of is not None:
        values["covers_as_of"] = covers_as_of
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where((_c.idempotency_key == key) & (_c.status == PENDING))
            .values(**values)
        )


def installation_id(engine: Engine) -> str:
    """This deployment's id (``installation``), which its reports' Message-IDs carry."""
    with engine.connect() as conn:
        found = conn.execute(sa.select(installation.c.installation_id)).first()  # one row
    if found is None:
        raise LookupError(
            "the serving store's installation table is empty (its row is made by migration "
            "0004): run `tutor-scoring db downgrade 0003` and `tutor-scoring db upgrade` to "
            "make a new one"
        )
    return str(found[0])


def mark_sent(engine: Engine, claim: Claim, *, provider_message_id: str, now: datetime) -> None:
    """Record that the claimed message was delivered."""
    note = None
    if claim.outcome_unknown:
        same = "Message-ID and key header" if claim.kept_message_id else "key header"
        note = (
            f"possible duplicate: {UNKNOWN_OUTCOME} of attempt {claim.entry.attempts - 1}; "
            f"both carried the same {same}"
        )
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where(
                (_c.idempotency_key == claim.entry.idempotency_key)
                & (_c.attempts == claim.entry.attempts)
            )
            .values(
                status=SENT,
                sent_at=now,
                next_attempt_at=None,
                error_message=note,
                provider_message_id=provider_message_id[:256] or None,
            )
        )


def mark_failed(
    engine: Engine,
    claim: Claim,
    *,
    error: str,
    now: datetime,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> LedgerEntry:
    """Record that the claimed attempt failed, and when to try again (or that nobody will)."""
    attempts = claim.entry.attempts
    if attempts >= max_attempts:
        next_at, message = None, f"{GAVE_UP} after {attempts} attempts: {error}"
    else:
        next_at = now + retry_delay(attempts)
        message = f"attempt {attempts} of {max_attempts} failed: {error}"
    key = claim.entry.idempotency_key
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where((_c.idempotency_key == key) & (_c.attempts == attempts))
            .values(status=FAILED, next_attempt_at=next_at, error_message=message[:_ERROR_CHARS])
        )
        entry = _entry(conn.execute(_select_key(key)).first())
    assert entry is not None
    return entry


def supersede(engine: Engine, key: str, *, by: str, now: datetime) -> bool:
    """Close an unsent ``key`` that is not in flight, because ``by`` covers what it would
    have said. Returns whether it was closed."""
    with engine.begin() as conn:
        row = _entry(conn.execute(_select_key(key, for_update=True)).first())
        if row is None or row.final:
            return False
        if row.status == PENDING and row.next_attempt_at is not None and row.next_attempt_at > now:
            return False  # a run is sending it right now
        result = conn.execute(
            sa.update(email_reports)
            .where(_unchanged_since(key, row))
            .values(
                status=FAILED,
                next_attempt_at=None,
                error_message=f"{SUPERSEDED} by {by}; last error: {row.error_message or 'none'}"[
                    :_ERROR_CHARS
                ],
            )
        )
    return result.rowcount == 1


def close(engine: Engine, claim: Claim, *, reason: str) -> None:
    """Close a claimed key without sending it (nothing left to say): failed, no retry."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(email_reports)
            .where(
                (_c.idempotency_key == claim.entry.idempotency_key)
                & (_c.attempts == claim.entry.attempts)
            )
            .values(status=FAILED, next_attempt_at=None, error_message=reason[:_ERROR_CHARS])
        )


def retry_candidates(engine: Engine, now: datetime) -> list[LedgerEntry]:
    """Failed rows due another attempt and pending rows whose claim expired, oldest first."""
    query = (
        sa.select(email_reports)
        .where(
            _c.status.in_((PENDING, FAILED))
            & _c.next_attempt_at.is_not(None)
            & (_c.next_attempt_at <= now)
        )
        .order_by(_c.created_at, _c.id)
    )
    with engine.connect() as conn:
        return _entries(conn.execute(query).all())


def last_sent(engine: Engine, kind: str) -> LedgerEntry | None:
    """The newest sent report of ``kind`` (by the snapshot it covers, then by send time)."""
    query = (
        sa.select(email_reports)
        .where((_c.report_kind == kind) & (_c.status == SENT))
        .order_by(_c.covers_as_of.desc().nulls_last(), _c.sent_at.desc(), _c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        return _entry(conn.execute(query).first())


def newest_covered(engine: Engine, kind: str) -> datetime | None:
    """The newest ``covers_as_of`` of any report of ``kind``, whatever its status."""
    with engine.connect() as conn:
        return utc(
            conn.execute(
                sa.select(sa.func.max(_c.covers_as_of)).where(_c.report_kind == kind)
            ).scalar()
        )


def previous_covered(engine: Engine, kind: str, *, before: datetime) -> datetime | None:
    """The newest ``covers_as_of`` of a report of ``kind`` before ``before``."""
    with engine.connect() as conn:
        return utc(
            conn.execute(
                sa.select(sa.func.max(_c.covers_as_of)).where(
                    (_c.report_kind == kind) & (_c.covers_as_of < before)
                )
            ).scalar()
        )


def keys_covering_since(engine: Engine, kind: str, since: datetime) -> list[str]:
    """Keys of ``kind`` whose ``covers_as_of`` is at or after ``since``, whatever their status."""
    query = sa.select(_c.idempotency_key).where(
        (_c.report_kind == kind) & (_c.covers_as_of >= since)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def count_created_since(engine: Engine, kind: str, since: datetime | None) -> int:
    """How many reports of ``kind`` were first claimed after ``since`` (None: ever)."""
    query = sa.select(sa.func.count()).where(_c.report_kind == kind)
    if since is not None:
        query = query.where(_c.created_at > since)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def delivery_latencies(engine: Engine, since: datetime) -> list[timedelta]:
    """For each report sent at or after ``since``: from the newest session it covers to its
    delivery, shortest first."""
    query = sa.select(_c.newest_session_time, _c.sent_at).where(
        (_c.status == SENT) & (_c.sent_at >= since) & _c.newest_session_time.is_not(None)
    )
    with engine.connect() as conn:
        pairs = conn.execute(query).all()
    latencies = []
    for newest, sent in pairs:
        newest_utc, sent_utc = utc(newest), utc(sent)
        if newest_utc is not None and sent_utc is not None:
            latencies.append(max(timedelta(0), sent_utc - newest_utc))
    return sorted(latencies)


def percentile(sorted_values: Sequence[timedelta], fraction: float) -> timedelta | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def delivery_latency_p95(engine: Engine, since: datetime) -> timedelta | None:
    """The 95th percentile of session-to-delivery latency of reports sent since ``since``
    (None when none was sent)."""
    return percentile(delivery_latencies(engine, since), 0.95)
