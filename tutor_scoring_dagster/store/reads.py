"""Queries of the serving store: the reads the original REST API offered (a page of tutors with
their scores, one tutor's scores and statistics, one tutor's reschedule history and trend), and
the current snapshot that reports read.

Every query is backed by an index of ``tables.py`` (the key of each table, and
``ix_tutor_scores_risk_status_tutor_id``, ``ix_sessions_tutor_id_scheduled_time``). Results are
plain dicts and dataclasses; timestamps are aware UTC datetimes on every database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.schemas import RISK_STATUSES, RISK_TIERS
from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.report_reads import utc

SORT_ORDERS: Final = ("asc", "desc")
DEFAULT_SORT: Final = "reschedule_rate_30d"
TUTOR_FIELDS: Final = ("name", "email", "is_active")
TREND_FIELDS: Final = (
    "reschedule_rate_7d",
    "reschedule_rate_30d",
    "reschedule_rate_90d",
    "is_high_risk",
    "risk_status",
)


@dataclass(frozen=True)
class TutorPage:
    """One page of tutors with their current scores, and how many tutors match in all."""

    tutors: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class TutorDetail:
    """One tutor: its ``tutors`` row, its current scores (None: not scored yet, e.g. no session
    before the snapshot), and statistics of its sessions and reschedules in the store."""

    tutor: dict[str, Any]
    scores: dict[str, Any] | None
    statistics: dict[str, Any]


@dataclass(frozen=True)
class TutorHistory:
    """One tutor's reschedules cancelled in ``[since, until)`` (newest first, at most the limit
    asked for) and its daily trend over those days (oldest first)."""

    tutor_id: str
    since: datetime
    until: datetime
    reschedules: list[dict[str, Any]]
    trend: list[dict[str, Any]]


def sort_columns() -> tuple[str, ...]:
    """What ``list_tutors`` can sort by: every column of ``tutor_scores``, and ``name``."""
    return (*t.tutor_scores.columns.keys(), "name")


def list_tutors(
    engine: Engine,
    *,
    risk_status: str | None = None,
    risk_tier: str | None = None,
    sort_by: str = DEFAULT_SORT,
    order: str = "desc",
    limit: int = 100,
    offset: int = 0,
) -> TutorPage:
    """Tutors with current scores, those of ``risk_status`` only if given (``high``, ``ok``,
    ``insufficient_data``) and of ``risk_tier`` only if given (``high``, ``watch``, ``ok``,
    ``insufficient_data``), sorted by ``sort_by`` (``order``: ``asc`` | ``desc``; nulls last,
    then by tutor id), ``limit`` of them from ``offset`` on.

    Each row is the tutor's ``tutor_scores`` row with its ``name``, ``email`` and ``is_active``.
    Raises ``ValueError`` (one line, naming what is allowed) for an unknown filter, column or
    order, or a negative limit or offset.
    """
    if risk_status is not None and risk_status not in RISK_STATUSES:
        raise ValueError(
            f"unknown risk status {risk_status!r}; allowed: {', '.join(RISK_STATUSES)} "
            "(or none for all)"
        )
    if risk_tier is not None and risk_tier not in RISK_TIERS:
        raise ValueError(
            f"unknown risk tier {risk_tier!r}; allowed: {', '.join(RISK_TIERS)} (or none for all)"
        )
    if sort_by not in sort_columns():
        raise ValueError(f"cannot sort tutors by {sort_by!r}; allowed: {', '.join(sort_columns())}")
    if order not in SORT_ORDERS:
        raise ValueError(f"unknown sort order {order!r}; allowed: {', '.join(SORT_ORDERS)}")
    _not_negative(limit=limit, offset=offset)
    s, tu = t.tutor_scores, t.tutors
    where = sa.and_(
        sa.true() if risk_status is None else s.c.risk_status == risk_status,
        sa.true() if risk_tier is None else s.c.risk_tier == risk_tier,
    )
    key = tu.c.name if sort_by == "name" else s.c[sort_by]
    ordered = key.asc() if order == "asc" else key.desc()
    query = (
        sa.select(s, *(tu.c[f] for f in TUTOR_FIELDS))
        .join(tu, tu.c.tutor_id == s.c.tutor_id)
        .where(where)
        .order_by(ordered.nulls_last(), s.c.tutor_id)
        .limit(limit)
        .offset(offset)
    )
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(s).where(where)).scalar()
        rows = [_utc(row) for row in conn.execute(query).mappings()] if limit else []
    return TutorPage(tutors=rows, total=int(total or 0), limit=limit, offset=offset)


def tutor_detail(engine: Engine, tutor_id: str) -> TutorDetail:
    """The tutor ``tutor_id``, its current scores and statistics; ``LookupError`` if the store
    does not know it.

    ``statistics`` counts the tutor's sessions in the store (those of the serving horizon,
    ``SERVING_HORIZON_DAYS``): ``sessions``, ``sessions_by_status``, ``first_scheduled``,
    ``last_scheduled``, ``reschedules_by_initiator`` and ``mean_hours_notice_by_initiator``
    (how long before the session it was moved).
    """
    with engine.connect() as conn:
        tutor = _tutor(conn, tutor_id)
        scores = conn.execute(
            sa.select(t.tutor_scores).where(t.tutor_scores.c.tutor_id == tutor_id)
        ).first()
        statistics = _statistics(conn, tutor_id)
    return TutorDetail(
        tutor=_utc(tutor),
        scores=None if scores is None else _utc(scores._mapping),
        statistics=statistics,
    )


def tutor_history(
    engine: Engine,
    tutor_id: str,
    *,
    days: int = 90,
    limit: int = 100,
    until: datetime | None = None,
) -> TutorHistory:
    """The tutor's reschedules (by anyone) cancelled in the ``days`` before ``until`` (default:
    now), newest first, at most ``limit``, each with its session's ``scheduled_time`` and
    ``status``; and one trend point per stored day of those days (``score_date`` and the daily
    snapshot's 7/30/90-day reschedule rates and risk). ``LookupError`` for an unknown tutor.

    The store holds the sessions of the serving horizon only (``SERVING_HORIZON_DAYS``); reaching
    further back finds no reschedules, but the trend (from ``tutor_score_history``) is kept.
    """
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")
    _not_negative(limit=limit)
    until = datetime.now(UTC) if until is None else until.astimezone(UTC)
    since = until - timedelta(days=days)
    s, r, h = t.sessions.c, t.reschedules.c, t.tutor_score_history.c
    reschedules = (
        sa.select(t.reschedules, s.scheduled_time, s.status)
        .join_from(t.reschedules, t.sessions, s.session_id == r.session_id)
        .where((s.tutor_id == tutor_id) & (r.cancelled_at >= since) & (r.cancelled_at < until))
        .order_by(r.cancelled_at.desc(), r.session_id)
        .limit(limit)
    )
    trend = (
        sa.select(h.score_date, *(h[f] for f in TREND_FIELDS))
        .where((h.tutor_id == tutor_id) & h.score_date.between(since.date(), until.date()))
        .order_by(h.score_date)
    )
    with engine.connect() as conn:
        _tutor(conn, tutor_id)
        moves = [_utc(row) for row in conn.execute(reschedules).mappings()] if limit else []
        points = [dict(row) for row in conn.execute(trend).mappings()]
    return TutorHistory(tutor_id, since, until, moves, points)


def current_scores(engine: Engine) -> list[dict[str, Any]]:
    """The current snapshot, one dict per tutor with its name, highest 30-day rate first."""
    s, tu = t.tutor_scores, t.tutors
    query = (
        sa.select(s, tu.c.name, tu.c.email, tu.c.is_active)
        .join(tu, tu.c.tutor_id == s.c.tutor_id)
        .order_by(s.c.reschedule_rate_30d.desc().nulls_last(), s.c.tutor_id)
    )
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def _statistics(conn: Connection, tutor_id: str) -> dict[str, Any]:
    s, r = t.sessions.c, t.reschedules.c
    by_status = conn.execute(
        sa.select(
            s.status, sa.func.count(), sa.func.min(s.scheduled_time), sa.func.max(s.scheduled_time)
        )
        .where(s.tutor_id == tutor_id)
        .group_by(s.status)
        .order_by(s.status)
    ).all()
    by_initiator = conn.execute(
        sa.select(r.initiator, sa.func.count(), sa.func.avg(r.hours_before_session))
        .join_from(t.reschedules, t.sessions, s.session_id == r.session_id)
        .where(s.tutor_id == tutor_id)
        .group_by(r.initiator)
        .order_by(r.initiator)
    ).all()
    return {
        "sessions": sum(n for _, n, _, _ in by_status),
        "sessions_by_status": {status: n for status, n, _, _ in by_status},
        "first_scheduled": utc(min((first for _, _, first, _ in by_status), default=None)),
        "last_scheduled": utc(max((last for _, _, _, last in by_status), default=None)),
        "reschedules_by_initiator": {who: n for who, n, _ in by_initiator},
        "mean_hours_notice_by_initiator": {who: mean for who, _, mean in by_initiator},
    }


def _tutor(conn: Connection, tutor_id: str) -> sa.RowMapping:
    row = conn.execute(sa.select(t.tutors).where(t.tutors.c.tutor_id == tutor_id)).first()
    if row is None:
        raise LookupError(f"no tutor {tutor_id!r} in the serving store")
    return row._mapping


def _not_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")


def _utc(row: sa.RowMapping) -> dict[str, Any]:
    return {k: utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
