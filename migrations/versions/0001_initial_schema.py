"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "email_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=False),
        sa.Column("report_kind", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("recipient_email", sa.String(length=1024), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("provider_message_id", sa.String(length=256), nullable=True),
        sa.Column("covers_as_of", sa.DateTime(timezone=True), nullable=True),
        sa.Column("newest_session_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_email_reports_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_reports")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_email_reports_idempotency_key")),
    )
    with op.batch_alter_table("email_reports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_email_reports_status_created_at"), ["status", "created_at"], unique=False
        )

    op.create_table(
        "tutors",
        sa.Column("tutor_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("in_tutors_export", sa.Boolean(), nullable=False),
        sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tutor_id", name=op.f("pk_tutors")),
    )
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("tutor_id", sa.String(length=64), nullable=False),
        sa.Column("student_id", sa.String(length=64), nullable=True),
        sa.Column("scheduled_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("duration_minutes", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('completed', 'rescheduled', 'no_show')", name=op.f("ck_sessions_status")
        ),
        sa.CheckConstraint(
            "duration_minutes IS NULL OR duration_minutes >= 0", name=op.f("ck_sessions_duration")
        ),
        sa.ForeignKeyConstraint(
            ["tutor_id"], ["tutors.tutor_id"], name=op.f("fk_sessions_tutor_id_tutors")
        ),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sessions_tutor_id_scheduled_time"),
            ["tutor_id", "scheduled_time"],
            unique=False,
        )

    op.create_table(
        "tutor_score_history",
        sa.Column("tutor_id", sa.String(length=64), nullable=False),
        sa.Column("score_date", sa.Date(), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_sessions_7d", sa.Integer(), nullable=False),
        sa.Column("total_sessions_30d", sa.Integer(), nullable=False),
        sa.Column("total_sessions_90d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_7d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_30d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_90d", sa.Integer(), nullable=False),
        sa.Column("no_shows_7d", sa.Integer(), nullable=False),
        sa.Column("no_shows_30d", sa.Integer(), nullable=False),
        sa.Column("no_shows_90d", sa.Integer(), nullable=False),
        sa.Column("reschedule_rate_7d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_90d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_7d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_30d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_90d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_7d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_90d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_7d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_30d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_90d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d_change_7d", sa.Float(), nullable=True),
        sa.Column("is_high_risk", sa.Boolean(), nullable=False),
        sa.Column("risk_status", sa.String(length=64), nullable=False),
        sa.Column("newly_high_risk", sa.Boolean(), nullable=False),
        sa.Column("no_longer_high_risk", sa.Boolean(), nullable=False),
        sa.Column("risk_threshold", sa.Float(), nullable=False),
        sa.Column("min_sessions", sa.Integer(), nullable=False),
        sa.Column("last_calculated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "risk_status IN ('high', 'ok', 'insufficient_data')",
            name=op.f("ck_tutor_score_history_risk_status"),
        ),
        sa.CheckConstraint(
            "no_show_rate_30d IS NULL OR (no_show_rate_30d >= 0 AND no_show_rate_30d <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_30d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_30d_lower95 IS NULL OR (no_show_rate_30d_lower95 >= 0 AND no_show_rate_30d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_30d_lower95"),
        ),
        sa.CheckConstraint(
            "no_show_rate_7d IS NULL OR (no_show_rate_7d >= 0 AND no_show_rate_7d <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_7d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_7d_lower95 IS NULL OR (no_show_rate_7d_lower95 >= 0 AND no_show_rate_7d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_7d_lower95"),
        ),
        sa.CheckConstraint(
            "no_show_rate_90d IS NULL OR (no_show_rate_90d >= 0 AND no_show_rate_90d <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_90d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_90d_lower95 IS NULL OR (no_show_rate_90d_lower95 >= 0 AND no_show_rate_90d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_no_show_rate_90d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_30d IS NULL OR (reschedule_rate_30d >= 0 AND reschedule_rate_30d <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_30d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_30d_lower95 IS NULL OR (reschedule_rate_30d_lower95 >= 0 AND reschedule_rate_30d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_30d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_7d IS NULL OR (reschedule_rate_7d >= 0 AND reschedule_rate_7d <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_7d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_7d_lower95 IS NULL OR (reschedule_rate_7d_lower95 >= 0 AND reschedule_rate_7d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_7d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_90d IS NULL OR (reschedule_rate_90d >= 0 AND reschedule_rate_90d <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_90d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_90d_lower95 IS NULL OR (reschedule_rate_90d_lower95 >= 0 AND reschedule_rate_90d_lower95 <= 1)",
            name=op.f("ck_tutor_score_history_reschedule_rate_90d_lower95"),
        ),
        sa.CheckConstraint(
            "risk_threshold >= 0 AND risk_threshold <= 1",
            name=op.f("ck_tutor_score_history_risk_threshold"),
        ),
        sa.ForeignKeyConstraint(
            ["tutor_id"], ["tutors.tutor_id"], name=op.f("fk_tutor_score_history_tutor_id_tutors")
        ),
        sa.PrimaryKeyConstraint("tutor_id", "score_date", name=op.f("pk_tutor_score_history")),
    )
    with op.batch_alter_table("tutor_score_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tutor_score_history_score_date"), ["score_date"], unique=False
        )

    op.create_table(
        "tutor_scores",
        sa.Column("tutor_id", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_sessions_7d", sa.Integer(), nullable=False),
        sa.Column("total_sessions_30d", sa.Integer(), nullable=False),
        sa.Column("total_sessions_90d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_7d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_30d", sa.Integer(), nullable=False),
        sa.Column("tutor_reschedules_90d", sa.Integer(), nullable=False),
        sa.Column("no_shows_7d", sa.Integer(), nullable=False),
        sa.Column("no_shows_30d", sa.Integer(), nullable=False),
        sa.Column("no_shows_90d", sa.Integer(), nullable=False),
        sa.Column("reschedule_rate_7d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_90d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_7d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_30d", sa.Float(), nullable=True),
        sa.Column("no_show_rate_90d", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_7d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_90d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_7d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_30d_lower95", sa.Float(), nullable=True),
        sa.Column("no_show_rate_90d_lower95", sa.Float(), nullable=True),
        sa.Column("reschedule_rate_30d_change_7d", sa.Float(), nullable=True),
        sa.Column("is_high_risk", sa.Boolean(), nullable=False),
        sa.Column("risk_status", sa.String(length=64), nullable=False),
        sa.Column("newly_high_risk", sa.Boolean(), nullable=False),
        sa.Column("no_longer_high_risk", sa.Boolean(), nullable=False),
        sa.Column("risk_threshold", sa.Float(), nullable=False),
        sa.Column("min_sessions", sa.Integer(), nullable=False),
        sa.Column("last_calculated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "risk_status IN ('high', 'ok', 'insufficient_data')",
            name=op.f("ck_tutor_scores_risk_status"),
        ),
        sa.CheckConstraint(
            "no_show_rate_30d IS NULL OR (no_show_rate_30d >= 0 AND no_show_rate_30d <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_30d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_30d_lower95 IS NULL OR (no_show_rate_30d_lower95 >= 0 AND no_show_rate_30d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_30d_lower95"),
        ),
        sa.CheckConstraint(
            "no_show_rate_7d IS NULL OR (no_show_rate_7d >= 0 AND no_show_rate_7d <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_7d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_7d_lower95 IS NULL OR (no_show_rate_7d_lower95 >= 0 AND no_show_rate_7d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_7d_lower95"),
        ),
        sa.CheckConstraint(
            "no_show_rate_90d IS NULL OR (no_show_rate_90d >= 0 AND no_show_rate_90d <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_90d"),
        ),
        sa.CheckConstraint(
            "no_show_rate_90d_lower95 IS NULL OR (no_show_rate_90d_lower95 >= 0 AND no_show_rate_90d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_no_show_rate_90d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_30d IS NULL OR (reschedule_rate_30d >= 0 AND reschedule_rate_30d <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_30d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_30d_lower95 IS NULL OR (reschedule_rate_30d_lower95 >= 0 AND reschedule_rate_30d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_30d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_7d IS NULL OR (reschedule_rate_7d >= 0 AND reschedule_rate_7d <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_7d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_7d_lower95 IS NULL OR (reschedule_rate_7d_lower95 >= 0 AND reschedule_rate_7d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_7d_lower95"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_90d IS NULL OR (reschedule_rate_90d >= 0 AND reschedule_rate_90d <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_90d"),
        ),
        sa.CheckConstraint(
            "reschedule_rate_90d_lower95 IS NULL OR (reschedule_rate_90d_lower95 >= 0 AND reschedule_rate_90d_lower95 <= 1)",
            name=op.f("ck_tutor_scores_reschedule_rate_90d_lower95"),
        ),
        sa.CheckConstraint(
            "risk_threshold >= 0 AND risk_threshold <= 1",
            name=op.f("ck_tutor_scores_risk_threshold"),
        ),
        sa.ForeignKeyConstraint(
            ["tutor_id"], ["tutors.tutor_id"], name=op.f("fk_tutor_scores_tutor_id_tutors")
        ),
        sa.PrimaryKeyConstraint("tutor_id", name=op.f("pk_tutor_scores")),
    )
    with op.batch_alter_table("tutor_scores", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tutor_scores_risk_status_tutor_id"),
            ["risk_status", "tutor_id"],
            unique=False,
        )

    op.create_table(
        "reschedules",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("initiator", sa.String(length=16), nullable=False),
        sa.Column("original_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("new_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("hours_before_session", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "initiator IN ('tutor', 'student')", name=op.f("ck_reschedules_initiator")
        ),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.session_id"], name=op.f("fk_reschedules_session_id_sessions")
        ),
        sa.PrimaryKeyConstraint("session_id", "cancelled_at", name=op.f("pk_reschedules")),
    )


def downgrade() -> None:
    op.drop_table("reschedules")
    with op.batch_alter_table("tutor_scores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tutor_scores_risk_status_tutor_id"))

    op.drop_table("tutor_scores")
    with op.batch_alter_table("tutor_score_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tutor_score_history_score_date"))

    op.drop_table("tutor_score_history")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessions_tutor_id_scheduled_time"))

    op.drop_table("sessions")
    op.drop_table("tutors")
    with op.batch_alter_table("email_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_email_reports_status_created_at"))

    op.drop_table("email_reports")
