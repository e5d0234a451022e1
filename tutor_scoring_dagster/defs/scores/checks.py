"""Asset checks of the score snapshots, run after each materialization. They are blocking: a
snapshot that fails one is not published to the serving store by the same run."""

from collections.abc import Iterator, Mapping
from datetime import date, datetime, timedelta

import dagster as dg
import duckdb
import polars as pl

from tutor_scoring_dagster.defs.resources import WarehouseResource
from tutor_scoring_dagster.defs.scores.assets import (
    LOADS_THROUGH,
    tutor_scores_current,
    tutor_scores_daily,
)
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.scoring import (
    AUDITS,
    COUNTS_AUDIT,
    LONGEST_WINDOW,
    TUTORS_AUDIT,
    WINDOW_COUNTS,
    Finding,
    as_utc,
    audit_score_parts,
    audit_scores,
    partition_as_of,
)
from tutor_scoring_dagster.warehouse import (
    fetch_one,
    newest_load,
    query_frame,
    sessions_changed_after,
)

SAMPLE_ROWS = 10
CHANGED_SINCE_SCORED = "tutors_changed_since_scored"
"""Check metadata: tutors of the sessions loads after the scores changed."""


def _specs(asset: dg.AssetsDefinition) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(name, asset=asset, description=description, blocking=True)
        for name, description in AUDITS.items()
    ]


def _results(
    asset: dg.AssetsDefinition, findings: list[Finding], checked: Mapping[str, dg.MetadataValue]
) -> Iterator[dg.AssetCheckResult]:
    for finding in findings:
        sample = finding.failures.head(SAMPLE_ROWS)
        yield dg.AssetCheckResult(
            asset_key=asset.key,
            check_name=finding.name,
            passed=finding.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                **checked,
                "failures": dg.MetadataValue.int(finding.failures.height),
                **(
                    {"failure_sample": dg.MetadataValue.md(_markdown(sample))}
                    if sample.height
                    else {}
                ),
            },
        )


def _markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *rows])


def _checked_days(
    context: dg.AssetCheckExecutionContext, con: duckdb.DuckDBPyConnection
) -> tuple[date, date] | None:
    """The partitions the run materialized; run on its own, the latest stored snapshot."""
    if context.has_partition_key or context.has_partition_key_range:
        keys = context.partition_key_range
        return date.fromisoformat(keys.start), date.fromisoformat(keys.end)
    row = fetch_one(con, load_sql("tutor_scores_daily_latest_select"))
    if row is None or row[0] is None:
        return None
    assert isinstance(row[0], datetime)
    last = (as_utc(row[0]) - timedelta(days=1)).date()
    return last, last


@dg.multi_asset_check(specs=_specs(tutor_scores_daily), pool="warehouse")
def tutor_scores_daily_checks(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[dg.AssetCheckResult]:
    """The daily snapshots of the partitions just materialized, checked against the
    warehouse: one row per tutor per day, rates consistent with counts, known tutors, and
    counts equal to an independent count of the sessions."""
    instants: list[datetime] = []
    rows_checked = 0
    later: dict[str, dg.MetadataValue] = {}
    with warehouse.connect(read_only=True) as con:
        days = _checked_days(context, con)
        if days is not None:
            first_day, last_day = days
            instants = [
                partition_as_of(first_day + timedelta(days=i))
                for i in range((last_day - first_day).days + 1)
            ]
            end = partition_as_of(last_day + timedelta(days=1))

            def rows_between(lo: datetime | None, hi: datetime | None) -> pl.DataFrame:
                nonlocal rows_checked
                # A range is read a chunk of days at a time: years of rows never at once.
                scores = query_frame(
                    con,
                    load_sql("tutor_scores_daily_range_select"),
                    {"start": lo or instants[0], "end": hi or end},
                )
                rows_checked += scores.height
                return scores

            findings = audit_score_parts(con, instants, rows_between)
            # The loads this run's scores saw (a run of the checks alone: the last day's latest
            # scores'). Days another run rewrote since saw newer loads: judged by this run's,
            # a few more of their rows are excused, none wrongly failed.
            metadata = _latest_metadata(
                context, tutor_scores_daily, last_day.isoformat(), own_run_first=True
            )
            findings, later = _excusing_later_loads(con, findings, metadata)
        else:  # nothing stored yet: nothing to check
            findings = [Finding(name, pl.DataFrame()) for name in AUDITS]
    checked = {
        "snapshots_checked": dg.MetadataValue.int(len(instants)),
        "rows_checked": dg.MetadataValue.int(rows_checked),
        **later,
    }
    yield from _results(tutor_scores_daily, findings, checked)


RECENT_MATERIALIZATIONS = 10
"""How far back a daily check looks for its own run's materialization of the last day."""


def _latest_metadata(
    context: dg.AssetCheckExecutionContext,
    asset: dg.AssetsDefinition,
    partition: str | None,
    *,
    own_run_first: bool = False,
) -> Mapping[str, dg.MetadataValue]:
    """The metadata of the latest materialization of ``asset`` (of ``partition``): the one
    whose rows the warehouse holds. ``own_run_first``: this run's, if it made one recently,
    even if another run rewrote the partition since (a range's other days are still this
    run's, made from the loads it saw)."""
    partitions = [partition] if partition is not None else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset.key, asset_partitions=partitions),
        limit=RECENT_MATERIALIZATIONS if own_run_first else 1,
    ).records
    own = [r for r in records if own_run_first and r.run_id == context.run.run_id]
    chosen = (own or records)[:1]
    materialization = chosen[0].asset_materialization if chosen else None
    return materialization.metadata if materialization is not None else {}


def _current_as_of(
    metadata: Mapping[str, dg.MetadataValue], scores: pl.DataFrame
) -> datetime | None:
    """The instant the snapshot was scored as of (the rows' own as_of if unknown)."""
    if "as_of" in metadata:
        text = metadata["as_of"].value
        assert isinstance(text, str)
        return as_utc(datetime.fromisoformat(text))
    if scores.height == 0:
        return None
    latest = scores.get_column("as_of").max()
    assert isinstance(latest, datetime)
    return latest


def _excusing_later_loads(
    con: duckdb.DuckDBPyConnection,
    findings: list[Finding],
    metadata: Mapping[str, dg.MetadataValue],
) -> tuple[list[Finding], dict[str, dg.MetadataValue]]:
    """``findings`` without the failures that loads newer than those the scores saw (their
    metadata's ``loads_through``) can explain, and what was left out.

    The warehouse pool runs one step at a time, not one run at a time: another run may load
    drops between the scores' step and their checks'. A count mismatch is excused only if one
    of that row's windows holds a session those loads changed (any export of it: a session may
    move to another tutor or time), an unknown tutor only if such a session was theirs; the
    run that scores those loads, or for past days the late-data sensor's, scores and checks
    them again. Every other row must still pass."""
    value = metadata[LOADS_THROUGH].value if LOADS_THROUGH in metadata else None
    if not isinstance(value, int) or newest_load(con) <= value:
        return findings, {CHANGED_SINCE_SCORED: dg.MetadataValue.int(0)}
    changed = sessions_changed_after(con, value).with_columns(
        pl.col("scheduled_time").cast(pl.Datetime("us", "UTC"))
    )
    excused = 0
    kept = []
    for finding in findings:
        left = _unexplained(finding, changed)
        excused += finding.failures.height - left.height
        kept.append(Finding(finding.name, left))
    return kept, {
        CHANGED_SINCE_SCORED: dg.MetadataValue.int(changed.get_column("tutor_id").n_unique()),
        "failures_excused": dg.MetadataValue.int(excused),
    }


def _unexplained(finding: Finding, changed: pl.DataFrame) -> pl.DataFrame:
    """The failures of ``finding`` that no session in ``changed`` (``tutor_id``,
    ``scheduled_time``: every export of the sessions later loads changed) can explain."""
    failures = finding.failures
    if failures.height == 0:
        return failures
    if finding.name == TUTORS_AUDIT:
        # A tutor known only from sessions is gone once a later export moves them away.
        return failures.filter(~pl.col("tutor_id").is_in(changed.get_column("tutor_id").implode()))
    if finding.name != COUNTS_AUDIT:
        return failures
    failures = failures.with_columns(pl.col("as_of").cast(pl.Datetime("us", "UTC")))
    # A row on one side only (a tutor scored or not): any changed session before the as-of
    # can explain it, as every tutor with a session before it is scored. A row on both
    # sides: only one in its windows.
    count = WINDOW_COUNTS[0]
    one_sided = pl.col(count).is_null() | pl.col(f"{count}_scored").is_null()
    reachable = (
        failures.select("tutor_id", "as_of", one_sided.alias("one_sided"))
        .unique()
        .join(changed, on="tutor_id")
        .filter(
            (pl.col("scheduled_time") < pl.col("as_of"))
            & (
                pl.col("one_sided")
                | (pl.col("scheduled_time") >= pl.col("as_of") - timedelta(days=LONGEST_WINDOW))
            )
        )
        .select("tutor_id", "as_of")
        .unique()
    )
    return failures.join(reachable, on=["tutor_id", "as_of"], how="anti")


@dg.multi_asset_check(specs=_specs(tutor_scores_current), pool="warehouse")
def tutor_scores_current_checks(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[dg.AssetCheckResult]:
    """The current snapshot checked against the warehouse before it is published: one row
    per tutor, all as of the instant the run scored, rates consistent with counts, known
    tutors, and counts equal to an independent count of the sessions."""
    metadata = _latest_metadata(context, tutor_scores_current, None)
    with warehouse.connect(read_only=True) as con:
        scores = query_frame(con, load_sql("tutor_scores_current_select"))
        as_of = _current_as_of(metadata, scores)
        findings = (
            audit_scores(con, scores, [as_of])
            if as_of is not None
            else [Finding(name, pl.DataFrame()) for name in AUDITS]
        )
        findings, later = _excusing_later_loads(con, findings, metadata)
    checked = {
        "as_of": dg.MetadataValue.text(as_of.isoformat() if as_of else "none"),
        "rows_checked": dg.MetadataValue.int(scores.height),
        **later,
    }
    yield from _results(tutor_scores_current, findings, checked)


SCORE_CHECKS = [tutor_scores_daily_checks, tutor_scores_current_checks]
"""Every check of the score assets, for runs that materialize them in-process."""
