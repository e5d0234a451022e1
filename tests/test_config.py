"""Settings that shape how the project runs, as the user sets them: the warehouse's memory."""

from __future__ import annotations

import duckdb
import pytest

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings, load_settings
from tutor_scoring_dagster.defs.resources import WarehouseResource


def duckdb_reports(size: str) -> str:
    """How DuckDB itself shows a memory limit of ``size``."""
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{size}'")
        row = con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert row is not None
        return str(row[0])
    finally:
        con.close()


def memory_of(resource: WarehouseResource) -> str:
    with resource.connect() as con:
        row = con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert row is not None
        return str(row[0])


def test_the_warehouse_memory_limit_reaches_duckdb(
    home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1GB by default (DuckDB would take 80% of the machine); the environment or the resource's
    own field (the launchpad) sets another, in any unit DuckDB takes."""
    assert home.warehouse_memory == "1GB"
    assert memory_of(WarehouseResource()) == duckdb_reports("1GB")
    monkeypatch.setenv("TUTOR_SCORING_WAREHOUSE_MEMORY", " 512MB ")
    assert memory_of(WarehouseResource()) == duckdb_reports("512MB")
    assert memory_of(WarehouseResource(memory_limit="2GiB")) == duckdb_reports("2GiB")
    assert memory_of(WarehouseResource(memory_limit="1.5 g")) == duckdb_reports("1.5 g")


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("lots", "must be a size such as"),
        ("80%", "must be a size such as"),
        ("-1GB", "must be a size such as"),
        ("1GB; DROP TABLE sessions", "must be a size such as"),
        ("0GB", "must be at least 128MB"),  # DuckDB takes it, then no query runs
        ("100MB", "must be at least 128MB"),
        ("0.1GiB", "must be at least 128MB"),
    ],
)
def test_a_memory_size_the_warehouse_cannot_work_in_is_refused_with_its_name(
    home: Settings, monkeypatch: pytest.MonkeyPatch, size: str, why: str
) -> None:
    monkeypatch.setenv("TUTOR_SCORING_WAREHOUSE_MEMORY", size)
    with pytest.raises(ValueError, match=f"TUTOR_SCORING_WAREHOUSE_MEMORY {why}"):
        load_settings()
    monkeypatch.delenv("TUTOR_SCORING_WAREHOUSE_MEMORY")
    with pytest.raises(ValueError, match=f"the warehouse resource's memory_limit {why}"):
        memory_of(WarehouseResource(memory_limit=size))
    opened = warehouse.connect(home.warehouse, memory_limit=size)  # whoever opens it
    with pytest.raises(ValueError, match=f"memory_limit {why}"), opened:
        pass
