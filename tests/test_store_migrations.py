"""Alembic migrations of the serving store, on SQLite and a throwaway Postgres database: they
build exactly the schema of ``tables.py``, go up and down step by step keeping rows, and a store
behind or ahead of the code is refused with a line that says what to do."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import test_store_frames as f
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from tutor_scoring_dagster.store import ledger, migrate
from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.errors import SchemaAheadError, SchemaBehindError
from tutor_scoring_dagster.store.publish import create_store_engine, publish_current

NOW = datetime(2026, 3, 1, 0, 5, tzinfo=UTC)


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    engine = create_store_engine(store_url)
    yield engine
    engine.dispose()


def revisions() -> list[str]:
    """Every migration, oldest first."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config())
    return [s.revision for s in reversed(list(scripts.walk_revisions()))]


def schema_differences(engine: sa.Engine) -> list[object]:
    """What autogenerate would change to make the database match ``tables.py``, and the check
    constraints (which autogenerate does not compare) that differ by name."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diffs: list[object] = list(compare_metadata(context, t.metadata))
        inspector = sa.inspect(conn)
        for table in t.metadata.sorted_tables:
            stored = {c["name"] for c in inspector.get_check_constraints(table.name)}
            modelled = {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
            if stored != modelled:
                diffs.append(("check constraints", table.name, stored ^ modelled))
    return diffs


def tables_in(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_migrations_build_exactly_the_modelled_schema_and_remove_it(engine: sa.Engine) -> None:
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision() == revisions()[-1]
    assert schema_differences(engine) == []
    assert tables_in(engine) == set(t.metadata.tables)

    migrate.downgrade(engine, "base")
    assert tables_in(engine) == set() and migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert schema_differences(engine) == []


def test_each_migration_steps_up_and_down_keeping_rows(engine: sa.Engine) -> None:
    tutor = {
        "tutor_id": "T1",
        "name": "Ann",
        "email": None,
        "is_active": True,
        "in_tutors_export": True,
        "source_updated_at": None,
        "updated_at": NOW,
    }
    score = {
        **f.scores(1).row(0, named=True),
        "tutor_id": "T1",
        "last_calculated_at": NOW,
    }
    steps = revisions()
    migrate.upgrade(engine, steps[0])
    with engine.begin() as conn:  # rows written by the first schema, the oldest we may meet
        conn.execute(sa.insert(t.tutors), tutor)
        first = sa.Table("tutor_scores", sa.MetaData(), autoload_with=conn)
        conn.execute(sa.insert(first), {k: v for k, v in score.items() if k in first.c})

    def stored() -> tuple[object, object]:
        with engine.connect() as conn:
            return (
                conn.execute(sa.select(t.tutors.c.name)).scalar(),
                conn.execute(sa.select(t.tutor_scores.c.total_sessions_90d)).scalar(),
            )

    for revision in steps[1:]:
        migrate.upgrade(engine, revision)
        assert stored() == ("Ann", score["total_sessions_90d"]), revision
    with engine.connect() as conn:  # 0003: a row stored before tiers was never judged
        tier = conn.execute(sa.select(t.tutor_scores.c.risk_tier, t.tutor_scores.c.newly_flagged))
        assert tier.one() == ("insufficient_data", False)
        # 0004: one id for this deployment, which its reports' Message-IDs carry.
        [(installation, made)] = conn.execute(
            sa.select(t.installation.c.installation_id, t.installation.c.created_at)
        ).all()
        assert re.fullmatch(r"[0-9a-f]{16}", installation) and made is not None
    assert ledger.installation_id(engine) == installation
    # 0005: the store refuses a second id, which would leave "this deployment's" to chance.
    for extra in ({}, {"single_row": False}):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            row = {"installation_id": "0" * 16, "created_at": NOW, **extra}
            conn.execute(sa.insert(t.installation), row)
    for revision in reversed(steps[:-1]):
        migrate.downgrade(engine, revision)
        assert stored() == ("Ann", score["total_sessions_90d"]), revision
        if revision == "0004":  # stepping back over 0005 keeps the deployment's id
            assert ledger.installation_id(engine) == installation


def test_a_store_with_two_installation_ids_keeps_the_one_its_message_ids_carry(
    engine: sa.Engine,
) -> None:
    """Before 0005 a second row was possible and the oldest was the id in use: upgrading keeps
    that one and drops the others, instead of failing every publish's automatic upgrade."""
    migrate.upgrade(engine, "0004")
    in_use = ledger.installation_id(engine)
    later = datetime.now(UTC) + timedelta(days=1)
    old = sa.Table("installation", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(old), {"installation_id": "f" * 16, "created_at": later})
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(t.installation.c.installation_id)).scalars().all() == [in_use]


def publish_small(engine: sa.Engine, *, auto_upgrade: bool) -> None:
    sessions = f.sessions(20, 2)
    publish_current(
        engine,
        tutors=f.tutors(2),
        sessions=sessions,
        reschedules=f.reschedules(sessions),
        scores=f.scores(2),
        horizon_start=None,
        now=NOW,
        auto_upgrade=auto_upgrade,
    )


def test_a_store_behind_the_code_is_upgraded_or_refused_when_upgrades_are_off(
    engine: sa.Engine,
) -> None:
    old = revisions()[0]
    migrate.upgrade(engine, old)
    with pytest.raises(SchemaBehindError) as caught:
        publish_small(engine, auto_upgrade=False)
    message = str(caught.value)
    assert "\n" not in message
    assert (
        f"at migration {old} but this code needs {migrate.head_revision()}, and automatic "
        "upgrades are off; run `tutor-scoring db upgrade`"
    ) in message
    assert migrate.current_revision(engine) == old  # nothing was touched

    publish_small(engine, auto_upgrade=True)
    assert migrate.current_revision(engine) == migrate.head_revision()


def test_an_empty_store_is_refused_when_upgrades_are_off(engine: sa.Engine) -> None:
    with pytest.raises(SchemaBehindError, match=r"at migration none \(empty\)"):
        publish_small(engine, auto_upgrade=False)


def test_a_store_ahead_of_the_code_is_refused(engine: sa.Engine) -> None:
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    for auto_upgrade in (True, False):
        with pytest.raises(SchemaAheadError) as caught:
            publish_small(engine, auto_upgrade=auto_upgrade)
        message = str(caught.value)
        assert "\n" not in message
        assert "at migration 0099_from_the_future, which this code does not know" in message
        assert "deploy that version" in message
