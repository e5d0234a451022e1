"""Ingest of landing drops (DESIGN.md, "Landing drops"), on real DuckDB files.

Row-level validation, file-level failures (quarantine with a reason, the rest still loads),
atomic per-file loads (an injected failure and a SIGKILL between inserts), crash after commit,
dedup by content, late updates in the current views, and the paths ingest refuses to touch.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from tutor_scoring_dagster import ingest, warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.ingest import IngestReport
from tutor_scoring_dagster.warehouse import fetch_one, query_frame

REPO = Path(__file__).resolve().parents[1]

SESSION_COLUMNS = (
    "session_id",
    "tutor_id",
    "student_id",
    "scheduled_time",
    "completed_time",
    "status",
    "duration_minutes",
    "created_at",
    "updated_at",
)
GOOD_SESSION = {
    "session_id": "S1",
    "tutor_id": "T1",
    "student_id": "U1",
    "scheduled_time": "2024-03-01T10:00:00Z",
    "completed_time": "2024-03-01T11:00:00Z",
    "status": "completed",
    "duration_minutes": "60",
    "created_at": "2024-02-20T08:00:00Z",
    "updated_at": "2024-03-01T11:05:00Z",
}
RESCHEDULE_COLUMNS = (
    "session_id",
    "initiator",
    "original_time",
    "new_time",
    "reason",
    "reason_code",
    "cancelled_at",
    "hours_before_session",
    "created_at",
)
GOOD_RESCHEDULE = {
    "session_id": "S1",
    "initiator": "tutor",
    "original_time": "2024-03-01T10:00:00Z",
    "new_time": "2024-03-02T10:00:00Z",
    "reason": 'Conflicting appointment, sorry "again"',
    "reason_code": "schedule_conflict",
    "cancelled_at": "2024-02-29T10:00:00Z",
    "hours_before_session": "",
    "created_at": "2024-02-29T10:00:00Z",
}
TUTOR_COLUMNS = ("tutor_id", "name", "email", "is_active", "updated_at")
GOOD_TUTOR = {
    "tutor_id": "T1",
    "name": "Ada",
    "email": "ada@example.com",
    "is_active": "true",
    "updated_at": "2024-01-01T00:00:00Z",
}


def csv_text(columns: tuple[str, ...], rows: list[dict[str, str]]) -> str:
    """A CSV export with ``columns`` (RFC 4180 quoting, LF line ends)."""
    out = io.StringIO()
    frame = pl.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], schema=columns)
    frame.write_csv(out)
    return out.getvalue()


def session(**changes: str) -> dict[str, str]:
    return {**GOOD_SESSION, **changes}


def sessions_csv(*rows: dict[str, str]) -> str:
    return csv_text(SESSION_COLUMNS, list(rows))


@dataclass
class Lake:
    """A landing folder and its warehouse, all under the test's TUTOR_SCORING_HOME.

    One connection serves the whole test (opened on first use), as one ingest run would.
    """

    landing: Path
    archive: Path
    quarantine: Path
    warehouse: Path
    _con: duckdb.DuckDBPyConnection | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = duckdb.connect(str(self.warehouse))
            self._con.execute("SET TimeZone = 'UTC'")
            warehouse.ensure_schema(self._con)
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def drop(self, name: str, content: str | bytes) -> Path:
        path = self.landing / name
        self.landing.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    def ingest(self, paths: list[Path] | None = None) -> IngestReport:
        return ingest.ingest_landing(
            self.con,
            self.landing,
            archive_dir=self.archive,
            quarantine_dir=self.quarantine,
            paths=paths,
        )

    def query(self, sql: str) -> pl.DataFrame:
        return query_frame(self.con, sql)

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) AS n FROM {table}").item())

    def landing_files(self) -> list[str]:
        return sorted(p.name for p in self.landing.iterdir() if not p.is_dir())


@pytest.fixture
def lake(home: Settings) -> Iterator[Lake]:
    home.landing_dir.mkdir(parents=True)
    lake = Lake(home.landing_dir, home.archive_dir, home.quarantine_dir, home.warehouse)
    yield lake
    lake.close()


def only(report: IngestReport) -> ingest.FileResult:
    assert len(report.files) == 1, report.files
    return report.files[0]


# Row-level validation


SESSION_DEFECTS = [
    ("session_id", {"session_id": ""}, "required value is missing"),
    ("tutor_id", {"tutor_id": "   "}, "required value is missing"),
    ("scheduled_time", {"scheduled_time": ""}, "required value is missing"),
    ("status", {"status": ""}, "required value is missing"),
    ("status", {"status": "cancelled"}, "value 'cancelled' not allowed; expected one of"),
    ("scheduled_time", {"scheduled_time": "31/12/2023 10:00"}, "not a valid timestamp"),
    ("scheduled_time", {"scheduled_time": "2024-02-30T10:00:00Z"}, "not a valid timestamp"),
    ("scheduled_time", {"scheduled_time": "0001-01-01T00:00:00Z"}, "years 1900-2199"),
    ("completed_time", {"completed_time": "yesterday"}, "not a valid timestamp"),
    ("duration_minutes", {"duration_minutes": "-5"}, "must be >= 0 (got -5)"),
    ("duration_minutes", {"duration_minutes": "60.5"}, "not a valid whole number: 60.5"),
    ("duration_minutes", {"duration_minutes": "an hour"}, "not a valid whole number"),
    (
        "completed_time",
        {"completed_time": "2024-03-01T09:59:59Z"},
        "completed_time not before scheduled_time",
    ),
]


@pytest.mark.parametrize(("column", "change", "reason"), SESSION_DEFECTS)
def test_a_bad_session_row_is_rejected_with_its_reason_and_the_rest_loads(
    lake: Lake, column: str, change: dict[str, str], reason: str
) -> None:
    lake.drop("sessions_1.csv", sessions_csv(session(), session(**{"session_id": "S2", **change})))
    result = only(lake.ingest())
    assert (result.outcome, result.rows_read, result.rows_loaded, result.rows_rejected) == (
        "loaded",
        2,
        1,
        1,
    )
    rejected = lake.query("SELECT line_number, column_name, reason, raw_record FROM rejected_rows")
    assert rejected.height == 1
    row = rejected.row(0, named=True)
    assert row["line_number"] == 3
    assert row["column_name"] == column
    assert reason in row["reason"]
    assert '"session_id":' in row["raw_record"]
    assert lake.query("SELECT session_id FROM raw_sessions").to_series().to_list() == ["S1"]
    # The rejected rows are also beside the archived file, for people.
    side = lake.archive / ("sessions_1.csv" + ingest.REJECTED_SUFFIX)
    assert reason.split(":")[0] in side.read_text(encoding="utf-8")


def test_a_row_with_several_failures_counts_once_and_lists_each(lake: Lake) -> None:
    bad = session(session_id="S2", status="maybe", duration_minutes="-1", tutor_id="")
    result = only(lake.ingest([lake.drop("sessions_1.csv", sessions_csv(session(), bad))]))
    assert (result.rows_loaded, result.rows_rejected) == (1, 1)
    columns = lake.query("SELECT column_name FROM rejected_rows ORDER BY 1").to_series()
    assert columns.to_list() == ["duration_minutes", "status", "tutor_id"]


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("initiator", "system", "value 'system' not allowed; expected one of tutor,student"),
        ("initiator", "", "required value is missing"),
        ("cancelled_at", "", "required value is missing"),
        ("cancelled_at", "not a date", "not a valid timestamp"),
        ("hours_before_session", "soon", "not a valid number"),
    ],
)
def test_a_bad_reschedule_row_is_rejected(lake: Lake, column: str, value: str, reason: str) -> None:
    rows = [GOOD_RESCHEDULE, {**GOOD_RESCHEDULE, "session_id": "S2", column: value}]
    lake.drop("reschedules_1.csv", csv_text(RESCHEDULE_COLUMNS, rows))
    result = only(lake.ingest())
    assert (result.rows_loaded, result.rows_rejected) == (1, 1)
    row = lake.query("SELECT column_name, reason FROM rejected_rows").row(0)
    assert row[0] == column and reason in row[1]


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("tutor_id", "", "required value is missing"),
        ("is_active", "yes", "not a valid boolean (true/false, 1/0, t/f): yes"),
        ("updated_at", "last week", "not a valid timestamp"),
    ],
)
def test_a_bad_tutor_row_is_rejected(lake: Lake, column: str, value: str, reason: str) -> None:
    rows = [GOOD_TUTOR, {**GOOD_TUTOR, "tutor_id": "T2", column: value}]
    lake.drop("tutors_1.csv", csv_text(TUTOR_COLUMNS, rows))
    result = only(lake.ingest())
    assert (result.rows_loaded, result.rows_rejected) == (1, 1)
    row = lake.query("SELECT column_name, reason FROM rejected_rows").row(0)
    assert row[0] == column and reason in row[1]


TIMESTAMP_SPELLINGS: list[tuple[str, datetime]] = [
    ("2024-03-01T10:00:00Z", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ("2024-03-01T10:00:00+00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ("2024-03-01T10:00:00+05:30", datetime(2024, 3, 1, 4, 30, tzinfo=UTC)),
    ("2024-03-01T10:00:00-04:00", datetime(2024, 3, 1, 14, tzinfo=UTC)),
    ("2024-03-01T10:00:00+0530", datetime(2024, 3, 1, 4, 30, tzinfo=UTC)),
    ("2024-03-01 10:00:00+05:30", datetime(2024, 3, 1, 4, 30, tzinfo=UTC)),
    ("2024-03-01T10:00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),  # naive is UTC
    ("2024-03-01 10:00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ("2024-03-01 10:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ("2024-03-01T10:00:00.123456Z", datetime(2024, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)),
    ("2024-03-01T10:00:00.5", datetime(2024, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2024-03-01T10:00:00.000-04:00", datetime(2024, 3, 1, 14, tzinfo=UTC)),
    (" 2024-03-01T10:00:00Z ", datetime(2024, 3, 1, 10, tzinfo=UTC)),
]


def test_timestamp_spellings_load_as_utc(lake: Lake) -> None:
    rows = [
        session(session_id=f"S{i:02d}", scheduled_time=text, completed_time="")
        for i, (text, _) in enumerate(TIMESTAMP_SPELLINGS)
    ]
    result = only(lake.ingest([lake.drop("sessions_1.csv", sessions_csv(*rows))]))
    assert (result.rows_loaded, result.rows_rejected) == (len(rows), 0)
    loaded = lake.query("SELECT scheduled_time FROM raw_sessions ORDER BY session_id")
    assert list(zip([t for t, _ in TIMESTAMP_SPELLINGS], loaded.to_series(), strict=True)) == [
        (text, expected) for text, expected in TIMESTAMP_SPELLINGS
    ]


TIMESTAMP_BATTERY = [
    "2024-01-01T10:00:00+00:00",
    "2024-01-01T10:00:00Z",
    "2024-01-01T10:00:00",
    "2024-01-01 10:00:00",
    "2024-01-01 10:00:00Z",
    "2024-01-01T10:00:00.5Z",
    "2024-01-01T10:00:00.1234567Z",
    "2024-01-01T10:00:00+05:30",
    "2024-01-01 10:00:00.123+05:30",
    "2024-01-01T10:00:00+0000",
    "2024-01-01T10:00:00-00:00",
    "2024-01-01T10:00",
    "2024-01-01",
    "2024-02-29T10:00:00Z",
    "2023-02-29T10:00:00",
    "2024-02-30T10:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-13-01T10:00:00",
    "2024-01-01T10:00:00Z+00:00",
    "2024-01-01T10:00:00+05",
    "2024-01-01T10:00:00Z ",
    "2024-01-01T10:00:00\t",
    "2024-01-01  10:00:00",
    "T2024-01-01 10:00:00",
    "20240101T100000Z",
    "not a date",
    "",
    None,
]


def test_the_fast_timestamp_parser_agrees_with_the_general_rules() -> None:
    text = pl.Series("t", TIMESTAMP_BATTERY, dtype=pl.String)
    fast = ingest.parse_timestamp_series(text)
    general = text.to_frame().select(ingest.parse_timestamps(pl.col("t"))).to_series()
    assert fast.to_list() == general.to_list()
    assert fast.null_count() < len(TIMESTAMP_BATTERY) // 2


BOOLEAN_SPELLINGS: list[tuple[str, bool | None]] = [
    ("true", True),
    ("false", False),
    ("True", True),
    ("False", False),
    ("1", True),
    ("0", False),
    ("t", True),
    ("f", False),
    ("TRUE", True),
    ("", None),
]


def test_boolean_spellings(lake: Lake) -> None:
    rows = [
        {**GOOD_TUTOR, "tutor_id": f"T{i:02d}", "is_active": text}
        for i, (text, _) in enumerate(BOOLEAN_SPELLINGS)
    ]
    result = only(lake.ingest([lake.drop("tutors_1.csv", csv_text(TUTOR_COLUMNS, rows))]))
    assert (result.rows_loaded, result.rows_rejected) == (len(rows), 0)
    raw = lake.query("SELECT is_active FROM raw_tutors ORDER BY tutor_id").to_series()
    assert raw.to_list() == [expected for _, expected in BOOLEAN_SPELLINGS]
    # An empty flag means the default: active.
    current = lake.query("SELECT is_active FROM tutors ORDER BY tutor_id").to_series()
    assert current.to_list() == [expected is not False for _, expected in BOOLEAN_SPELLINGS]


def test_optional_columns_may_be_missing_and_extra_columns_are_kept(lake: Lake) -> None:
    text = (
        "session_id,tutor_id,scheduled_time,status,platform\n"
        "S1,T1,2024-03-01T10:00:00Z,no_show,web\n"
    )
    assert only(lake.ingest([lake.drop("sessions_1.csv", text)])).rows_loaded == 1
    row = lake.query("SELECT student_id, updated_at, extra_columns FROM raw_sessions").row(0)
    assert row == (None, None, '{"platform":"web"}')


def test_extra_columns_named_like_working_columns_are_kept_as_they_are(lake: Lake) -> None:
    """Ingest types rows with working columns of its own; an export's columns never meet them,
    whatever they are called, and a column name holding a NUL is refused."""
    text = (
        "session_id,tutor_id,scheduled_time,status,_row,_file,_line\n"
        "S1,T1,2024-03-01T10:00:00Z,no_show,r,nightly-42.csv,7\n"
        "S2,T1,2024-03-01T11:00:00Z,wrong,r2,nightly-42.csv,8\n"
    )
    result = only(lake.ingest([lake.drop("sessions_1.csv", text)]))
    assert (result.outcome, result.rows_loaded, result.rows_rejected) == ("loaded", 1, 1)
    row = lake.query("SELECT extra_columns FROM raw_sessions").item(0, 0)
    assert row == '{"_row":"r","_file":"nightly-42.csv","_line":"7"}'
    rejected = lake.query("SELECT line_number, raw_record FROM rejected_rows").row(0)
    assert rejected[0] == 3 and '"_file":"nightly-42.csv"' in rejected[1]
    odd = {"session_id": ["S3"], "tutor_id": ["T1"], "status": ["no_show"], "odd\x00name": ["x"]}
    parquet = io.BytesIO()
    pl.DataFrame({**odd, "scheduled_time": ["2024-03-01T10:00:00Z"]}).write_parquet(parquet)
    result = only(lake.ingest([lake.drop("sessions_2.parquet", parquet.getvalue())]))
    assert result.outcome == "quarantined" and "NUL" in (result.reason or "")


# File-level failures


GOOD_TEXT = sessions_csv(session(), session(session_id="S2", status="no_show", completed_time=""))


def _parquet_bytes(text: str = GOOD_TEXT) -> bytes:
    buf = io.BytesIO()
    pl.read_csv(io.StringIO(text), infer_schema=False).write_parquet(buf)
    return buf.getvalue()


def _wide_parquet(columns: int) -> bytes:
    frame = pl.read_csv(io.StringIO(GOOD_TEXT), infer_schema=False)
    frame = frame.with_columns(pl.lit("x").alias(f"extra_{i}") for i in range(columns))
    buf = io.BytesIO()
    frame.write_parquet(buf)
    return buf.getvalue()


def _xlsx_like() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
    return buf.getvalue()


FILE_DEFECTS: list[tuple[str, str, Callable[[], bytes], str]] = [
    ("empty", "sessions_b.csv", lambda: b"", "the file is empty (0 bytes)"),
    ("blank lines only", "sessions_b.csv", lambda: b"\n\n", "no header row"),
    (
        "header only",
        "sessions_b.csv",
        lambda: GOOD_TEXT.splitlines()[0].encode() + b"\n",
        "header but no rows",
    ),
    (
        "no header",
        "sessions_b.csv",
        lambda: "\n".join(GOOD_TEXT.splitlines()[1:]).encode(),
        "does the file start with a header row?",
    ),
    (
        "missing required column",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("status", "state", 1).encode(),
        "missing required column(s) status",
    ),
    (
        "semicolons",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace(",", ";").encode(),
        "is the file comma-separated?",
    ),
    (
        "tabs",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace(",", "\t").encode(),
        "is the file comma-separated?",
    ),
    (
        "latin-1 bytes",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("U1", "Jos\xe9").encode("latin-1"),
        "not valid UTF-8 text: byte 0xe9 on line 2",
    ),
    (
        "utf-16",
        "sessions_b.csv",
        lambda: GOOD_TEXT.encode("utf-16"),
        "UTF-16",
    ),
    (
        "truncated gzip",
        "sessions_b.csv.gz",
        lambda: gzip.compress(GOOD_TEXT.encode() * 50)[:-40],
        "gzip stream is truncated or corrupt",
    ),
    (
        "gzip named .csv",
        "sessions_b.csv",
        lambda: gzip.compress(GOOD_TEXT.encode()),
        "is gzip-compressed (name it .csv.gz)",
    ),
    (
        "plain text named .csv.gz",
        "sessions_b.csv.gz",
        lambda: GOOD_TEXT.encode(),
        "not gzip-compressed",
    ),
    (
        "truncated parquet",
        "sessions_b.parquet",
        lambda: _parquet_bytes()[:-20],
        "Parquet file is truncated",
    ),
    (
        "parquet named .csv",
        "sessions_b.csv",
        _parquet_bytes,
        "named .csv but holds Parquet data",
    ),
    (
        "csv named .parquet",
        "sessions_b.parquet",
        lambda: GOOD_TEXT.encode(),
        "named .parquet but holds text",
    ),
    ("excel named .csv", "sessions_b.csv", _xlsx_like, "ZIP archive"),
    (
        "unclosed quote",
        "sessions_b.csv",
        lambda: (GOOD_TEXT + 'S3,T1,U1,2024-03-01T10:00:00Z,,no_show,"60\n').encode(),
        "malformed CSV",
    ),
    (
        "too many fields",
        "sessions_b.csv",
        lambda: (GOOD_TEXT + "S3,T1,U1,2024-03-01T10:00:00Z,,no_show,60,,,extra\n").encode(),
        "more fields than the header",
    ),
    (
        "a column twice",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("student_id", "status", 1).encode(),
        "names a column more than once: status",
    ),
    (
        "a column twice once trimmed",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("student_id", " status ", 1).encode(),
        "names a column more than once (spaces around names aside): status",
    ),
    (
        "a line break in a header name",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("tutor_id", '"tutor\nid"', 1).encode(),
        "missing required column(s) tutor_id; found session_id, tutor id, student_id",
    ),
    (
        "too many columns",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace(
            "\n", "," + ",".join(f"c{i}" for i in range(1000)) + "\n", 1
        ).encode(),
        "the header has more than 1,000 columns",
    ),
    (
        "a header over 1 MiB",
        "sessions_b.csv",
        lambda: GOOD_TEXT.replace("\n", ',"' + "x" * (1 << 20) + '"\n', 1).encode(),
        "the header row is longer than 1 MiB",
    ),
    (
        "too many parquet columns",
        "sessions_b.parquet",
        lambda: _wide_parquet(1000),
        "the file has 1,009 columns; at most 1,000",
    ),
    (
        "every row invalid",
        "sessions_b.csv",
        lambda: sessions_csv(session(status="x"), session(session_id="S2", status="y")).encode(),
        "every one of 2 rows is invalid",
    ),
    ("unknown entity", "students_b.csv", lambda: GOOD_TEXT.encode(), "does not start with"),
    ("unknown extension", "sessions_b.json", lambda: b"[]", "unsupported extension"),
]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [pytest.param(n, c, r, id=i) for i, n, c, r in FILE_DEFECTS],
)
def test_a_broken_file_is_quarantined_with_its_reason_and_the_others_load(
    lake: Lake, name: str, content: Callable[[], bytes], reason: str
) -> None:
    good = lake.drop("sessions_a.csv", GOOD_TEXT.replace("S1", "SA").replace("S2", "SB"))
    bad = lake.drop(name, content())
    bad_bytes = bad.read_bytes()
    report = lake.ingest()
    outcomes = {f.file_name: (f.outcome, f.reason) for f in report.files}
    assert outcomes[good.name] == ("loaded", None)
    outcome, why = outcomes[name]
    assert outcome == "quarantined"
    assert why is not None and reason in why
    assert "\n" not in why and "\r" not in why  # one line in the sidecar, logs and reports
    # Nothing is deleted: the file sits in quarantine, byte for byte, with its reason beside it.
    assert lake.landing_files() == []
    assert (lake.quarantine / name).read_bytes() == bad_bytes
    sidecar = (lake.quarantine / (name + ingest.REASON_SUFFIX)).read_text(encoding="utf-8")
    assert reason in sidecar
    assert len(sidecar.splitlines()) == 5  # file, sha256, quarantined_at, reason, advice
    assert lake.query("SELECT file_name, reason FROM quarantined_files").rows() == [(name, why)]
    assert lake.count("raw_sessions") == 2


def test_a_gzip_inflating_past_its_bound_is_quarantined_as_a_bomb(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "INFLATE_MIN_LIMIT", 1 << 20)
    bomb = gzip.compress(GOOD_TEXT.encode() + b"\0" * (4 << 20), 9)  # ~4 kB: bound 1 MiB
    fine = gzip.compress(GOOD_TEXT.replace("S1", "SA").replace("S2", "SB").encode() * 2)
    report = lake.ingest(
        [lake.drop("sessions_bomb.csv.gz", bomb), lake.drop("sessions_ok.csv.gz", fine)]
    )
    outcomes = {f.file_name: (f.outcome, f.reason or "") for f in report.files}
    assert outcomes["sessions_ok.csv.gz"][0] == "loaded"
    outcome, why = outcomes["sessions_bomb.csv.gz"]
    assert outcome == "quarantined" and "inflates to more than 1 MiB" in why
    assert "suspected zip bomb" in why


@pytest.mark.parametrize(
    ("header", "columns"),
    [
        ('a,"b,c",d', 3),  # a quoted comma is part of a name
        ('a,"b\nc,d",e', 3),  # so is a quoted line break
        ('a,b"c,d', 3),  # a quote inside a field is a character, not a quote
        (",".join(["c"] * 1000), 1000),
    ],
)
def test_the_header_check_counts_columns_as_rfc_4180_does(header: str, columns: int) -> None:
    data = (header + "\n1,2\n").encode()
    ingest.check_csv_header(data)  # at most 1,000 columns: accepted
    with pytest.raises(ingest.FileRejected, match="more than 1,000 columns"):
        ingest.check_csv_header((header + ",x" * (1001 - columns) + "\n").encode())


def test_a_parquet_column_polars_cannot_cast_rejects_its_rows(lake: Lake) -> None:
    frame = pl.DataFrame(
        {"tutor_id": ["T1", "T2"], "is_active": [date(2024, 1, 1), None]}  # Date -> Boolean
    )
    buf = io.BytesIO()
    frame.write_parquet(buf)
    result = only(lake.ingest([lake.drop("tutors_1.parquet", buf.getvalue())]))
    assert (result.outcome, result.rows_loaded, result.rows_rejected) == ("loaded", 1, 1)
    assert lake.query("SELECT line_number, column_name, reason FROM rejected_rows").row(0) == (
        1,
        "is_active",
        "not a valid boolean (true/false, 1/0, t/f): 2024-01-01",
    )


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (pl.Series("t", [1709287200, 1709290800, None]), pl.Datetime("us", "UTC")),
        (pl.Series("t", [date(2024, 1, 1)] * 3), pl.Boolean()),
        (pl.Series("t", [timedelta(1)] * 3), pl.Datetime("us", "UTC")),
    ],
)
def test_a_column_of_a_type_that_does_not_convert_becomes_nulls_of_its_length(
    values: pl.Series, dtype: pl.DataType
) -> None:
    out = ingest.coerce_column(values, dtype)
    assert (out.len(), out.null_count(), out.dtype) == (3, 3, dtype)


@pytest.mark.parametrize(
    "error",
    [
        pl.exceptions.ComputeError("boom"),
        pl.exceptions.PanicException("boom"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "boom"),
    ],
    ids=["polars-error", "polars-panic", "decode-error"],
)
def test_an_unforeseen_read_error_quarantines_the_file_and_the_others_load(
    lake: Lake, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    real = ingest.type_and_validate

    def breaks_on_s9(frame: pl.DataFrame, entity: str, *, first_line: int) -> ingest.TypedDrop:
        if "S9" in frame.get_column("session_id").to_list():
            raise error
        return real(frame, entity, first_line=first_line)

    monkeypatch.setattr(ingest, "type_and_validate", breaks_on_s9)
    lake.drop("sessions_bad.csv", GOOD_TEXT.replace("S2", "S9"))
    os.utime(lake.landing / "sessions_bad.csv", (1e9, 1e9))  # the first of the pass
    lake.drop("sessions_good.csv", GOOD_TEXT)
    report = lake.ingest()
    outcomes = {f.file_name: (f.outcome, f.reason or "") for f in report.files}
    assert outcomes["sessions_good.csv"][0] == "loaded"
    outcome, why = outcomes["sessions_bad.csv"]
    assert outcome == "quarantined"
    assert why.startswith(f"cannot read or validate the file ({type(error).__name__}: ")
    assert lake.landing_files() == []


def test_a_fixed_file_dropped_again_under_the_same_name_loads(lake: Lake) -> None:
    lake.drop("sessions_1.csv", GOOD_TEXT.replace("status", "state", 1))
    assert only(lake.ingest()).outcome == "quarantined"
    lake.drop("sessions_1.csv", GOOD_TEXT)
    result = only(lake.ingest())
    assert (result.outcome, result.rows_loaded) == ("loaded", 2)
    assert (lake.quarantine / "sessions_1.csv").exists()  # the broken one is kept
    assert (lake.archive / "sessions_1.csv").read_text(encoding="utf-8") == GOOD_TEXT


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("sessions_crlf.csv", GOOD_TEXT.replace("\n", "\r\n").encode()),
        ("sessions_bom.csv", b"\xef\xbb\xbf" + GOOD_TEXT.encode()),
        ("sessions_gz.csv.gz", gzip.compress(GOOD_TEXT.encode())),
        (  # several gzip members (as `cat a.gz b.gz` makes), zero padding after the last
            "sessions_members.csv.gz",
            b"".join(gzip.compress(line.encode()) for line in GOOD_TEXT.splitlines(True))
            + b"\0" * 16,
        ),
        ("sessions_blank_line.csv", GOOD_TEXT.replace("\nS2", "\n\nS2").encode()),
        ("sessions_pq.parquet", _parquet_bytes()),
    ],
)
def test_accepted_encodings_and_formats(lake: Lake, name: str, content: bytes) -> None:
    result = only(lake.ingest([lake.drop(name, content)]))
    assert (result.outcome, result.rows_read, result.rows_loaded) == ("loaded", 2, 2)
    assert lake.query("SELECT session_id FROM sessions ORDER BY 1").to_series().to_list() == [
        "S1",
        "S2",
    ]


def test_quoted_commas_quotes_and_newlines_survive(lake: Lake) -> None:
    reason = 'Sick, "really" sick\nsee you Monday'
    rows = [{**GOOD_RESCHEDULE, "reason": reason}]
    only(lake.ingest([lake.drop("reschedules_1.csv", csv_text(RESCHEDULE_COLUMNS, rows))]))
    assert lake.query("SELECT reason FROM raw_reschedules").item() == reason
    # Derived when the export leaves it empty: original_time - cancelled_at.
    assert lake.query("SELECT hours_before_session FROM reschedules").item() == 24.0


def test_parquet_types_are_converted_to_the_contract(lake: Lake) -> None:
    frame = pl.DataFrame(
        {
            "session_id": ["S1", "S2", "S3"],
            "tutor_id": ["T1", "T1", "T1"],
            "scheduled_time": [
                datetime(2024, 3, 1, 10),  # naive: UTC
                datetime(2024, 3, 1, 10),
                datetime(2024, 3, 1, 10),
            ],
            "completed_time": [None, None, None],
            "status": ["completed", "no_show", "completed"],
            "duration_minutes": [60.0, None, 30.5],  # floats: whole numbers only
            "updated_at": ["2024-03-01T12:00:00+01:00", None, None],  # text: parsed
        },
        schema_overrides={
            "scheduled_time": pl.Datetime("ns"),
            "completed_time": pl.Datetime("ms", "Europe/Paris"),
        },
    )
    buf = io.BytesIO()
    frame.write_parquet(buf)
    result = only(lake.ingest([lake.drop("sessions_1.parquet", buf.getvalue())]))
    assert (result.rows_loaded, result.rows_rejected) == (2, 1)
    got = lake.query(
        "SELECT session_id, scheduled_time, duration_minutes, updated_at, source_line "
        "FROM raw_sessions ORDER BY 1"
    )
    assert got.rows() == [
        ("S1", datetime(2024, 3, 1, 10, tzinfo=UTC), 60, datetime(2024, 3, 1, 11, tzinfo=UTC), 1),
        ("S2", datetime(2024, 3, 1, 10, tzinfo=UTC), None, None, 2),
    ]
    assert lake.query("SELECT line_number, column_name FROM rejected_rows").row(0) == (
        3,
        "duration_minutes",
    )


# Atomic loads, crashes, duplicates


def _big_sessions(n: int) -> str:
    return sessions_csv(*[session(session_id=f"S{i:04d}") for i in range(n)])


def _assert_nothing_loaded(lake: Lake) -> None:
    for table in ("raw_sessions", "rejected_rows", "loaded_files"):
        assert lake.count(table) == 0, table


def _assert_loaded_once(lake: Lake, n: int) -> None:
    counts = lake.query(
        "SELECT count(*) AS rows, count(DISTINCT session_id) AS ids FROM raw_sessions"
    ).row(0)
    assert counts == (n, n)
    assert lake.count("loaded_files") == 1


def test_a_failure_between_inserts_loads_nothing_and_a_rerun_loads_each_row_once(
    lake: Lake,
) -> None:
    text = _big_sessions(50) + "S9,T1,,nope,,completed,,,\n"
    path = lake.drop("sessions_1.csv", text)
    with pytest.raises(ingest.InjectedFailure):
        ingest.ingest_file(
            lake.con,
            path,
            archive_dir=lake.archive,
            quarantine_dir=lake.quarantine,
            fail_after_rows=20,
        )
    _assert_nothing_loaded(lake)
    assert lake.landing_files() == ["sessions_1.csv"]  # still waiting, not moved
    result = only(lake.ingest())
    assert (result.outcome, result.rows_loaded, result.rows_rejected) == ("loaded", 50, 1)
    _assert_loaded_once(lake, 50)
    assert lake.count("rejected_rows") == 1
    # The same file dropped again (a platform retry) loads nothing.
    assert only(lake.ingest([lake.drop("sessions_1.csv", text)])).outcome == "duplicate"
    _assert_loaded_once(lake, 50)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tutor_scoring_dagster import ingest, warehouse

def die(rows):  # the process dies mid-transaction: no rollback, no cleanup
    os.kill(os.getpid(), signal.SIGKILL)

ingest._fail = die
with warehouse.connect(Path(sys.argv[1])) as con:
    warehouse.ensure_schema(con)
    ingest.ingest_file(
        con, Path(sys.argv[2]), archive_dir=Path(sys.argv[3]), quarantine_dir=Path(sys.argv[4]),
        fail_after_rows=int(sys.argv[5]),
    )
"""


def test_a_process_killed_mid_load_loses_nothing_and_duplicates_nothing(lake: Lake) -> None:
    path = lake.drop("sessions_1.csv", _big_sessions(300))
    args = [str(lake.warehouse), str(path), str(lake.archive), str(lake.quarantine), "150"]
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    _assert_nothing_loaded(lake)
    assert lake.landing_files() == ["sessions_1.csv"]
    assert only(lake.ingest()).rows_loaded == 300
    _assert_loaded_once(lake, 300)


def test_a_crash_after_commit_before_the_move_archives_and_loads_nothing_twice(
    lake: Lake,
) -> None:
    text = sessions_csv(session(), session(session_id="S2", status="bad"))
    path = lake.drop("sessions_1.csv", text)
    drop = ingest.classify(path)
    typed = ingest.type_and_validate(
        ingest.read_drop(drop, path.read_bytes()), "sessions", first_line=2
    )
    ingest.load_drop(lake.con, drop, ingest.file_hash(path), typed)  # ... and the process dies
    result = only(lake.ingest())
    assert result.outcome == "duplicate"
    assert lake.landing_files() == []
    assert (lake.archive / "sessions_1.csv").read_text(encoding="utf-8") == text
    # The rejected-rows CSV the crash skipped is written now; no "duplicate" sidecar.
    assert (lake.archive / ("sessions_1.csv" + ingest.REJECTED_SUFFIX)).exists()
    assert not (lake.archive / ("sessions_1.csv" + ingest.REASON_SUFFIX)).exists()
    assert (lake.count("raw_sessions"), lake.count("rejected_rows")) == (1, 1)


def test_the_rejected_rows_csv_is_written_before_the_file_leaves_landing(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = sessions_csv(session(), session(session_id="S2", status="bad"))
    path = lake.drop("sessions_1.csv", text)

    def crash(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("the process dies before the move")

    monkeypatch.setattr(ingest, "move_file", crash)
    with pytest.raises(RuntimeError, match="dies before the move"):
        lake.ingest()
    # Committed, its CSV written where the file goes; the file still in landing.
    assert lake.landing_files() == ["sessions_1.csv"]
    csv_path = lake.archive / ("sessions_1.csv" + ingest.REJECTED_SUFFIX)
    written = csv_path.read_text(encoding="utf-8")
    assert "S2" in written and not list(lake.archive.glob(".tmp-*"))
    monkeypatch.undo()
    result = only(lake.ingest())
    assert result.outcome == "duplicate" and result.moved_to == lake.archive / path.name
    assert csv_path.read_text(encoding="utf-8") == written
    assert sorted(p.name for p in lake.archive.iterdir()) == [
        "sessions_1.csv",
        "sessions_1.csv" + ingest.REJECTED_SUFFIX,
    ]


def test_sidecars_replace_a_link_planted_where_they_go_and_never_follow_it(
    lake: Lake, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    lake.archive.mkdir(parents=True)
    planted = [
        lake.archive / ("sessions_1.csv" + ingest.REJECTED_SUFFIX),
        lake.archive / ("sessions_copy.csv" + ingest.REASON_SUFFIX),
    ]
    for link in planted:
        link.symlink_to(victim)
    lake.drop("sessions_1.csv", sessions_csv(session(), session(session_id="S2", status="x")))
    assert only(lake.ingest()).rows_rejected == 1
    lake.drop("sessions_copy.csv", (lake.archive / "sessions_1.csv").read_bytes())
    assert only(lake.ingest()).outcome == "duplicate"
    assert victim.read_text(encoding="utf-8") == "precious\n"
    for sidecar in planted:
        assert not sidecar.is_symlink() and sidecar.stat().st_mode & 0o777 == 0o644


def test_the_same_bytes_under_another_name_or_again_load_nothing_new(lake: Lake) -> None:
    lake.drop("sessions_1.csv", GOOD_TEXT)
    assert only(lake.ingest()).outcome == "loaded"
    lake.drop("sessions_copy.csv", GOOD_TEXT)
    lake.drop("sessions_1.csv", GOOD_TEXT)  # the very same file, dropped again
    report = lake.ingest()
    assert [f.outcome for f in report.files] == ["duplicate", "duplicate"]
    assert lake.count("raw_sessions") == 2
    assert lake.landing_files() == []
    # Both copies are archived, none overwritten; the renamed one says why nothing loaded.
    archived = sorted(p.name for p in lake.archive.iterdir())
    assert len([n for n in archived if n.endswith(".csv") and "rejected" not in n]) == 3
    note = (lake.archive / ("sessions_copy.csv" + ingest.REASON_SUFFIX)).read_text("utf-8")
    assert "same bytes as sessions_1.csv" in note


# loaded_files: which scheduled days a load touched


def test_loaded_files_records_the_scheduled_range_of_each_load(lake: Lake) -> None:
    lake.drop(
        "sessions_1.csv",
        sessions_csv(
            session(scheduled_time="2024-03-01T10:00:00Z"),
            session(session_id="S2", scheduled_time="2024-03-05T09:00:00+02:00", completed_time=""),
            session(session_id="S3", scheduled_time="2020-01-01T00:00:00Z", status="bad"),
        ),
    )
    lake.drop("reschedules_1.csv", csv_text(RESCHEDULE_COLUMNS, [GOOD_RESCHEDULE]))
    no_original = [c for c in RESCHEDULE_COLUMNS if c != "original_time"]
    lake.drop("reschedules_2.csv", csv_text(tuple(no_original), [GOOD_RESCHEDULE]))
    lake.drop("tutors_1.csv", csv_text(TUTOR_COLUMNS, [GOOD_TUTOR]))
    lake.ingest()
    ranges = {
        row[0]: row[1:]
        for row in lake.query(
            "SELECT file_name, min_scheduled_time, max_scheduled_time FROM loaded_files"
        ).rows()
    }
    t = datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert ranges == {
        "sessions_1.csv": (t, datetime(2024, 3, 5, 7, tzinfo=UTC)),  # rejected rows don't count
        "reschedules_1.csv": (t, t),
        "reschedules_2.csv": (None, None),
        "tutors_1.csv": (None, None),
    }


def test_ensure_schema_adds_the_new_loaded_files_columns_to_an_old_warehouse(
    lake: Lake,
) -> None:
    with duckdb.connect(str(lake.warehouse)) as con:
        con.execute("CREATE SEQUENCE load_ids START 2")
        con.execute(
            "CREATE TABLE loaded_files (file_hash VARCHAR PRIMARY KEY, load_id BIGINT NOT NULL "
            "UNIQUE, entity VARCHAR NOT NULL, file_name VARCHAR NOT NULL, loaded_at TIMESTAMPTZ "
            "NOT NULL, rows_read BIGINT NOT NULL, rows_loaded BIGINT NOT NULL, rows_rejected "
            "BIGINT NOT NULL)"
        )
        con.execute(
            "INSERT INTO loaded_files VALUES ('h', 1, 'sessions', 'old.csv', now(), 1, 1, 0)"
        )
    lake.drop("sessions_2.csv", GOOD_TEXT)
    warehouse.ensure_schema(lake.con)  # the first use ran it once already: a second is a no-op
    lake.ingest()
    rows = lake.query(
        "SELECT file_name, min_scheduled_time IS NULL FROM loaded_files ORDER BY load_id"
    ).rows()
    assert rows == [("old.csv", True), ("sessions_2.csv", False)]


# Current views: late updates, drop order, reschedules before sessions, unknown tutors


def test_the_latest_updated_at_wins_whatever_the_drop_order(lake: Lake) -> None:
    newer = session(status="no_show", completed_time="", updated_at="2024-03-02T00:00:00Z")
    older = session(status="completed", updated_at="2024-03-01T11:05:00Z")
    lake.drop("sessions_1.csv", sessions_csv(newer))
    lake.ingest()
    lake.drop("sessions_2.csv", sessions_csv(older))  # a stale export arrives late
    lake.ingest()
    assert lake.query("SELECT status FROM sessions").item() == "no_show"
    assert lake.count("raw_sessions") == 2  # history is append-only


def test_without_updated_at_the_later_drop_wins_then_the_later_line(lake: Lake) -> None:
    first = session(status="completed", updated_at="")
    lake.drop("sessions_1.csv", sessions_csv(first))
    lake.ingest()
    second = session(status="rescheduled", completed_time="", updated_at="")
    third = session(status="no_show", completed_time="", updated_at="")
    lake.drop("sessions_2.csv", sessions_csv(second, third))
    lake.ingest()
    assert lake.query("SELECT status FROM sessions").item() == "no_show"


def test_a_reschedule_before_its_session_is_kept_and_joins_when_it_arrives(lake: Lake) -> None:
    lake.drop("reschedules_1.csv", csv_text(RESCHEDULE_COLUMNS, [GOOD_RESCHEDULE]))
    lake.ingest()
    assert lake.count("reschedules") == 1
    join = "SELECT s.tutor_id, r.initiator FROM reschedules r JOIN sessions s USING (session_id)"
    assert lake.query(join).height == 0
    lake.drop("sessions_1.csv", sessions_csv(session(status="rescheduled", completed_time="")))
    lake.ingest()
    assert lake.query(join).rows() == [("T1", "tutor")]


def test_a_tutor_seen_only_in_sessions_gets_a_tutors_row(lake: Lake) -> None:
    lake.drop("tutors_1.csv", csv_text(TUTOR_COLUMNS, [GOOD_TUTOR]))
    lake.drop("sessions_1.csv", sessions_csv(session(), session(session_id="S2", tutor_id="T9")))
    lake.ingest()
    rows = lake.query(
        "SELECT tutor_id, name, is_active, in_tutors_export FROM tutors ORDER BY 1"
    ).rows()
    assert rows == [("T1", "Ada", True, True), ("T9", None, True, False)]


STATUSES = ("completed", "rescheduled", "no_show")


@st.composite
def export_histories(draw: st.DrawFn) -> list[list[tuple[str, int, str]]]:
    """Exports of a few sessions: each file a list of (session_id, version, status), where a
    higher version has a later updated_at; versions repeat, go back in time and files repeat."""
    n_sessions = draw(st.integers(1, 4))
    versions = {
        f"S{i}": draw(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=3))
        for i in range(n_sessions)
    }
    row = st.sampled_from(
        [(sid, v, status) for sid, states in versions.items() for v, status in enumerate(states)]
    )
    files = draw(st.lists(st.lists(row, min_size=1, max_size=6), min_size=1, max_size=4))
    # Drop some files twice (the same bytes), in any position.
    repeats = draw(st.lists(st.sampled_from(files), max_size=2))
    return draw(st.permutations(files + repeats))


def _history_csv(rows: list[tuple[str, int, str]]) -> str:
    base = datetime(2024, 3, 1, 10, tzinfo=UTC)
    return sessions_csv(
        *[
            session(
                session_id=sid,
                tutor_id=f"T{version}",
                status=status,
                completed_time="",
                updated_at=(base + timedelta(hours=version)).isoformat(),
            )
            for sid, version, status in rows
        ]
    )


def _current_sessions(root: Path, exports: list[str]) -> pl.DataFrame:
    lake = Lake(root / "landing", root / "archive", root / "quarantine", root / "wh.duckdb")
    try:
        for i, text in enumerate(exports):  # in drop order, one file at a time
            path = lake.drop(f"sessions_{i:03d}.csv", text)
            ingest.ingest_file(
                lake.con, path, archive_dir=lake.archive, quarantine_dir=lake.quarantine
            )
        return lake.query(
            "SELECT session_id, tutor_id, status, scheduled_time, updated_at "
            "FROM sessions ORDER BY session_id"
        )
    finally:
        lake.close()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=export_histories())
def test_any_interleaving_of_exports_gives_the_final_state(
    history: list[list[tuple[str, int, str]]],
) -> None:
    final: dict[str, tuple[str, int, str]] = {}
    for rows in history:
        for sid, version, status in rows:
            if sid not in final or version > final[sid][1]:
                final[sid] = (sid, version, status)
    with tempfile.TemporaryDirectory() as tmp:
        interleaved = _current_sessions(Path(tmp) / "a", [_history_csv(r) for r in history])
        once = _current_sessions(Path(tmp) / "b", [_history_csv(list(final.values()))])
    assert_frame_equal(interleaved, once)


# Paths ingest refuses to read or move


def test_a_symlink_in_landing_is_quarantined_without_reading_its_target(
    lake: Lake, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.csv"
    target.write_text(GOOD_TEXT, encoding="utf-8")
    (lake.landing / "sessions_link.csv").symlink_to(target)
    result = only(lake.ingest())
    assert result.outcome == "quarantined"
    assert result.reason is not None and "symbolic link" in result.reason
    assert (lake.quarantine / "sessions_link.csv").is_symlink()
    assert target.read_text(encoding="utf-8") == GOOD_TEXT
    assert lake.count("raw_sessions") == 0


def test_requested_paths_outside_landing_are_skipped_and_left_alone(
    lake: Lake, tmp_path: Path
) -> None:
    outside = tmp_path / "sessions_outside.csv"
    outside.write_text(GOOD_TEXT, encoding="utf-8")
    lake.archive.mkdir(parents=True)
    archived = lake.archive / "sessions_old.csv"
    archived.write_text(GOOD_TEXT, encoding="utf-8")
    inside = lake.drop("sessions_in.csv", GOOD_TEXT.replace("S2", "S3"))
    report = lake.ingest(
        [
            outside,
            archived,
            lake.landing / ".." / "sessions_outside.csv",
            Path("sessions_in.csv"),  # relative: inside the landing folder
            lake.landing / "sessions_gone.csv",
            lake.landing / "sessions_busy.csv.part",
        ]
    )
    outcomes = [(f.file_name, f.outcome) for f in report.files]
    assert outcomes == [
        ("sessions_outside.csv", "skipped"),
        ("sessions_old.csv", "skipped"),
        ("sessions_outside.csv", "skipped"),
        ("sessions_gone.csv", "skipped"),
        ("sessions_busy.csv.part", "skipped"),
        ("sessions_in.csv", "loaded"),
    ]
    assert "outside the landing folder" in (report.files[0].reason or "")
    assert outside.read_text(encoding="utf-8") == GOOD_TEXT
    assert archived.exists() and not inside.exists()


def test_list_landing_skips_partial_hidden_and_fresh_files(lake: Lake) -> None:
    for name in ("sessions_1.csv", "sessions_2.csv.part", ".sessions_3.csv", "x.tmp"):
        lake.drop(name, GOOD_TEXT)
    (lake.landing / "archive").mkdir()
    assert [p.name for p in ingest.list_landing(lake.landing)] == ["sessions_1.csv"]
    assert ingest.list_landing(lake.landing, min_age_s=3600) == []


# The generator's drops end to end


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    from tutor_scoring_dagster.generate import generate_drops

    def make(fmt: str, defects: float) -> Path:
        out = tmp_path / f"{fmt}-{defects}"
        generate_drops(
            out / "landing",
            tutors=15,
            days=6,
            sessions_per_day=40,
            seed=11,
            end=date(2024, 3, 1),
            fmt=fmt,  # type: ignore[arg-type]
            drops_per_day=2,
            defects=defects,
        )
        (out / "landing" / "ground_truth.csv").rename(out / "ground_truth.csv")
        return out

    yield make


def _ingest_folder(root: Path) -> tuple[IngestReport, pl.DataFrame]:
    with warehouse.connect(root / "wh.duckdb") as con:
        warehouse.ensure_schema(con)
        report = ingest.ingest_landing(
            con, root / "landing", archive_dir=root / "archive", quarantine_dir=root / "q"
        )
        current = query_frame(
            con,
            "SELECT session_id, tutor_id, student_id, scheduled_time, completed_time, status, "
            "duration_minutes, created_at, updated_at FROM sessions ORDER BY session_id",
        )
    return report, current


def test_csv_and_parquet_drops_of_the_same_history_give_the_same_sessions(
    generated: Callable[..., Path],
) -> None:
    csv_report, csv_sessions = _ingest_folder(generated("csv", 0.0))
    pq_report, pq_sessions = _ingest_folder(generated("parquet", 0.0))
    for report in (csv_report, pq_report):
        assert {f.outcome for f in report.files} == {"loaded"}
        assert report.rows_rejected == 0
    assert csv_sessions.height > 100
    assert_frame_equal(csv_sessions, pq_sessions)


def test_generated_defects_are_rejected_row_by_row(generated: Callable[..., Path]) -> None:
    root = generated("csv", 0.2)
    report, _ = _ingest_folder(root)
    for f in report.files:
        if f.outcome == "loaded":
            assert f.rows_read == f.rows_loaded + f.rows_rejected
    assert report.rows_rejected > 0
    with warehouse.connect(root / "wh.duckdb") as con:
        reasons = query_frame(con, "SELECT DISTINCT column_name FROM rejected_rows")
        loaded = fetch_one(con, "SELECT sum(rows_loaded) FROM loaded_files")
        raw = fetch_one(
            con,
            "SELECT (SELECT count(*) FROM raw_sessions) + (SELECT count(*) FROM raw_reschedules)"
            " + (SELECT count(*) FROM raw_tutors)",
        )
    assert loaded == raw
    assert {"status", "tutor_id", "scheduled_time", "initiator"} <= set(reasons.to_series())


def test_nested_parquet_columns_are_kept_as_json_extras_but_refused_in_the_contract(
    lake: Lake,
) -> None:
    base = pl.read_csv(io.StringIO(GOOD_TEXT), infer_schema=False)
    extras = base.with_columns(
        pl.Series("tags", [["a", "b"], []]), pl.Series("blob", [b"\x00\x01", b""])
    )
    buf = io.BytesIO()
    extras.write_parquet(buf)
    assert only(lake.ingest([lake.drop("sessions_1.parquet", buf.getvalue())])).rows_loaded == 2
    extra = lake.query("SELECT extra_columns FROM raw_sessions ORDER BY session_id").item(0, 0)
    assert json.loads(extra) == {"blob": "AAE=", "tags": '["a","b"]'}
    nested_id = base.with_columns(pl.Series("session_id", [["S1"], ["S2"]]))
    buf = io.BytesIO()
    nested_id.write_parquet(buf)
    result = only(lake.ingest([lake.drop("sessions_2.parquet", buf.getvalue())]))
    assert result.outcome == "quarantined"
    assert "type the contract does not allow: session_id (List(String))" in (result.reason or "")
