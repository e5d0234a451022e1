"""Queries of the serving store that reports and operators read."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tutor_scoring_dagster.store import tables as t


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


def newest_session_time(engine: Engine, before: datetime) -> datetime | None:
    """The newest scheduled time of a published session before ``before``."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.max(t.sessions.c.scheduled_time)).where(
                t.sessions.c.scheduled_time < before
            )
        ).scalar()
