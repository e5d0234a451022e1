"""Shared helpers of the reliability tests: a small but varied set of drops, and a snapshot of
everything the pipeline leaves behind (warehouse, serving store, ledger, files, outbox) that two
runs can be compared on, wall-clock columns aside."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import fakes
import polars as pl
import sqlalchemy as sa
from fakes import FakeSendGrid as FakeSendGrid  # re-exported (as-aliases): the tests
from fakes import Reply as Reply  # import them from here, with fake_sendgrid below

from tutor_scoring_dagster.config import Settings, load_settings
from tutor_scoring_dagster.delivery import KEY_HEADER
from tutor_scoring_dagster.generate import generate_drops

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
"""The as-of instant of the runs compared (the drops end at 2026-03-01 00:00 UTC)."""
HISTORY_DAYS = 3
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

WAREHOUSE_IGNORED: Mapping[str, frozenset[str]] = {
    "loaded_files": frozenset({"loaded_at", "load_id"}),
    "quarantined_files": frozenset({"quarantined_at"}),
    "rejected_rows": frozenset({"load_id"}),
    "raw_sessions": frozenset({"load_id"}),
    "raw_reschedules": frozenset({"load_id"}),
    "raw_tutors": frozenset({"load_id"}),
    "sessions": frozenset({"load_id"}),
    "reschedules": frozenset({"load_id"}),
    "tutors": frozenset(),
    "tutor_daily_activity": frozenset(),
    "tutor_scores_current": frozenset(),
    "tutor_scores_daily": frozenset(),
}
"""Warehouse tables and views compared, and the columns left out: wall clock, and load ids
(a sequence value drawn by a transaction that was rolled back is not handed out again, so a
crashed load leaves a gap; the order of loads is compared instead)."""

STORE_IGNORED: Mapping[str, frozenset[str]] = {
    "tutors": frozenset({"updated_at"}),
    "sessions": frozenset({"updated_at"}),
    "reschedules": frozenset({"updated_at"}),
    "tutor_scores": frozenset({"last_calculated_at"}),
    "tutor_score_history": frozenset({"last_calculated_at"}),
    "email_reports": frozenset(
        {"id", "created_at", "sent_at", "next_attempt_at", "attempts", "error_message"}
    ),
}
"""Serving-store tables compared, and their wall-clock columns (in the store ``updated_at`` is
the publish stamp; the export's own is ``source_updated_at``). The ledger's attempt count and
note are compared separately: a resend after an unknown outcome is recorded as such."""


def build_drops(landing: Path, *, seed: int = 11) -> list[Path]:
    """About forty CSV drops over 20 days for 12 tutors (with 5% defective rows: rejected rows
    and a quarantined file), plus one unloadable file."""
    landing.mkdir(parents=True, exist_ok=True)
    made = generate_drops(
        landing,
        tutors=12,
        days=20,
        sessions_per_day=24,
        seed=seed,
        end=date(2026, 3, 1),
        drops_per_day=1,
        defects=0.05,
        ground_truth_path=landing.parent / "ground_truth.csv",
    )
    broken = landing / "sessions_broken.csv"
    broken.write_text("session_id;tutor_id\n1;2\n", encoding="utf-8")
    files = [*made.files, *newly_risky_drops(landing), broken]
    # Drops are taken oldest first (by mtime): make that order the files' order, whatever
    # the file system's timestamp granularity, so that two runs see the same drop order.
    start = T.timestamp() - 86_400
    for i, f in enumerate(files):
        os.utime(f, (start + i, start + i))
    return files


def newly_risky_drops(landing: Path, tutors: tuple[str, ...] = ("Z1", "Z2")) -> list[Path]:
    """Tutors who cross the risk rule in the 12 hours before ``T`` (so each gets an alert):
    five sessions held in the days before, then two moved by the tutor on the day."""
    sessions, moves = [], []
    for tutor in tutors:
        for i in range(5):
            at = T - timedelta(days=2 + i)
            sessions.append((f"{tutor}-{i}", tutor, at, "completed"))
        for i in range(2):
            at = T - timedelta(hours=3 + i)
            sessions.append((f"{tutor}-m{i}", tutor, at, "rescheduled"))
            moves.append((f"{tutor}-m{i}", at))
    iso = "%Y-%m-%dT%H:%M:%SZ"
    s_path = landing / "sessions_20260301T1130.csv"
    pl.DataFrame(
        {
            "session_id": [s[0] for s in sessions],
            "tutor_id": [s[1] for s in sessions],
            "scheduled_time": [s[2].strftime(iso) for s in sessions],
            "status": [s[3] for s in sessions],
            "duration_minutes": ["60"] * len(sessions),
        }
    ).write_csv(s_path)
    r_path = landing / "reschedules_20260301T1130.csv"
    pl.DataFrame(
        {
            "session_id": [m[0] for m in moves],
            "initiator": ["tutor"] * len(moves),
            "original_time": [m[1].strftime(iso) for m in moves],
            "new_time": [(m[1] + timedelta(days=1)).strftime(iso) for m in moves],
            "reason": ["<b>car</b> =cmd|' /C calc'!A0"] * len(moves),
            "cancelled_at": [(m[1] - timedelta(hours=2)).strftime(iso) for m in moves],
        }
    ).write_csv(r_path)
    return [s_path, r_path]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a subprocess running against ``settings``' home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["TUTOR_SCORING_HOME"] = str(settings.home)
    env.update(extra)
    return env


def run_script(
    code: str, env: Mapping[str, str], *, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``python -c code`` from the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _rows(columns: list[str], records: list[tuple[Any, ...]], ignored: frozenset[str]) -> Counter:
    keep = [i for i, c in enumerate(columns) if c not in ignored]
    names = tuple(columns[i] for i in keep)
    return Counter((names, tuple(r[i] for i in keep)) for r in records)


def warehouse_state(path: Path) -> dict[str, Any]:
    """Every compared warehouse table as a multiset of rows, and the order files loaded in."""
    state: dict[str, Any] = {}
    with duckdb.connect(str(path), read_only=True) as con:
        for table, ignored in WAREHOUSE_IGNORED.items():
            cursor = con.execute(f"SELECT * FROM {table}")
            columns = [d[0] for d in cursor.description]
            state[table] = _rows(columns, cursor.fetchall(), ignored)
        state["load_order"] = [
            r[0]
            for r in con.execute("SELECT file_name FROM loaded_files ORDER BY load_id").fetchall()
        ]
    return state


def store_state(url: str) -> dict[str, Any]:
    """Every compared serving-store table as a multiset of rows. Message-IDs name the store's
    own installation, which differs between the two stores compared: it reads as ``<own>``."""
    state: dict[str, Any] = {}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            own = conn.execute(sa.text("SELECT installation_id FROM installation")).scalar_one()
            for table, ignored in STORE_IGNORED.items():
                result = conn.execute(sa.text(f"SELECT * FROM {table}"))
                columns = list(result.keys())
                rows = [
                    tuple(v.replace(f".{own}@", ".<own>@") if isinstance(v, str) else v for v in r)
                    for r in result
                ]
                state[table] = _rows(columns, rows, ignored)
    finally:
        engine.dispose()
    return state


def ledger_rows(url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    sa.text("SELECT * FROM email_reports ORDER BY idempotency_key")
                ).mappings()
            ]
    finally:
        engine.dispose()


def outbox_keys(outbox: Path) -> Counter:
    """How many ``.eml`` files the outbox holds per idempotency key."""
    keys: Counter = Counter()
    for f in sorted(outbox.glob("*.eml")):
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        keys[str(msg[KEY_HEADER])] += 1
    return keys


def _sidecar(path: Path) -> str:
    # quarantined_at is wall clock
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("quarantined_at:"))


def file_state(settings: Settings) -> dict[str, Any]:
    """What the landing, archive and quarantine folders and the outbox hold."""
    archive = {
        p.name: (
            p.read_text(encoding="utf-8") if p.name.endswith((".rejected.csv", ".txt")) else ""
        )
        for p in sorted(settings.archive_dir.glob("*"))
    }
    quarantine = {
        p.name: (_sidecar(p) if p.name.endswith(".reason.txt") else "")
        for p in sorted(settings.quarantine_dir.glob("*"))
    }
    landing = sorted(p.name for p in settings.landing_dir.iterdir() if p.is_file())
    return {
        "archive": archive,
        "quarantine": quarantine,
        "landing": landing,
        "outbox": outbox_keys(settings.outbox_dir),
    }


def full_state(settings: Settings, url: str) -> dict[str, Any]:
    return {
        "warehouse": warehouse_state(settings.warehouse),
        "store": store_state(url),
        "files": file_state(settings),
    }


def diff_states(
    expected: Mapping[str, Any], actual: Mapping[str, Any], where: str = ""
) -> list[str]:
    """Human-readable differences between two nested states (empty when equal)."""
    out: list[str] = []
    for key in sorted(set(expected) | set(actual)):
        here = f"{where}/{key}"
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, Counter) and isinstance(b, Counter):
            missing, extra = a - b, b - a
            if missing or extra:
                out.append(
                    f"{here}: {sum(missing.values())} rows missing, e.g. "
                    f"{list(missing)[:2]}; {sum(extra.values())} rows extra, e.g. {list(extra)[:2]}"
                )
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_states(a, b, here)
        elif isinstance(a, list) and isinstance(b, list) and a != b:
            first = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
            out.append(
                f"{here}: differs from item {first}: expected {a[first : first + 3]}, "
                f"got {b[first : first + 3]} (lengths {len(a)}, {len(b)})"
            )
        elif a != b:
            out.append(f"{here}: expected {a!r:.600}, got {b!r:.600}")
    return out


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for a block (module-scoped fixtures
    cannot use the monkeypatch fixture)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def isolated_env(home: Path, **extra: str | None) -> dict[str, str | None]:
    """Values for :func:`environment`: every project variable cleared, ``home`` as the base."""
    from conftest import ENV_VARS  # tests/conftest.py

    values: dict[str, str | None] = dict.fromkeys(ENV_VARS)
    values["TUTOR_SCORING_HOME"] = str(home)
    values.update(extra)
    return values


def settings_for(home: Path) -> Settings:
    return load_settings({"TUTOR_SCORING_HOME": str(home)})


def frame_rows(path: Path) -> int:
    """Data rows of a landing CSV as a spreadsheet would count them (blank lines aside)."""
    frame = pl.read_csv(path, infer_schema=False)
    return frame.filter(~pl.all_horizontal(pl.all().is_null())).height


def fake_sendgrid() -> AbstractContextManager[FakeSendGrid]:
    """The fake SendGrid v3 ``/mail/send`` of tests/fakes.py, its error bodies echoing the
    request's Authorization header, as some proxies and providers do, to catch a leaked key."""
    return fakes.fake_sendgrid(echo_auth=True)


_REAL_TIME, _REAL_SLEEP = time.time, time.sleep


class FastClock:
    """``time.time`` and ``time.sleep`` where sleeping only moves the clock: Dagster's retry
    waits (10 s, then 30 s, 70 s) pass at once. ``install`` it with ``monkeypatch``."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return _REAL_TIME() + self.offset

    def sleep(self, seconds: float) -> None:
        # Polling loops still yield the CPU (a short real sleep); long waits are skipped.
        real = min(max(0.0, seconds), 0.02)
        _REAL_SLEEP(real)
        self.offset += max(0.0, seconds) - real
        if seconds >= 1:
            self.slept.append(seconds)

    def install(self, monkeypatch: Any) -> None:
        monkeypatch.setattr(time, "time", self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)


def expire_retry_waits(url: str) -> None:
    """Make every ledger row's next attempt due now (as if its wait had passed)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE email_reports SET next_attempt_at = :past WHERE next_attempt_at IS NOT NULL"
            ),
            {"past": datetime.now(UTC) - timedelta(minutes=1)},
        )
    engine.dispose()
