"""What risk tiers (issue #11) cost: one day's tiers and a one-year daily backtest.

    .venv/bin/python -m benchmarks.risk_tiers_cost --warehouse data/warehouse.duckdb
    .venv/bin/python -m benchmarks.risk_tiers_cost --tutors 2000 --days 365 --sessions-per-day 3000
    .venv/bin/python -m benchmarks.risk_tiers_cost --tutors 5000 --days 1095 --sessions-per-day 9130

With ``--warehouse`` it reads an existing warehouse (read-only); otherwise it generates Parquet
drops (``tutor-scoring generate``'s code) into ``--data`` and loads the two tables that tiers
read (``sessions``: the latest export of each session; ``reschedules``) straight into a DuckDB
file there, without the pipeline: the measurement is of the tiers, not of ingest. It times,
each ``--repeat`` times (the median is reported):

- ``one_day``: :func:`risk_tiers_as_of` at the last midnight (the hourly snapshot's call, with
  its default 30 days of ``watch_since`` lookback: 31 instants);
- ``one_day_alone``: the same with ``since_lookback_days=0`` (one instant; ``watch_since`` from
  :func:`carry_watch_since`);
- ``backtest``: :func:`run_backtest` over the last 365 days, every day, without labels (all
  four rules);
- ``range``: :func:`risk_tiers_by_chunk` over every day after the first 180 (the daily
  partitions' path: chunks of ``scoring.CHUNK_DAYS`` days, the sessions read once), once;

and prints one JSON object with the sizes, the seconds and the process's peak resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from tutor_scoring_dagster.backtest import run_backtest
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.params import TierParams
from tutor_scoring_dagster.risk_tiers import risk_tiers_as_of, risk_tiers_by_chunk
from tutor_scoring_dagster.scoring import CHUNK_DAYS

LOAD_SQL = """
SET TimeZone = 'UTC';
CREATE OR REPLACE TABLE sessions AS
SELECT session_id, tutor_id, scheduled_time, status
FROM read_parquet('{drops}/sessions_*.parquet', filename = true)
QUALIFY row_number() OVER (
    PARTITION BY session_id ORDER BY updated_at DESC, filename DESC
) = 1;
CREATE OR REPLACE TABLE reschedules AS
SELECT DISTINCT session_id, initiator, reason_code, cancelled_at, hours_before_session
FROM read_parquet('{drops}/reschedules_*.parquet');
"""


def build_warehouse(args: argparse.Namespace) -> Path:
    """Generate the drops and load the two tables tiers read; returns the DuckDB file."""
    drops = args.data / "drops"
    path = args.data / "tiers.duckdb"
    if path.exists():
        return path
    began = time.perf_counter()
    generate_drops(
        drops,
        tutors=args.tutors,
        days=args.days,
        sessions_per_day=args.sessions_per_day,
        seed=args.seed,
        end=args.end,
        fmt="parquet",
        drops_per_day=1,
        ground_truth_path=args.data / "ground_truth.csv",
    )
    con = duckdb.connect(str(path))
    con.execute(LOAD_SQL.format(drops=drops))
    con.close()
    print(f"generated and loaded in {time.perf_counter() - began:.1f} s", flush=True)
    return path


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls of ``fn``, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warehouse", type=Path, default=None, help="an existing warehouse")
    parser.add_argument("--data", type=Path, default=Path("/tmp/risk_tiers_cost"))
    parser.add_argument("--tutors", type=int, default=2000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--sessions-per-day", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--end", type=date.fromisoformat, default=date(2025, 1, 1))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-backtest", action="store_true")
    parser.add_argument("--skip-range", action="store_true")
    args = parser.parse_args()

    path = args.warehouse or build_warehouse(args)
    params = TierParams()
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    sessions, tutors, last = con.execute(
        "SELECT count(*), count(DISTINCT tutor_id), max(scheduled_time) FROM sessions"
    ).fetchall()[0]
    end = last.astimezone(UTC).date()  # the last day with sessions: its end is the snapshot
    as_of = datetime.combine(end + timedelta(days=1), datetime.min.time(), UTC)
    out: dict[str, Any] = {
        "warehouse": str(path),
        "sessions": sessions,
        "tutors": tutors,
        "as_of": as_of.isoformat(),
        "params": params.as_dict(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_1min_before": os.getloadavg()[0],
    }
    seconds, rows = timed(lambda: risk_tiers_as_of(con, as_of, params), args.repeat)
    out["one_day"] = {"seconds": round(seconds, 3), "rows": rows.height}
    seconds, rows = timed(
        lambda: risk_tiers_as_of(con, as_of, params, since_lookback_days=0), args.repeat
    )
    out["one_day_alone"] = {"seconds": round(seconds, 3), "rows": rows.height}
    out["peak_rss_mb_after_one_day"] = round(peak_rss_mb())
    if not args.skip_backtest:
        start = end - timedelta(days=364)
        seconds, result = timed(lambda: run_backtest(con, start, end), 1)
        out["backtest"] = {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "seconds": round(seconds, 3),
            "tutor_days": result.daily.height,
        }
        out["peak_rss_mb"] = round(peak_rss_mb())
    if not args.skip_range:
        first = con.execute("SELECT min(scheduled_time) FROM sessions").fetchall()[0][0]
        day = first.astimezone(UTC).date() + timedelta(days=params.lookback_days)
        chunks = []
        while day <= end:
            chunks.append((day, min(end, day + timedelta(days=CHUNK_DAYS - 1))))
            day = chunks[-1][1] + timedelta(days=1)
        seconds, rows = timed(
            lambda: sum(t.height for t in risk_tiers_by_chunk(con, chunks, params)), 1
        )
        out["range"] = {
            "from": chunks[0][0].isoformat() if chunks else None,
            "to": end.isoformat(),
            "chunks": len(chunks),
            "seconds": round(seconds, 3),
            "rows": rows,
        }
        out["peak_rss_mb"] = round(peak_rss_mb())
    out["load_1min_after"] = os.getloadavg()[0]
    con.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
