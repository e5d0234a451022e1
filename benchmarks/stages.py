"""The benchmark's stages, each run in a process of its own by ``benchmarks.run`` (so that each
has its own peak resident set, and the environment the code location reads at import time).

Every stage takes a :class:`Plan` and returns a JSON-able dict of what it measured. Stages that
run Dagster run the project's real assets, checks, sensors and jobs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import psycopg

from benchmarks.probe import ServerCpu, UsageSampler, peak_rss_mb, run_steps

SQL_DIR = Path(__file__).parent / "sql"
TICK_SESSIONS = 125
"""Sessions in one hourly drop: an hour of the platform's ~3,000 sessions a day."""


def load_sql(name: str) -> str:
    """A statement of ``benchmarks/sql/`` by name."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def psycopg_url(url: str) -> str:
    """A SQLAlchemy ``postgresql+psycopg://`` URL as psycopg's own connect takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass(frozen=True)
class Plan:
    """What one benchmark run works on; handed from the parent to each stage process."""

    sessions: int
    tutors: int
    days: int
    end: str  # ISO date: the generated data ends at this midnight UTC (the first as-of)
    work: str  # folder of this run's data (generated drops, homes)
    database_url: str  # the throwaway Postgres database of the serving store
    baseline_sample: int
    latency_drops: int
    seed: int = 7

    @property
    def end_date(self) -> date:
        return date.fromisoformat(self.end)

    @property
    def start_date(self) -> date:
        return self.end_date - timedelta(days=self.days)

    @property
    def as_of(self) -> datetime:
        """The instant of the full rebuild's current snapshot (= its last daily partition's)."""
        return datetime.combine(self.end_date, datetime.min.time(), tzinfo=UTC)

    @property
    def root(self) -> Path:
        return Path(self.work)

    def drops(self, fmt: str) -> Path:
        """Where the generated drops of a format are kept (the landing folder gets links)."""
        return self.root / f"drops_{fmt}"

    def home(self, name: str) -> Path:
        """A TUTOR_SCORING_HOME of this run: ``pipeline`` (Parquet) or ``csv`` (CSV ingest)."""
        return self.root / f"home_{name}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _link_drops(source: Path, landing: Path) -> int:
    """Hard-link every drop of ``source`` into ``landing`` (ingest moves what it loads; the
    generated files stay where they are for the floor and later runs). Keeps mtimes, so
    ingest loads them in the same order."""
    landing.mkdir(parents=True, exist_ok=True)
    n = 0
    for path in sorted(source.iterdir()):
        if path.name.startswith(("tutors", "sessions", "reschedules")):
            os.link(path, landing / path.name)
            n += 1
    return n


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# Generation


def generate(plan: Plan, fmt: str) -> dict[str, Any]:
    """Generate the drops of ``fmt`` (deterministic for the plan's seed)."""
    from tutor_scoring_dagster.generate import generate_drops

    out = plan.drops(fmt)
    per_day = max(1, round(plan.sessions / plan.days))
    result, seconds = _timed(
        lambda: generate_drops(
            out,
            tutors=plan.tutors,
            days=plan.days,
            sessions_per_day=per_day,
            seed=plan.seed,
            end=plan.end_date,
            fmt=fmt,  # type: ignore[arg-type]
            ground_truth_path=plan.root / f"ground_truth_{fmt}.csv",
        )
    )
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "files": len(result.files),
        "sessions": result.sessions,
        "reschedules": result.reschedules,
        "tutors": result.tutors,
        "megabytes": round(_folder_bytes(out) / 2**20, 1),
    }


# The Dagster runs


def _server_cpu(plan: Plan) -> ServerCpu | None:
    """The server of the benchmark's database, when it runs on this machine: its CPU time is
    part of the pipeline's work (the publishes' COPY, index builds, queries)."""
    with psycopg.connect(psycopg_url(plan.database_url)) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return None if row is None else ServerCpu.of_backend(int(row[0]))


def _usage(sampler: UsageSampler) -> dict[str, Any]:
    """The CPU time of a whole stage: its process's and (None: not measured) the server's."""
    usage = sampler.usage()
    return {
        "cpu_seconds": None if usage is None else usage.cpu_seconds,
        "server_cpu_seconds": None if usage is None else usage.server_cpu_seconds,
    }


def _materialize(
    assets: list[Any],
    run_config: dict[str, Any],
    tags: dict[str, str] | None = None,
    instance: Any = None,
    server: ServerCpu | None = None,
):
    """``dg.materialize`` on ``instance`` (default: an ephemeral one) with the default
    resources, measured."""
    import dagster as dg

    from tutor_scoring_dagster.defs.resources import default_resources

    instance = instance or dg.DagsterInstance.ephemeral()
    with UsageSampler(server=server) as sampler:
        result, seconds = _timed(
            lambda: dg.materialize(
                assets,
                resources=default_resources(),
                instance=instance,
                run_config=run_config,
                tags=tags or {},
                raise_on_error=False,
            )
        )
    steps = run_steps(instance, result.run_id, sampler)
    return result, seconds, steps


def ingest_csv(plan: Plan) -> dict[str, Any]:
    """Ingest the CSV variant (the `landing_drops` asset alone) into a warehouse of its own."""
    from tutor_scoring_dagster.defs.ingest.assets import landing_drops

    landing = plan.home("csv") / "landing"
    files = _link_drops(plan.drops("csv"), landing)
    result, seconds, steps = _materialize(
        [landing_drops], {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    )
    meta = _metadata(result, "landing_drops")
    return {
        "success": result.success,
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "files": files,
        "rows_loaded": meta.get("rows_loaded"),
        "rows_rejected": meta.get("rows_rejected"),
        "steps": [s.to_json() for s in steps],
    }


def _metadata(result: Any, asset: str) -> dict[str, Any]:
    for event in result.all_events:
        if event.is_step_materialization:
            mat = event.step_materialization_data.materialization
            if mat.asset_key.to_user_string() == asset:
                return {k: v.value for k, v in mat.metadata.items()}
    return {}


def rebuild(plan: Plan) -> dict[str, Any]:
    """The full rebuild: `run_pipeline` over every day of the data, from an empty warehouse and
    store, with the Parquet drops in the landing folder."""
    import dagster as dg

    from tutor_scoring_dagster.defs.jobs import run_pipeline

    files = _link_drops(plan.drops("parquet"), plan.home("pipeline") / "landing")
    instance = dg.DagsterInstance.ephemeral()
    with UsageSampler(server=_server_cpu(plan)) as sampler:
        summary, seconds = _timed(
            lambda: run_pipeline(as_of=plan.as_of, history_days=plan.days, instance=instance)
        )
    # run_pipeline's runs: landing, the daily range, the snapshot.
    steps = [step for run_id in summary.run_ids for step in run_steps(instance, run_id, sampler)]
    return {
        "success": summary.success,
        "errors": summary.errors,
        "seconds": round(seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "files": files,
        "rows_loaded": summary.value("landing_drops", "rows_loaded"),
        "tutors_scored": summary.value("tutor_scores_current", "tutors_scored"),
        "daily_rows": summary.value("tutor_scores_daily", "rows"),
        "emails_sent": summary.value("email_reports", "emails_sent"),
        "steps": [s.to_json() for s in steps],
        # Run creation, planned events, each partition's materialization event: Dagster's own.
        "outside_steps_seconds": round(seconds - sum(s.seconds for s in steps), 3),
        # The work in CPU time: this process's threads, and the Postgres server's processes.
        **_usage(sampler),
    }


# The serving-store publish alone


def publish(plan: Plan) -> dict[str, Any]:
    """The serving-store publish alone (``store/publish.py``), on the rebuild's warehouse, into
    a database of its own: every day's history into an empty store (a backfill), one day of it
    re-published, the current snapshot's first publish (the 180-day horizon of sessions); then
    the hourly cases: the whole horizon mirrored again with nothing changed (the path before
    delta publishing), and delta publishes with nothing and with 1% of the horizon's sessions
    changed. Each case is one ``publish_*`` call, timed (rows offered, written, deleted)."""
    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.paths import load_sql as project_sql
    from tutor_scoring_dagster.store.publish import (
        PART_ROWS,
        FrameParts,
        PublishStats,
        create_store_engine,
        horizon_start,
        publish_current,
        publish_history,
    )
    from tutor_scoring_dagster.warehouse import connect, export_daily_scores, query_frame

    settings = load_settings()
    with connect(settings.warehouse, read_only=True) as con:
        scores = query_frame(con, project_sql("tutor_scores_current_select"))
        start = horizon_start(scores, settings.serving_horizon_days, now=datetime.now(UTC))
        since = start or datetime(1970, 1, 1, tzinfo=UTC)
        tutors = query_frame(con, project_sql("tutors_current_select"))
        sessions = query_frame(con, project_sql("sessions_recent_select"), {"since": since})
        reschedules = query_frame(con, project_sql("reschedules_recent_select"), {"since": since})
        # As the tutor_score_history asset: the range in Parquet parts of whole tutors.
        parts_dir = Path(tempfile.mkdtemp(prefix=".history-", dir=settings.warehouse.parent))
        history = FrameParts.from_parquet(
            export_daily_scores(
                con,
                start=plan.as_of - timedelta(days=plan.days - 1),
                end=plan.as_of + timedelta(1),
                folder=parts_dir,
                part_rows=PART_ROWS,
            )
        )
        one_day = query_frame(
            con,
            project_sql("tutor_scores_daily_range_select"),
            {"start": plan.as_of, "end": plan.as_of + timedelta(1)},
        )
    first_day = plan.start_date
    last_day = plan.end_date - timedelta(days=1)
    admin = plan.database_url.rpartition("/")[0]
    database = plan.database_url.rpartition("/")[2] + "_publish"
    pg_admin = psycopg_url(admin) + "/postgres"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    cases: list[dict[str, Any]] = []

    def record(name: str, run: Callable[[], PublishStats]) -> PublishStats:
        stats, seconds = _timed(run)
        cases.append(
            {
                "case": name,
                "seconds": round(seconds, 3),
                "staged": stats.staged,
                "written": stats.written,
                "deleted": stats.deleted,
                "delta": stats.delta,
            }
        )
        return stats

    engine = create_store_engine(f"{admin}/{database}")
    try:
        record(
            "history, every day into an empty store",
            lambda: publish_history(
                engine, history, first_day, last_day, now=datetime.now(UTC), tutors=tutors
            ),
        )
        record(
            "history, the last day re-published (nothing changed)",
            lambda: publish_history(engine, one_day, last_day, last_day, now=datetime.now(UTC)),
        )

        def current(rows: pl.DataFrame, **kw: Any) -> PublishStats:
            return publish_current(
                engine,
                tutors=tutors,
                sessions=rows,
                reschedules=kw.pop("reschedules", reschedules),
                scores=scores,
                horizon_start=start,
                now=datetime.now(UTC),
                **kw,
            )

        record("current, first publish (180-day horizon)", lambda: current(sessions))
        mark = record(
            "current, whole horizon again, nothing changed (full mirror)",
            lambda: current(sessions),
        ).mark
        changed = sessions.filter(pl.int_range(pl.len()) % 100 == 0).with_columns(
            updated_at=pl.col("updated_at") + timedelta(hours=1)
        )
        nothing = reschedules.clear()
        mark = record(
            "current, delta, nothing changed",
            lambda: current(sessions.clear(), reschedules=nothing, changed_since=mark),
        ).mark
        record(
            "current, delta, 1% of the horizon's sessions changed",
            lambda: current(changed, reschedules=nothing, changed_since=mark),
        )
    finally:
        engine.dispose()
        shutil.rmtree(parts_dir, ignore_errors=True)
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return {
        "seconds": round(sum(c["seconds"] for c in cases), 3),
        "peak_rss_mb": peak_rss_mb(),
        "history_rows": history.height,
        "horizon_sessions": sessions.height,
        "cases": cases,
    }


# The floor


def floor(plan: Plan) -> dict[str, Any]:
    """DuckDB alone over the same Parquet files: every tutor's windowed counts on every day.
    Then (untimed) the same counts compared with what the pipeline stored."""
    first_day, last_day = plan.start_date, plan.end_date - timedelta(days=1)
    sessions = str(plan.drops("parquet") / "sessions*.parquet")
    reschedules = str(plan.drops("parquet") / "reschedules*.parquet")
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    with UsageSampler() as sampler:
        _, seconds = _timed(
            lambda: con.execute(
                load_sql("floor_scores_create"),
                {
                    "sessions": sessions,
                    "reschedules": reschedules,
                    "first_day": first_day,
                    "last_day": last_day,
                },
            )
        )
    rows = con.execute("SELECT count(*) FROM floor_scores").fetchall()[0][0]
    warehouse = plan.home("pipeline") / "warehouse.duckdb"
    con.execute(f"ATTACH '{warehouse}' AS pipeline (READ_ONLY)")
    only_floor, only_pipeline, differ, compared = con.execute(
        load_sql("floor_mismatches_select"), {"first_day": first_day, "last_day": last_day}
    ).fetchall()[0]
    con.close()
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": sampler.peak_mb(),
        **_usage(sampler),  # DuckDB's threads are this process's
        "rows": rows,
        "compared_rows": compared,
        "only_in_floor": only_floor,
        "only_in_pipeline": only_pipeline,
        "counts_differ": differ,
        "mismatches": only_floor + only_pipeline + differ,
    }


# The original system's approach


def baseline(plan: Plan) -> dict[str, Any]:
    """For each of a sample of recent sessions, recompute its tutor's three windows with one
    COUNT query each against the serving store (the original system's per-session work); then
    (untimed) compare with the published snapshot."""
    with psycopg.connect(psycopg_url(plan.database_url), autocommit=True) as conn:
        row = conn.execute("SELECT max(as_of) FROM tutor_scores").fetchone()
        assert row is not None and isinstance(row[0], datetime)
        as_of: datetime = row[0]
        sample = conn.execute(
            load_sql("baseline_sample_select"),
            {"since": as_of - timedelta(days=7), "as_of": as_of, "sample": plan.baseline_sample},
        ).fetchall()
        windows = (7, 30, 90)
        query = load_sql("baseline_window_select")
        counted: list[tuple[str, int, tuple[int, int, int]]] = []

        def run() -> None:
            with conn.cursor() as cursor:
                for _session_id, tutor_id in sample:
                    for w in windows:
                        cursor.execute(
                            query,
                            {
                                "tutor_id": tutor_id,
                                "start": as_of - timedelta(days=w),
                                "end": as_of,
                            },
                        )
                        got = cursor.fetchone()
                        assert got is not None
                        counted.append((tutor_id, w, (got[0], got[1], got[2])))

        _, seconds = _timed(run)
        stored = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT tutor_id, total_sessions_7d, tutor_reschedules_7d, no_shows_7d,"
                " total_sessions_30d, tutor_reschedules_30d, no_shows_30d,"
                " total_sessions_90d, tutor_reschedules_90d, no_shows_90d FROM tutor_scores"
            ).fetchall()
        }
    mismatches = 0
    for tutor_id, w, counts in counted:
        i = windows.index(w) * 3
        if tuple(stored.get(tutor_id, (None,) * 9)[i : i + 3]) != counts:
            mismatches += 1
    return {
        "as_of": as_of.isoformat(),
        "sessions": len(sample),
        "queries": len(counted),
        "seconds": round(seconds, 3),
        "sessions_per_second": round(len(sample) / seconds, 1) if seconds else None,
        "mismatches": mismatches,
        "peak_rss_mb": peak_rss_mb(),
    }


# Hourly drops: the incremental tick and drop-to-email latency


def _tutor_ids(plan: Plan) -> list[str]:
    warehouse = plan.home("pipeline") / "warehouse.duckdb"
    with duckdb.connect(str(warehouse), read_only=True) as con:
        rows = con.execute("SELECT DISTINCT tutor_id FROM raw_tutors ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def write_hourly_drop(landing: Path, tutors: list[str], as_of: datetime, seed: int) -> list[Path]:
    """One hour's export ending at ``as_of``: ``TICK_SESSIONS`` sessions scheduled in the hour
    before it (8% rescheduled, 60% of those by the tutor; 4% no-shows), and their reschedules,
    as Parquet. Each file is written under a temporary name and renamed, as a platform would."""
    from tutor_scoring_dagster.schemas import drop_columns

    rng = np.random.default_rng(seed)
    n = TICK_SESSIONS
    start = as_of - timedelta(hours=1)
    scheduled = [start + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 3600, n))]
    status = rng.choice(["completed", "rescheduled", "no_show"], size=n, p=[0.88, 0.08, 0.04])
    stamp = f"{as_of:%Y%m%dT%H%M}"
    ids = [f"H{stamp}-{i:04d}" for i in range(n)]
    sessions = pl.DataFrame(
        {
            "session_id": ids,
            "tutor_id": list(rng.choice(tutors, size=n)),
            "student_id": [f"HS{int(i):06d}" for i in rng.integers(0, 10**6, n)],
            "scheduled_time": scheduled,
            "completed_time": [None] * n,
            "status": list(status),
            "duration_minutes": [60] * n,
            "created_at": [t - timedelta(days=3) for t in scheduled],
            "updated_at": [as_of - timedelta(minutes=1)] * n,
        },
        schema=drop_columns("sessions"),
    )
    moved = [i for i in range(n) if status[i] == "rescheduled"]
    initiators = rng.choice(["tutor", "student"], size=len(moved), p=[0.6, 0.4])
    reschedules = pl.DataFrame(
        {
            "session_id": [ids[i] for i in moved],
            "initiator": list(initiators),
            "original_time": [scheduled[i] for i in moved],
            "new_time": [scheduled[i] + timedelta(days=2) for i in moved],
            "reason": ["Need to reschedule"] * len(moved),
            "reason_code": ["other"] * len(moved),
            "cancelled_at": [scheduled[i] - timedelta(hours=5) for i in moved],
            "hours_before_session": [5.0] * len(moved),
            "created_at": [scheduled[i] - timedelta(hours=5) for i in moved],
        },
        schema=drop_columns("reschedules"),
    )
    landing.mkdir(parents=True, exist_ok=True)
    written = []
    for entity, frame in (("sessions", sessions), ("reschedules", reschedules)):
        path = landing / f"{entity}_{stamp}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


def _eml(outbox: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in outbox.glob("*.eml")} if outbox.is_dir() else {}


def tick(plan: Plan) -> dict[str, Any]:
    """The hourly incremental run on top of the full history: one new drop through ingest, the
    current snapshot (and its blocking checks), publish and the report emails (the hourly
    job's assets but the dashboard); then, as a run of its own, the hourly dashboard rebuild."""
    import dagster as dg

    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.defs.ingest.assets import landing_drops
    from tutor_scoring_dagster.defs.publish.assets import tutor_scores
    from tutor_scoring_dagster.defs.reports.assets import email_reports
    from tutor_scoring_dagster.defs.reports.checks import email_delivery_latency
    from tutor_scoring_dagster.defs.scores.assets import tutor_scores_current
    from tutor_scoring_dagster.defs.scores.checks import tutor_scores_current_checks
    from tutor_scoring_dagster.defs.site.assets import dashboard_site

    settings = load_settings()
    as_of = plan.as_of + timedelta(hours=1)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    # The previous hour's publish, as a deployed instance remembers it (the store mark and the
    # newest load it included, in its materialization): untimed, it writes nothing new.
    instance = dg.DagsterInstance.ephemeral()
    server = _server_cpu(plan)
    previous, previous_seconds, _ = _materialize([tutor_scores], quiet, instance=instance)
    write_hourly_drop(settings.landing_dir, _tutor_ids(plan), as_of, plan.seed)
    before = _eml(settings.outbox_dir)
    result, seconds, steps = _materialize(
        [
            landing_drops,
            tutor_scores_current,
            tutor_scores_current_checks,
            tutor_scores,
            email_reports,
            email_delivery_latency,
        ],
        {
            "ops": {
                "landing_drops": {"config": {"min_age_seconds": 0}},
                "tutor_scores_current": {"config": {"as_of": as_of.isoformat()}},
            },
            **quiet,
        },
        instance=instance,
        server=server,
    )
    emails = sorted(set(_eml(settings.outbox_dir)) - set(before))
    site, site_seconds, site_steps = _materialize([dashboard_site], quiet, server=server)
    return {
        "success": result.success and site.success,
        "as_of": as_of.isoformat(),
        "seconds": round(seconds, 3),
        "dashboard_seconds": round(site_seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "rows_loaded": _metadata(result, "landing_drops").get("rows_loaded"),
        "previous_publish_seconds": round(previous_seconds, 3),
        "previous_publish_success": previous.success,
        "publish_delta": _metadata(result, "tutor_scores").get("delta"),
        "emails": emails,
        "digest_sent": any(name.startswith("digest") for name in emails),
        "steps": [s.to_json() for s in [*steps, *site_steps]],
    }


@dataclass
class Phase:
    """One piece of a drop's way to an email, with its wall time."""

    name: str
    seconds: float


RUN_QUEUE_DEQUEUE_S = 5
"""How often Dagster's QueuedRunCoordinator (dagster.yaml) looks at the run queue (its default)."""


def _run_start_seconds(samples: int = 3) -> float:
    """What a launched run's process does before its first step: start Python and load the
    code location (the median of ``samples`` fresh processes)."""
    import statistics
    import subprocess
    import sys

    times = []
    for _ in range(samples):
        _, seconds = _timed(
            lambda: subprocess.run(
                [sys.executable, "-W", "ignore", "-c", "import tutor_scoring_dagster.definitions"],
                check=True,
            )
        )
        times.append(seconds)
    return statistics.median(times)


def latency(plan: Plan) -> dict[str, Any]:
    """Drop-to-email through the real path, for several drops. Each drop (one hour's sessions
    and reschedules) is written into the landing folder; `landing_sensor` is evaluated on a
    `dg.instance_for_test()` instance until it hands the files over (two sightings of each);
    the runs it requests (`landing_ingest_job`: ingest, the snapshot with its blocking checks,
    publish, the reports due) execute in-process one after the other, as the warehouse pool
    would order their steps. Latency = drop written to last `.eml` written.

    Sensors are evaluated back to back, so that is the work's latency; the deployed estimate
    adds the landing sensor's two sightings (up to 2 x 30 s), the run queue's dequeue interval
    and a run process's start (measured: Python and the code location loaded afresh). The
    synthetic data ends at ``plan.end``, so the snapshot's as-of is pinned to the drop's
    simulated instant (a minute after it lands) instead of the wall clock; the run is
    otherwise the one the sensor requested. The instance first records one untimed publish,
    as a deployed instance remembers the last one, so publishes take the delta path."""
    import dagster as dg

    from tutor_scoring_dagster.config import load_settings
    from tutor_scoring_dagster.definitions import defs
    from tutor_scoring_dagster.defs.ingest.sensors import landing_sensor
    from tutor_scoring_dagster.defs.publish.assets import tutor_scores
    from tutor_scoring_dagster.defs.resources import LandingResource, default_resources

    settings = load_settings()
    tutors = _tutor_ids(plan)
    job = defs.resolve_job_def("landing_ingest_job")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    drops: list[dict[str, Any]] = []
    with dg.instance_for_test() as instance:
        dg.materialize(
            [tutor_scores], resources=default_resources(), instance=instance, run_config=quiet
        )
        landing_cursor: str | None = None
        for k in range(plan.latency_drops):
            # Hourly drops of simulated time, each scored a minute after it lands.
            as_of = plan.as_of + timedelta(hours=2 + k)
            run_as_of = as_of + timedelta(minutes=1)
            phases: list[Phase] = []
            before = _eml(settings.outbox_dir)
            write_hourly_drop(settings.landing_dir, tutors, as_of, plan.seed + 1 + k)
            dropped = time.time()
            ticks = 0
            requests: list[dg.RunRequest] = []
            while not requests and ticks < 5:
                ticks += 1
                context = dg.build_sensor_context(
                    instance=instance,
                    cursor=landing_cursor,
                    resources={"landing": LandingResource()},
                )
                found, seconds = _timed(partial(landing_sensor, context))
                phases.append(Phase(f"landing_sensor tick {ticks}", seconds))
                landing_cursor = found.cursor
                requests = list(found.run_requests or [])
            for i, request in enumerate(requests, start=1):
                ops = {
                    **request.run_config["ops"],
                    "tutor_scores_current": {"config": {"as_of": run_as_of.isoformat()}},
                }
                with UsageSampler() as sampler:
                    result, seconds = _timed(
                        partial(
                            job.execute_in_process,
                            run_config={"ops": ops, **quiet},
                            instance=instance,
                            tags=request.tags,
                            raise_on_error=True,
                        )
                    )
                phases.append(
                    Phase(f"run {i} ({request.tags['tutor_scoring/landing_file']})", seconds)
                )
                phases += [
                    Phase(f"  {step.key}", step.seconds)
                    for step in run_steps(instance, result.run_id, sampler)
                ]
            done = time.time()
            new = {n: t for n, t in _eml(settings.outbox_dir).items() if n not in before}
            drops.append(
                {
                    "as_of": run_as_of.isoformat(),
                    "landing_ticks": ticks,
                    "ingest_runs": len(requests),
                    "emails": sorted(new),
                    "seconds": round(max(new.values()) - dropped, 3) if new else None,
                    "runs_done_seconds": round(done - dropped, 3),
                    "phases": [{"name": p.name, "seconds": round(p.seconds, 3)} for p in phases],
                }
            )
    done_s = sorted(d["seconds"] for d in drops if d["seconds"] is not None)
    p50, p95 = _percentile(done_s, 0.5), _percentile(done_s, 0.95)
    waits = {
        "landing_sensor_two_sightings_s": 2 * (landing_sensor.minimum_interval_seconds or 0),
        "run_queue_dequeue_s": RUN_QUEUE_DEQUEUE_S,
        "run_start_s": round(_run_start_seconds(), 3),
    }
    added = sum(waits.values())
    return {
        "drops": drops,
        "emailed": len(done_s),
        "p50_seconds": p50,
        "p95_seconds": p95,
        # Deployed: the work plus, at worst, the waits above. No hourly wait: each landing run
        # scores and reports; no report-sensor wait: the run sends its own reports.
        "deployed_waits": waits,
        "deployed_p50_seconds": round(p50 + added, 1) if p50 is not None else None,
        "deployed_p95_seconds": round(p95 + added, 1) if p95 is not None else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, int(np.ceil(q * len(values))))
    return values[rank - 1]


STAGES: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "generate_parquet": lambda plan: generate(plan, "parquet"),
    "generate_csv": lambda plan: generate(plan, "csv"),
    "ingest_csv": ingest_csv,
    "rebuild": rebuild,
    "publish": publish,
    "floor": floor,
    "baseline": baseline,
    "tick": tick,
    "latency": latency,
}
"""Every stage, in the order a benchmark runs them."""
