"""Risk tiers, drivers and actions through the pipeline (issue #11): `run --as-of T` stores the
tiers the backtest replays for T, in SQLite and Postgres; the drivers of flagged tutors reach
the store; every parameter is a setting."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from drops import one_file_per_entity

from tutor_scoring_dagster import assessment
from tutor_scoring_dagster.assessment import assess_as_of, assess_days, flagged_since
from tutor_scoring_dagster.backtest import run_backtest
from tutor_scoring_dagster.config import SETTINGS, Settings, load_settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.params import AssessParams, TierParams
from tutor_scoring_dagster.scoring import RiskRule
from tutor_scoring_dagster.warehouse import connect

END = date(2026, 3, 1)
AS_OF = datetime(2026, 3, 1, tzinfo=UTC)  # midnight: the snapshot the backtest replays for Feb 28
HISTORY_DAYS = 10


def land(home: Settings, tmp_path: Path) -> None:
    """A generated quarter with every kind of tutor, one landing file per entity."""
    generated = generate_drops(
        tmp_path / "generated",
        tutors=40,
        days=120,
        sessions_per_day=140,
        end=END,
        drops_per_day=1,
        seed=5,
    )
    one_file_per_entity(generated.files, home.landing_dir)


def stored(url: str, table: str) -> pl.DataFrame:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT * FROM {table}")).mappings().all()
    finally:
        engine.dispose()
    return pl.DataFrame([dict(r) for r in rows], infer_schema_length=None)


def test_run_as_of_a_past_day_stores_the_tiers_the_backtest_replays(
    home: Settings, tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", store_url)
    land(home, tmp_path)
    summary = run_pipeline(as_of=AS_OF, history_days=HISTORY_DAYS)
    assert summary.success, summary.render()

    first = END - timedelta(days=HISTORY_DAYS)
    with connect(home.warehouse, read_only=True) as con:
        replay = run_backtest(con, first, END - timedelta(days=1)).daily
    columns = ["tutor_id", "day", "risk_tier", "risk_probability", "cusum_statistic"]
    expected = replay.select(columns).sort("tutor_id", "day")
    assert expected.filter(pl.col("risk_tier") == "high").height > 0
    assert expected.filter(pl.col("risk_tier") == "watch").height > 0

    current = stored(store_url, "tutor_scores").with_columns(
        pl.lit(END - timedelta(days=1)).alias("day")
    )
    history = stored(store_url, "tutor_score_history").rename({"score_date": "day"})
    if history.schema["day"] == pl.String:  # SQLite keeps dates as text
        history = history.with_columns(pl.col("day").str.to_date())
    for name, frame in (("tutor_scores", current), ("tutor_score_history", history)):
        got = frame.select(columns).sort("tutor_id", "day")
        want = expected.join(got.select("tutor_id", "day"), on=["tutor_id", "day"], how="semi")
        assert got.height == want.height > 0, name
        assert got.select("tutor_id", "day", "risk_tier").equals(
            want.select("tutor_id", "day", "risk_tier")
        ), name
        for value in ("risk_probability", "cusum_statistic"):
            diff = (got.get_column(value) - want.get_column(value)).abs().max()
            assert diff is None or diff < 1e-9, (name, value)

    # Flagged tutors have an action and their drivers are in the store; nobody else has either.
    scores = stored(store_url, "tutor_scores")
    flagged = scores.filter(pl.col("risk_tier").is_in(["high", "watch"]))
    assert flagged.height > 0 and flagged.get_column("watch_since").null_count() == 0
    assert (
        scores.filter(pl.col("risk_tier").is_in(["ok", "insufficient_data"]))[
            "recommended_action"
        ].null_count()
        == scores.height - flagged.height
    )
    drivers = stored(store_url, "tutor_risk_drivers")
    assert set(drivers.get_column("tutor_id")) == set(flagged.get_column("tutor_id"))
    assert set(drivers.get_column("driver")) >= {"reschedule_rate", "trend"}


def test_tier_parameters_are_settings_with_the_calibrated_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = {s.env: s for s in SETTINGS}
    for field in ("LEVEL", "CUSUM_H", "P0", "P1", "MIN_SESSIONS", "POSTERIOR_WINDOW_DAYS"):
        assert f"RISK_TIER_{field}" in names, field
    assert names["RISK_TIER_CUSUM_H"].default == str(TierParams().cusum_h)
    assert "RISK_DRIVER_SHORT_NOTICE_HOURS" in names and "RISK_ACTIONS_FILE" in names
    assert load_settings({}).assess.tiers == TierParams()

    tuned = load_settings({"RISK_TIER_CUSUM_H": "4.5", "RISK_THRESHOLD": "0.2"}).assess
    assert tuned.tiers.cusum_h == 4.5 and tuned.tiers.threshold == 0.2
    with pytest.raises(ValueError, match="RISK_TIER_LEVEL must be a float"):
        load_settings({"RISK_TIER_LEVEL": "high"})
    with pytest.raises(ValueError, match="RISK_TIER_"):
        load_settings({"RISK_TIER_LEVEL": "1.5"})


def test_a_higher_alarm_limit_puts_fewer_tutors_on_watch(home: Settings, tmp_path: Path) -> None:
    land(home, tmp_path)
    summary = run_pipeline(as_of=AS_OF, history_days=1)
    assert summary.success, summary.render()
    with connect(home.warehouse, read_only=True) as con:
        default = assess_as_of(con, AS_OF, RiskRule(), AssessParams()).scores
        strict = assess_as_of(
            con, AS_OF, RiskRule(), AssessParams(tiers=TierParams(cusum_h=50.0))
        ).scores
    watch = pl.col("risk_tier") == "watch"
    assert default.filter(watch).height > strict.filter(watch).height
    # The contract's rule is not the tier's: is_high_risk does not move with the tier settings.
    assert default.get_column("is_high_risk").equals(strict.get_column("is_high_risk"))


def test_flagged_since_reads_like_a_person_wrote_it() -> None:
    as_of = datetime(2026, 3, 1, tzinfo=UTC)
    assert flagged_since({"as_of": as_of, "watch_since": None}) == "not flagged"
    assert flagged_since({"as_of": as_of, "watch_since": as_of - timedelta(days=3)}) == (
        "since 2026-02-26"
    )
    assert flagged_since({"as_of": as_of, "watch_since": as_of - timedelta(days=30)}) == (
        "for 30+ days"
    )


def test_a_long_range_assessed_a_chunk_at_a_time_equals_one_chunk(
    home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daily partitions' path: scores of the next chunk are computed while this chunk's
    tiers are; the rows are those of the range taken at once."""
    land(home, tmp_path)
    assert run_pipeline(as_of=AS_OF, history_days=1).success
    first, last = END - timedelta(days=9), END - timedelta(days=1)
    rule, params = RiskRule(), AssessParams()
    with connect(home.warehouse, read_only=True) as con:
        whole = assess_days(con, first, last, rule, params, with_drivers=False).scores
        monkeypatch.setattr(assessment, "CHUNK_DAYS", 2)
        chunked = assess_days(con, first, last, rule, params, with_drivers=False).scores
    assert whole.height == 9 * whole.get_column("tutor_id").n_unique() > 0
    assert chunked.sort("tutor_id", "as_of").equals(whole.sort("tutor_id", "as_of"))


def test_a_snapshots_tiers_are_judged_while_its_scores_are_made(
    home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The current snapshot's path (with drivers): its scores, made on a thread, are waited
    for only once its tiers are judged, so the two run side by side; the rows are the same,
    a failure making the scores is raised, and when the judging fails too the error raised
    names both. No thread is left behind."""
    land(home, tmp_path)
    assert run_pipeline(as_of=AS_OF, history_days=1).success
    rule, params = RiskRule(), AssessParams()
    with connect(home.warehouse, read_only=True) as con:
        alone = assess_as_of(con, AS_OF, rule, params)
    judged = threading.Event()
    real_tiers, real_scores = assessment.risk_tiers_for_days, assessment.score_snapshots

    def tiers(*args: Any, **kwargs: Any) -> pl.DataFrame:
        made = real_tiers(*args, **kwargs)
        judged.set()
        return made

    def scores(*args: Any, **kwargs: Any) -> pl.DataFrame:
        # Waiting for the scores before judging the tiers would stall this for the timeout.
        assert judged.wait(timeout=10), "the scores were waited for before the tiers"
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(assessment, "risk_tiers_for_days", tiers)
    monkeypatch.setattr(assessment, "score_snapshots", scores)
    with connect(home.warehouse, read_only=True) as con:
        side_by_side = assess_as_of(con, AS_OF, rule, params)
    assert alone.scores.height > 0 and alone.drivers.height > 0
    assert side_by_side.scores.equals(alone.scores)
    assert side_by_side.drivers.equals(alone.drivers)

    def scores_broken(*args: Any, **kwargs: Any) -> pl.DataFrame:
        raise RuntimeError("scores broke")

    def tiers_broken(*args: Any, **kwargs: Any) -> pl.DataFrame:
        raise RuntimeError("tiers broke")

    monkeypatch.setattr(assessment, "score_snapshots", scores_broken)
    with connect(home.warehouse, read_only=True) as con:
        with pytest.raises(RuntimeError, match="scores broke"):
            assess_as_of(con, AS_OF, rule, params)
        monkeypatch.setattr(assessment, "risk_tiers_for_days", tiers_broken)
        with pytest.raises(RuntimeError, match="tiers broke") as both:
            assess_as_of(con, AS_OF, rule, params)
    assert any("scores broke" in note for note in getattr(both.value, "__notes__", []))
    assert not [t for t in threading.enumerate() if t.name.startswith("scores")]
