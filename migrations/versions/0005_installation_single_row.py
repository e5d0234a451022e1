"""installation holds one row

``installation`` names the deployment in every Message-ID it writes; a second row would leave
which id is "this deployment's" to the order rows are read in. A column that must be true and
is unique (``single_row``) lets the database refuse a second row, on SQLite and Postgres alike.
A store that already has more keeps the one its Message-IDs carry (the oldest).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows beyond the first were possible before: installation_id() read the oldest, so that
    # is the id this deployment's Message-IDs carry. It stays; the others were never used.
    table = sa.table("installation", sa.column("installation_id"), sa.column("created_at"))
    oldest = (
        sa.select(table.c.installation_id)
        .order_by(table.c.created_at, table.c.installation_id)
        .limit(1)
        .scalar_subquery()
    )
    op.execute(table.delete().where(table.c.installation_id != oldest))
    # SQLite cannot add a constraint in place: batch mode rebuilds this one-row table.
    with op.batch_alter_table("installation", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("single_row", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.create_unique_constraint(batch_op.f("uq_installation_single_row"), ["single_row"])
        batch_op.create_check_constraint(batch_op.f("ck_installation_single_row"), "single_row")


def downgrade() -> None:
    with op.batch_alter_table("installation", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_installation_single_row"), type_="check")
        batch_op.drop_constraint(batch_op.f("uq_installation_single_row"), type_="unique")
        batch_op.drop_column("single_row")
