"""The deployment's Dagster instance (``dagster.yaml``): run, event-log and schedule storage on
Postgres, configured from DAGSTER_PG_* variables. A real asset of the code location runs through
it, and the run and its materialization land in a throwaway Postgres database."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.resources import default_resources

DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def test_runs_are_stored_in_postgres(
    home: Settings, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    config = yaml.safe_load(DAGSTER_YAML.read_text(encoding="utf-8"))
    assert config["storage"]["postgres"]["postgres_db"].get("scheme") == "postgresql+psycopg2", (
        "dagster.yaml must set storage.postgres.postgres_db.scheme: postgresql+psycopg2 "
        "(SQLAlchemy 2.1 maps postgresql:// to psycopg 3, whose server-side parameters break "
        "dagster-postgres's NOTIFY)"
    )
    shutil.copy(DAGSTER_YAML, dagster_home / "dagster.yaml")
    url = sa.make_url(pg_url)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    for name, value in {
        "DAGSTER_PG_HOST": url.host,
        "DAGSTER_PG_PORT": url.port or 5432,
        "DAGSTER_PG_USER": url.username,
        "DAGSTER_PG_PASSWORD": url.password or "",
        "DAGSTER_PG_DB": url.database,
    }.items():
        monkeypatch.setenv(name, str(value))
    home.landing_dir.mkdir(parents=True)

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([landing_drops], resources=default_resources(), instance=instance)
        assert result.success
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.status == dg.DagsterRunStatus.SUCCESS
        assert instance.get_latest_materialization_event(dg.AssetKey("landing_drops"))

    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            status = conn.execute(
                sa.text("SELECT status FROM runs WHERE run_id = :id"), {"id": result.run_id}
            ).scalar()
            materialized = conn.execute(
                sa.text(
                    "SELECT count(*) FROM event_logs WHERE run_id = :id "
                    "AND dagster_event_type = 'ASSET_MATERIALIZATION'"
                ),
                {"id": result.run_id},
            ).scalar()
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert status == "SUCCESS" and materialized == 1
    assert {"runs", "event_logs", "jobs", "job_ticks"} <= tables  # run, event, schedule storage
