"""Publish: warehouse scores -> serving store (Postgres / SQLite) through SQLAlchemy."""

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

import dagster as dg
import duckdb
import polars as pl
import sqlalchemy as sa

from tutor_scoring_dagster.defs.partitions import daily_partitions
from tutor_scoring_dagster.defs.resources import ServingStoreResource, WarehouseResource
from tutor_scoring_dagster.defs.scores.assets import tutor_scores_current, tutor_scores_daily
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.store.errors import StoreSchemaError, explain
from tutor_scoring_dagster.store.publish import (
    PART_ROWS,
    FrameParts,
    PublishStats,
    StaleMark,
    StoreMark,
    horizon_start,
    publish_current,
    publish_history,
)
from tutor_scoring_dagster.warehouse import export_daily_scores, query_frame

STORE_RETRY = dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL)


@contextmanager
def store_errors_explained(url: str) -> Iterator[None]:
    """Fail with one clear line; only an unreachable server is worth Dagster's retries."""
    try:
        yield
    except (sa.exc.SQLAlchemyError, StoreSchemaError) as exc:
        problem = explain(exc, url)
        retry = " (Dagster retries this step with backoff)" if problem.retryable else ""
        raise dg.Failure(
            description=problem.message + retry, allow_retries=problem.retryable
        ) from None


def publish_metadata(stats: PublishStats) -> dict[str, dg.MetadataValue]:
    """Per table: rows offered, written (new or changed) and deleted; and how long it took."""
    meta: dict[str, dg.MetadataValue] = {}
    for kind, counts in (
        ("rows", stats.staged),
        ("written", stats.written),
        ("deleted", stats.deleted),
    ):
        for table, n in counts.items():
            meta[f"{table}_{kind}"] = dg.MetadataValue.int(n)
    meta["publish_seconds"] = dg.MetadataValue.float(round(stats.seconds, 3))
    return meta


MARK_KEY = "store_mark"
LOADS_KEY = "published_loads"
"""Metadata of a ``tutor_scores`` materialization: what its publish left in the store, and the
warehouse loads it included (``load_id:count:fingerprint``, ``sql/loads_latest_select.sql``):
the next publish ships only what later loads changed."""
ALL_LOADS = 2**62


def warehouse_loads(con: duckdb.DuckDBPyConnection, upto: int = ALL_LOADS) -> str:
    """``load_id:count:fingerprint`` of the warehouse's loads up to ``upto``."""
    row = query_frame(con, load_sql("loads_latest_select"), {"upto": upto}).row(0)
    return ":".join(str(v) for v in row)


def previous_publish(context: dg.AssetExecutionContext) -> tuple[StoreMark, str] | None:
    """The store mark and loads of this asset's latest materialization, if it recorded them."""
    event = context.instance.get_latest_materialization_event(context.asset_key)
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        return None
    mark, loads = materialization.metadata.get(MARK_KEY), materialization.metadata.get(LOADS_KEY)
    if mark is None or loads is None:
        return None
    try:
        return StoreMark.from_json(str(mark.value)), str(loads.value)
    except (TypeError, ValueError, KeyError):
        return None


@dg.asset(
    group_name="publish",
    kinds={"postgres", "sqlalchemy"},
    deps=[tutor_scores_current],
    retry_policy=STORE_RETRY,
    # In the warehouse pool, publishes and snapshots take turns: a publish ships the newest
    # snapshot as its step starts and commits it before another snapshot replaces it, so the
    # store never goes back to an older one when landing runs overlap.
    pool="warehouse",
    owners=["team:data"],
)
def tutor_scores(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    serving_store: ServingStoreResource,
) -> dg.MaterializeResult:
    """The current snapshot in the serving store (`tutor_scores`, one row per tutor, with its
    risk tiers), the drivers of its flagged tutors (`tutor_risk_drivers`), the `tutors` it
    names and the `sessions` and `reschedules` of the last SERVING_HORIZON_DAYS (0: all)
    behind it, published in one transaction. Only new and changed rows are written
    (the metadata counts them); a re-run with the same input changes no row. When the store is
    still as this asset's last materialization left it, only the sessions and reschedules of
    the loads since are read and shipped (`delta`); else the whole horizon is mirrored. The
    warehouse must still hold exactly the loads that publish included (not a rebuilt one)."""
    previous = previous_publish(context)
    with warehouse.connect(read_only=True) as con:
        scores = query_frame(con, load_sql("tutor_scores_current_select"))
        drivers = query_frame(con, load_sql("tutor_risk_drivers_current_select"))
        start = horizon_start(scores, serving_store.horizon(), now=datetime.now(UTC))
        since = start or datetime(1970, 1, 1, tzinfo=UTC)
        loads = warehouse_loads(con)
        tutors = query_frame(con, load_sql("tutors_current_select"))
        after_load = int(previous[1].split(":")[0]) if previous is not None else 0
        if previous is not None and warehouse_loads(con, after_load) != previous[1]:
            previous = None  # another warehouse, or its loads changed: mirror the horizon
        if previous is not None:
            after: dict[str, object] = {"after": after_load}
            sessions = query_frame(con, load_sql("sessions_changed_select"), after)
            reschedules = query_frame(
                con, load_sql("reschedules_changed_select"), {**after, "since": since}
            )
    with store_errors_explained(serving_store.url()), serving_store.engine() as engine:

        def publish(
            tutors: pl.DataFrame,
            sessions: pl.DataFrame,
            reschedules: pl.DataFrame,
            changed_since: StoreMark | None = None,
        ) -> PublishStats:
            return publish_current(
                engine,
                tutors=tutors,
                sessions=sessions,
                reschedules=reschedules,
                scores=scores,
                horizon_start=start,
                now=datetime.now(UTC),
                changed_since=changed_since,
                risk_drivers=drivers,
            )

        stats = None
        if previous is not None:
            with suppress(StaleMark):
                stats = publish(tutors, sessions, reschedules, changed_since=previous[0])
        if stats is None:
            with warehouse.connect(read_only=True) as con:  # one read: tutors cover sessions
                loads = warehouse_loads(con)
                tutors = query_frame(con, load_sql("tutors_current_select"))
                sessions = query_frame(con, load_sql("sessions_recent_select"), {"since": since})
                reschedules = query_frame(
                    con, load_sql("reschedules_recent_select"), {"since": since}
                )
            stats = publish(tutors, sessions, reschedules)
    metadata = publish_metadata(stats)
    metadata["delta"] = dg.MetadataValue.bool(stats.delta)
    if stats.mark is not None:
        metadata[MARK_KEY] = dg.MetadataValue.text(stats.mark.to_json())
        metadata[LOADS_KEY] = dg.MetadataValue.text(loads)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name="publish",
    kinds={"postgres", "sqlalchemy"},
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[tutor_scores_daily],
    retry_policy=STORE_RETRY,
    owners=["team:data"],
)
def tutor_score_history(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    serving_store: ServingStoreResource,
) -> dg.MaterializeResult:
    """One row per tutor per day in the serving store (`tutor_score_history`), for trends; the
    days of the partitions run are replaced as a whole, with the `tutors` they name."""
    window = context.partition_time_window
    first_day, last_day = window.start.date(), (window.end - timedelta(days=1)).date()
    # A backfill of years is millions of rows: they wait on disk beside the warehouse, in
    # parts of whole tutors, so memory holds one part and the warehouse is free meanwhile.
    with TemporaryDirectory(prefix=".history-", dir=warehouse.file().parent) as folder:
        with warehouse.connect(read_only=True) as con:
            parts = export_daily_scores(
                con,
                start=window.start + timedelta(days=1),
                end=window.end + timedelta(days=1),
                folder=Path(folder),
                part_rows=PART_ROWS,
            )
            tutors = query_frame(con, load_sql("tutors_current_select"))
        with store_errors_explained(serving_store.url()), serving_store.engine() as engine:
            stats = publish_history(
                engine,
                FrameParts.from_parquet(parts),
                first_day,
                last_day,
                now=datetime.now(UTC),
                tutors=tutors,
            )
    return dg.MaterializeResult(metadata=publish_metadata(stats))
