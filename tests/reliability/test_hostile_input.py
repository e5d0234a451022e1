"""Hostile input: fuzzed CSV and Parquet drops, decompression bombs, absurd headers, odd file
names, paths and symbolic links that point elsewhere, HTML and spreadsheet formulas in data.

Ingest never crashes on a file: every file ends archived (loaded, maybe with rejected rows) or
quarantined with a one-line reason, its rows reconcile, and whatever the project writes for
people (rejected-rows CSVs, emails, the static site) stays inert."""

from __future__ import annotations

import csv
import email as email_lib
import email.policy
import gzip
import io
import json
import os
import string
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.ingest import (
    REASON_SUFFIX,
    REJECTED_SUFFIX,
    FileResult,
    ingest_file,
    ingest_landing,
)
from tutor_scoring_dagster.schemas import drop_columns
from tutor_scoring_dagster.site import build_site
from tutor_scoring_dagster.store.publish import create_store_engine

from ._support import T, build_drops, newly_risky_drops, run_script

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository
    derandomize=True,  # the same examples on every run: CI stays repeatable
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ENTITIES = ("sessions", "reschedules", "tutors")
GOOD_ROWS = "session_id,tutor_id,scheduled_time,status\nS1,T1,2024-01-01T10:00:00Z,completed\n"


# --- the harness ---------------------------------------------------------------------------


class Warehouse:
    """An in-memory warehouse and a fresh landing folder per file."""

    def __init__(self, root: Path) -> None:
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        warehouse.ensure_schema(self.con)
        self.root = root
        self.n = 0

    def ingest(self, name: str, data: bytes) -> FileResult:
        """Drop ``data`` as ``name``, ingest it, and check everything a file must end as."""
        self.n += 1
        base = self.root / str(self.n)
        landing, archive, quarantine = base / "landing", base / "archive", base / "quarantine"
        landing.mkdir(parents=True)
        path = landing / name
        path.write_bytes(data)
        result = ingest_file(self.con, path, archive_dir=archive, quarantine_dir=quarantine)
        check_outcome(self.con, path, data, result)
        return result


def check_outcome(con: duckdb.DuckDBPyConnection, path: Path, data: bytes, r: FileResult) -> None:
    assert r.outcome in ("loaded", "quarantined", "duplicate"), r
    assert not path.exists() and not path.is_symlink(), "the file stayed in the landing folder"
    assert r.moved_to is not None and r.moved_to.read_bytes() == data, "the file was altered"
    if r.outcome == "quarantined":
        assert r.reason and r.reason.strip()
        sidecar = r.moved_to.with_name(r.moved_to.name + REASON_SUFFIX)
        assert f"reason: {r.reason}" in sidecar.read_text(encoding="utf-8")
        assert "\n" not in r.reason and "\r" not in r.reason, (
            f"reason on several lines: {r.reason!r}"
        )
        return
    if r.outcome == "duplicate":
        return
    # Loaded: every row read is loaded or rejected, the ledger of loads agrees, and the
    # rejected rows are beside the archived file in a CSV a spreadsheet cannot run.
    assert r.rows_read == r.rows_loaded + r.rows_rejected, r
    row = con.execute(
        "SELECT rows_read, rows_loaded, rows_rejected FROM loaded_files WHERE file_hash = ?",
        [r.file_hash],
    ).fetchone()
    assert row == (r.rows_read, r.rows_loaded, r.rows_rejected)
    rejected = r.moved_to.with_name(r.moved_to.name + REJECTED_SUFFIX)
    if r.rows_rejected:
        lines = assert_inert_csv(rejected)
        assert len({line[0] for line in lines}) == r.rows_rejected
    else:
        assert not rejected.exists()


def assert_inert_csv(path: Path) -> list[list[str]]:
    """Every cell of a CSV the project wrote is safe to open in a spreadsheet."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_STARTS), f"formula cell {cell!r} in {path.name}"
    return rows[1:]


@pytest.fixture(scope="module")
def wh(tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    return Warehouse(tmp_path_factory.mktemp("hostile"))


# --- fuzzing -------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    '"',
    '""',
    "'",
    ",",
    "\n",
    "\r\n",
    "\ufeff",
    "\u202e",
    "é",
    "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "=1+1",
    "+1",
    "-1",
    "@SUM(A1)",
    '=HYPERLINK("http://x","y")',
    "\t=cmd",
    "<script>alert(1)</script>",
    "NaN",
    "inf",
    "-0",
    "1e400",
    "9" * 40,
    "0000-00-00",
    "9999-12-31T23:59:59Z",
    "2024-02-30T10:00:00Z",
    "2024-03-01 10:00:00+05:30",
    "2024-03-01T10:00:00.1234567Z",
    "true",
    "T",
    "completed",
    "no_show",
    "rescheduled",
    "tutor",
    "student",
]


def cells() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(max_size=30),
        st.text(alphabet=string.digits + "-:TZ. +", max_size=30),
        st.builds(lambda c, n: c * n, st.sampled_from('ax,"\n'), st.integers(1_000, 200_000)),
    )


def column_names(entity: str) -> st.SearchStrategy[list[str]]:
    contract = list(drop_columns(entity))
    return st.lists(
        st.one_of(st.sampled_from(contract), st.sampled_from(NASTY), st.text(max_size=12)),
        min_size=0,
        max_size=12,
    ).map(lambda extra: contract[:4] + extra)  # usually the required ones, sometimes twice


def _field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\r\n') else value


@st.composite
def csv_drops(draw: st.DrawFn) -> tuple[str, bytes]:
    entity = draw(st.sampled_from(ENTITIES))
    header = draw(st.one_of(column_names(entity), st.lists(st.text(max_size=8), max_size=5)))
    width = max(1, len(header))
    rows = draw(
        st.lists(
            st.lists(cells(), min_size=0, max_size=width + 2),  # ragged rows too
            max_size=8,
        )
    )
    text = "\r\n".join(",".join(_field(c) for c in r) for r in [header, *rows])
    if draw(st.booleans()):
        text = text.replace('"', "", draw(st.integers(0, 2)))  # break the quoting
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "mixed"]))
    if encoding == "mixed":
        half = len(text) // 2
        data = text[:half].encode("utf-8", "replace") + text[half:].encode("cp1252", "replace")
    else:
        data = text.encode(encoding, "replace")
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # cut short
    if draw(st.integers(0, 4)) == 0:
        return f"{entity}_fuzz.csv.gz", gzip.compress(data)
    return f"{entity}_fuzz.csv", data


def _parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


BREAKERS = {
    # Each of these once escaped ingest as an exception, or wrote a reason on several lines.
    # A Parquet column whose type Polars cannot cast to the contract's: InvalidOperationError.
    "date-as-boolean": (
        "tutors_x.parquet",
        _parquet(pl.DataFrame({"tutor_id": ["T1"], "is_active": [datetime(2024, 1, 1).date()]})),
    ),
    # Epoch seconds where a timestamp belongs: a 1-row null literal meets an n-row frame.
    "epoch-as-timestamp": (
        "sessions_x.parquet",
        _parquet(
            pl.DataFrame(
                {
                    "session_id": ["S1", "S2"],
                    "tutor_id": ["T1", "T1"],
                    "scheduled_time": [1709287200, 1709290800],
                    "status": ["completed", "completed"],
                }
            )
        ),
    ),
    # Two header names equal once trimmed: the rename raises DuplicateError.
    "same-name-after-trim": (
        "sessions_x.csv",
        b"session_id,tutor_id,scheduled_time,status, status\nS1,T1,2024-01-01T00:00:00Z,x,y\n",
    ),
    # A quoted header name with a line break ends up, raw, in a multi-line reason (and can
    # forge lines of the .reason.txt sidecar).
    "line-break-in-a-name": (
        "sessions_x.csv",
        b'session_id,"tutor\nquarantined_at: never",status\nS1,T1,completed\n',
    ),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_files_that_once_broke_ingest_are_quarantined(wh: Warehouse, case: str) -> None:
    assert wh.ingest(*BREAKERS[case]).outcome == "quarantined"


def test_one_file_that_breaks_typing_does_not_hold_back_the_others(home: Settings) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    name, data = BREAKERS["epoch-as-timestamp"]
    (landing / name).write_bytes(data)
    (landing / "sessions_good.csv").write_text(GOOD_ROWS)
    os.utime(landing / "sessions_good.csv", (2e9, 2e9))  # the newer of the two
    with warehouse.connect(home.warehouse) as con:
        warehouse.ensure_schema(con)
        report = ingest_landing(
            con, landing, archive_dir=home.archive_dir, quarantine_dir=home.quarantine_dir
        )
    assert sorted(f.outcome for f in report.files) == ["loaded", "quarantined"]


@FUZZ
@given(drop=csv_drops())
@example(drop=BREAKERS["same-name-after-trim"])
@example(drop=BREAKERS["line-break-in-a-name"])
def test_fuzzed_csv_drops_end_archived_or_quarantined(
    wh: Warehouse, drop: tuple[str, bytes]
) -> None:
    wh.ingest(*drop)


@FUZZ
@given(
    name=st.sampled_from(
        [f"{e}_x{ext}" for e in ENTITIES for ext in (".csv", ".csv.gz", ".parquet")]
    ),
    prefix=st.sampled_from(
        [b"", b"PAR1", b"\x1f\x8b", b"PK\x03\x04", b"\xff\xfe", b"\xef\xbb\xbf"]
    ),
    data=st.binary(max_size=4096),
    suffix=st.sampled_from([b"", b"PAR1"]),
)
def test_random_bytes_end_quarantined(
    wh: Warehouse, name: str, prefix: bytes, data: bytes, suffix: bytes
) -> None:
    wh.ingest(name, prefix + data + suffix)


PARQUET_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "str": cells().map(lambda s: s[:200]),
    "int": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "bool": st.booleans(),
    "datetime": st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.none()
    ),
    "date": st.dates(),
    "list": st.lists(st.integers(0, 10), max_size=3),
    "bytes": st.binary(max_size=20),
}


@st.composite
def parquet_drops(draw: st.DrawFn) -> tuple[str, bytes]:
    entity = draw(st.sampled_from(ENTITIES))
    names = draw(column_names(entity))
    n = draw(st.integers(0, 6))
    columns: dict[str, pl.Series] = {}
    for name in dict.fromkeys(names):  # Parquet column names are unique
        kind = draw(st.sampled_from(sorted(PARQUET_VALUES)))
        values = draw(st.lists(st.one_of(st.none(), PARQUET_VALUES[kind]), min_size=n, max_size=n))
        try:
            columns[name] = pl.Series(name, values, strict=False)
        except (OverflowError, TypeError, ValueError, pl.exceptions.PolarsError):
            columns[name] = pl.Series(name, [None] * n, dtype=pl.String)
    buffer = io.BytesIO()
    pl.DataFrame(list(columns.values())).write_parquet(buffer)
    return f"{entity}_fuzz.parquet", buffer.getvalue()


@FUZZ
@given(drop=parquet_drops())
@example(drop=BREAKERS["date-as-boolean"])
@example(drop=BREAKERS["epoch-as-timestamp"])
def test_fuzzed_parquet_drops_end_archived_or_quarantined(
    wh: Warehouse, drop: tuple[str, bytes]
) -> None:
    wh.ingest(*drop)


def test_formula_cells_are_neutralized_in_rejected_rows_csv(wh: Warehouse) -> None:
    payloads = ["=1+2", "+3", "-4", "@SUM(A1)", "\t=5", "\r=6", '=HYPERLINK("http://evil")']
    lines = ["session_id,tutor_id,scheduled_time,status,duration_minutes"]
    for i, p in enumerate(payloads):
        q = _field(p)
        lines.append(f"{q},{q},{q},{q},{q}")  # every cell bad or hostile
        lines.append(f"ok{i},T{i},2024-01-01T00:00:00Z,{q},60")
    lines.append("fine,T1,2024-01-01T00:00:00Z,completed,60")
    r = wh.ingest("sessions_formulas.csv", "\n".join(lines).encode())
    assert r.outcome == "loaded" and r.rows_rejected == 2 * len(payloads), r
    assert r.moved_to is not None
    rows = assert_inert_csv(r.moved_to.with_name(r.moved_to.name + REJECTED_SUFFIX))
    # The payloads are kept (to fix and re-drop), only made inert.
    text = json.dumps(rows)
    assert "=HYPERLINK" in text and "@SUM(A1)" in text


# --- bombs and absurd headers (own process, bounded memory) -------------------------------

HARNESS = """
import json, resource, sys, time
from pathlib import Path
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from tutor_scoring_dagster import ingest, warehouse
base, path = Path(sys.argv[1]), Path(sys.argv[2])
started = time.monotonic()
with warehouse.connect(base / "w.duckdb") as con:
    warehouse.ensure_schema(con)
    r = ingest.ingest_file(
        con, path, archive_dir=base / "archive", quarantine_dir=base / "quarantine"
    )
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking pytest worker (its whole
# resident set), while VmHWM is this process image's own high-water mark.
status = Path("/proc/self/status").read_text()
hwm_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
print(json.dumps({"outcome": r.outcome, "reason": r.reason, "rows": r.rows_loaded,
                  "seconds": time.monotonic() - started, "peak_mb": hwm_kb // 1024}))
"""
ADDRESS_SPACE = 3 * 1024**3
"""The ingest process gets 3 GB of address space (a modest worker); importing Polars, DuckDB
and Pandera takes about 0.8 GB of it."""
PEAK_RSS_MB = 700


def ingest_bounded(tmp_path: Path, name: str, data: bytes) -> dict[str, Any]:
    landing = tmp_path / "landing"
    landing.mkdir(exist_ok=True)
    path = landing / name
    path.write_bytes(data)
    done = run_script(
        HARNESS.replace("sys.argv[1]", repr(str(tmp_path)))
        .replace("sys.argv[2]", repr(str(path)))
        .replace("sys.argv[3]", str(ADDRESS_SPACE)),
        env={**os.environ, "TUTOR_SCORING_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    assert done.returncode == 0, f"ingest died on {name}: {done.stderr[-1500:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_normal_drop_loads_within_the_memory_bound(tmp_path: Path) -> None:
    rows = "".join(f"s{i},T{i % 50},2024-01-01T10:00:00Z,completed\n" for i in range(200_000))
    data = gzip.compress(("session_id,tutor_id,scheduled_time,status\n" + rows).encode())
    out = ingest_bounded(tmp_path, "sessions_normal.csv.gz", data)
    assert out["outcome"] == "loaded" and out["rows"] == 200_000, out


def _gzip_bomb() -> bytes:
    """A 1 MB .csv.gz that inflates to 1 GiB (64 gzip members of 16 MiB of zeros)."""
    header = gzip.compress(b"session_id,tutor_id,scheduled_time,status\n")
    return header + gzip.compress(b"\0" * (1 << 24), 9) * 64


def test_a_gzip_bomb_is_quarantined_without_exhausting_memory(tmp_path: Path) -> None:
    out = ingest_bounded(tmp_path, "sessions_bomb.csv.gz", _gzip_bomb())
    assert out["outcome"] == "quarantined" and out["peak_mb"] < PEAK_RSS_MB, out


def test_a_million_column_header_is_quarantined(tmp_path: Path) -> None:
    n = 1_000_000
    header = "session_id,tutor_id,scheduled_time,status," + ",".join(f"c{i}" for i in range(n))
    row = "s1,T1,2024-01-01T00:00:00Z,completed," + ",".join("x" * n)
    out = ingest_bounded(tmp_path, "sessions_wide.csv", f"{header}\n{row}\n".encode())
    assert out["outcome"] == "quarantined" and out["peak_mb"] < PEAK_RSS_MB, out


# --- names, paths and links ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "sessions with spaces.csv",
        "sessions \"quoted\" 'single'.csv",
        "sessions_ünïcödé_☃_日本.csv",
        "sessions..csv",
        "sessions_..%2F..%2Fetc.csv",
        "sessions_<img src=x onerror=alert(1)>.csv",
        "sessions_$(touch pwned);`id`.csv",
        "sessions\u202etxt.csv",
    ],
)
def test_odd_file_names_are_loaded_and_archived_under_their_own_name(
    wh: Warehouse, name: str
) -> None:
    r = wh.ingest(name, GOOD_ROWS.replace("S1", f"S-{name.encode().hex()[:24]}").encode())
    assert r.outcome == "loaded" and r.moved_to is not None and r.moved_to.name == name
    assert r.moved_to.parent.name == "archive"
    assert not (Path.cwd() / "pwned").exists()


def test_paths_outside_the_landing_folder_are_refused_and_untouched(home: Settings) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    (landing / "sub").mkdir()
    outside = home.home / "sessions_outside.csv"
    outside.write_text(GOOD_ROWS)
    inner = landing / "sub" / "sessions_inner.csv"
    inner.write_text(GOOD_ROWS)
    requested = [
        Path("../sessions_outside.csv"),
        outside,
        landing / "sub" / ".." / ".." / "sessions_outside.csv",
        inner,
        landing / "archive" / "sessions_x.csv",
        Path("/etc/passwd"),
    ]
    with warehouse.connect(home.warehouse) as con:
        warehouse.ensure_schema(con)
        report = ingest_landing(
            con,
            landing,
            archive_dir=home.archive_dir,
            quarantine_dir=home.quarantine_dir,
            paths=requested,
        )
        loaded = con.execute("SELECT count(*) FROM loaded_files").fetchone()
    assert [f.outcome for f in report.files] == ["skipped"] * len(requested)
    assert all(f.reason for f in report.files)
    assert outside.read_text() == GOOD_ROWS and inner.read_text() == GOOD_ROWS
    assert loaded == (0,)


def test_symlinks_out_of_the_landing_folder_are_quarantined_never_read(home: Settings) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    secret = home.home / "secret.csv"
    secret.write_text(GOOD_ROWS)
    before = secret.stat()
    (landing / "sessions_link.csv").symlink_to(secret)
    (landing / "sessions_dir_link.csv").symlink_to(home.home)
    (landing / "sessions_dangling.csv").symlink_to(home.home / "nothing-here")
    with warehouse.connect(home.warehouse) as con:
        warehouse.ensure_schema(con)
        report = ingest_landing(
            con, landing, archive_dir=home.archive_dir, quarantine_dir=home.quarantine_dir
        )
        loaded = con.execute("SELECT count(*) FROM loaded_files").fetchone()
    assert sorted(f.outcome for f in report.files) == ["quarantined"] * 3
    assert all("symbolic link" in (f.reason or "") for f in report.files)
    assert loaded == (0,)
    after = secret.stat()
    assert secret.read_text() == GOOD_ROWS and after.st_mtime_ns == before.st_mtime_ns
    for f in report.files:  # moved as links, targets untouched
        assert f.moved_to is not None and f.moved_to.is_symlink()


def test_a_link_planted_where_a_sidecar_goes_is_not_followed(home: Settings) -> None:
    landing = home.landing_dir
    landing.mkdir(parents=True)
    victim = home.home / "victim.txt"
    victim.write_text("precious\n")
    home.quarantine_dir.mkdir(parents=True)
    (home.quarantine_dir / ("sessions_bad.csv" + REASON_SUFFIX)).symlink_to(victim)
    (landing / "sessions_bad.csv").write_text("no,header\n")
    with warehouse.connect(home.warehouse) as con:
        warehouse.ensure_schema(con)
        report = ingest_landing(
            con, landing, archive_dir=home.archive_dir, quarantine_dir=home.quarantine_dir
        )
    assert [f.outcome for f in report.files] == ["quarantined"]
    assert victim.read_text() == "precious\n"


# --- HTML in names, reasons and data: emails and the static site --------------------------

XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "</script><script>alert(2)</script>"


def _raw_payloads(text: str) -> list[str]:
    # Escaped text still holds "onerror=alert": only a raw tag is a hole.
    return [p for p in (XSS, SCRIPT, "<img", "<script>alert") if p in text]


def test_html_in_names_reasons_and_data_is_escaped_in_emails_and_site(
    home: Settings, tmp_path: Path
) -> None:
    landing = home.landing_dir
    build_drops(landing)
    newly_risky_drops(landing, tutors=(f"Z{XSS}",))
    (landing / "tutors_hostile.csv").write_text(
        f'tutor_id,name,email\nZ1,"{SCRIPT}","{XSS}@example.com"\nZ{XSS},"{XSS}",x@example.com\n',
        encoding="utf-8",
    )
    (landing / f"sessions_{XSS}.csv").write_text(f"{SCRIPT},{XSS}\n1,2\n", encoding="utf-8")
    summary = run_pipeline(as_of=T, history_days=3)
    assert summary.success, summary.render()
    messages = [
        email_lib.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in sorted(home.outbox_dir.glob("*.eml"))
    ]
    assert len(messages) >= 2  # the digest and alerts
    seen_escaped = False
    for msg in messages:
        html = msg.get_body(preferencelist=("html",))
        assert html is not None
        body = html.get_content()
        assert not _raw_payloads(body), (msg["Subject"], _raw_payloads(body))
        seen_escaped |= "&lt;img src=x onerror=alert(1)&gt;" in body
    assert seen_escaped, "the hostile names should be shown, escaped"

    engine = create_store_engine(home.database_url)
    try:
        build_site(engine, tmp_path / "site")
    finally:
        engine.dispose()
    pages = list((tmp_path / "site").rglob("*.html")) + list((tmp_path / "site").rglob("*.js"))
    assert len(pages) > 3
    for page in pages:
        assert page.resolve().is_relative_to((tmp_path / "site").resolve())
        text = page.read_text(encoding="utf-8")
        if page.suffix == ".html":
            assert not _raw_payloads(text), (page.name, _raw_payloads(text))
    assert any("&lt;b&gt;car&lt;/b&gt;" in p.read_text() for p in pages if p.suffix == ".html")
