"""One command for the whole benchmark (issue #8; benchmarks/README.md):

    .venv/bin/python -m benchmarks.run [--sessions 10000000] [--tutors 5000] [--days 1095]
                                       [--smoke] [--data DIR] [--results DIR]

generates the drops (Parquet, and a CSV variant), ingests the CSV variant, runs the real
pipeline's full rebuild into a throwaway Postgres database, measures the DuckDB-only floor and
the original system's per-session queries, an hourly incremental tick and drop-to-email latency,
and writes ``latest.json`` and ``latest.md`` into the results folder. Each stage runs in a
process of its own (``--child``), so its peak resident set is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.probe import BUSY_MIN_SECONDS, SAMPLE_INTERVAL_S
from benchmarks.stages import STAGES, Plan, psycopg_url

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "benchmarks" / "data"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
PG_ADMIN_URL = os.environ.get(
    "TUTOR_SCORING_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SMOKE = {"sessions": 200_000, "tutors": 500, "days": 240, "baseline_sample": 200, "latency": 3}

FIRST_STAGES = ("generate_parquet", "generate_csv")
"""Stages that start a run afresh; ``--only`` of later stages reuses a kept run's data."""

TARGETS = {
    "rebuild_seconds": 90.0,
    "rebuild_vs_floor": 6.0,
    "peak_rss_mb": 4096.0,
    "tick_seconds": 10.0,
    "latency_p95_seconds": 120.0,
    "throughput_vs_baseline": 1000.0,
}

PROJECT_ENV = (
    "TUTOR_SCORING_HOME",
    "TUTOR_SCORING_LANDING_DIR",
    "TUTOR_SCORING_ARCHIVE_DIR",
    "TUTOR_SCORING_QUARANTINE_DIR",
    "TUTOR_SCORING_WAREHOUSE",
    "TUTOR_SCORING_SITE_DIR",
    "TUTOR_SCORING_START_DATE",
    "DATABASE_URL",
    "EMAIL_SERVICE",
    "EMAIL_OUTBOX_DIR",
    "SERVING_HORIZON_DAYS",
    "DAGSTER_HOME",
)
"""Variables a stage process gets from the benchmark only (never from the caller's shell)."""

STAGE_HOME = {"ingest_csv": "csv"}
"""The TUTOR_SCORING_HOME of each stage: the pipeline's unless named here."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--sessions", type=int, default=10_000_000)
    parser.add_argument("--tutors", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=1095)
    parser.add_argument(
        "--end",
        default="2026-01-01",
        help="the data ends at this midnight UTC (ISO date, not after today)",
    )
    parser.add_argument("--smoke", action="store_true", help="a small run for CI: " + str(SMOKE))
    parser.add_argument("--baseline-sample", type=int, default=2000)
    parser.add_argument("--latency-drops", type=int, default=6)
    parser.add_argument("--data", type=Path, default=None, help="default benchmarks/data/<size>")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--keep", action="store_true", help="keep the data and the database")
    parser.add_argument(
        "--only",
        default=",".join(STAGES),
        help="comma-separated stages to run (later ones need the earlier ones' data)",
    )
    parser.add_argument("--child", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sessions, args.tutors, args.days = SMOKE["sessions"], SMOKE["tutors"], SMOKE["days"]
        args.baseline_sample, args.latency_drops = SMOKE["baseline_sample"], SMOKE["latency"]
    return args


def create_database(admin_url: str) -> tuple[str, str]:
    """A throwaway database on the admin URL's server: its name and SQLAlchemy URL."""
    name = f"tutor_scoring_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(psycopg_url(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    return name, f"{base}/{name}"


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(psycopg_url(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stage_env(plan: Plan, stage: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env.update(
        {
            "TUTOR_SCORING_HOME": str(plan.home(STAGE_HOME.get(stage, "pipeline"))),
            "TUTOR_SCORING_START_DATE": plan.start_date.isoformat(),
            "DATABASE_URL": plan.database_url,
            "EMAIL_SERVICE": "outbox",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        }
    )
    return env


def run_stage(plan: Plan, stage: str, plan_file: Path) -> dict[str, Any]:
    """Run one stage in a process of its own; its result, with the process's wall time
    (imports included) and maximum resident set (from the kernel's rusage)."""
    result_file = plan.root / f"{stage}.result.json"
    log_file = plan.root / f"{stage}.log"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.run",
                "--child",
                stage,
                "--plan",
                str(plan_file),
                "--result",
                str(result_file),
            ],
            env=stage_env(plan, stage),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    process = {
        "process_seconds": round(time.perf_counter() - started, 3),
        "process_max_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit_code": proc.returncode,
        # Other work on the machine skews every number: the 1-minute load around the stage.
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
    }
    if proc.returncode != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace").splitlines()[-30:]
        return {"error": "\n".join(tail), **process}
    return {**json.loads(result_file.read_text()), **process}


def machine(admin_url: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import dagster
    import duckdb
    import polars

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    with psycopg.connect(psycopg_url(admin_url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "polars": polars.__version__,
        "dagster": dagster.__version__,
        "postgres": row[0] if row else None,
    }


def summarize(plan: Plan, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers and each target, met or not."""

    def get(stage: str, key: str) -> Any:
        return stages.get(stage, {}).get(key)

    rebuild_s = get("rebuild", "seconds")
    floor_s = get("floor", "seconds")
    sessions = get("generate_parquet", "sessions") or plan.sessions
    ours = sessions / rebuild_s if rebuild_s else None
    base = get("baseline", "sessions_per_second")
    # The target is the deployed latency: the work plus the sensor and run-start waits.
    p95 = get("latency", "deployed_p95_seconds")
    peak = max(
        (v for s in ("rebuild", "tick", "latency") if (v := get(s, "process_max_rss_mb"))),
        default=None,
    )
    numbers = {
        "rebuild_seconds": rebuild_s,
        "rebuild_vs_floor": round(rebuild_s / floor_s, 2) if rebuild_s and floor_s else None,
        "peak_rss_mb": peak,
        "tick_seconds": get("tick", "seconds"),
        "latency_p95_seconds": p95,
        "throughput_vs_baseline": round(ours / base, 1) if ours and base else None,
    }
    return {
        "sessions_per_second": round(ours, 1) if ours else None,
        "baseline_sessions_per_second": base,
        "work": _work(stages),
        "latency_work_p50_seconds": get("latency", "p50_seconds"),
        "latency_work_p95_seconds": get("latency", "p95_seconds"),
        "latency_deployed_waits": get("latency", "deployed_waits") or {},
        "targets": {
            name: {
                "value": numbers[name],
                "target": target,
                "met": None
                if numbers[name] is None
                else (
                    numbers[name] >= target
                    if name == "throughput_vs_baseline"
                    else numbers[name] <= target
                ),
            }
            for name, target in TARGETS.items()
        },
    }


def _work(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The rebuild's work in CPU time against the floor's: what even perfect use of every core
    would leave of the ratio to the floor."""
    rebuild, floor = stages.get("rebuild", {}), stages.get("floor", {})
    process, server = rebuild.get("cpu_seconds"), rebuild.get("server_cpu_seconds")
    cores = len(os.sched_getaffinity(0))  # the cores this process may use
    work = None if process is None else process + (server or 0.0)
    wall, floor_wall = rebuild.get("seconds"), floor.get("seconds")
    floor_cpu = floor.get("cpu_seconds")
    least = None if work is None else work / cores
    return {
        "rebuild_cpu_seconds": None if work is None else round(work, 1),
        "rebuild_process_cpu_seconds": process,
        "rebuild_server_cpu_seconds": server,  # None: not measured (see ServerCpu)
        "rebuild_cores_busy": round(work / wall, 2) if work and wall else None,
        "floor_cpu_seconds": floor_cpu,
        "rebuild_vs_floor_cpu": round(work / floor_cpu, 1) if work and floor_cpu else None,
        "cores": cores,
        "rebuild_seconds_every_core_busy": None if least is None else round(least, 1),
        "every_core_busy_vs_floor": round(least / floor_wall, 2) if least and floor_wall else None,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _steps_table(steps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| step | wall s | peak RSS MB | CPU s | Postgres CPU s | cores busy | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        lines.append(
            f"| {s['step']} | {_fmt(s['seconds'], 2)} | {_fmt(s['peak_rss_mb'])} | "
            f"{_fmt(s.get('cpu_seconds'))} | {_fmt(s.get('server_cpu_seconds'))} | "
            f"{_fmt(s.get('cores_busy'), 2)} | {s['status']} |"
        )
    lines += [
        "",
        "CPU s: this process's threads. Postgres CPU s: the local server's processes, all of "
        "its work meanwhile (-: not measured, for runs without the store or a server not on "
        "this machine). Cores busy: both over the time between the samples around the step, "
        f"for steps of {BUSY_MIN_SECONDS:g} s or more (CPU time is sampled every "
        f"{SAMPLE_INTERVAL_S * 1000:g} ms).",
    ]
    return lines


def _work_lines(work: dict[str, Any]) -> list[str]:
    """The rebuild's work in CPU time against the floor's, as a paragraph (none if unmeasured)."""
    if work.get("rebuild_cpu_seconds") is None:
        return []
    server = work["rebuild_server_cpu_seconds"]
    where = (
        f"{_fmt(work['rebuild_process_cpu_seconds'])} in its process and {_fmt(server)} in the "
        "Postgres server, all of its work meanwhile"
        if server is not None
        else "its process only: the Postgres server's was not measured, so this is a lower bound"
    )
    lines = [
        f"Work in CPU time: the rebuild used {_fmt(work['rebuild_cpu_seconds'])} CPU-seconds "
        f"({where}), {_fmt(work['rebuild_cores_busy'], 2)} of {work['cores']} cores busy on "
        "average. With every core busy it would still take "
        f"{_fmt(work['rebuild_seconds_every_core_busy'])} s."
    ]
    if work.get("floor_cpu_seconds") is not None:
        lines[0] += (
            f" The floor used {_fmt(work['floor_cpu_seconds'])} CPU-seconds: the rebuild's "
            f"work is {_fmt(work['rebuild_vs_floor_cpu'])}x the floor's, and even with every "
            f"core busy it would take {_fmt(work['every_core_busy_vs_floor'], 2)}x the floor's "
            "wall time."
        )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    m, p, st, sm = report["machine"], report["plan"], report["stages"], report["summary"]
    met = {True: "met", False: "**not met**", None: "-"}
    t = sm["targets"]

    def row(label: str, stage: str, note: str = "") -> str:
        s = st.get(stage, {})
        value = s.get("seconds")
        return (
            f"| {label} | {_fmt(value, 2)} | {_fmt(s.get('process_max_rss_mb'))} | "
            f"{_fmt(s.get('loadavg_before'), 2)} / {_fmt(s.get('loadavg_after'), 2)} | "
            f"{note or ('error' if 'error' in s else '')} |"
        )

    gen = st.get("generate_parquet", {})
    lines = [
        f"# Benchmark results ({report['finished_at']})",
        "",
        f"{_fmt(gen.get('sessions'))} sessions, {_fmt(gen.get('tutors'))} tutors, "
        f"{p['days']} days ending {p['end']}; {_fmt(gen.get('files'))} Parquet drops "
        f"({_fmt(gen.get('megabytes'))} MB).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, DuckDB {m['duckdb']}, Polars {m['polars']}, "
        f"Dagster {m['dagster']}, Postgres {m['postgres']}.",
        "",
        "| stage | wall s | peak RSS MB (process) | load before/after | notes |",
        "|---|---:|---:|---|---|",
        row("generate Parquet drops", "generate_parquet"),
        row(
            "generate CSV drops",
            "generate_csv",
            f"{_fmt(st.get('generate_csv', {}).get('megabytes'))} MB",
        ),
        row(
            "ingest CSV drops (landing_drops)",
            "ingest_csv",
            f"{_fmt(st.get('ingest_csv', {}).get('rows_loaded'))} rows loaded",
        ),
        row(
            "**full rebuild** (run_pipeline, all days, Postgres)",
            "rebuild",
            f"{_fmt(sm['sessions_per_second'], 0)} sessions/s",
        ),
        row(
            "floor (DuckDB alone on the Parquet)",
            "floor",
            f"{_fmt(st.get('floor', {}).get('rows'))} rows; "
            f"{_fmt(st.get('floor', {}).get('mismatches'))} mismatches with the pipeline",
        ),
        row(
            "baseline (3 COUNT queries per session)",
            "baseline",
            f"{_fmt(st.get('baseline', {}).get('sessions'))} sessions, "
            f"{_fmt(sm['baseline_sessions_per_second'])} sessions/s, "
            f"{_fmt(st.get('baseline', {}).get('mismatches'))} mismatches",
        ),
        row(
            "hourly tick (125 sessions: ingest, snapshot + checks, publish, email)",
            "tick",
            f"{len(st.get('tick', {}).get('emails', []))} emails, digest sent: "
            f"{st.get('tick', {}).get('digest_sent')}; then the hourly dashboard rebuild "
            f"{_fmt(st.get('tick', {}).get('dashboard_seconds'), 2)} s; delta publish: "
            f"{st.get('tick', {}).get('publish_delta')}",
        ),
        row(
            "serving-store publish alone (history backfill, current, hourly cases)",
            "publish",
            f"{_fmt(st.get('publish', {}).get('history_rows'))} history rows (cases below)",
        ),
        "",
        "| target | measured | target | |",
        "|---|---:|---:|---|",
        f"| full rebuild wall | {_fmt(t['rebuild_seconds']['value'])} s | < 90 s | "
        f"{met[t['rebuild_seconds']['met']]} |",
        f"| full rebuild / floor | {_fmt(t['rebuild_vs_floor']['value'], 2)}x | <= 6x | "
        f"{met[t['rebuild_vs_floor']['met']]} |",
        f"| peak RSS (rebuild, tick, latency) | {_fmt(t['peak_rss_mb']['value'])} MB | < 4096 MB | "
        f"{met[t['peak_rss_mb']['met']]} |",
        f"| hourly tick | {_fmt(t['tick_seconds']['value'], 2)} s | < 10 s | "
        f"{met[t['tick_seconds']['met']]} |",
        f"| drop-to-email p95 (deployed) | {_fmt(t['latency_p95_seconds']['value'], 1)} s | "
        f"< 120 s | {met[t['latency_p95_seconds']['met']]} |",
        f"| throughput vs per-session baseline | "
        f"{_fmt(t['throughput_vs_baseline']['value'])}x | >= 1000x | "
        f"{met[t['throughput_vs_baseline']['met']]} |",
        "",
        "Drop-to-email: the work (sensor evaluated back to back, the run it requests "
        f"executed) p50 {_fmt(sm['latency_work_p50_seconds'], 1)} s, p95 "
        f"{_fmt(sm['latency_work_p95_seconds'], 1)} s; deployed adds at worst "
        + ", ".join(f"{k} {v} s" for k, v in sm["latency_deployed_waits"].items())
        + ".",
        "",
        *_work_lines(sm.get("work", {})),
    ]
    for stage, title in (
        ("rebuild", "Full rebuild, per step"),
        ("tick", "Hourly tick, per step"),
        ("ingest_csv", "CSV ingest, per step"),
    ):
        steps = st.get(stage, {}).get("steps")
        if steps:
            lines += [f"## {title}", "", *_steps_table(steps), ""]
            outside = st[stage].get("outside_steps_seconds")
            if outside is not None:
                lines += [
                    f"Outside the steps (Dagster's runs, planned and materialization events): "
                    f"{_fmt(outside, 2)} s.",
                    "",
                ]
    pub = st.get("publish", {})
    if pub.get("cases"):
        lines += [
            "## Serving-store publish alone (store/publish.py, its own Postgres database)",
            "",
            f"{_fmt(pub.get('history_rows'))} history rows; "
            f"{_fmt(pub.get('horizon_sessions'))} sessions in the serving horizon.",
            "",
            "| case | s | rows offered | written | deleted |",
            "|---|---:|---:|---:|---:|",
        ]
        for case in pub["cases"]:
            lines.append(
                f"| {case['case']} | {_fmt(case['seconds'], 2)} | "
                f"{_fmt(sum(case['staged'].values()))} | {_fmt(sum(case['written'].values()))} | "
                f"{_fmt(sum(case['deleted'].values()))} |"
            )
        lines.append("")
    lat = st.get("latency", {})
    if lat.get("drops"):
        lines += [
            "## Drop-to-email latency, per drop (sensors evaluated back to back)",
            "",
            f"p50 {_fmt(lat.get('p50_seconds'), 2)} s, p95 {_fmt(lat.get('p95_seconds'), 2)} s "
            f"over {lat.get('emailed')} of {len(lat['drops'])} drops emailed.",
            "",
            "| as of | latency s | landing ticks | phases (s) | emails |",
            "|---|---:|---:|---|---|",
        ]
        for d in lat["drops"]:
            phases = "; ".join(f"{ph['name']} {ph['seconds']:.2f}" for ph in d["phases"])
            lines.append(
                f"| {d['as_of']} | {_fmt(d['seconds'], 2)} | {d['landing_ticks']} | {phases} | "
                f"{len(d['emails'])} |"
            )
        lines.append("")
    errors = {name: s["error"] for name, s in st.items() if "error" in s}
    for name, error in errors.items():
        lines += [f"## {name} failed", "", "```", error, "```", ""]
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    label = "smoke" if args.smoke else f"{args.sessions}"
    data = (args.data or DEFAULT_DATA / label).resolve()
    plan_file = data / "plan.json"
    wanted = [s for s in STAGES if s in set(args.only.split(","))]
    if wanted[0] not in FIRST_STAGES and plan_file.exists():
        # Later stages of a kept run (--keep): its data, warehouse and database, as they are.
        plan = Plan.from_json(plan_file.read_text())
        db_name = plan.database_url.rpartition("/")[2]
    else:
        if data.exists():
            shutil.rmtree(data)
        data.mkdir(parents=True)
        db_name, db_url = create_database(args.pg_admin_url)
        plan = Plan(
            sessions=args.sessions,
            tutors=args.tutors,
            days=args.days,
            end=args.end,
            work=str(data),
            database_url=db_url,
            baseline_sample=args.baseline_sample,
            latency_drops=args.latency_drops,
        )
        plan_file.write_text(plan.to_json())
    stages: dict[str, dict[str, Any]] = {}
    started = datetime.now(UTC)
    try:
        for stage in wanted:
            print(f"[{datetime.now(UTC):%H:%M:%S}] {stage} ...", flush=True)
            stages[stage] = run_stage(plan, stage, plan_file)
            outcome = stages[stage]
            if "error" in outcome:
                print(f"  FAILED:\n{outcome['error']}", flush=True)
                if stage in ("generate_parquet", "rebuild"):
                    break
            else:
                seconds = outcome.get("seconds", outcome.get("p95_seconds"))
                print(
                    f"  {seconds} s, process max RSS {outcome['process_max_rss_mb']} MB",
                    flush=True,
                )
        report = {
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "plan": {
                **{k: v for k, v in json.loads(plan.to_json()).items() if k != "database_url"},
                "database": db_name,
            },
            "machine": machine(args.pg_admin_url),
            "stages": stages,
            "summary": summarize(plan, stages),
        }
    finally:
        if not args.keep:
            drop_database(args.pg_admin_url, db_name)
            shutil.rmtree(data, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.results / "latest.md").write_text(markdown(report) + "\n")
    print((args.results / "latest.md").read_text())
    failed = [name for name, s in stages.items() if "error" in s]
    return 1 if failed or len(stages) < len(wanted) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        plan = Plan.from_json(args.plan.read_text())
        result = STAGES[args.child](plan)
        args.result.write_text(json.dumps(result, indent=2, default=str))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
