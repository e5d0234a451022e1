"""installation id

One row naming this deployment (``installation``), made once when the store is migrated: the
Message-IDs of its reports carry it, so that two deployments sending the same report key (say
staging and production, each with its own store) never give two different messages one
Message-ID, while a resend by the same deployment keeps its message's.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("installation_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("installation_id", name=op.f("pk_installation")),
    )
    # 64 random bits: two deployments sharing a mailbox are never confused in practice.
    op.bulk_insert(
        table, [{"installation_id": uuid.uuid4().hex[:16], "created_at": datetime.now(UTC)}]
    )


def downgrade() -> None:
    op.drop_table("installation")
