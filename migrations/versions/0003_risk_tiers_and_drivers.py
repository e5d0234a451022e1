"""risk tiers and drivers

Issue #11: each score row (``tutor_scores`` and ``tutor_score_history``) gains its risk tier and
the evidence behind it (posterior probability, CUSUM statistic, the start of the warning, the
fitted prior) with the top drivers and the recommended action; ``tutor_risk_drivers`` holds the
drivers of the current snapshot's flagged tutors.

Rows stored before this revision get ``risk_tier = 'insufficient_data'`` (their tier was never
judged) and ``newly_flagged = false``; the next publish replaces them with judged rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCORE_TABLES = ("tutor_scores", "tutor_score_history")
TIER_CHECK = "risk_tier IN ('high', 'watch', 'ok', 'insufficient_data')"
PROBABILITY_CHECK = "risk_probability IS NULL OR (risk_probability >= 0 AND risk_probability <= 1)"
DRIVER_CHECK = "driver IN ('short_notice', 'reason_code', 'no_show', 'reschedule_rate', 'trend')"


def _tier_columns() -> list[sa.Column[object]]:
    utc = sa.DateTime(timezone=True)
    return [
        sa.Column(
            "risk_tier", sa.String(length=64), nullable=False, server_default="insufficient_data"
        ),
        sa.Column("risk_probability", sa.Float(), nullable=True),
        sa.Column("cusum_statistic", sa.Float(), nullable=True),
        sa.Column("watch_since", utc, nullable=True),
        sa.Column("newly_flagged", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("prior_alpha", sa.Float(), nullable=True),
        sa.Column("prior_beta", sa.Float(), nullable=True),
        sa.Column("top_drivers", sa.Text(), nullable=True),
        sa.Column("recommended_action", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    for table in SCORE_TABLES:
        # SQLite cannot add a constraint in place: batch mode rebuilds the table.
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in _tier_columns():
                batch_op.add_column(column)
            batch_op.create_check_constraint(batch_op.f(f"ck_{table}_risk_tier"), TIER_CHECK)
            batch_op.create_check_constraint(
                batch_op.f(f"ck_{table}_risk_probability"), PROBABILITY_CHECK
            )
        # The defaults only filled the rows already there; new rows always carry a tier.
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("risk_tier", server_default=None)
            batch_op.alter_column("newly_flagged", server_default=None)
    with op.batch_alter_table("tutor_scores", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tutor_scores_risk_tier_tutor_id"), ["risk_tier", "tutor_id"]
        )
    op.create_table(
        "tutor_risk_drivers",
        sa.Column("tutor_id", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("driver", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=64), nullable=True),
        sa.Column("tutor_value", sa.Float(), nullable=False),
        sa.Column("population_value", sa.Float(), nullable=True),
        sa.Column("lift", sa.Float(), nullable=True),
        sa.Column("tutor_count", sa.Integer(), nullable=False),
        sa.Column("tutor_base", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(DRIVER_CHECK, name=op.f("ck_tutor_risk_drivers_driver")),
        sa.CheckConstraint(
            "tutor_base > 0 AND tutor_count >= 0", name=op.f("ck_tutor_risk_drivers_counts")
        ),
        sa.ForeignKeyConstraint(
            ["tutor_id"],
            ["tutors.tutor_id"],
            name=op.f("fk_tutor_risk_drivers_tutor_id_tutors"),
        ),
        sa.PrimaryKeyConstraint("tutor_id", "as_of", "driver", name=op.f("pk_tutor_risk_drivers")),
    )


def downgrade() -> None:
    op.drop_table("tutor_risk_drivers")
    with op.batch_alter_table("tutor_scores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tutor_scores_risk_tier_tutor_id"))
    for table in SCORE_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"ck_{table}_risk_probability"), type_="check")
            batch_op.drop_constraint(batch_op.f(f"ck_{table}_risk_tier"), type_="check")
            for column in reversed(_tier_columns()):
                batch_op.drop_column(column.name)
