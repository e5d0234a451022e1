"""Batched ingest (a pass of many files: a backfill, a rebuild): each file ends exactly as a
pass of one file at a time would leave it (outcome, reason, rows, rejected rows and their
lines, load ids in drop order, archive and quarantine), duplicates within the pass load once,
and a failure in the middle of a batch loads nothing of that batch.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tutor_scoring_dagster import ingest, warehouse
from tutor_scoring_dagster.generate import generate_drops
from tutor_scoring_dagster.ingest import IngestReport
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.warehouse import query_frame

TABLES = {
    "raw_sessions": "load_id, source_line",
    "raw_reschedules": "load_id, source_line",
    "raw_tutors": "load_id, source_line",
    "rejected_rows": "load_id, line_number, column_name",
    "loaded_files": "load_id",
    "quarantined_files": "file_name",
    "sessions": "session_id",
    "reschedules": "session_id, cancelled_at",
    "tutors": "tutor_id",
    "current_loads": "entity",
}
TIMESTAMPS = {"loaded_files": ["loaded_at"], "quarantined_files": ["quarantined_at"]}
"""Columns that say when, not what: they differ between any two passes."""
BAD_FILES = (
    "sessions_semicolons.csv",
    "sessions_all_invalid.csv",
    "reschedules_truncated.parquet",
    "sessions_bomb.csv.gz",
    "sessions_empty.csv",
    "notes_for_ops.csv",
)
_WHEN = re.compile(r" at \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC|quarantined_at: .*")


def build_landing(landing: Path) -> list[str]:
    """Generated CSV and Parquet drops with defective rows, and among them, in drop order:
    bad files of every kind, a file whose rows are all invalid, and copies of the same bytes
    (side by side, and far apart). Returns the file names in drop order."""
    landing.mkdir(parents=True)
    for fmt in ("parquet", "csv"):
        generate_drops(
            landing,
            tutors=8,
            days=5,
            sessions_per_day=30,
            seed=5,
            end=date(2024, 3, 1),
            fmt=fmt,  # type: ignore[arg-type]
            drops_per_day=2,
            defects=0.1,
            ground_truth_path=landing.parent / f"truth-{fmt}.csv",
        )
    generated = sorted(p.name for p in landing.iterdir())
    parquet = [n for n in generated if n.endswith(".parquet")]
    bad: dict[str, bytes] = {
        "sessions_semicolons.csv": b"session_id;tutor_id\n1;2\n",
        "sessions_all_invalid.csv": b"session_id,tutor_id,scheduled_time,status\n,T1,x,done\n",
        "reschedules_truncated.parquet": (landing / parquet[0]).read_bytes()[:-9],
        "sessions_bomb.csv.gz": gzip.compress(b"session_id\n" + b"1\n" * (40 << 20)),
        "sessions_empty.csv": b"",
        "notes_for_ops.csv": b"anything\n1\n",
    }
    copied = [n for n in generated if n.startswith("sessions") and n.endswith(".parquet")]
    names = list(generated)
    assert tuple(bad) == BAD_FILES
    for i, (name, content) in enumerate(bad.items()):
        (landing / name).write_bytes(content)
        names.insert(3 + 4 * i, name)
    # The same bytes twice in a row (one batch), and again much later (another batch).
    shutil.copyfile(landing / copied[1], landing / "sessions_copy_a.parquet")
    shutil.copyfile(landing / copied[1], landing / "sessions_copy_b.parquet")
    names.insert(names.index(copied[1]) + 1, "sessions_copy_a.parquet")
    names.append("sessions_copy_b.parquet")
    for i, name in enumerate(names):
        os.utime(landing / name, (1e9 + i, 1e9 + i))
    return names


def run_pass(
    root: Path, monkeypatch: pytest.MonkeyPatch, *, batched: bool, max_files: int = 7
) -> IngestReport:
    """One ingest pass over ``root/landing`` into ``root/wh.duckdb``."""
    monkeypatch.setattr(ingest, "BATCH_MIN_FILES", 2 if batched else 10**9)
    monkeypatch.setattr(ingest, "BATCH_MAX_FILES", max_files)
    monkeypatch.setattr(ingest, "BATCH_MAX_ROWS", 400)  # some batches end on rows
    with warehouse.connect(root / "wh.duckdb") as con:
        warehouse.ensure_schema(con)
        return ingest.ingest_landing(
            con,
            root / "landing",
            archive_dir=root / "landing" / "archive",
            quarantine_dir=root / "landing" / "quarantine",
        )


def outcome(root: Path, report: IngestReport) -> dict[str, Any]:
    """Everything a pass leaves behind, but the instants it happened at."""
    files = [
        (
            f.file_name,
            f.entity,
            f.file_hash,
            f.outcome,
            f.rows_read,
            f.rows_loaded,
            f.rows_rejected,
            _WHEN.sub("", f.reason or ""),
            f.load_id,
            f.moved_to and f.moved_to.relative_to(root),
        )
        for f in report.files
    ]
    folders = {
        str(p.relative_to(root)): _WHEN.sub("", p.read_text(errors="replace"))
        if p.name.endswith((".txt", ".rejected.csv"))
        else p.stat().st_size
        for p in sorted((root / "landing").rglob("*"))
        if p.is_file()
    }
    with warehouse.connect(root / "wh.duckdb", read_only=True) as con:
        tables = {
            table: query_frame(
                con,
                f"SELECT * FROM {table} ORDER BY {order}",
            ).drop(TIMESTAMPS.get(table, []))
            for table, order in TABLES.items()
        }
    return {"files": files, "folders": folders, "tables": tables}


def assert_same(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert one["files"] == other["files"]
    assert one["folders"] == other["folders"]
    for table, frame in one["tables"].items():
        assert frame.equals(other["tables"][table]), table


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Two identical landing folders (the same files, bytes and drop order)."""
    names = build_landing(tmp_path / "one" / "landing")
    shutil.copytree(tmp_path / "one", tmp_path / "other")
    for p in (tmp_path / "one" / "landing").iterdir():
        st = p.stat()
        os.utime(tmp_path / "other" / "landing" / p.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    return tmp_path / "one", tmp_path / "other", names


def test_a_batched_pass_ends_every_file_as_one_by_one_does(
    twins: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    one, other, names = twins
    alone = run_pass(one, monkeypatch, batched=False)
    batched = run_pass(other, monkeypatch, batched=True)
    assert [f.file_name for f in batched.files] == names  # in drop order
    quarantined = {f.file_name for f in batched.files if f.outcome == "quarantined"}
    assert set(BAD_FILES) <= quarantined  # generated files with only bad rows too
    assert batched.count("duplicate") == 2
    assert batched.count("loaded") > 20
    assert batched.rows_rejected > 0
    assert_same(outcome(one, alone), outcome(other, batched))


def test_copies_of_the_same_bytes_in_one_pass_load_once(
    twins: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, root, names = twins
    report = run_pass(root, monkeypatch, batched=True, max_files=64)
    by_name = {f.file_name: f for f in report.files}
    first = names[names.index("sessions_copy_a.parquet") - 1]
    assert by_name[first].outcome == "loaded"
    for copy in ("sessions_copy_a.parquet", "sessions_copy_b.parquet"):
        assert by_name[copy].outcome == "duplicate"
        assert by_name[copy].reason is not None
        assert by_name[copy].reason.startswith(f"same bytes as {first}, loaded as load ")
        assert (root / "landing" / "archive" / copy).exists()
    with warehouse.connect(root / "wh.duckdb", read_only=True) as con:
        frame = query_frame(
            con,
            "SELECT count(*) AS n FROM loaded_files WHERE file_hash = $hash",
            {"hash": by_name[first].file_hash},
        )
    assert frame.item() == 1


def test_a_failure_in_the_middle_of_a_batch_loads_nothing_of_it_and_a_rerun_finishes(
    twins: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_root, root, names = twins
    real = load_sql
    calls = []

    def fails_in_second_batch(name: str) -> str:
        if name == "loaded_files_batch_insert":
            calls.append(name)
            if len(calls) == 2:  # its rows and rejected rows are inserted by now
                raise ingest.InjectedFailure("injected failure in the second batch")
        return real(name)

    monkeypatch.setattr(ingest, "load_sql", fails_in_second_batch)
    with pytest.raises(ingest.InjectedFailure):
        run_pass(root, monkeypatch, batched=True)
    left = sorted(p.name for p in (root / "landing").iterdir() if p.is_file())
    # The first batch (7 files) is loaded and archived; every file from the second on,
    # loadable or not, is still in landing.
    assert left == sorted(names[7:])
    with warehouse.connect(root / "wh.duckdb", read_only=True) as con:
        loaded = query_frame(con, "SELECT file_name FROM loaded_files").to_series().to_list()
        raw_files = query_frame(
            con,
            "SELECT DISTINCT source_file FROM raw_sessions UNION "
            "SELECT DISTINCT source_file FROM raw_reschedules UNION "
            "SELECT DISTINCT source_file FROM raw_tutors UNION "
            "SELECT DISTINCT source_file FROM rejected_rows",
        )
        quarantined = query_frame(con, "SELECT file_name FROM quarantined_files")
    assert set(loaded) | set(quarantined.to_series()) <= set(names[:7])
    assert set(raw_files.to_series()) <= set(loaded)

    monkeypatch.setattr(ingest, "load_sql", real)
    rerun = run_pass(root, monkeypatch, batched=True)
    clean = run_pass(clean_root, monkeypatch, batched=True)
    assert [f.file_name for f in rerun.files] == names[7:]
    # The failed batch used up its load ids (as a failed one-file load does its one): the
    # rerun's are higher, in the same order.
    finished, expected = outcome(root, rerun), outcome(clean_root, clean)
    assert _renumbered(finished["folders"]) == _renumbered(expected["folders"])
    for table, frame in expected["tables"].items():
        assert _ranked(frame).equals(_ranked(finished["tables"][table])), table


def _ranked(frame: pl.DataFrame) -> pl.DataFrame:
    """A table with its load ids replaced by their order."""
    if "load_id" not in frame.columns:
        return frame
    return frame.with_columns(pl.col("load_id").rank("dense"))


def _renumbered(folders: dict[str, Any]) -> dict[str, Any]:
    """Sidecars without the load ids they name."""
    return {
        k: re.sub(r"load \d+", "load N", v) if isinstance(v, str) else v for k, v in folders.items()
    }


def test_a_file_that_breaks_typing_in_a_batch_is_quarantined_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    header = "session_id,tutor_id,scheduled_time,status\n"
    for i in range(6):
        tutor = "BOOM" if i == 3 else f"T{i}"
        (landing / f"sessions_{i}.csv").write_text(
            header + f"S{i},{tutor},2024-03-01T10:00:00Z,completed\n"
        )
        os.utime(landing / f"sessions_{i}.csv", (1e9 + i, 1e9 + i))
    real = ingest.coerce_column

    def breaks_on_boom(values: pl.Series, dtype: pl.DataType) -> pl.Series:
        if values.dtype == pl.String and (values == "BOOM").any():
            raise pl.exceptions.ComputeError("a Polars error met by odd input")
        return real(values, dtype)

    monkeypatch.setattr(ingest, "coerce_column", breaks_on_boom)
    report = run_pass(tmp_path, monkeypatch, batched=True)
    outcomes = {f.file_name: f.outcome for f in report.files}
    assert outcomes.pop("sessions_3.csv") == "quarantined"
    assert set(outcomes.values()) == {"loaded"}
    assert [f.load_id for f in report.files if f.load_id] == [1, 2, 3, 4, 5]


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tutor_scoring_dagster import ingest, warehouse

root, point = Path(sys.argv[1]), sys.argv[2]
ingest.BATCH_MIN_FILES, ingest.BATCH_MAX_FILES, ingest.BATCH_MAX_ROWS = 2, 7, 400
hits = 0

def die_on_second(*args, **kwargs):  # no rollback, no cleanup: a power cut
    global hits
    hits += 1
    if hits == 2:
        os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-transaction":  # the second batch's rows inserted, nothing committed
    real = ingest.load_sql
    def load_sql(name):
        if name == "loaded_files_batch_insert":
            die_on_second()
        return real(name)
    ingest.load_sql = load_sql
else:  # the second batch committed, none of its files moved yet
    real_ingest_batch, real_move = ingest._ingest_batch, ingest.move_file
    batches = 0
    def ingest_batch(*args, **kwargs):
        global batches
        batches += 1
        return real_ingest_batch(*args, **kwargs)
    def move_file(*args, **kwargs):
        if batches == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_move(*args, **kwargs)
    ingest._ingest_batch, ingest.move_file = ingest_batch, move_file
with warehouse.connect(root / "wh.duckdb") as con:
    warehouse.ensure_schema(con)
    ingest.ingest_landing(
        con, root / "landing", archive_dir=root / "landing" / "archive",
        quarantine_dir=root / "landing" / "quarantine",
    )
"""


@pytest.mark.parametrize("point", ["mid-transaction", "after-commit-before-moves"])
def test_a_pass_killed_in_a_batch_then_rerun_equals_a_pass_never_killed(
    twins: tuple[Path, Path, list[str]], monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    clean_root, root, _ = twins
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(root), point],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    rerun = run_pass(root, monkeypatch, batched=True)
    if point == "after-commit-before-moves":
        # Loaded before the kill: seen as loaded by the rerun, archived, not loaded again.
        seen = {f.file_name for f in rerun.files if f.outcome == "duplicate"}
        assert seen - {"sessions_copy_a.parquet", "sessions_copy_b.parquet"}
    clean = run_pass(clean_root, monkeypatch, batched=True)
    finished, expected = outcome(root, rerun), outcome(clean_root, clean)
    assert _renumbered(finished["folders"]) == _renumbered(expected["folders"])
    for table, frame in expected["tables"].items():
        assert _ranked(frame).equals(_ranked(finished["tables"][table])), table


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "batched"])
def test_the_next_files_are_prepared_on_another_thread_one_step_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """Reading and validating (Polars, Pandera) run on a thread of their own while the files
    before are loaded (DuckDB), and never more than one file (or batch) ahead: what waits
    to be loaded is in memory."""
    names = build_landing(tmp_path / "landing")
    prepared: list[tuple[str, str]] = []  # (file, thread) in the order they were prepared
    loaded: list[tuple[str, int]] = []  # (file, files prepared by then)
    real_read, real_ingest = ingest._read_file, ingest.ingest_file

    def reading(path: Path) -> Any:
        prepared.append((path.name, threading.current_thread().name))
        return real_read(path)

    def loading(con: Any, path: Path, **kwargs: Any) -> Any:
        loaded.append((path.name, len(prepared)))
        return real_ingest(con, path, **kwargs)

    monkeypatch.setattr(ingest, "_read_file", reading)
    monkeypatch.setattr(ingest, "ingest_file", loading)
    report = run_pass(tmp_path, monkeypatch, batched=batched, max_files=4)
    assert [f.file_name for f in report.files] == names
    assert [name for name, _ in prepared] == names
    assert {thread for _, thread in prepared} == {"prepare_0"}
    ahead = 4 if batched else 1  # the next batch's files at most (they stop at 400 rows)
    for i, (name, seen) in enumerate(loaded):
        assert name == names[i]
        assert i + 1 <= seen <= i + 1 + ahead + (ahead - 1) * batched, (name, seen)
