"""Alembic migrations of the serving store, run from code (``tutor-scoring db upgrade``), and the
store-wide write lock that migrations and publishing share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from tutor_scoring_dagster.paths import MIGRATIONS_DIR
from tutor_scoring_dagster.store.errors import (
    UPGRADE_HINT,
    SchemaAheadError,
    SchemaBehindError,
    StoreSchemaError,
    safe_url,
)

STORE_LOCK_ID: Final = 0x7475746F72  # "tutor": the Postgres advisory lock of store writers


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for ``migrations/``, bound to ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str | None:
    """The newest migration this code knows."""
    return _scripts().get_current_head()


def known_revisions() -> set[str]:
    """Every migration this code knows."""
    return {script.revision for script in _scripts().walk_revisions()}


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: not migrated yet)."""
    with engine.connect() as conn:
        return _revision(conn)


@contextmanager
def locked_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the store's write lock, so that writers (migrations, publishes)
    take turns rather than interleave: a Postgres advisory lock, or SQLite's own write lock
    taken at BEGIN (``BEGIN IMMEDIATE``) rather than at the first write."""
    with engine.connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(STORE_LOCK_ID)))
        elif conn.dialect.name == "sqlite":
            # pysqlite's legacy mode has not begun yet (it begins at the first DML only), so
            # this BEGIN is the transaction's, and DDL within it is transactional too.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store up to ``revision``."""
    with locked_transaction(engine) as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the store down to ``revision`` (``base`` removes every table)."""
    with locked_transaction(engine) as conn:
        command.downgrade(alembic_config(conn), revision)


def schema_problem(
    current: str | None, url: str | sa.URL, *, upgrades_off: bool = False
) -> StoreSchemaError | None:
    """None when a store at migration ``current`` fits this code; else what is wrong with it
    (``upgrades_off``: the caller would have upgraded a store behind, but may not)."""
    head = head_revision()
    if current == head:
        return None
    where = safe_url(url)
    if current is not None and current not in known_revisions():
        return SchemaAheadError(
            f"the serving store at {where} is at migration {current}, which this code does not "
            f"know (its newest is {head}): a newer version migrated it; deploy that version, or "
            f"downgrade the store with it (`tutor-scoring db downgrade {head}`)"
        )
    off = ", and automatic upgrades are off" if upgrades_off else ""
    return SchemaBehindError(
        f"the serving store at {where} is at migration {current or 'none (empty)'} but this "
        f"code needs {head}{off}; {UPGRADE_HINT}"
    )


def readable_problem(engine: Engine) -> StoreSchemaError | None:
    """None when this code can read the store (or it is empty: the read then names the table
    it lacks); else a store at an older migration, or at one this code does not know."""
    current = current_revision(engine)
    return None if current is None else schema_problem(current, engine.url)


def ensure_current(engine: Engine, *, auto_upgrade: bool = True) -> None:
    """Make sure the store's schema is the one this code needs (publishing calls this first).

    A store behind this code is upgraded when ``auto_upgrade`` is on; otherwise, or when the
    store is ahead of this code, a ``StoreSchemaError`` says what to do.
    """
    if current_revision(engine) == head_revision():
        return
    with locked_transaction(engine) as conn:
        # Read again under the lock: another writer may have upgraded while we waited.
        problem = schema_problem(_revision(conn), engine.url, upgrades_off=not auto_upgrade)
        if problem is None:
            return
        if isinstance(problem, SchemaAheadError) or not auto_upgrade:
            raise problem
        command.upgrade(alembic_config(conn), "head")
