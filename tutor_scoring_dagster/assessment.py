"""Assess score snapshots: who is at risk, who is becoming so, why, and what to do (issue #11).

Scores (scoring.py) say what each tutor's rates are; this stage adds, beside them, each tutor's
risk tier with its evidence (risk_tiers.py), for ``watch`` and ``high`` tutors the drivers
behind it (drivers.py) and the action the reviewed rule table recommends. The contract's
``is_high_risk`` keeps its meaning; the tier is read next to it.

A stored score row is a :class:`~tutor_scoring_dagster.schemas.TutorScores` row followed by
its :class:`~tutor_scoring_dagster.schemas.TutorRiskTiers` columns (``score_row_schema``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import duckdb
import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.ahead import next_of_both, note_pending_error, one_ahead
from tutor_scoring_dagster.drivers import (
    ACTION_SCHEMA,
    compute_drivers,
    load_action_rules,
    recommend_actions,
)
from tutor_scoring_dagster.params import AssessParams
from tutor_scoring_dagster.risk_tiers import (
    read_session_events,
    risk_tiers_by_chunk,
    risk_tiers_for_days,
)
from tutor_scoring_dagster.schemas import (
    FLAGGED_TIERS,
    TutorRiskDrivers,
    TutorRiskTiers,
    model_schema,
    score_row_schema,
)
from tutor_scoring_dagster.scoring import (
    CHUNK_DAYS,
    LATE_DATA_REACH_DAYS,
    RiskRule,
    ScoresInvalid,
    as_utc,
    day_offset,
    day_start,
    score_snapshots,
    snapshot_day,
)

KEYS = ["tutor_id", "as_of"]
WATCH_SINCE_REACH_DAYS = 30
"""How far back ``watch_since`` looks for the start of a warning: an older start shows as
``as_of`` minus this, so a row is the same whichever range of days a run computed."""


@dataclass(frozen=True)
class Assessment:
    """Score rows with their tiers (``score_row_schema``) and the drivers of the flagged."""

    scores: pl.DataFrame
    drivers: pl.DataFrame


def reach_days(params: AssessParams) -> int:
    """How many days after a session's day a daily snapshot may still change with it: the
    score windows' reach, or the tiers' (their lookback, then ``watch_since``'s reach)."""
    tiers = params.tiers.lookback_days - 1 + WATCH_SINCE_REACH_DAYS
    return max(LATE_DATA_REACH_DAYS, tiers)


def assess(
    con: duckdb.DuckDBPyConnection,
    scores: pl.DataFrame | Callable[[], pl.DataFrame],
    first_day: date,
    last_day: date,
    params: AssessParams,
    *,
    offset: timedelta = timedelta(0),
    with_drivers: bool = True,
    tiers: pl.DataFrame | None = None,
) -> Assessment:
    """Tiers, drivers and actions for ``scores``, the snapshots as of the end of each day
    ``first_day..last_day`` (days starting ``offset`` after midnight UTC), from the warehouse's
    sessions. A scored tutor the detector has no row for is ``insufficient_data``. Without
    ``with_drivers`` only the tiers and their evidence are judged (``top_drivers`` and
    ``recommended_action`` stay empty): with drivers, a long history costs about twice what
    the tiers alone do.
    ``tiers``: those days' rows of :func:`risk_tiers_for_days` when the caller has them.
    ``scores`` may be a function giving them, called once the tiers and drivers are judged:
    scores made on another thread are waited for only then."""
    events = None
    if with_drivers:
        # One read for both: the tiers' reach (from the first day watch_since looks at) and
        # the drivers' (from the first snapshot), whichever is longer.
        first_instant = day_start(first_day - timedelta(days=WATCH_SINCE_REACH_DAYS - 1), offset)
        reach = max(params.tiers.lookback_days, params.drivers.lookback_days)
        events = read_session_events(
            con,
            start=first_instant - timedelta(days=reach),
            end=day_start(last_day + timedelta(days=1), offset),
        )
    if tiers is None:
        tiers = risk_tiers_for_days(
            con,
            first_day,
            last_day,
            params.tiers,
            offset=offset,
            since_lookback_days=WATCH_SINCE_REACH_DAYS,
            events=events,
        )
    tiers = tiers.with_columns(
        pl.when(pl.col("watch_since").is_not_null())
        .then(
            pl.max_horizontal(
                "watch_since", pl.col("as_of") - pl.duration(days=WATCH_SINCE_REACH_DAYS)
            )
        )
        .alias("watch_since")
    )
    flagged = tiers.filter(pl.col("risk_tier").is_in(FLAGGED_TIERS))
    drivers = pl.DataFrame(schema=model_schema(TutorRiskDrivers))
    if events is not None and flagged.height:
        drivers = compute_drivers(events, flagged, params.drivers).select(
            list(model_schema(TutorRiskDrivers))
        )
    rules = load_action_rules(params.rules_path)  # read (and checked) by every run alike
    if callable(scores):
        scores = scores()
    tier_columns = list(model_schema(TutorRiskTiers))
    rows = scores.join(tiers, on=KEYS, how="left").with_columns(
        pl.col("risk_tier").fill_null("insufficient_data"),
        pl.col("newly_flagged").fill_null(False),
    )
    if drivers.height:
        actions = recommend_actions(tiers, drivers, rules)
        rows = rows.join(
            actions.select(*KEYS, "top_drivers", pl.col("action").alias("recommended_action")),
            on=KEYS,
            how="left",
        )
    else:
        # No driver, no action (recommend_actions would give every row nulls): the daily
        # partitions' case, where this join cost ~1 s of a 10M-session rebuild's critical path.
        rows = rows.with_columns(
            pl.lit(None, ACTION_SCHEMA["top_drivers"]).alias("top_drivers"),
            pl.lit(None, ACTION_SCHEMA["action"]).alias("recommended_action"),
        )
    _validate(TutorRiskTiers, rows.select(tier_columns))
    drivers = drivers.join(scores.select(KEYS), on=KEYS, how="semi")
    return Assessment(
        scores=rows.select(list(score_row_schema())),
        drivers=_validate(TutorRiskDrivers, drivers),
    )


def assess_days(
    con: duckdb.DuckDBPyConnection,
    first_day: date,
    last_day: date,
    rule: RiskRule,
    params: AssessParams,
    *,
    offset: timedelta = timedelta(0),
    with_drivers: bool = True,
) -> Assessment:
    """Scored and assessed snapshots as of the end of each day ``first_day..last_day``."""
    parts = list(
        assess_days_by_chunk(
            con, first_day, last_day, rule, params, offset=offset, with_drivers=with_drivers
        )
    )
    if len(parts) == 1:
        return parts[0]
    return Assessment(
        scores=pl.concat([p.scores for p in parts], rechunk=False),
        drivers=pl.concat([p.drivers for p in parts], rechunk=False),
    )


def assess_days_by_chunk(
    con: duckdb.DuckDBPyConnection,
    first_day: date,
    last_day: date,
    rule: RiskRule,
    params: AssessParams,
    *,
    offset: timedelta = timedelta(0),
    with_drivers: bool = True,
) -> Generator[Assessment]:
    """:func:`assess_days` a chunk of days (CHUNK_DAYS) at a time, in day order: the
    caller may store or drop each chunk before asking for the next."""
    chunks: list[tuple[date, date]] = []
    day = first_day
    while day <= last_day:
        chunks.append((day, min(last_day, day + timedelta(days=CHUNK_DAYS - 1))))
        day = chunks[-1][1] + timedelta(days=1)
    # A chunk's scores (DuckDB, Polars, Pandera) and, without drivers, its risk tiers (mostly
    # numpy; the sessions read once for every chunk) are each made one chunk ahead on a thread
    # and a cursor of their own, while this thread joins and checks the chunk before. The
    # tiers were the critical path: ~2 s less over three years, for ~0.4 GB more at the peak
    # (benchmarks/README.md). With drivers the tiers are judged here, beside the scores. Both
    # cursors exist before either thread starts; each thread is done before its cursor
    # closes, however the loop ends; if a chunk's scores and its tiers (or, with drivers, the
    # judging) both fail, the error raised names both.
    with ExitStack() as held:
        reader = held.enter_context(con.cursor())
        tiers_reader = None if with_drivers else held.enter_context(con.cursor())
        scores_ahead = held.enter_context(
            closing(
                one_ahead(
                    (score_snapshots(reader, day, end, rule, offset=offset) for day, end in chunks),
                    "scores",
                )
            )
        )
        # With drivers, each chunk reads its wider events for both and judges its tiers here.
        tiers = (
            None
            if tiers_reader is None
            else held.enter_context(
                closing(
                    one_ahead(
                        risk_tiers_by_chunk(
                            tiers_reader,
                            chunks,
                            params.tiers,
                            offset=offset,
                            since_lookback_days=WATCH_SINCE_REACH_DAYS,
                        ),
                        "tiers",
                    )
                )
            )
        )
        scores_taken = False

        def take_scores() -> pl.DataFrame:
            nonlocal scores_taken
            scores_taken = True
            return next(scores_ahead)

        for day, end in chunks:
            scores: pl.DataFrame | Callable[[], pl.DataFrame]
            if tiers is None:
                # The tiers and drivers are judged here while the scores are made on their
                # thread, and taken only then (a current snapshot at 10M: ~0.5 s of ~3 s).
                chunk_tiers, scores, scores_taken = None, take_scores, False
            else:
                # The tiers first: their next chunk, the critical path, starts as soon as this
                # one is taken.
                chunk_tiers, scores = next_of_both(tiers, scores_ahead)
            try:
                assessed = assess(
                    con,
                    scores,
                    day,
                    end,
                    params,
                    offset=offset,
                    with_drivers=with_drivers,
                    tiers=chunk_tiers,
                )
            except Exception as exc:
                # Judging failed before the scores were taken: their error, if any, too.
                if tiers is None and not scores_taken:
                    note_pending_error(exc, scores_ahead, "the scores")
                raise
            del scores, chunk_tiers  # not kept while the caller stores this chunk
            yield assessed
            del assessed


def assess_as_of(
    con: duckdb.DuckDBPyConnection, as_of: datetime, rule: RiskRule, params: AssessParams
) -> Assessment:
    """Every tutor's scores, tier, drivers and action as of the instant ``as_of``."""
    day = snapshot_day(as_of)
    return assess_days(con, day, day, rule, params, offset=day_offset(as_of))


def flagged_since(row: Mapping[str, Any]) -> str:
    """When a score row's current warning began, for people: "since 2026-03-01", or "for 30+
    days" when the start lies beyond the reach of ``watch_since``."""
    since, as_of = row.get("watch_since"), row.get("as_of")
    if since is None or as_of is None:
        return "not flagged"
    if as_utc(as_of) - as_utc(since) >= timedelta(days=WATCH_SINCE_REACH_DAYS):
        return f"for {WATCH_SINCE_REACH_DAYS}+ days"
    return f"since {as_utc(since):%Y-%m-%d}"


def _validate(model: type[pa.DataFrameModel], frame: pl.DataFrame) -> pl.DataFrame:
    try:
        return model.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ScoresInvalid(exc.failure_cases) from exc
