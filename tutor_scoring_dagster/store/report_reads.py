"""Queries of the serving store that reports read: the snapshot, what was published since a
point in time, a tutor's recent reschedules and score history.

Every timestamp returned is an aware UTC datetime (SQLite hands them back naive).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tutor_scoring_dagster.store import tables as t


def utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime (naive values are UTC already)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_row(row: sa.RowMapping) -> dict[str, Any]:
    return {k: utc(v) if isinstance(v, datetime) else v for k, v in row.items()}


@dataclass(frozen=True)
class Processed:
    """Sessions and reschedules published to the store since a point in time."""

    sessions: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    reschedules: int = 0
    by_initiator: dict[str, int] = field(default_factory=dict)
    tutors: int = 0


def snapshot_as_of(engine: Engine) -> datetime | None:
    """The as-of instant of the current snapshot (None: nothing published yet)."""
    with engine.connect() as conn:
        return utc(conn.execute(sa.select(sa.func.max(t.tutor_scores.c.as_of))).scalar())


def newly_high_risk_tutors(engine: Engine) -> list[str]:
    """Tutors the current snapshot flags as having crossed the risk rule in its last day."""
    s = t.tutor_scores.c
    query = (
        sa.select(s.tutor_id)
        .where(s.is_high_risk & s.newly_high_risk)
        .order_by(s.reschedule_rate_30d.desc().nulls_last(), s.tutor_id)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def tutor_scores_of(engine: Engine, tutor_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The current score rows (with name and email) of ``tutor_ids``, by tutor."""
    ids = sorted(set(tutor_ids))
    if not ids:
        return {}
    s, tu = t.tutor_scores, t.tutors
    query = (
        sa.select(s, tu.c.name, tu.c.email, tu.c.is_active)
        .join(tu, tu.c.tutor_id == s.c.tutor_id)
        .where(s.c.tutor_id.in_(ids))
    )
    with engine.connect() as conn:
        return {r["tutor_id"]: _utc_row(r) for r in conn.execute(query).mappings()}


def processed_since(engine: Engine, since: datetime | None) -> Processed:
    """What the publish step wrote (inserted or changed) after ``since`` (None: ever)."""
    s, r = t.sessions.c, t.reschedules.c
    session_filter = s.updated_at > since if since is not None else sa.true()
    resched_filter = r.updated_at > since if since is not None else sa.true()
    with engine.connect() as conn:
        by_status = {
            status: int(n)
            for status, n in conn.execute(
                sa.select(s.status, sa.func.count()).where(session_filter).group_by(s.status)
            )
        }
        tutors = conn.execute(
            sa.select(sa.func.count(sa.distinct(s.tutor_id))).where(session_filter)
        ).scalar()
        by_initiator = {
            initiator: int(n)
            for initiator, n in conn.execute(
                sa.select(r.initiator, sa.func.count()).where(resched_filter).group_by(r.initiator)
            )
        }
    return Processed(
        sessions=sum(by_status.values()),
        by_status=dict(sorted(by_status.items())),
        reschedules=sum(by_initiator.values()),
        by_initiator=dict(sorted(by_initiator.items())),
        tutors=int(tutors or 0),
    )


def newest_session_before(engine: Engine, before: datetime) -> datetime | None:
    """The newest scheduled time of a published session before ``before``."""
    s = t.sessions.c
    with engine.connect() as conn:
        return utc(
            conn.execute(
                sa.select(sa.func.max(s.scheduled_time)).where(s.scheduled_time < before)
            ).scalar()
        )


def newest_session_update(engine: Engine) -> datetime | None:
    """When the publish step last inserted or changed a session."""
    with engine.connect() as conn:
        return utc(conn.execute(sa.select(sa.func.max(t.sessions.c.updated_at))).scalar())


def newest_update(engine: Engine) -> datetime | None:
    """When the publish step last inserted or changed a session or a reschedule."""
    with engine.connect() as conn:
        times = [
            utc(conn.execute(sa.select(sa.func.max(table.c.updated_at))).scalar())
            for table in (t.sessions, t.reschedules)
        ]
    return max((x for x in times if x is not None), default=None)


def count_sessions_updated(engine: Engine, after: datetime, upto: datetime) -> int:
    """Sessions the publish step inserted or changed in ``(after, upto]``."""
    s = t.sessions.c
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where((s.updated_at > after) & (s.updated_at <= upto))
            ).scalar()
            or 0
        )


def sessions_updated(engine: Engine, after: datetime, upto: datetime) -> list[dict[str, Any]]:
    """Sessions published in ``(after, upto]`` with their tutor's name and their reschedules
    (key ``reschedules``, oldest first), in scheduled order."""
    s, tu, r = t.sessions, t.tutors, t.reschedules
    query = (
        sa.select(s, tu.c.name.label("tutor_name"))
        .join(tu, tu.c.tutor_id == s.c.tutor_id)
        .where((s.c.updated_at > after) & (s.c.updated_at <= upto))
        .order_by(s.c.scheduled_time, s.c.session_id)
    )
    with engine.connect() as conn:
        rows = [_utc_row(row) for row in conn.execute(query).mappings()]
        moves: dict[str, list[dict[str, Any]]] = defaultdict(list)
        ids = [row["session_id"] for row in rows]
        for chunk in range(0, len(ids), 1000):
            part = ids[chunk : chunk + 1000]
            for m in conn.execute(
                sa.select(r).where(r.c.session_id.in_(part)).order_by(r.c.cancelled_at)
            ).mappings():
                moves[m["session_id"]].append(_utc_row(m))
    for row in rows:
        row["reschedules"] = moves.get(row["session_id"], [])
    return rows


def recent_reschedules(
    engine: Engine, tutor_id: str, *, since: datetime, before: datetime, limit: int = 25
) -> list[dict[str, Any]]:
    """The tutor's sessions rescheduled (by anyone) with an original time in
    ``[since, before)``, newest first: when, who, why, and how early."""
    s, r = t.sessions.c, t.reschedules.c
    original = sa.func.coalesce(r.original_time, s.scheduled_time)
    query = (
        sa.select(
            r.session_id,
            r.initiator,
            r.reason,
            r.reason_code,
            r.cancelled_at,
            r.hours_before_session,
            r.new_time,
            original.label("original_time"),
            s.student_id,
            s.status,
        )
        .join(t.sessions, s.session_id == r.session_id)
        .where((s.tutor_id == tutor_id) & (original >= since) & (original < before))
        .order_by(original.desc(), r.cancelled_at.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [_utc_row(row) for row in conn.execute(query).mappings()]


def score_history(
    engine: Engine, tutor_ids: Iterable[str], *, first_day: date, last_day: date
) -> dict[str, dict[date, float | None]]:
    """Each tutor's daily 30-day reschedule rate from ``tutor_score_history``."""
    ids = sorted(set(tutor_ids))
    if not ids:
        return {}
    h = t.tutor_score_history.c
    out: dict[str, dict[date, float | None]] = defaultdict(dict)
    with engine.connect() as conn:
        for chunk in range(0, len(ids), 1000):
            query = sa.select(h.tutor_id, h.score_date, h.reschedule_rate_30d).where(
                h.tutor_id.in_(ids[chunk : chunk + 1000])
                & h.score_date.between(first_day, last_day)
            )
            for tutor_id, day, rate in conn.execute(query):
                out[tutor_id][day] = rate
    return dict(out)
