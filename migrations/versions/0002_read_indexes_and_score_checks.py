"""read indexes and score checks

Indexes for the reports' reads: sessions.scheduled_time (the newest published session), and
sessions.updated_at and reschedules.updated_at (what a publish wrote since the last report); and
check constraints that keep each score row's counts consistent: parts within their window's
total, none negative, and a minimum of at least one session.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("sessions", "scheduled_time"),
    ("sessions", "updated_at"),
    ("reschedules", "updated_at"),
)
SCORE_TABLES = ("tutor_scores", "tutor_score_history")
WINDOWS = (7, 30, 90)


def _count_check(window: int) -> str:
    total = f"total_sessions_{window}d"
    moved, missed = f"tutor_reschedules_{window}d", f"no_shows_{window}d"
    return f"{moved} >= 0 AND {missed} >= 0 AND {moved} <= {total} AND {missed} <= {total}"


def upgrade() -> None:
    for table, column in INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)
    # SQLite cannot add a constraint in place: batch mode rebuilds these two tables, which no
    # other table references.
    for table in SCORE_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_check_constraint(
                batch_op.f(f"ck_{table}_min_sessions"), "min_sessions >= 1"
            )
            for window in WINDOWS:
                batch_op.create_check_constraint(
                    batch_op.f(f"ck_{table}_counts_{window}d"), _count_check(window)
                )


def downgrade() -> None:
    for table in SCORE_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for window in WINDOWS:
                batch_op.drop_constraint(batch_op.f(f"ck_{table}_counts_{window}d"), type_="check")
            batch_op.drop_constraint(batch_op.f(f"ck_{table}_min_sessions"), type_="check")
    for table, column in reversed(INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))
