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
    tutors_changed_after,
)

SAMPLE_ROWS = 10


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
        else:  # nothing stored yet: nothing to check
            findings = [Finding(name, pl.DataFrame()) for name in AUDITS]
    checked = {
        "snapshots_checked": dg.MetadataValue.int(len(instants)),
        "rows_checked": dg.MetadataValue.int(rows_checked),
    }
    yield from _results(tutor_scores_daily, findings, checked)


def _current_snapshot(
    context: dg.AssetCheckExecutionContext, scores: pl.DataFrame
) -> tuple[datetime | None, int | None]:
    """The instant the latest materialization scored as of (the rows' own as_of if unknown),
    and the newest load it scored (None if unknown)."""
    event = context.instance.get_latest_materialization_event(tutor_scores_current.key)
    materialization = event.asset_materialization if event is not None else None
    metadata = materialization.metadata if materialization is not None else {}
    loads = metadata[LOADS_THROUGH].value if LOADS_THROUGH in metadata else None
    loads_through = loads if isinstance(loads, int) else None
    if "as_of" in metadata:
        text = metadata["as_of"].value
        assert isinstance(text, str)
        return as_utc(datetime.fromisoformat(text)), loads_through
    if scores.height == 0:
        return None, loads_through
    latest = scores.get_column("as_of").max()
    assert isinstance(latest, datetime)
    return latest, loads_through


def _excusing(findings: list[Finding], tutors: pl.Series) -> list[Finding]:
    """``findings`` with the count mismatches of ``tutors`` left out."""
    if tutors.len() == 0:
        return findings
    return [
        Finding(f.name, f.failures.filter(~pl.col("tutor_id").is_in(tutors.implode())))
        if f.name == COUNTS_AUDIT and f.failures.height
        else f
        for f in findings
    ]


@dg.multi_asset_check(specs=_specs(tutor_scores_current), pool="warehouse")
def tutor_scores_current_checks(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> Iterator[dg.AssetCheckResult]:
    """The current snapshot checked against the warehouse before it is published: one row
    per tutor, all as of the instant the run scored, rates consistent with counts, known
    tutors, and counts equal to an independent count of the sessions."""
    with warehouse.connect(read_only=True) as con:
        scores = query_frame(con, load_sql("tutor_scores_current_select"))
        as_of, loads_through = _current_snapshot(context, scores)
        findings = (
            audit_scores(con, scores, [as_of])
            if as_of is not None
            else [Finding(name, pl.DataFrame()) for name in AUDITS]
        )
        # Another run may have loaded drops between this snapshot's step and this one (the
        # warehouse pool runs one step at a time, not one run): the tutors those loads touched
        # are counted against data the snapshot never saw, and are checked by the run that
        # scores them. Every other tutor must still reconcile.
        changed = (
            tutors_changed_after(con, loads_through)
            if loads_through is not None and newest_load(con) > loads_through
            else pl.Series("tutor_id", [], pl.String())
        )
    findings = _excusing(findings, changed)
    checked = {
        "as_of": dg.MetadataValue.text(as_of.isoformat() if as_of else "none"),
        "rows_checked": dg.MetadataValue.int(scores.height),
        "tutors_changed_since_scored": dg.MetadataValue.int(changed.len()),
    }
    yield from _results(tutor_scores_current, findings, checked)


SCORE_CHECKS = [tutor_scores_daily_checks, tutor_scores_current_checks]
"""Every check of the score assets, for runs that materialize them in-process."""
