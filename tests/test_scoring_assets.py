"""The score assets as Dagster runs them: a backfill range run against one run per partition,
the asset checks on tampered snapshots (and blocking what follows), the late-data sensor, and
the daily history's publish to the store."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import pytest
import sqlalchemy as sa
from drops import HandDrop, one_file_per_entity

from tutor_scoring_dagster import assessment, scoring, warehouse
from tutor_scoring_dagster.assessment import Assessment, reach_days
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.definitions import defs
from tutor_scoring_dagster.defs.partitions import daily_partitions, due_day
from tutor_scoring_dagster.defs.publish.assets import tutor_score_history
from tutor_scoring_dagster.defs.resources import (
    RiskRuleResource,
    ServingStoreResource,
    WarehouseResource,
)
from tutor_scoring_dagster.defs.scores import assets as score_assets
from tutor_scoring_dagster.defs.scores import checks as score_checks
from tutor_scoring_dagster.defs.scores import freshness
from tutor_scoring_dagster.defs.scores.assets import (
    LOADS_THROUGH,
    ScoreTally,
    score_metadata,
    tutor_daily_activity,
    tutor_scores_current,
    tutor_scores_daily,
)
from tutor_scoring_dagster.defs.scores.checks import (
    SCORE_CHECKS,
    tutor_scores_current_checks,
    tutor_scores_daily_checks,
)
from tutor_scoring_dagster.defs.scores.freshness import (
    DUE_PARTITION,
    YESTERDAY_MATERIALIZED,
    yesterday_partition_freshness,
)
from tutor_scoring_dagster.defs.scores.sensors import late_data_sensor
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.ingest import IngestReport, ingest_landing
from tutor_scoring_dagster.params import AssessParams
from tutor_scoring_dagster.scoring import (
    COUNTS_AUDIT,
    LATE_DATA_REACH_DAYS,
    affected_day_ranges,
    audit_score_parts,
    audit_scores,
    partition_as_of,
)
from tutor_scoring_dagster.store.migrate import STORE_LOCK_ID, ensure_current
from tutor_scoring_dagster.warehouse import query_frame

AS_OF = datetime(2024, 5, 20, 13, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warehouse loaded from generated drops (one combined file per entity, in drop order)."""
    root = tmp_path_factory.mktemp("assets")
    drops = generate_drops(
        root / "generated", tutors=25, days=100, sessions_per_day=30, seed=5, end=date(2024, 5, 21)
    )
    landing = root / "landing"
    one_file_per_entity(drops.files, landing)
    path = root / "warehouse.duckdb"
    with warehouse.connect(path) as con:
        warehouse.ensure_schema(con)
        ingest_landing(con, landing, archive_dir=root / "archive", quarantine_dir=root / "q")
    return path


@pytest.fixture
def wh(generated: Path, tmp_path: Path, home: Settings) -> Path:
    """A private copy of the generated warehouse."""
    path = tmp_path / "warehouse.duckdb"
    shutil.copy(generated, path)
    return path


def resources(path: Path) -> dict[str, Any]:
    return {"warehouse": WarehouseResource(path=str(path)), "risk_rule": RiskRuleResource()}


def range_tags(first: date, last: date) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": first.isoformat(),
        "dagster/asset_partition_range_end": last.isoformat(),
    }


def table(path: Path, name: str) -> pl.DataFrame:
    with warehouse.connect(path) as con:
        return query_frame(con, f"SELECT * FROM {name} ORDER BY ALL")


def check_outcomes(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


DAILY = [tutor_daily_activity, tutor_scores_daily, tutor_scores_daily_checks]


def test_backfill_range_run_equals_one_run_per_partition(wh: Path, tmp_path: Path) -> None:
    first, last = date(2024, 5, 12), date(2024, 5, 15)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    backfill = tmp_path / "backfill.duckdb"
    shutil.copy(wh, backfill)
    result = dg.materialize(DAILY, resources=resources(backfill), tags=range_tags(first, last))
    assert result.success
    assert all(check_outcomes(result).values()) and len(check_outcomes(result)) == 4

    # One run per day, in a shuffled order, one of them twice: the same rows.
    order = [*days, days[1]]
    random.Random(3).shuffle(order)
    for day in order:
        single = dg.materialize(DAILY, resources=resources(wh), partition_key=day.isoformat())
        assert single.success and all(check_outcomes(single).values())

    for name in ("tutor_daily_activity", "tutor_scores_daily"):
        ranged, singles = table(backfill, name), table(wh, name)
        assert ranged.height > 0
        assert ranged.equals(singles), name
    scores = table(backfill, "tutor_scores_daily")
    assert scores.get_column("as_of").dt.date().unique().sort().to_list() == [
        d + timedelta(days=1) for d in days
    ]

    # The hourly asset as of the same midnight gives the partition's rows.
    midnight = datetime.combine(last + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    current = dg.materialize(
        [tutor_scores_current],
        resources=resources(backfill),
        run_config={"ops": {"tutor_scores_current": {"config": {"as_of": midnight.isoformat()}}}},
    )
    assert current.success
    # The same rows, but that only the current snapshot judges drivers and actions.
    actions = ["top_drivers", "recommended_action"]
    snapshot = table(backfill, "tutor_scores_current")
    assert snapshot.drop(actions).equals(scores.filter(pl.col("as_of") == midnight).drop(actions))
    assert scores.get_column("recommended_action").null_count() == scores.height
    flagged = snapshot.filter(pl.col("risk_tier").is_in(["high", "watch"]))
    assert flagged.height > 0 and flagged.get_column("recommended_action").null_count() == 0


def step_error(result: dg.ExecuteInProcessResult) -> str:
    """The error the run's failed step raised itself (Dagster wraps it in its own)."""
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.step_failure_data.error
    assert error is not None and error.cause is not None, error
    return error.cause.message


def test_a_range_run_stores_its_chunks_in_one_transaction(
    wh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range is stored a chunk of days at a time while the next chunk is assessed (years of
    rows are never all in memory): the rows and the asset page's counts are those of the range
    in one piece, and a chunk that fails after others were stored leaves the range's stored
    rows as they were, not half replaced."""
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    whole = tmp_path / "whole.duckdb"
    shutil.copy(wh, whole)
    at_once = dg.materialize(DAILY, resources=resources(whole), tags=range_tags(first, last))
    monkeypatch.setattr(assessment, "CHUNK_DAYS", 2)
    chunks: list[int] = []
    real_assess = assessment.assess

    def counted(*args: Any, **kwargs: Any) -> Assessment:
        chunks.append(1)
        return real_assess(*args, **kwargs)

    monkeypatch.setattr(assessment, "assess", counted)
    chunked = dg.materialize(DAILY, resources=resources(wh), tags=range_tags(first, last))
    assert at_once.success and chunked.success and len(chunks) == 3
    stored = table(wh, "tutor_scores_daily")
    assert stored.height > 0 and stored.equals(table(whole, "tutor_scores_daily"))

    def page(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
        event = result.asset_materializations_for_node("tutor_scores_daily")[0]
        return {k: v.value for k, v in event.metadata.items()}

    assert page(chunked) == page(at_once)
    assert page(chunked) == {
        "first_as_of": partition_as_of(first).isoformat(),
        "last_as_of": partition_as_of(last).isoformat(),
        "loads_through": page(at_once)["loads_through"],
        **{k: v.value for k, v in score_metadata(stored).items()},
    }
    assert page(chunked)["rows"] == stored.height

    def broken(*args: Any, **kwargs: Any) -> Assessment:
        if len(chunks) == 4:  # the second chunk of the next run, while the first is stored
            raise RuntimeError("chunk broke")
        return counted(*args, **kwargs)

    monkeypatch.setattr(assessment, "assess", broken)
    stricter = {**resources(wh), "risk_rule": RiskRuleResource(threshold=0.05)}  # other rows
    failed = dg.materialize(
        DAILY, resources=stricter, tags=range_tags(first, last), raise_on_error=False
    )
    assert not failed.success and len(chunks) == 4
    # The step fails with the chunk's own error, not one from closing a connection still busy
    # on another thread.
    assert "RuntimeError: chunk broke" in step_error(failed)
    assert table(wh, "tutor_scores_daily").equals(stored)


@pytest.mark.parametrize("scores_fail_too", [False, True])
def test_a_range_run_whose_risk_tiers_fail_stores_nothing_and_says_why(
    wh: Path, monkeypatch: pytest.MonkeyPatch, scores_fail_too: bool
) -> None:
    """The tiers are judged a chunk ahead on a thread of their own: a chunk whose tiers fail
    while the one before is being assessed and stored fails the step with the tiers' own
    error (not one from closing a cursor still busy), and the range's rows stay as they were.
    When the same chunk's scores fail too, the step's error names both."""
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    tags = range_tags(first, last)
    assert dg.materialize(DAILY, resources=resources(wh), tags=tags).success
    stored = table(wh, "tutor_scores_daily")
    monkeypatch.setattr(assessment, "CHUNK_DAYS", 2)
    real_tiers, real_scores = assessment.risk_tiers_by_chunk, assessment.score_snapshots

    def failing(*args: Any, **kwargs: Any) -> Iterator[pl.DataFrame]:
        for i, tiers in enumerate(real_tiers(*args, **kwargs)):
            if i == 1:
                raise RuntimeError("tiers broke")
            yield tiers

    def failing_scores(con: Any, day: date, *args: Any, **kwargs: Any) -> pl.DataFrame:
        if day > first:
            raise RuntimeError("scores broke")
        return real_scores(con, day, *args, **kwargs)

    monkeypatch.setattr(assessment, "risk_tiers_by_chunk", failing)
    if scores_fail_too:
        monkeypatch.setattr(assessment, "score_snapshots", failing_scores)
    stricter = {**resources(wh), "risk_rule": RiskRuleResource(threshold=0.05)}  # other rows
    failed = dg.materialize(DAILY, resources=stricter, tags=tags, raise_on_error=False)
    assert not failed.success
    error = step_error(failed)
    if scores_fail_too:
        assert error.startswith("RuntimeError: tiers broke"), error
        assert "making the other item failed too: RuntimeError('scores broke')" in error
    else:
        assert "RuntimeError: tiers broke" in error
    assert table(wh, "tutor_scores_daily").equals(stored)


def current_run(
    path: Path, *extra: dg.AssetsDefinition, **kwargs: Any
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [tutor_scores_current, tutor_scores_current_checks, *extra],
        resources=resources(path),
        run_config={"ops": {"tutor_scores_current": {"config": {"as_of": AS_OF.isoformat()}}}},
        raise_on_error=False,
        **kwargs,
    )


def load_drop(path: Path, drop: HandDrop, folder: Path, stamp: str) -> IngestReport:
    """``drop`` written to ``folder`` (stamped ``stamp``), then loaded into warehouse ``path``."""
    drop.write(folder, stamp=stamp)
    with warehouse.connect(path) as con:
        return ingest_landing(
            con, folder, archive_dir=folder / "archive", quarantine_dir=folder / "quarantine"
        )


def checks_only(
    path: Path, instance: dg.DagsterInstance, asset: dg.AssetsDefinition, check: Any, **kw: Any
) -> dict[str, bool]:
    result = dg.materialize(
        [asset, check],
        resources=resources(path),
        instance=instance,
        selection=dg.AssetSelection.checks_for_assets(asset),
        raise_on_error=False,
        **kw,
    )
    return check_outcomes(result)


def tamper(path: Path, sql: str) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(sql)


ALL_PASS = dict.fromkeys(
    [
        "one_row_per_tutor_per_snapshot",
        "rates_consistent_with_counts",
        "tutors_known",
        "counts_reconcile_with_sessions",
    ],
    True,
)


TAMPERED_CURRENT = [
    (
        "a count changed by hand: its rate no longer matches, nor does the sessions count",
        "UPDATE tutor_scores_current SET total_sessions_30d = total_sessions_30d + 1 "
        "WHERE tutor_id = (SELECT min(tutor_id) FROM tutor_scores_current "
        "WHERE total_sessions_30d > 0)",
        {"rates_consistent_with_counts", "counts_reconcile_with_sessions"},
    ),
    (
        "a tutor nobody knows, with otherwise consistent numbers",
        "INSERT INTO tutor_scores_current SELECT * REPLACE ('GHOST' AS tutor_id) "
        "FROM tutor_scores_current LIMIT 1",
        {"tutors_known", "counts_reconcile_with_sessions"},
    ),
    (
        "a tutor twice, and a tutor missing",
        "INSERT INTO tutor_scores_current SELECT * FROM tutor_scores_current "
        "WHERE tutor_id = (SELECT min(tutor_id) FROM tutor_scores_current); "
        "DELETE FROM tutor_scores_current WHERE tutor_id = "
        "(SELECT max(tutor_id) FROM tutor_scores_current)",
        # The rates check validates the TutorScores model, whose keys are unique too.
        {
            "one_row_per_tutor_per_snapshot",
            "counts_reconcile_with_sessions",
            "rates_consistent_with_counts",
        },
    ),
]
"""(what was done, the SQL that does it, the checks that must fail: those only)."""


def test_current_checks_catch_a_tampered_snapshot(wh: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = current_run(wh, instance=instance)
    assert result.success and check_outcomes(result) == ALL_PASS
    original = wh.with_name("original.duckdb")
    shutil.copy(wh, original)
    for what, sql, failing in TAMPERED_CURRENT:
        shutil.copy(original, wh)
        tamper(wh, sql)
        outcome = checks_only(wh, instance, tutor_scores_current, tutor_scores_current_checks)
        assert {name for name, passed in outcome.items() if not passed} == failing, what


@pytest.mark.parametrize("snapshot", ["current", "daily"])
def test_checks_leave_out_tutors_a_later_drop_changed(
    wh: Path, tmp_path: Path, snapshot: str
) -> None:
    """Another run may load drops between a snapshot's step and its checks' (the warehouse
    pool runs one step at a time, not one run at a time). The tutors those drops touched are
    not counted against sessions the snapshot never saw; every other tutor must still
    reconcile."""
    instance = dg.DagsterInstance.ephemeral()
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    if snapshot == "current":
        asset, check, tags = tutor_scores_current, tutor_scores_current_checks, {}
        late_at = AS_OF - timedelta(days=1)
        assert current_run(wh, instance=instance).success
    else:
        asset, check, tags = tutor_scores_daily, tutor_scores_daily_checks, range_tags(first, last)
        late_at = partition_as_of(first) + timedelta(days=1, hours=3)  # in the range
        assert dg.materialize(DAILY, resources=resources(wh), instance=instance, tags=tags).success
    name = f"tutor_scores_{snapshot}"
    tutors = table(wh, name).get_column("tutor_id").unique(maintain_order=True)
    one, two, untouched, later = tutors.head(4)
    late = HandDrop()
    late.session("late-1", one, late_at, moved_by="tutor")
    late.session("late-2", two, late_at, status="no_show")
    # After every as-of checked: no count of this tutor's checked rows can hold it.
    late.session("late-3", later, AS_OF + timedelta(days=2))
    # A new tutor's only session, older than every window: the snapshot lacks the tutor.
    late.session("late-4", "T-new", late_at - timedelta(days=120))
    report = load_drop(wh, late, tmp_path / "landing", "20240520T1200")
    assert sum(f.rows_loaded for f in report.files) == 5

    def checks() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [asset, check],
            resources=resources(wh),
            instance=instance,
            selection=dg.AssetSelection.checks_for_assets(asset),
            raise_on_error=False,
            tags=tags,
        )

    result = checks()
    assert check_outcomes(result) == ALL_PASS
    (counted,) = (e for e in result.get_asset_check_evaluations() if e.check_name == COUNTS_AUDIT)
    assert counted.metadata["tutors_changed_since_scored"].value == 4
    assert counted.metadata["failures_excused"].value > 0
    # A tutor the drop did not touch, or touched only after every as-of checked, is still
    # recounted.
    sound = tmp_path / "sound.duckdb"
    shutil.copy(wh, sound)
    for tutor in (untouched, later):
        shutil.copy(sound, wh)
        tamper(
            wh,
            f"UPDATE {name} SET total_sessions_90d = total_sessions_90d + 1 "
            f"WHERE tutor_id = '{tutor}'",
        )
        assert not check_outcomes(checks())[COUNTS_AUDIT], tutor


def test_a_tutor_a_later_export_moves_away_is_not_called_unknown(wh: Path, tmp_path: Path) -> None:
    """A tutor known only from their sessions leaves the `tutors` view when a later export
    gives their one session to someone else; the snapshot scored before it is not failed for
    that, but a tutor unknown for any other reason still is."""
    instance = dg.DagsterInstance.ephemeral()
    own = HandDrop()
    own.session("moving", "T-moving", AS_OF - timedelta(days=3))
    load_drop(wh, own, tmp_path / "first", "20240517T1200")
    assert current_run(wh, instance=instance).success
    assert "T-moving" in table(wh, "tutor_scores_current").get_column("tutor_id").to_list()
    moved = HandDrop()
    moved.session("moving", "T-other", AS_OF - timedelta(days=3))
    load_drop(wh, moved, tmp_path / "second", "20240520T1200")
    outcome = checks_only(wh, instance, tutor_scores_current, tutor_scores_current_checks)
    assert outcome == ALL_PASS
    tamper(wh, "UPDATE tutor_scores_current SET tutor_id = 'T-nobody' WHERE tutor_id = 'T-moving'")
    assert not checks_only(wh, instance, tutor_scores_current, tutor_scores_current_checks)[
        "tutors_known"
    ]


def test_a_daily_check_judges_by_the_loads_its_own_run_scored(wh: Path, tmp_path: Path) -> None:
    """A range's check runs in the range's run; if another run re-scored its last day from
    newer loads in between, the range's other days were still made from this run's loads."""
    instance = dg.DagsterInstance.ephemeral()
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    scores = [tutor_daily_activity, tutor_scores_daily]
    ours = dg.materialize(
        scores, resources=resources(wh), instance=instance, tags=range_tags(first, last)
    )
    late = HandDrop()
    late.session("late-1", "T-late", partition_as_of(last) - timedelta(hours=3))
    load_drop(wh, late, tmp_path / "landing", "20240520T1200")
    theirs = dg.materialize(
        scores, resources=resources(wh), instance=instance, tags=range_tags(last, last)
    )
    assert ours.success and theirs.success
    # The check's own view of the instance: the run it belongs to.
    context: Any = types.SimpleNamespace(instance=instance, run=instance.get_run_by_id(ours.run_id))
    own = score_checks._latest_metadata(
        context, tutor_scores_daily, last.isoformat(), own_run_first=True
    )
    latest = score_checks._latest_metadata(context, tutor_scores_daily, last.isoformat())
    assert own[LOADS_THROUGH].value < latest[LOADS_THROUGH].value


def test_failed_checks_block_what_follows(wh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    published: list[bool] = []

    @dg.asset(deps=[tutor_scores_current])
    def published_snapshot() -> None:
        published.append(True)

    real = score_assets.assess_as_of

    def with_ghost(*args: Any, **kwargs: Any) -> Assessment:
        assessed = real(*args, **kwargs)
        scores = assessed.scores
        ghost = scores.head(1).with_columns(pl.lit("GHOST").alias("tutor_id"))
        return dataclasses.replace(assessed, scores=pl.concat([scores, ghost]))

    monkeypatch.setattr(score_assets, "assess_as_of", with_ghost)
    result = current_run(wh, published_snapshot)
    assert not result.success
    assert check_outcomes(result)["tutors_known"] is False
    assert published == []
    monkeypatch.undo()
    result = current_run(wh, published_snapshot)
    assert result.success and published == [True]


def test_daily_checks_catch_a_missing_row(wh: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    # Nothing stored yet: nothing to check.
    assert checks_only(wh, instance, tutor_scores_daily, tutor_scores_daily_checks) == ALL_PASS
    day = date(2024, 5, 12)
    tags = range_tags(day - timedelta(days=1), day)
    result = dg.materialize(DAILY, resources=resources(wh), instance=instance, tags=tags)
    assert result.success
    tamper(
        wh,
        "DELETE FROM tutor_scores_daily WHERE as_of = TIMESTAMPTZ '2024-05-13 00:00:00+00' "
        "AND tutor_id = (SELECT min(tutor_id) FROM tutor_scores_daily)",
    )
    run_alone = checks_only(wh, instance, tutor_scores_daily, tutor_scores_daily_checks)
    assert run_alone == {**ALL_PASS, "counts_reconcile_with_sessions": False}
    with_range = checks_only(wh, instance, tutor_scores_daily, tutor_scores_daily_checks, tags=tags)
    assert with_range == run_alone


def test_daily_checks_judge_rows_stored_out_of_order_and_catch_a_repeated_one(wh: Path) -> None:
    """The checks read stored rows in stored order and sort them only when they need it: days
    re-stored after later ones (late data) pass as before, and a repeated row appended at the
    end still fails its check."""
    instance = dg.DagsterInstance.ephemeral()
    first, last = date(2024, 5, 10), date(2024, 5, 13)
    result = dg.materialize(
        DAILY, resources=resources(wh), instance=instance, tags=range_tags(first, last)
    )
    assert result.success
    # The second day moved to the end of the table, as a later re-run of it would store it.
    tamper(
        wh,
        "CREATE TEMP TABLE moved AS SELECT * FROM tutor_scores_daily "
        "WHERE as_of = TIMESTAMPTZ '2024-05-11 00:00:00+00'; "
        "DELETE FROM tutor_scores_daily WHERE as_of = TIMESTAMPTZ '2024-05-11 00:00:00+00'; "
        "INSERT INTO tutor_scores_daily SELECT * FROM moved",
    )
    with duckdb.connect(str(wh), read_only=True) as con:
        stored = con.execute("SELECT as_of FROM tutor_scores_daily").fetchall()
    assert stored != sorted(stored)
    tags = range_tags(first, last)
    assert checks_only(wh, instance, tutor_scores_daily, tutor_scores_daily_checks, tags=tags) == (
        ALL_PASS
    )
    tamper(
        wh,
        "INSERT INTO tutor_scores_daily SELECT * FROM tutor_scores_daily "
        "WHERE as_of = TIMESTAMPTZ '2024-05-12 00:00:00+00' LIMIT 1",
    )
    outcome = checks_only(wh, instance, tutor_scores_daily, tutor_scores_daily_checks, tags=tags)
    assert outcome["one_row_per_tutor_per_snapshot"] is False


def test_score_checks_cover_both_snapshot_assets() -> None:
    keys = {key for check in SCORE_CHECKS for key in check.check_keys}
    assert {k.asset_key for k in keys} == {tutor_scores_daily.key, tutor_scores_current.key}
    assert all(spec.blocking for check in SCORE_CHECKS for spec in check.check_specs)
    assert {k.name for k in keys} == set(ALL_PASS)


# Late data


def loads(*spans: tuple[str | None, str | None]) -> pl.DataFrame:
    def ts(text: str | None) -> datetime | None:
        return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)

    return pl.DataFrame(
        {
            "load_id": list(range(1, len(spans) + 1)),
            "min_scheduled_time": [ts(a) for a, _ in spans],
            "max_scheduled_time": [ts(b) for _, b in spans],
        },
        schema_overrides={
            "min_scheduled_time": pl.Datetime("us", "UTC"),
            "max_scheduled_time": pl.Datetime("us", "UTC"),
        },
    )


def test_affected_day_ranges_merge_and_clip() -> None:
    reach = timedelta(days=LATE_DATA_REACH_DAYS)
    first, last = date(2023, 1, 1), date(2024, 12, 31)
    ranges = affected_day_ranges(
        loads(
            ("2024-04-10T08:00:00", "2024-04-12T23:59:59"),
            ("2024-04-11T00:00:00", "2024-04-11T01:00:00"),  # inside the first
            ("2024-07-18T00:00:00", "2024-07-18T00:00:00"),  # the day after the first ends
            (None, None),  # a tutors file
            ("2024-12-01T00:00:00", "2025-02-01T00:00:00"),  # ends after the last partition
            ("2022-12-30T00:00:00", "2023-01-02T00:00:00"),  # starts before the first
            ("2025-03-01T00:00:00", "2025-03-02T00:00:00"),  # in the future
        ),
        first_day=first,
        last_day=last,
    )
    assert ranges == [
        (first, date(2023, 1, 2) + reach),
        (date(2024, 4, 10), date(2024, 7, 18) + reach),
        (date(2024, 12, 1), last),
    ]
    assert date(2024, 4, 12) + reach == date(2024, 7, 17)


def write_sessions(landing: Path, name: str, times: list[datetime], prefix: str) -> None:
    landing.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "session_id": [f"{prefix}{i}" for i in range(len(times))],
            "tutor_id": ["T1"] * len(times),
            "scheduled_time": [t.isoformat() for t in times],
            "status": ["completed"] * len(times),
        }
    ).write_csv(landing / name)


def ingest(home: Settings) -> None:
    with warehouse.connect(home.warehouse) as con:
        warehouse.ensure_schema(con)
        ingest_landing(
            con, home.landing_dir, archive_dir=home.archive_dir, quarantine_dir=home.quarantine_dir
        )


def evaluate(home: Settings, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(
        cursor=cursor,
        resources={
            "warehouse": WarehouseResource(path=str(home.warehouse)),
            "risk_rule": RiskRuleResource(),
        },
    )
    result = late_data_sensor(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def test_late_data_sensor_requests_one_range_run_per_late_load(home: Settings) -> None:
    assert isinstance(evaluate(home, None), dg.SkipReason)  # no warehouse yet
    start = daily_partitions.start.date()
    last_key = daily_partitions.get_last_partition_key()
    assert last_key is not None
    last = date.fromisoformat(last_key)
    at = datetime(2024, 4, 10, 8, tzinfo=UTC)
    write_sessions(home.landing_dir, "sessions_1.csv", [at, at + timedelta(days=2)], "a")
    pl.DataFrame({"tutor_id": ["T1"], "name": ["Ann"]}).write_csv(home.landing_dir / "tutors_1.csv")
    ingest(home)

    first = evaluate(home, None)
    assert isinstance(first, dg.SensorResult)
    assert first.cursor is not None and int(first.cursor) >= 2
    [request] = first.run_requests or []
    assert request.tags["dagster/asset_partition_range_start"] == "2024-04-10"
    # The days whose windows, and whose risk tiers (baseline, watch_since), read those days.
    reach = reach_days(AssessParams())
    assert reach > LATE_DATA_REACH_DAYS
    expected_end = min(last, date(2024, 4, 12) + timedelta(days=reach))
    assert request.tags["dagster/asset_partition_range_end"] == expected_end.isoformat()
    assert request.run_key is not None and request.run_key.startswith("late-data:")

    again = evaluate(home, first.cursor)
    assert isinstance(again, dg.SkipReason)

    # A correction of an old day and a load of sessions still to come.
    write_sessions(home.landing_dir, "sessions_2.csv", [datetime(2022, 12, 30, tzinfo=UTC)], "b")
    future = datetime.combine(last + timedelta(days=3), datetime.min.time(), tzinfo=UTC)
    write_sessions(home.landing_dir, "sessions_3.csv", [future], "c")
    ingest(home)
    later = evaluate(home, first.cursor)
    assert isinstance(later, dg.SensorResult)
    assert int(later.cursor or 0) == int(first.cursor) + 2
    # 2022-12-30 reaches `reach` days on; days before the first partition do not exist.
    reach_end = date(2022, 12, 30) + timedelta(days=reach)
    expected = [] if start > reach_end else [max(start, date(2022, 12, 30)).isoformat()]
    starts = [r.tags["dagster/asset_partition_range_start"] for r in later.run_requests or []]
    assert starts == expected

    # The requested range run recomputes those partitions (checks included).
    result = dg.materialize(
        DAILY,
        resources=resources(home.warehouse),
        tags={k: v for k, v in request.tags.items() if k.startswith("dagster/")},
    )
    assert result.success and all(check_outcomes(result).values())
    scores = table(home.warehouse, "tutor_scores_daily")
    assert scores.get_column("as_of").min() == datetime(2024, 4, 11, tzinfo=UTC)


def test_late_data_sensor_redoes_the_day_a_session_left_and_a_rescheduled_sessions_day(
    home: Settings,
) -> None:
    """Two late loads whose own rows do not say which days they change: a re-export moving a
    session to another day (its old day goes stale too), and a reschedule without an
    original_time (its day is its session's)."""
    old_day, kept_day = datetime(2024, 4, 10, 8, tzinfo=UTC), datetime(2024, 4, 20, 8, tzinfo=UTC)
    write_sessions(home.landing_dir, "sessions_1.csv", [old_day, kept_day], "a")
    ingest(home)
    first = evaluate(home, None)
    assert isinstance(first, dg.SensorResult)

    def starts(result: dg.SensorResult | dg.SkipReason) -> list[str]:
        assert isinstance(result, dg.SensorResult)
        return [r.tags["dagster/asset_partition_range_start"] for r in result.run_requests or []]

    write_sessions(home.landing_dir, "sessions_2.csv", [datetime(2024, 5, 20, tzinfo=UTC)], "a")
    ingest(home)
    moved = evaluate(home, first.cursor)
    assert starts(moved) == ["2024-04-10"]

    pl.DataFrame(
        {"session_id": ["a1"], "initiator": ["tutor"], "cancelled_at": ["2024-04-19T08:00:00Z"]}
    ).write_csv(home.landing_dir / "reschedules_1.csv")
    ingest(home)
    assert isinstance(moved, dg.SensorResult)
    assert starts(evaluate(home, moved.cursor)) == ["2024-04-20"]


def test_late_data_sensor_skips_while_the_warehouse_is_locked(home: Settings) -> None:
    write_sessions(home.landing_dir, "sessions_1.csv", [datetime(2024, 4, 10, tzinfo=UTC)], "a")
    ingest(home)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time\n"
            f"con = duckdb.connect({str(home.warehouse)!r})\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = evaluate(home, None)
        assert isinstance(result, dg.SkipReason)
        assert "busy" in (result.skip_message or "")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert isinstance(evaluate(home, None), dg.SensorResult)


def test_late_data_sensor_waits_for_the_load_range_columns(home: Settings) -> None:
    home.warehouse.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(home.warehouse)) as con:
        con.execute("CREATE TABLE loaded_files (load_id BIGINT, file_name VARCHAR)")
        con.execute("INSERT INTO loaded_files VALUES (1, 'sessions_1.csv')")
    result = evaluate(home, None)
    assert isinstance(result, dg.SkipReason)
    assert "min/max_scheduled_time" in (result.skip_message or "")


def test_the_daily_checks_read_a_long_range_a_chunk_at_a_time_with_the_same_findings(
    wh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    result = dg.materialize(DAILY, resources=resources(wh), tags=range_tags(first, last))
    assert result.success
    tamper(
        wh,
        "DELETE FROM tutor_scores_daily WHERE as_of = TIMESTAMPTZ '2024-05-13 00:00:00+00' "
        "AND tutor_id = (SELECT min(tutor_id) FROM tutor_scores_daily)",
    )
    instants = [partition_as_of(first + timedelta(days=i)) for i in range(5)]
    scores = table(wh, "tutor_scores_daily")
    with warehouse.connect(wh, read_only=True) as con:
        whole = audit_scores(con, scores, instants)
        monkeypatch.setattr(scoring, "CHUNK_DAYS", 2)
        reads: list[int] = []

        def rows_between(lo: datetime | None, hi: datetime | None) -> pl.DataFrame:
            part = scores.filter(
                (pl.col("as_of") >= (lo or instants[0]))
                & (pl.col("as_of") < (hi or datetime.max.replace(tzinfo=UTC)))
            )
            reads.append(part.height)
            return part

        parts = audit_score_parts(con, instants, rows_between)
    assert len(reads) == 3 and sum(reads) == scores.height  # every row read once, in 3 parts
    assert [f.name for f in parts] == [f.name for f in whole]
    for chunked, at_once in zip(parts, whole, strict=True):
        assert chunked.failures.equals(at_once.failures), chunked.name
    assert not next(f for f in parts if f.name == "counts_reconcile_with_sessions").passed


def with_store(path: Path, url: str) -> dict[str, Any]:
    return {**resources(path), "serving_store": ServingStoreResource(database_url=url)}


def stored_history(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT * FROM tutor_score_history ORDER BY tutor_id, score_date"
            return [tuple(row) for row in conn.exec_driver_sql(query)]
    finally:
        engine.dispose()


def writable_by_another_process(path: Path) -> bool:
    """Whether another process (a landing run, say) could open the warehouse to write now."""
    opened = subprocess.run(
        [sys.executable, "-c", "import duckdb, sys; duckdb.connect(sys.argv[1]).close()", path],
        capture_output=True,
        check=False,
    )
    return opened.returncode == 0


def test_the_history_frees_the_warehouse_before_the_store_has_taken_it(
    wh: Path, pg_url: str
) -> None:
    """The history's range waits in Parquet parts beside the warehouse, which is closed before
    the store takes them: another process (a landing run) can write the warehouse while the
    store is still busy, here waiting for another publish to finish."""
    first, last = date(2024, 5, 10), date(2024, 5, 14)
    assert dg.materialize(DAILY, resources=resources(wh), tags=range_tags(first, last)).success
    store = sa.create_engine(pg_url)
    ensure_current(store)  # so that the publish waits for the lock below, not its migration
    runs: list[dg.ExecuteInProcessResult] = []

    def publish() -> None:
        runs.append(
            dg.materialize(
                [tutor_score_history],
                resources=with_store(wh, pg_url),
                tags=range_tags(first, last),
                raise_on_error=False,
            )
        )

    step = threading.Thread(target=publish)
    with store.connect() as other_publish, other_publish.begin():
        other_publish.execute(sa.select(sa.func.pg_advisory_xact_lock(STORE_LOCK_ID)))
        step.start()
        deadline = time.monotonic() + 60
        while not writable_by_another_process(wh):
            assert time.monotonic() < deadline, "the warehouse stayed open"
        assert step.is_alive() and stored_history(pg_url) == []  # the store is still waiting
    step.join(60)
    store.dispose()
    assert runs and runs[0].success
    tutors = table(wh, "tutor_scores_daily").get_column("tutor_id").n_unique()
    assert len(stored_history(pg_url)) == 5 * tutors


def test_a_range_lists_each_top_risk_tutor_once_at_their_highest() -> None:
    """A range run's page listed one tutor once per day of the range, without the day."""
    days = [datetime(2024, 5, d, tzinfo=UTC) for d in (10, 11, 12)]
    rows = pl.DataFrame(
        {
            "tutor_id": ["A", "A", "A", "B", "B", "C"],
            "as_of": [*days, days[0], days[2], days[1]],
            "is_high_risk": [True, True, True, True, True, False],
            "reschedule_rate_7d": [0.2] * 6,
            "reschedule_rate_30d": [0.30, 0.40, 0.35, 0.20, 0.25, 0.9],
            "reschedule_rate_90d": [0.2] * 6,
            "total_sessions_30d": [10] * 6,
            "risk_tier": ["high"] * 6,
            "newly_flagged": [False] * 6,
        }
    )
    tally = ScoreTally()
    tally.add(rows.head(3))  # stored a part at a time, as a backfill does
    tally.add(rows.tail(3))
    table = tally.metadata()["top_risks"].value
    assert isinstance(table, str)
    assert table.splitlines()[2:] == [
        "| A | 2024-05-11 00:00 | 20% | 40% | 20% | 10 |",
        "| B | 2024-05-12 00:00 | 20% | 25% | 20% | 10 |",
    ]


def test_the_partition_due_is_yesterdays_from_the_deadline_on() -> None:
    assert due_day(datetime(2026, 12, 7, 1, 29, 59, tzinfo=UTC)) == date(2026, 12, 5)
    assert due_day(datetime(2026, 12, 7, 1, 30, tzinfo=UTC)) == date(2026, 12, 6)
    assert due_day(datetime(2026, 12, 7, 23, 59, tzinfo=UTC)) == date(2026, 12, 6)
    assert due_day(datetime(2026, 12, 8, 0, 15, tzinfo=UTC)) == date(2026, 12, 6)
    # Another timezone's instant is the same instant.
    eastern = timezone(timedelta(hours=-5))
    assert due_day(datetime(2026, 12, 6, 20, 30, tzinfo=eastern)) == date(2026, 12, 6)


def test_the_schedules_ask_for_yesterday_after_midnight_and_check_it_at_the_deadline() -> None:
    """The ticks as the daemon evaluates them, on a real instance: at 00:15 UTC the daily
    schedule requests yesterday's partition (the snapshot as of midnight); at 01:30 UTC the
    deadline's schedule requests the partition check's job."""
    daily = defs.resolve_schedule_def("daily_scores_job_schedule")
    deadline = defs.resolve_schedule_def("yesterday_partition_freshness_job_schedule")
    assert (daily.cron_schedule, deadline.cron_schedule) == ("15 0 * * *", "30 1 * * *")
    with dg.instance_for_test() as instance:
        for at, partition in [
            (datetime(2026, 12, 7, 0, 15, tzinfo=UTC), "2026-12-06"),
            (datetime(2027, 1, 1, 0, 15, tzinfo=UTC), "2026-12-31"),
        ]:
            tick = daily.evaluate_tick(
                dg.build_schedule_context(instance=instance, scheduled_execution_time=at)
            )
            assert [r.partition_key for r in tick.run_requests or []] == [partition]
            assert daily_partitions.time_window_for_partition_key(partition).end == at.replace(
                minute=0
            )
        at = datetime(2026, 12, 7, 1, 30, tzinfo=UTC)
        tick = deadline.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=at)
        )
        assert len(tick.run_requests or []) == 1
        assert deadline.job_name == "yesterday_partition_freshness_job"
        assert due_day(at) == date(2026, 12, 6)  # what the check, run now, looks for


def test_yesterdays_partition_goes_red_until_a_run_materializes_it(
    wh: Path, tmp_path: Path, due_partition: date
) -> None:
    """A backfill of old days used to keep the daily assets green while yesterday's partition
    was missing. The partition check is red then, names the day it waits for, and turns green
    in the run that materializes that day."""
    due = due_partition.isoformat()
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    daily = [*DAILY, tutor_score_history, yesterday_partition_freshness]
    with dg.instance_for_test() as instance:
        # A backfill of old days: Dagster's freshness policy is satisfied, the check is not.
        old = range_tags(date(2024, 5, 12), date(2024, 5, 13))
        backfill = dg.materialize(daily, resources=with_store(wh, url), instance=instance, tags=old)
        assert backfill.success
        evaluations = {
            e.asset_key.to_user_string(): e
            for e in backfill.get_asset_check_evaluations()
            if e.check_name == YESTERDAY_MATERIALIZED
        }
        assert set(evaluations) == {
            "tutor_daily_activity",
            "tutor_scores_daily",
            "tutor_score_history",
        }
        history = evaluations["tutor_score_history"]
        assert not history.passed and history.severity == dg.AssetCheckSeverity.ERROR
        assert f"partition {due} was due by" in (history.description or "")
        assert history.metadata[DUE_PARTITION].value == due
        assert not evaluations["tutor_scores_daily"].passed

        # The deadline's own run (the schedule's job: the check alone) stays red.
        job = defs.resolve_job_def("yesterday_partition_freshness_job")
        alone = job.execute_in_process(instance=instance, resources=with_store(wh, url))
        assert alone.success
        assert [e.passed for e in alone.get_asset_check_evaluations()] == [False] * 3

        # The daily schedule's run of the due day runs the check too, and it passes.
        daily_run = dg.materialize(
            daily, resources=with_store(wh, url), instance=instance, partition_key=due
        )
        assert daily_run.success
        fresh = [
            e
            for e in daily_run.get_asset_check_evaluations()
            if e.check_name == YESTERDAY_MATERIALIZED
        ]
        assert len(fresh) == 3 and all(e.passed for e in fresh)
    # The scheduled job selects the check, so a missing day is re-judged by the run that fills
    # it; the check's own schedule runs it at the deadline.
    daily_job = defs.resolve_job_def("daily_scores_job")
    assert {
        k.asset_key.to_user_string()
        for k in daily_job.asset_layer.asset_graph.asset_check_keys
        if k.name == YESTERDAY_MATERIALIZED
    } == {"tutor_daily_activity", "tutor_scores_daily", "tutor_score_history"}
    schedule = defs.resolve_schedule_def("yesterday_partition_freshness_job_schedule")
    assert schedule.cron_schedule == "30 1 * * *"


def test_no_partition_is_due_before_the_first_one(
    wh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment whose first day is today has no partition due: the check passes rather
    than failing the run (Dagster's own check failed the step there)."""
    today = datetime.now(UTC).date()
    monkeypatch.setattr(
        freshness,
        "daily_partitions",
        dg.DailyPartitionsDefinition(start_date=today.isoformat(), timezone="UTC", end_offset=0),
    )
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("yesterday_partition_freshness_job")
        run = job.execute_in_process(instance=instance, resources=with_store(wh, "sqlite://"))
    assert run.success
    evaluations = run.get_asset_check_evaluations()
    assert len(evaluations) == 3 and all(e.passed for e in evaluations)
    assert all("no partition is due yet" in (e.description or "") for e in evaluations)
