"""SQLAlchemy tables of the serving store (DESIGN.md, "Stores").

Score columns are derived from the ``TutorScores`` and ``TutorRiskTiers`` Pandera models, and
driver columns from ``TutorRiskDrivers``, so a column added there is a column here (and, through
an Alembic migration, in the database) without a second list.
"""

from __future__ import annotations

from typing import Any, Final

import pandera.polars as pa
import polars as pl
import sqlalchemy as sa

from tutor_scoring_dagster.schemas import (
    DRIVERS,
    INITIATORS,
    RISK_STATUSES,
    RISK_TIERS,
    SESSION_STATUSES,
    WINDOWS_DAYS,
    TutorRiskDrivers,
    TutorRiskTiers,
    TutorScores,
    is_long_text,
)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UtcDateTime: Final = sa.DateTime(timezone=True)
EMAIL_STATUSES: Final = ("pending", "sent", "failed")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)  # constants of this module, not input
    return f"{column} IN ({quoted})"


def _sa_type(dtype: pl.DataType) -> sa.types.TypeEngine[Any]:
    if isinstance(dtype, pl.Datetime):
        return UtcDateTime
    for polars_type, sa_type in (
        (pl.String, sa.String(64)),
        (pl.Int64, sa.Integer()),
        (pl.Float64, sa.Float()),
        (pl.Boolean, sa.Boolean()),
    ):
        if dtype == polars_type:
            return sa_type
    raise TypeError(f"no SQL type for {dtype}")


def _model_columns(
    *models: type[pa.DataFrameModel], skip: tuple[str, ...] = ("tutor_id", "as_of")
) -> list[sa.Column[Any]]:
    """The models' columns, in order, but ``skip`` (the tables' keys); free text as TEXT."""
    columns: dict[str, sa.Column[Any]] = {}
    for model in models:
        for name, col in model.to_schema().columns.items():
            if name in skip or name in columns:
                continue
            sql_type = sa.Text() if is_long_text(model, name) else _sa_type(col.dtype.type)
            columns[name] = sa.Column(name, sql_type, nullable=col.nullable)
    return list(columns.values())


def _score_columns() -> list[sa.Column[Any]]:
    """Every score-row column (TutorScores, then TutorRiskTiers) but the keys."""
    return _model_columns(TutorScores, TutorRiskTiers)


def _score_checks() -> list[sa.CheckConstraint]:
    checks = [
        sa.CheckConstraint(_in("risk_status", RISK_STATUSES), name="risk_status"),
        sa.CheckConstraint("risk_threshold >= 0 AND risk_threshold <= 1", name="risk_threshold"),
        sa.CheckConstraint("min_sessions >= 1", name="min_sessions"),
        sa.CheckConstraint(_in("risk_tier", RISK_TIERS), name="risk_tier"),
        sa.CheckConstraint(
            "risk_probability IS NULL OR (risk_probability >= 0 AND risk_probability <= 1)",
            name="risk_probability",
        ),
    ]
    for w in WINDOWS_DAYS:
        total, moved, missed = f"total_sessions_{w}d", f"tutor_reschedules_{w}d", f"no_shows_{w}d"
        checks.append(
            sa.CheckConstraint(
                f"{moved} >= 0 AND {missed} >= 0 AND {moved} <= {total} AND {missed} <= {total}",
                name=f"counts_{w}d",
            )
        )
    for name in TutorScores.to_schema().columns:
        if "_rate_" in name and not name.endswith("change_7d"):
            checks.append(
                sa.CheckConstraint(f"{name} IS NULL OR ({name} >= 0 AND {name} <= 1)", name=name)
            )
    return checks


tutors = sa.Table(
    "tutors",
    metadata,
    sa.Column("tutor_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(256)),
    sa.Column("email", sa.String(320)),
    sa.Column("is_active", sa.Boolean(), nullable=False),
    sa.Column("in_tutors_export", sa.Boolean(), nullable=False),
    sa.Column("source_updated_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_id", sa.String(64), primary_key=True),
    sa.Column("tutor_id", sa.String(64), sa.ForeignKey("tutors.tutor_id"), nullable=False),
    sa.Column("student_id", sa.String(64)),
    sa.Column("scheduled_time", UtcDateTime, nullable=False),
    sa.Column("completed_time", UtcDateTime),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("duration_minutes", sa.Integer()),
    sa.Column("created_at", UtcDateTime),
    sa.Column("source_updated_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint(_in("status", SESSION_STATUSES), name="status"),
    sa.CheckConstraint("duration_minutes IS NULL OR duration_minutes >= 0", name="duration"),
    sa.Index(None, "tutor_id", "scheduled_time"),  # one tutor's sessions (reads.tutor_*)
    sa.Index(None, "scheduled_time"),  # the newest session (reports)
    sa.Index(None, "updated_at"),  # what a publish wrote since a report (reports)
)

reschedules = sa.Table(
    "reschedules",
    metadata,
    sa.Column("session_id", sa.String(64), sa.ForeignKey("sessions.session_id"), primary_key=True),
    sa.Column("cancelled_at", UtcDateTime, primary_key=True),
    sa.Column("initiator", sa.String(16), nullable=False),
    sa.Column("original_time", UtcDateTime),
    sa.Column("new_time", UtcDateTime),
    sa.Column("reason", sa.Text()),
    sa.Column("reason_code", sa.String(64)),
    sa.Column("hours_before_session", sa.Float()),
    sa.Column("created_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint(_in("initiator", INITIATORS), name="initiator"),
    sa.Index(None, "updated_at"),  # what a publish wrote since a report (reports)
)

tutor_scores = sa.Table(
    "tutor_scores",
    metadata,
    sa.Column("tutor_id", sa.String(64), sa.ForeignKey("tutors.tutor_id"), primary_key=True),
    sa.Column("as_of", UtcDateTime, nullable=False),
    *_score_columns(),
    sa.Column("last_calculated_at", UtcDateTime, nullable=False),
    *_score_checks(),
    sa.Index(None, "risk_status", "tutor_id"),  # reads.list_tutors(risk_status=...)
    sa.Index(None, "risk_tier", "tutor_id"),  # flagged tutors (reports, dashboard)
)

tutor_score_history = sa.Table(
    "tutor_score_history",
    metadata,
    sa.Column("tutor_id", sa.String(64), sa.ForeignKey("tutors.tutor_id"), primary_key=True),
    sa.Column("score_date", sa.Date(), primary_key=True),
    sa.Column("as_of", UtcDateTime, nullable=False),
    *_score_columns(),
    sa.Column("last_calculated_at", UtcDateTime, nullable=False),
    *_score_checks(),
    sa.Index(None, "score_date"),  # a day range, replaced by publish_history
)

tutor_risk_drivers = sa.Table(
    "tutor_risk_drivers",
    metadata,
    sa.Column("tutor_id", sa.String(64), sa.ForeignKey("tutors.tutor_id"), primary_key=True),
    sa.Column("as_of", UtcDateTime, primary_key=True),
    sa.Column("driver", sa.String(64), primary_key=True),
    *_model_columns(TutorRiskDrivers, skip=("tutor_id", "as_of", "driver")),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint(_in("driver", DRIVERS), name="driver"),
    sa.CheckConstraint("tutor_base > 0 AND tutor_count >= 0", name="counts"),
)
"""The drivers of the current snapshot's ``watch`` and ``high`` tutors (issue #11)."""

email_reports = sa.Table(
    "email_reports",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(256), nullable=False, unique=True),
    sa.Column("report_kind", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("recipient_email", sa.String(1024), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("error_message", sa.Text()),
    sa.Column("provider_message_id", sa.String(256)),
    sa.Column("covers_as_of", UtcDateTime),
    sa.Column("newest_session_time", UtcDateTime),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("next_attempt_at", UtcDateTime),
    sa.Column("sent_at", UtcDateTime),
    sa.CheckConstraint(_in("status", EMAIL_STATUSES), name="status"),
    sa.Index(None, "status", "created_at"),
)

installation = sa.Table(
    "installation",
    metadata,
    sa.Column("installation_id", sa.String(32), primary_key=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # True and unique (migration 0005): the database refuses a second row.
    sa.Column("single_row", sa.Boolean(), server_default=sa.true(), nullable=False, unique=True),
    sa.CheckConstraint("single_row", name="single_row"),
)
"""One row, made by migration 0004: this deployment's id. It is part of every Message-ID the
deployment writes, so that two deployments sending the same report (staging and production)
never give their two messages one Message-ID."""
