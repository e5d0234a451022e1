"""A bounded soak: 30 simulated days of drops every 6 hours (with defective rows, a re-dropped
copy, a file written in two steps and an unloadable file), run tick by tick through the landing
sensor (its run requests executed as Dagster runs) and the scheduled run of the whole pipeline
as of that tick. After every tick the invariants hold:

- every file that landed is archived or quarantined, none twice; the landing folder is empty;
- rows reconcile: each archived file's data rows = loaded + rejected, and the raw tables and
  ``rejected_rows`` hold exactly those;
- the serving store's sessions are the warehouse's current sessions within the horizon, and
  its tutor_scores the warehouse's current snapshot;
- every report that came due was sent exactly once: nothing is left due, every ledger row is
  sent, the outbox holds one message per sent key.
"""

from __future__ import annotations

import functools
import shutil
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
import sqlalchemy as sa

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.ingest.assets import landing_drops
from tutor_scoring_dagster.defs.ingest.sensors import (
    BATCH_RUN_KEY_PREFIX,
    RUN_KEY_PREFIX,
    landing_sensor,
)
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.defs.resources import LandingResource, default_resources
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.reports import ReportSettings, find_due_work
from tutor_scoring_dagster.store import tables as t
from tutor_scoring_dagster.store.publish import create_store_engine

from ._support import outbox_keys

END = date(2026, 3, 1)
DAYS = 30
TICK = timedelta(hours=54)
"""A scheduled run every 54 hours (the hourly run, sampled to keep the soak under a minute):
it meets every hour of the 6-hour drop cycle, and every tick's drops reach the sensor first."""
HORIZON_DAYS = 7


def _stamp(path: Path) -> datetime:
    """The end of the period a generated drop covers (``{entity}_{YYYYMMDD}T{HHMM}.csv``)."""
    text = path.name.split("_", 1)[1].split(".", 1)[0]
    return datetime.strptime(text, "%Y%m%dT%H%M").replace(tzinfo=UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@functools.cache
def _data_rows(path: Path) -> int:
    frame = pl.read_csv(path, infer_schema=False)
    return frame.filter(~pl.all_horizontal(pl.all().is_null())).height


class Soak:
    def __init__(self, home: Settings, instance: dg.DagsterInstance, staging: Path) -> None:
        self.home = home
        self.instance = instance  # the sensor's (runs go to ephemeral instances: faster)
        made = generate_drops(
            staging,
            tutors=10,
            days=DAYS,
            sessions_per_day=16,
            seed=5,
            end=END,
            drops_per_day=4,
            defects=0.04,
            ground_truth_path=staging.parent / "truth.csv",
        )
        self.pending = sorted(made.files, key=_stamp)
        self.cursor: str | None = None
        self.run_keys: Counter = Counter()
        self.dropped: list[str] = []  # names, in landing order
        self.extra_quarantined = 0

    def land(self, upto: datetime) -> None:
        """Move the drops whose period ended by ``upto`` into the landing folder."""
        self.home.landing_dir.mkdir(parents=True, exist_ok=True)
        while self.pending and _stamp(self.pending[0]) <= upto:
            f = self.pending.pop(0)
            shutil.copy2(f, self.home.landing_dir / f.name)
            self.dropped.append(f.name)

    def sense(self) -> list[dg.RunRequest]:
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={"landing": LandingResource(landing_dir=str(self.home.landing_dir))},
        )
        result = landing_sensor(context)
        assert isinstance(result, dg.SensorResult) and result.cursor is not None
        self.cursor = result.cursor
        requests = list(result.run_requests or [])
        for r in requests:
            assert r.run_key and r.run_key.startswith((RUN_KEY_PREFIX, BATCH_RUN_KEY_PREFIX))
            self.run_keys[r.run_key] += 1
        return requests

    def ingest(self, requests: list[dg.RunRequest]) -> None:
        """The sensor's runs (one per tick in production; their paths together here)."""
        if not requests:
            return
        paths = [
            p for r in requests for p in r.run_config["ops"]["landing_drops"]["config"]["paths"]
        ]
        result = dg.materialize(
            [landing_drops],
            resources=default_resources(),
            run_config={"ops": {"landing_drops": {"config": {"paths": paths}}}},
        )
        assert result.success


def check_invariants(soak: Soak, as_of: datetime) -> None:
    home = soak.home
    landed = [p.name for p in home.landing_dir.iterdir() if p.is_file()]
    assert not [n for n in landed if not n.endswith(".part")], f"left in landing: {landed}"
    archived = {p.name for p in home.archive_dir.glob("*.csv")} - {
        p.name for p in home.archive_dir.glob("*.rejected.csv")
    }
    quarantined = {
        p.name for p in home.quarantine_dir.glob("*") if not p.name.endswith(".reason.txt")
    }
    assert archived.isdisjoint(quarantined)
    assert archived | quarantined == set(soak.dropped), (
        "a dropped file is neither archived nor quarantined"
    )
    assert len(soak.dropped) == len(set(soak.dropped))
    assert set(soak.run_keys.values()) <= {1}, "a file was handed over twice"

    with duckdb.connect(str(home.warehouse), read_only=True) as con:
        loads = {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT file_name, load_id, entity, rows_read, rows_loaded, rows_rejected "
                "FROM loaded_files"
            ).fetchall()
        }
        raw = {}
        for entity in ("sessions", "reschedules", "tutors"):
            for load_id, n in con.execute(
                f"SELECT load_id, count(*) FROM raw_{entity} GROUP BY load_id"
            ).fetchall():
                raw[load_id] = n
        rejected = dict(
            con.execute(
                "SELECT load_id, count(DISTINCT line_number) FROM rejected_rows GROUP BY load_id"
            ).fetchall()
        )
        since = as_of - timedelta(days=HORIZON_DAYS)
        wh_sessions = {
            (*r[:3], _utc(r[3]))
            for r in con.execute(
                "SELECT session_id, tutor_id, status, scheduled_time FROM sessions "
                "WHERE scheduled_time >= ?",
                [since],
            ).fetchall()
        }
        wh_scores = set(
            con.execute(
                "SELECT tutor_id, total_sessions_30d, tutor_reschedules_30d, is_high_risk "
                "FROM tutor_scores_current"
            ).fetchall()
        )
    assert set(loads) <= archived  # a duplicate is archived without a load of its own
    for name, (load_id, _, read, loaded, rejected_n) in loads.items():
        assert read == loaded + rejected_n == _data_rows(home.archive_dir / name), name
        assert raw.get(load_id, 0) == loaded and rejected.get(load_id, 0) == rejected_n, name

    engine = create_store_engine(home.database_url)
    try:
        with engine.connect() as conn:
            c = t.sessions.c
            store_sessions = {
                (r[0], r[1], r[2], _utc(r[3]))
                for r in conn.execute(
                    sa.select(c.session_id, c.tutor_id, c.status, c.scheduled_time)
                )
            }
            store_scores = set(
                conn.execute(
                    sa.text(
                        "SELECT tutor_id, total_sessions_30d, tutor_reschedules_30d, is_high_risk "
                        "FROM tutor_scores"
                    )
                ).all()
            )
            ledger = conn.execute(
                sa.text("SELECT idempotency_key, status FROM email_reports")
            ).all()
        due = find_due_work(engine, now=datetime.now(UTC), settings=ReportSettings())
    finally:
        engine.dispose()
    assert store_sessions == wh_sessions
    assert store_scores == {(t, n, k, bool(h)) for t, n, k, h in wh_scores}
    assert not due, f"still due after the run: {due.keys}"
    assert {s for _, s in ledger} <= {"sent"}, ledger
    outbox = outbox_keys(home.outbox_dir)
    assert set(outbox.values()) <= {1} and set(outbox) == {k for k, _ in ledger}


@pytest.mark.slow
def test_thirty_days_of_drops_keep_every_invariant(
    home: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SERVING_HORIZON_DAYS", str(HORIZON_DAYS))
    with dg.instance_for_test() as instance:
        soak = Soak(home, instance, tmp_path / "staging")
        start = _stamp(soak.pending[0])
        ticks = 0
        digests = 0
        at = start
        while at <= datetime.combine(END, datetime.min.time(), tzinfo=UTC) + TICK:
            ticks += 1
            soak.land(at)
            landing = home.landing_dir
            if ticks == 3:
                # The same bytes again under a new name: recognised, archived, not reloaded.
                first = soak.dropped[1]
                shutil.copy2(home.archive_dir / first, landing / f"copy_of_{first}")
                (landing / f"copy_of_{first}").rename(landing / f"sessions_again_{first}")
                soak.dropped.append(f"sessions_again_{first}")
            if ticks == 5:
                (landing / "sessions_broken.csv").write_text("id;tutor\n1;2\n")
                soak.dropped.append("sessions_broken.csv")
            if ticks == 7:
                (landing / "sessions_late.csv.part").write_text(
                    "session_id,tutor_id,scheduled_time,status\n"
                )
            if ticks == 8:
                part = landing / "sessions_late.csv.part"
                with part.open("a") as fh:
                    fh.write(f"late-1,T00001,{at - timedelta(days=1):%Y-%m-%dT%H:%M:%SZ},no_show\n")
                part.rename(landing / "sessions_late.csv")
                soak.dropped.append("sessions_late.csv")
            first_look = soak.sense()  # sees the new files
            second_look = soak.sense()  # they did not change: handed over
            soak.ingest(first_look + second_look)
            summary = run_pipeline(as_of=at, history_days=1)
            assert summary.success, f"tick {ticks} at {at}: {summary.render()}"
            digests += summary.value("email_reports", "emails_sent")
            check_invariants(soak, at)
            at += TICK
    assert ticks >= DAYS * 24 // 54 and not soak.pending
    assert digests >= ticks // 2  # reports kept coming
