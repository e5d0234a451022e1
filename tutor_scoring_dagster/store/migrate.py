"""Alembic migrations of the serving store, run from code (``tutor-scoring db upgrade``)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.paths import MIGRATIONS_DIR


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for ``migrations/``, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration this code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: not migrated yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store up to ``revision``."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the store down to ``revision`` (``base`` removes every table)."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)


def ensure_current(engine: Engine) -> None:
    """Upgrade the store if it is behind this code (publishing calls this first)."""
    if current_revision(engine) != head_revision():
        upgrade(engine)
