"""Tests of the synthetic landing-drop generator (tutor_scoring_dagster.generate)."""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pytest

from tutor_scoring_dagster import generate
from tutor_scoring_dagster.generate import (
    BAD_TIMESTAMPS,
    MAX_FILES_PER_ENTITY,
    GeneratedDrops,
    generate_drops,
)
from tutor_scoring_dagster.schemas import DROP_MODELS, INITIATORS, SESSION_STATUSES, drop_columns

END = date(2024, 6, 1)
DAYS = 60
NAME = re.compile(r"^(tutors|sessions|reschedules)_(\d{8}T\d{4})\.(csv|parquet)$")
ENTITIES = ("tutors", "sessions", "reschedules")


def _small(
    out: Path, *, fmt: Literal["csv", "parquet"] = "csv", defects: float = 0.0
) -> GeneratedDrops:
    """~12,000 sessions of 100 tutors: big enough for rates, small enough for a fast test."""
    return generate_drops(
        out, tutors=100, days=DAYS, sessions_per_day=200, end=END, fmt=fmt, defects=defects
    )


def _read(path: Path, *, text: bool = False) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    return pl.read_csv(path, infer_schema=not text, infer_schema_length=None)


def _load(g: GeneratedDrops, entity: str, *, text: bool = True) -> pl.DataFrame:
    """All rows of one entity, in drop order, with the drop number of each row."""
    return _load_files(tuple(g.files), entity, text)


@functools.cache  # the module's fixtures are read by several tests
def _load_files(files: tuple[Path, ...], entity: str, text: bool) -> pl.DataFrame:
    frames = [
        _read(p, text=text).with_columns(drop=pl.lit(i))
        for i, p in enumerate(files)
        if p.name.startswith(entity)
    ]
    return pl.concat(frames, how="vertical")


def _instant(value: str | None) -> datetime | None:
    """A contract timestamp as an aware UTC datetime (naive means UTC)."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


@pytest.fixture(scope="module")
def csv_drops(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDrops:
    return _small(tmp_path_factory.mktemp("csv"))


@pytest.fixture(scope="module")
def parquet_drops(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDrops:
    return _small(tmp_path_factory.mktemp("parquet"), fmt="parquet")


@pytest.fixture(scope="module")
def defect_drops(tmp_path_factory: pytest.TempPathFactory) -> GeneratedDrops:
    return _small(tmp_path_factory.mktemp("defects"), defects=0.05)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_same_seed_gives_identical_bytes_other_seed_differs(
    tmp_path: Path, fmt: Literal["csv", "parquet"]
) -> None:
    a, b, c = (
        generate_drops(tmp_path / name, tutors=30, days=20, sessions_per_day=60, end=END,
                       fmt=fmt, seed=seed, defects=0.05)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    )  # fmt: skip
    assert [p.name for p in a.files] == [p.name for p in b.files]
    for pa, pb in zip([*a.files, a.ground_truth], [*b.files, b.ground_truth], strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    a_sessions = b"".join(p.read_bytes() for p in a.files if p.name.startswith("sessions"))
    c_sessions = b"".join(p.read_bytes() for p in c.files if p.name.startswith("sessions"))
    assert a_sessions != c_sessions


@pytest.mark.parametrize("fixture", ["csv_drops", "parquet_drops"])
def test_files_have_exactly_the_contract_columns(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    g: GeneratedDrops = request.getfixturevalue(fixture)
    for path in g.files:
        entity = NAME.match(path.name).group(1)  # type: ignore[union-attr]
        if path.suffix == ".parquet":
            assert dict(pl.read_parquet_schema(path)) == drop_columns(entity), path.name
        else:
            assert pl.read_csv(path, n_rows=0).columns == list(drop_columns(entity)), path.name


@pytest.mark.parametrize("entity", ENTITIES)
def test_clean_parquet_rows_pass_the_pandera_models(
    parquet_drops: GeneratedDrops, entity: str
) -> None:
    DROP_MODELS[entity].validate(_load(parquet_drops, entity).drop("drop"), lazy=True)


def test_clean_rows_follow_the_contract(csv_drops: GeneratedDrops) -> None:
    s = _load(csv_drops, "sessions", text=False)
    r = _load(csv_drops, "reschedules", text=False)
    t = _load(csv_drops, "tutors", text=False)
    assert set(s["status"]) <= set(SESSION_STATUSES)
    assert set(s["status"]) == set(SESSION_STATUSES)
    assert set(r["initiator"]) == set(INITIATORS)
    for frame, entity in ((s, "sessions"), (r, "reschedules"), (t, "tutors")):
        required = [c for c in ("session_id", "tutor_id", "status", "initiator") if c in frame]
        assert sum(frame.select(pl.col(required).null_count()).row(0)) == 0, entity
    assert t["is_active"].dtype == pl.Boolean
    assert set(s["duration_minutes"]) == {30, 45, 60, 90}
    assert not s.is_duplicated().any()

    times = s.select(
        pl.col("scheduled_time").map_elements(_instant, return_dtype=pl.Datetime("us", "UTC")),
        pl.col("completed_time").map_elements(_instant, return_dtype=pl.Datetime("us", "UTC")),
        pl.col("updated_at").map_elements(_instant, return_dtype=pl.Datetime("us", "UTC")),
        "status",
    )
    end = datetime(END.year, END.month, END.day, tzinfo=UTC)
    start = end - timedelta(days=DAYS)
    assert times["scheduled_time"].min() >= start  # type: ignore[operator]
    assert times["scheduled_time"].max() < end  # type: ignore[operator]
    assert times["updated_at"].max() < end  # type: ignore[operator]
    minutes = times["scheduled_time"].dt.minute()
    assert set(minutes) <= {0, 30}
    done = times.filter(pl.col("completed_time").is_not_null())
    assert (done["completed_time"] >= done["scheduled_time"]).all()
    assert (done["status"] == "completed").all()

    rt = r.select(
        pl.col(c).map_elements(_instant, return_dtype=pl.Datetime("us", "UTC"))
        for c in ("original_time", "new_time", "cancelled_at")
    ).with_columns(r["hours_before_session"])
    assert (rt["new_time"] > rt["original_time"]).all()
    assert (rt["cancelled_at"] < rt["original_time"]).all()
    hours = (rt["original_time"] - rt["cancelled_at"]).dt.total_seconds() / 3600
    assert ((hours - rt["hours_before_session"]).abs() < 1e-6).all()
    short = (rt["hours_before_session"] < 24).mean()
    assert 0.2 < short < 0.8  # type: ignore[operator]
    assert r["reason_code"].n_unique() >= 5


def test_reschedules_refer_to_sessions_of_the_same_or_an_earlier_drop(
    csv_drops: GeneratedDrops,
) -> None:
    s = _load(csv_drops, "sessions").group_by("session_id").agg(first_drop=pl.col("drop").min())
    r = _load(csv_drops, "reschedules")
    joined = r.join(s, on="session_id", how="left")
    assert joined["first_drop"].null_count() == 0
    assert (joined["first_drop"] <= joined["drop"]).all()


def test_returned_counts_match_the_files(csv_drops: GeneratedDrops) -> None:
    s, r = _load(csv_drops, "sessions"), _load(csv_drops, "reschedules")
    assert csv_drops.sessions == s["session_id"].n_unique()
    assert csv_drops.reschedules == r["session_id"].n_unique() == r.height
    assert csv_drops.tutors == pl.read_csv(csv_drops.ground_truth).height
    # Every session rescheduled by anyone has exactly one reschedule row.
    moved = s.filter(pl.col("status") == "rescheduled")["session_id"].unique()
    assert set(moved) <= set(r["session_id"])


def test_parquet_holds_the_same_instants_as_the_mixed_csv_spellings(
    csv_drops: GeneratedDrops, parquet_drops: GeneratedDrops
) -> None:
    assert [p.stem for p in csv_drops.files] == [p.stem for p in parquet_drops.files]
    spellings: set[str] = set()
    for entity in ENTITIES:
        text, typed = _load(csv_drops, entity), _load(parquet_drops, entity)
        for col, dtype in drop_columns(entity).items():
            if isinstance(dtype, pl.Datetime):
                spellings |= set(text[col].drop_nulls().str.replace_all(r"\d", "9"))
                assert [_instant(v) for v in text[col]] == typed[col].to_list(), (entity, col)
            elif dtype == pl.Boolean:
                assert (text[col] == "true").to_list() == typed[col].to_list(), (entity, col)
            else:
                assert text[col].cast(dtype).to_list() == typed[col].to_list(), (entity, col)
    assert {
        "9999-99-99T99:99:99+99:99",
        "9999-99-99T99:99:99Z",
        "9999-99-99 99:99:99",
        "9999-99-99T99:99:99-99:99",
    } <= spellings


def test_chronic_tutors_reschedule_far_more_than_reliable_ones(
    parquet_drops: GeneratedDrops,
) -> None:
    truth = pl.read_csv(parquet_drops.ground_truth)
    sessions = _load(parquet_drops, "sessions").select("session_id", "tutor_id").unique()
    by_tutor = (
        _load(parquet_drops, "reschedules")
        .filter(pl.col("initiator") == "tutor")
        .select("session_id", moved=pl.lit(1))
    )
    rates = (
        sessions.join(by_tutor, on="session_id", how="left")
        .join(truth, on="tutor_id")
        .group_by("profile")
        .agg(rate=pl.col("moved").fill_null(0).mean())
    )
    rate = dict(zip(rates["profile"], rates["rate"], strict=True))
    assert rate["chronic"] > 0.18
    assert rate["reliable"] < 0.07
    assert rate["chronic"] > 3 * rate["reliable"]
    assert 0.08 < rate["near_threshold"] < 0.15


def test_deteriorating_tutors_jump_at_their_onset(parquet_drops: GeneratedDrops) -> None:
    truth = pl.read_csv(parquet_drops.ground_truth, try_parse_dates=True)
    assert set(truth["profile"]) == {
        "reliable", "chronic", "deteriorating", "near_threshold", "low_volume"
    }  # fmt: skip
    has_onset = truth.filter(pl.col("onset").is_not_null())
    assert set(has_onset["profile"]) == {"deteriorating"}
    sessions = _load(parquet_drops, "sessions").unique("session_id")
    moved = _load(parquet_drops, "reschedules").filter(pl.col("initiator") == "tutor")
    phases = (
        sessions.join(has_onset, on="tutor_id")
        .join(moved.select("session_id", moved=pl.lit(1)), on="session_id", how="left")
        .group_by(after=pl.col("scheduled_time").dt.date() >= pl.col("onset"))
        .agg(rate=pl.col("moved").fill_null(0).mean())
    )
    rate = dict(zip(phases["after"], phases["rate"], strict=True))
    assert rate[True] > 0.15 > 0.07 > rate[False]
    low = truth.filter(pl.col("profile") == "low_volume")["tutor_id"]
    counts = sessions.group_by("tutor_id").len()
    low_counts = counts.filter(pl.col("tutor_id").is_in(low.to_list()))["len"]
    assert low_counts.max() < counts["len"].median()  # type: ignore[operator]


def test_file_names_and_drop_count(csv_drops: GeneratedDrops) -> None:
    names = [p.name for p in csv_drops.files]
    assert all(NAME.match(n) for n in names)
    assert all(p.parent == csv_drops.ground_truth.parent and p.exists() for p in csv_drops.files)
    assert names[0] == "tutors_20240402T0000.csv"  # the start of the 60 days before END
    stamps = [NAME.match(n).group(2) for n in names]  # type: ignore[union-attr]
    assert stamps == sorted(stamps)
    periods = DAYS * 4
    sessions = [n for n in names if n.startswith("sessions")]
    assert periods * 0.9 <= len(sessions) <= periods
    assert sessions[-1] == "sessions_20240601T0000.csv"
    assert {s[-4:] for s in stamps} <= {"0000", "0600", "1200", "1800"}
    tutors = [n for n in names if n.startswith("tutors")]
    assert len(tutors) == 2  # the initial export and a later delta


def test_long_ranges_group_days_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_FILES_PER_ENTITY == 1200
    # A lower cap exercises the same rule as a multi-year run, in a fraction of the time.
    monkeypatch.setattr(generate, "MAX_FILES_PER_ENTITY", 100)
    days = 250  # 250 days * 4 drops > 100 -> ceil(250 / 100) = 3 days per file
    g = generate_drops(tmp_path, tutors=20, days=days, sessions_per_day=20, end=END)
    sessions = [p.name for p in g.files if p.name.startswith("sessions")]
    assert 0.9 * math.ceil(days / 3) <= len(sessions) <= math.ceil(days / 3)
    stamps = [datetime.strptime(n[9:22], "%Y%m%dT%H%M") for n in sessions]
    assert stamps[-1].date() == END
    assert all((END - s.date()).days % 3 == 0 and s.hour == s.minute == 0 for s in stamps)


def test_some_tutors_with_sessions_are_missing_from_the_tutors_export(
    csv_drops: GeneratedDrops,
) -> None:
    listed = set(_load(csv_drops, "tutors")["tutor_id"])
    teaching = set(_load(csv_drops, "sessions")["tutor_id"])
    missing = teaching - listed
    assert len(missing) == 2  # 2% of 100
    truth = pl.read_csv(csv_drops.ground_truth)
    assert set(truth.filter(~pl.col("in_tutors_export"))["tutor_id"]) == missing
    # The later delta renames or deactivates a few tutors.
    delta = _read([p for p in csv_drops.files if p.name.startswith("tutors")][1])
    assert delta.height >= 2 and "false" in set(delta["is_active"].cast(pl.String))


def test_late_updates_change_status_in_a_later_drop(csv_drops: GeneratedDrops) -> None:
    s = _load(csv_drops, "sessions")
    updated = pl.col("updated_at").map_elements(_instant, return_dtype=pl.Datetime("us", "UTC"))
    versions = (
        s.sort("drop", maintain_order=True)
        .group_by("session_id", maintain_order=True)
        .agg("status", "drop", updated)
    )
    multi = versions.filter(pl.col("status").list.len() > 1)
    late = multi.filter(pl.col("status").list.first() != "rescheduled")
    assert late.height > 0.005 * csv_drops.sessions
    firsts, lasts = late["status"].list.first(), late["status"].list.last()
    assert set(zip(firsts, lasts, strict=True)) == {
        ("completed", "rescheduled"), ("completed", "no_show"), ("no_show", "completed")
    }  # fmt: skip
    assert (late["drop"].list.first() < late["drop"].list.last()).all()
    assert (late["updated_at"].list.first() < late["updated_at"].list.last()).all()
    # Moved then held: first exported as rescheduled, then completed.
    held = multi.filter(pl.col("status").list.first() == "rescheduled")
    assert (held["status"].list.last() == "completed").all() and held.height > 0


def test_defects_break_every_rule(defect_drops: GeneratedDrops) -> None:
    s = _load(defect_drops, "sessions")
    r = _load(defect_drops, "reschedules")
    t = _load(defect_drops, "tutors")
    assert s["tutor_id"].null_count() > 0
    assert s["scheduled_time"].null_count() > 0
    assert s["status"].null_count() > 0
    assert (~s["status"].drop_nulls().is_in(SESSION_STATUSES)).any()
    assert (s["duration_minutes"].cast(pl.Int64) < 0).any()
    assert s["scheduled_time"].is_in(BAD_TIMESTAMPS).any()
    assert s.drop("drop").is_duplicated().any()
    valid = s.filter(
        pl.col("completed_time").is_not_null()
        & pl.col("scheduled_time").is_not_null()
        & ~pl.col("scheduled_time").is_in(BAD_TIMESTAMPS)
    )
    early = [
        _instant(c) < _instant(sched)  # type: ignore[operator]
        for c, sched in zip(valid["completed_time"], valid["scheduled_time"], strict=True)
    ]
    assert any(early)
    assert (~r["initiator"].drop_nulls().is_in(INITIATORS)).any()
    assert r["initiator"].null_count() > 0
    assert r["cancelled_at"].null_count() > 0
    assert r["cancelled_at"].is_in(BAD_TIMESTAMPS).any()
    assert r.drop("drop").is_duplicated().any()
    assert t["tutor_id"].null_count() > 0
    assert (~t["is_active"].is_in(["true", "false"])).any()
    # More late updates than without defects.
    versions = s.unique(["session_id", "status"]).group_by("session_id").len()
    assert (versions["len"] > 1).sum() > 0.02 * defect_drops.sessions


def test_parquet_defects_keep_typed_columns(tmp_path: Path) -> None:
    g = _small(tmp_path, fmt="parquet", defects=0.1)
    s = _load(g, "sessions")
    assert dict(s.drop("drop").schema) == drop_columns("sessions")
    assert s["tutor_id"].null_count() > 0 and s["scheduled_time"].null_count() > 0
    assert (s["duration_minutes"] < 0).any()
    assert (s["completed_time"] < s["scheduled_time"]).any()
    r = _load(g, "reschedules")
    assert (~r["initiator"].drop_nulls().is_in(INITIATORS)).any()


@pytest.mark.parametrize(
    "bad",
    [{"tutors": 0}, {"days": 0}, {"drops_per_day": 7}, {"defects": 1.5}, {"fmt": "json"}],
)
def test_rejects_bad_arguments(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate_drops(tmp_path, end=END, **bad)
