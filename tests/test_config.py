"""Settings that shape how the project runs, as the user sets them: the warehouse's memory,
and what a mistyped setting says."""

from __future__ import annotations

import duckdb
import pytest

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings, load_settings
from tutor_scoring_dagster.defs.resources import WarehouseResource
from tutor_scoring_dagster.reports import ReportSettings


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


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("RISK_THRESHOLD", "abc", "RISK_THRESHOLD must be a number, got 'abc'"),
        ("MIN_SESSIONS", "5.5", "MIN_SESSIONS must be a whole number, got '5.5'"),
        ("SMTP_PORT", "abc", "SMTP_PORT must be a whole number, got 'abc'"),
        ("SERVING_HORIZON_DAYS", "-1", "SERVING_HORIZON_DAYS must be 0 (keep all) or more"),
        # A typo in a yes/no setting must not quietly mean no.
        ("SMTP_STARTTLS", "maybe", "SMTP_STARTTLS must be true or false, got 'maybe'"),
    ],
)
def test_a_mistyped_setting_is_refused_with_its_name(
    home: Settings, monkeypatch: pytest.MonkeyPatch, name: str, value: str, why: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as raised:
        load_settings()
    assert str(raised.value).startswith(why), raised.value


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("TUTOR_ALERTS", "ture", "TUTOR_ALERTS must be true or false, got 'ture'"),
        ("DIGEST_MAX_ROWS", "ten", "DIGEST_MAX_ROWS must be a whole number, got 'ten'"),
        ("EMAIL_MAX_ATTEMPTS", "0", "EMAIL_MAX_ATTEMPTS must be at least 1, got 0"),
    ],
)
def test_a_mistyped_report_setting_is_refused_with_its_name(
    name: str, value: str, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        ReportSettings.from_env({name: value})


def test_yes_and_no_settings_take_the_usual_words(home: Settings) -> None:
    for yes in ("1", "true", "YES", " on "):
        assert load_settings({"SMTP_STARTTLS": yes}).smtp_starttls
        assert ReportSettings.from_env({"PER_SESSION_REPORTS": yes}).per_session_reports
    for no in ("0", "False", "no", "off"):
        assert not load_settings({"SMTP_STARTTLS": no}).smtp_starttls
        assert not ReportSettings.from_env({"TUTOR_ALERTS": no}).tutor_alerts
