"""The operator commands, through the installed console script, as an operator types them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_pipeline import T, build_drops
from test_store_migrations import revisions

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.store import migrate


def cli(home: Settings, *args: str, extra_env: dict[str, str] | None = None):
    script = shutil.which("tutor-scoring", path=str(Path(sys.executable).parent))
    assert script, "the tutor-scoring console script is not installed (pip install -e .)"
    env = {**os.environ, "TUTOR_SCORING_HOME": str(home.home), **(extra_env or {})}
    return subprocess.run(
        [script, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def checks(lines: str) -> dict[str, dict[str, object]]:
    """``health --json``'s checks by name."""
    return {c["name"]: c for c in map(json.loads, lines.splitlines())}


@pytest.fixture
def scored(home: Settings) -> Settings:
    build_drops(home.landing_dir)
    assert run_pipeline(as_of=T, history_days=5).success
    return home


def test_tutors_lists_filters_sorts_and_pages(scored: Settings) -> None:
    table = cli(scored, "tutors")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["tutor", "name", "risk", "tier"]
    assert lines[-1] == "(1-4 of 4 tutors)"

    everyone = [json.loads(x) for x in cli(scored, "tutors", "--json").stdout.splitlines()]
    for tier in {r["risk_tier"] for r in everyone}:
        listed = cli(scored, "tutors", "--tier", tier, "--json").stdout.splitlines()
        assert {json.loads(x)["tutor_id"] for x in listed} == {
            r["tutor_id"] for r in everyone if r["risk_tier"] == tier
        }

    high = cli(scored, "tutors", "--risk", "high", "--json")
    rows = [json.loads(line) for line in high.stdout.splitlines()]
    assert {r["tutor_id"] for r in rows} == {"A", "D"}
    assert all(r["risk_status"] == "high" for r in rows)

    asc = cli(scored, "tutors", "--sort-by", "total_sessions_90d", "--order", "asc", "--json")
    totals = [json.loads(line)["total_sessions_90d"] for line in asc.stdout.splitlines()]
    assert totals == sorted(totals)

    page = cli(
        scored,
        "tutors",
        "--sort-by",
        "tutor_id",
        "--order",
        "asc",
        "--limit",
        "2",
        "--offset",
        "1",
        "--json",
    )
    assert [json.loads(line)["tutor_id"] for line in page.stdout.splitlines()] == ["B", "C"]
    past_end = cli(scored, "tutors", "--offset", "10")
    assert past_end.returncode == 0 and past_end.stdout.strip().endswith("(none of 4 tutors)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tutors", "--sort-by", "bogus"), "cannot sort tutors by 'bogus'"),
        (("tutors", "--risk", "medium"), "invalid choice"),
        (("tutors", "--limit", "-1"), "must not be negative"),
        (("tutors", "--order", "up"), "invalid choice"),
        (("tutor", "A", "--history-days", "0"), "must be at least 1"),
        # It would be published as the current snapshot.
        (("run", "--as-of", "2999-01-01T00:00:00Z"), "--as-of 2999-01-01T00:00:00+00:00 is in"),
        (("db", "downgrade", "9999"), "db downgrade: Can't locate revision identified by '9999'"),
        (("db", "upgrade", "9999"), "db upgrade: Can't locate revision identified by '9999'"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(
    scored: Settings, args: tuple[str, ...], message: str
) -> None:
    done = cli(scored, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_tutor_shows_scores_statistics_trend_and_reschedules(scored: Settings) -> None:
    done = cli(scored, "tutor", "A", "--history-days", "90")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("Ana <b>Bold</b> (A)")
    assert "risk: high" in out
    as_json = json.loads(cli(scored, "tutor", "A", "--json").stdout)
    tier = as_json["scores"]["risk_tier"]
    assert f"tier: {tier.replace('_', ' ')}" in out
    if tier in ("high", "watch"):
        assert f"action: {as_json['scores']['recommended_action']}" in out
    assert "30d: reschedules 2/6 = 33.3%" in out
    assert "reschedules in the last 90 days:" in out and "tutor" in out

    as_json = json.loads(cli(scored, "tutor", "A", "--json").stdout)
    assert as_json["scores"]["tutor_reschedules_30d"] == 2
    assert as_json["trend"], "the daily trend comes from tutor_score_history"

    unknown = cli(scored, "tutor", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "tutor-scoring: no tutor 'nobody' in the serving store"


def test_health_reports_each_part_and_fails_when_one_is_wrong(scored: Settings) -> None:
    done = cli(scored, "health", "--json")
    found = checks(done.stdout)
    assert set(found) >= {
        "landing",
        "warehouse",
        "serving_store",
        "snapshot",
        "email",
        "dagster_instance",
    }
    assert found["warehouse"]["ok"] and found["serving_store"]["ok"]
    # The snapshot is as of T, long ago: the 1-hour target is missed, so health fails.
    assert not found["snapshot"]["ok"] and "min old" in found["snapshot"]["detail"]
    assert done.returncode == 1

    bad_email = cli(scored, "health", extra_env={"EMAIL_SERVICE": "pigeon"})
    assert bad_email.returncode == 1
    assert "BAD  email" in bad_email.stdout and "EMAIL_SERVICE" in bad_email.stdout
    # Read by the runs that send reports, which it would fail.
    bad_report = cli(scored, "health", extra_env={"TUTOR_ALERTS": "ture"})
    assert bad_report.returncode == 1
    assert "BAD  email             TUTOR_ALERTS must be true or false, got 'ture'" in (
        bad_report.stdout
    )


def test_a_store_at_another_migration_is_one_line_saying_what_to_do(scored: Settings) -> None:
    """Code upgraded before its store, or a store migrated by newer code: readers and `db`
    say so, rather than fail on a missing column or call the store unreachable."""
    engine = sa.create_engine(scored.database_url)
    head = migrate.head_revision()
    try:
        migrate.downgrade(engine, revisions()[-2])
        for command in (["tutors"], ["tutor", "A"]):
            done = cli(scored, *command)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
            assert f"but this code needs {head}; run `tutor-scoring db upgrade`" in done.stderr
        health = checks(cli(scored, "health", "--json").stdout)
        assert not health["serving_store"]["ok"]
        assert "run `tutor-scoring db upgrade`" in health["serving_store"]["detail"]
        assert not health["snapshot"]["ok"]
        assert cli(scored, "db", "upgrade").returncode == 0
        assert cli(scored, "tutors").returncode == 0

        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_future'"))
        for command in (["tutors"], ["db", "upgrade"], ["db", "downgrade", head]):
            done = cli(scored, *command)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
            assert "at migration 0099_future, which this code does not know" in done.stderr
        health = checks(cli(scored, "health", "--json").stdout)
        assert "which this code does not know" in health["serving_store"]["detail"]
        current = cli(scored, "db", "current")
        assert current.returncode == 0 and "at revision 0099_future" in current.stdout
    finally:
        engine.dispose()


def test_db_on_a_store_out_of_reach_is_one_line(home: Settings) -> None:
    unreachable = {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    for command in (["db", "current"], ["db", "upgrade"]):
        done = cli(home, *command, extra_env=unreachable)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "cannot reach the serving store at" in done.stderr
    health = checks(cli(home, "health", "--json", extra_env=unreachable).stdout)
    assert not health["serving_store"]["ok"] and not health["snapshot"]["ok"]
    # An upgrade to a revision this code does not know creates no store.
    store = Path(str(sa.make_url(home.database_url).database))
    done = cli(home, "db", "upgrade", "9999")
    assert done.returncode == 2 and "Can't locate revision" in done.stderr
    assert not store.exists()


def test_store_problems_are_one_line(home: Settings) -> None:
    done = cli(home, "tutors", extra_env={"DATABASE_URL": "nosuchdb://x"})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "DATABASE_URL is not a usable SQLAlchemy URL" in done.stderr


def test_reading_a_store_that_is_not_there_says_so_and_creates_nothing(
    home: Settings, tmp_path: Path
) -> None:
    """A typo'd home or a first look before any run: the SQLite store is not made empty by a
    reader (health would then call it a store at an unknown migration)."""
    store = Path(str(sa.make_url(home.database_url).database))
    for command in (
        ["tutors"],
        ["tutor", "T00001"],
        ["db", "current"],
        ["db", "downgrade", "base"],
    ):
        done = cli(home, *command)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert "does not exist yet: run the pipeline once" in done.stderr, done.stderr
        assert not store.exists() and not store.parent.exists()
    # A usage error is said before the store is looked at.
    done = cli(home, "db", "downgrade")
    assert done.returncode == 2
    assert "db downgrade needs a revision (or 'base')" in done.stderr, done.stderr
    assert not store.exists() and not store.parent.exists()
    # A store file without tables (an older version of this command left such files).
    empty = tmp_path / "empty.sqlite"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    done = cli(home, "tutors", extra_env={"DATABASE_URL": f"sqlite:///{empty}"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "lacks a table this code reads" in done.stderr, done.stderr
    assert "server" not in done.stderr


def test_backtest_replays_the_warehouse(scored: Settings, tmp_path: Path) -> None:
    period = ("--from", "2026-02-20", "--to", "2026-02-28")
    done = cli(scored, "backtest", *period)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| rule | flagged tutor-days")
    assert "| original |" in done.stdout and "| watch_or_high |" in done.stdout
    missing = cli(scored, "backtest", *period, "--labels", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "no labels file" in missing.stderr
    not_labels = tmp_path / "scores.csv"
    not_labels.write_text("tutor,rate\nT1,0.1\n")
    wrong = cli(scored, "backtest", *period, "--labels", str(not_labels))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert f"{not_labels} is not a ground_truth.csv" in wrong.stderr
    before = cli(scored, "backtest", "--from", "2020-01-01", "--to", "2020-01-31")
    assert before.returncode == 1 and before.stdout == "", before.stdout
    assert "nothing to replay from 2020-01-01 to 2020-01-31" in before.stderr
    bad = cli(scored, "backtest", *period, "--every", "x")
    assert bad.returncode == 2 and "number of days" in bad.stderr
