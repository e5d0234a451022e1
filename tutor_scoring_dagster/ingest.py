"""Landing drops -> warehouse: read, type, validate and load each file exactly once.

A file is identified by the sha256 of its bytes. Each file loads in one DuckDB transaction
(its valid rows, its rejected rows and its ``loaded_files`` entry together), then moves to the
archive; a file with nothing loadable moves to quarantine with a ``.reason.txt`` sidecar.
Nothing in the landing folder is ever deleted. A pass of many files (a backfill, a rebuild)
reads, validates and loads them in batches of consecutive files, one transaction per batch,
each file ending exactly as it would alone.

The landing folder is also watched from here (`scan_landing`, used by the Dagster sensor): a
file is handed to ingest once it has been seen unchanged twice, and only once per content hash.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import duckdb
import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.ahead import one_ahead
from tutor_scoring_dagster.paths import load_sql
from tutor_scoring_dagster.schemas import DROP_MODELS, drop_columns, required_columns
from tutor_scoring_dagster.warehouse import (
    fetch_one,
    raw_frame_schema,
    raw_table,
    refresh_current,
)

log = logging.getLogger(__name__)

FORMATS: Final = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet"}
IN_PROGRESS_SUFFIXES: Final = (".tmp", ".part", ".partial", ".crdownload")
REJECTED_SUFFIX: Final = ".rejected.csv"
REASON_SUFFIX: Final = ".reason.txt"
DEFER_CHECKPOINTS_FILES: Final = 10
PASS_CHECKPOINT_THRESHOLD: Final = "1GB"
BATCH_MIN_FILES: Final = 100
"""A pass of at least this many files (a backfill, a rebuild) is ingested in batches; a
smaller one (the sensor's one-file runs, an hourly sweep) one file at a time."""
BATCH_MAX_FILES: Final = 64
BATCH_MAX_ROWS: Final = 500_000
"""A batch is at most this many consecutive files, and stops at the file that brings its rows
read to this many: what it holds in memory (twice, with the next batch being prepared)."""

MAX_HEADER_BYTES: Final = 1 << 20
"""A header row longer than this (1 MiB) is refused before parsing."""
MAX_COLUMNS: Final = 1000
"""A file with more columns than this is refused before parsing (the contract has about ten)."""
INFLATE_MIN_LIMIT: Final = 64 << 20
INFLATE_MAX_LIMIT: Final = 256 << 20
INFLATE_RATIO: Final = 100
"""A ``.csv.gz`` may inflate to ``INFLATE_RATIO`` times its size, within the two limits; CSV
compresses 5 to 20 times, so a file past that is a decompression bomb, not an export."""
INFLATE_STEP: Final = 1 << 16
"""Compressed bytes inflated per step."""
SIDECAR_MODE: Final = 0o644
"""Mode of the files ingest writes beside drops (what a plain write gives under umask 022)."""

TOUCHED_TIME_COLUMN: Final = {"sessions": "scheduled_time", "reschedules": "original_time"}
"""The column whose range ``loaded_files.min/max_scheduled_time`` records, per entity."""

Outcome = Literal["loaded", "quarantined", "duplicate", "skipped"]


@dataclass(frozen=True)
class Drop:
    """A file in the landing folder that looks like an export."""

    path: Path
    entity: str | None  # None: the name does not say which export it is
    fmt: str | None  # None: not a supported format


@dataclass
class FileResult:
    """What happened to one landing file."""

    file_name: str
    entity: str | None
    file_hash: str  # "" when the file was never read (skipped)
    outcome: Outcome
    rows_read: int = 0
    rows_loaded: int = 0
    rows_rejected: int = 0
    reason: str | None = None
    load_id: int | None = None
    moved_to: Path | None = None


@dataclass
class IngestReport:
    """What one ingest pass did, file by file."""

    files: list[FileResult] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        """How many files ended with ``outcome``."""
        return sum(1 for f in self.files if f.outcome == outcome)

    @property
    def rows_loaded(self) -> int:
        """Rows loaded across all files."""
        return sum(f.rows_loaded for f in self.files)

    @property
    def rows_rejected(self) -> int:
        """Rows rejected across all files."""
        return sum(f.rows_rejected for f in self.files)


class FileRejected(Exception):
    """The whole file cannot be loaded; the message says why."""


class InjectedFailure(RuntimeError):
    """A failure raised on purpose in the middle of a load (tests of atomicity)."""


def classify(path: Path) -> Drop:
    """Which entity and format a landing file is, from its name."""
    name = path.name.lower()
    fmt = next((f for ext, f in FORMATS.items() if name.endswith(ext)), None)
    entity = next((e for e in DROP_MODELS if name.startswith(e)), None)
    return Drop(path=path, entity=entity, fmt=fmt)


def is_in_progress(path: Path) -> bool:
    """A file the platform is still writing (by its name) or a hidden file."""
    name = path.name
    return name.startswith(".") or name.lower().endswith(IN_PROGRESS_SUFFIXES)


def list_landing(landing_dir: Path, *, min_age_s: float = 0.0) -> list[Path]:
    """Candidate files in the landing folder (not subfolders), oldest first.

    Symbolic links are listed (so that ingest quarantines them); files modified less than
    ``min_age_s`` seconds ago are left for later.
    """
    if not landing_dir.is_dir():
        return []
    now_ns = time.time_ns()
    found: list[tuple[int, str, Path]] = []
    for p in landing_dir.iterdir():
        if is_in_progress(p):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:  # moved away while listing
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            continue  # subfolders (archive/, quarantine/), pipes, sockets
        if min_age_s and now_ns - st.st_mtime_ns < min_age_s * 1e9:
            continue
        found.append((st.st_mtime_ns, p.name, p))
    return [p for _, _, p in sorted(found)]


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes: a drop's identity."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_landing_path(path: Path, landing_dir: Path) -> str | None:
    """Why a requested path may not be ingested from ``landing_dir`` (None: it may).

    A path must name a file directly inside the landing folder; a relative path is taken
    relative to it. Symbolic links pass here and are quarantined by `ingest_file`.
    """
    if not path.is_absolute():
        path = landing_dir / path
    if path.parent.resolve() != landing_dir.resolve():
        return f"outside the landing folder {landing_dir}; refused"
    if is_in_progress(path):
        return "still being written (temporary or hidden name); left for later"
    if path.is_symlink():
        return None
    if not path.exists():
        return "no longer in the landing folder (ingested or moved by another run)"
    if not path.is_file():
        return "not a regular file; refused"
    return None


# Watching the landing folder (the sensor's half: cheap, no warehouse connection)


@dataclass(frozen=True)
class SeenFile:
    """A landing file as the watcher last saw it."""

    size: int
    mtime_ns: int
    sha256: str | None = None  # hash prefix, once stable and handed over (or a duplicate)


CURSOR_VERSION: Final = 1
HASH_PREFIX: Final = 16
"""Hex digits of a hash the cursor keeps: 64 bits tell files apart; the run key has them all."""
MAX_RECENT_HASHES: Final = 100
"""Hashes handed over that the cursor remembers. The cursor is stored with every tick, so it
stays a few kilobytes; a copy of an older file is left to Dagster's run-key check instead."""


@dataclass(frozen=True)
class LandingCursor:
    """What the watcher remembers between ticks (stored as JSON in the sensor's cursor)."""

    files: dict[str, SeenFile] = field(default_factory=dict)
    recent: tuple[str, ...] = ()  # hash prefixes handed over, oldest first

    def to_json(self) -> str:
        """The cursor as compact JSON."""
        files = {
            name: {"size": f.size, "mtime_ns": f.mtime_ns, "sha256": f.sha256}
            for name, f in sorted(self.files.items())
        }
        return json.dumps(
            {"version": CURSOR_VERSION, "files": files, "recent": list(self.recent)},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> LandingCursor:
        """Parse a cursor; a missing or unreadable one starts afresh (run keys still dedupe)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            if data.get("version") != CURSOR_VERSION:
                raise ValueError(f"cursor version {data.get('version')!r}")
            files = {
                str(name): SeenFile(int(f["size"]), int(f["mtime_ns"]), f.get("sha256"))
                for name, f in data["files"].items()
            }
            return cls(files=files, recent=tuple(str(h) for h in data["recent"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring an unreadable landing cursor (%s); starting afresh", exc)
            return cls()


@dataclass(frozen=True)
class ReadyFile:
    """A landing file that is complete and whose bytes were never handed over before."""

    path: Path
    sha256: str
    size: int


def scan_landing(
    landing_dir: Path,
    cursor: LandingCursor,
    *,
    max_files: int = 50,
    hash_budget_s: float = 20.0,
) -> tuple[list[ReadyFile], LandingCursor]:
    """New complete files in the landing folder, oldest first, and the cursor after them.

    A file is ready once it has the same size and mtime as on the previous scan (so one the
    platform is still writing waits), has no temporary name, is a regular file (symbolic links
    are left to the next full ingest, which quarantines them) and has bytes not handed over
    before. At most ``max_files`` files, and as many as can be hashed in ``hash_budget_s``
    seconds, are returned per scan; the rest stay for the next.
    """
    entries: list[tuple[int, str, int]] = []
    if landing_dir.is_dir():
        for p in landing_dir.iterdir():
            if is_in_progress(p):
                continue
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_mtime_ns, p.name, st.st_size))
    deadline = time.monotonic() + hash_budget_s
    files: dict[str, SeenFile] = {}
    recent = list(cursor.recent)
    known = set(recent)
    ready: list[ReadyFile] = []
    for mtime_ns, name, size in sorted(entries):
        before = cursor.files.get(name)
        if before is None or (before.size, before.mtime_ns) != (size, mtime_ns):
            files[name] = SeenFile(size, mtime_ns)  # new or still changing: look again next tick
            continue
        if before.sha256 is not None or len(ready) >= max_files or time.monotonic() > deadline:
            files[name] = before
            continue
        path = landing_dir / name
        try:
            digest = file_hash(path)
            st = path.lstat()
        except FileNotFoundError:
            continue
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):  # written to while hashing
            files[name] = SeenFile(st.st_size, st.st_mtime_ns)
            continue
        key = digest[:HASH_PREFIX]
        files[name] = SeenFile(size, mtime_ns, key)
        if key in known:
            log.info("%s has the same bytes as a file handed over before; not loaded again", name)
            continue
        known.add(key)
        recent.append(key)
        ready.append(ReadyFile(path=path, sha256=digest, size=size))
    recent = recent[-MAX_RECENT_HASHES:]
    return ready, LandingCursor(files=files, recent=tuple(recent))


# Reading


def _content_kind(data: bytes) -> str:
    """What a file's first bytes say it is."""
    if not data:
        return "empty"
    if data.startswith(b"PAR1"):
        return "parquet"
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf16"
    if b"\x00" in data[:8192]:
        return "binary"
    return "text"


_KIND_TEXT: Final = {
    "empty": "is empty (0 bytes)",
    "parquet": "holds Parquet data",
    "gzip": "is gzip-compressed (name it .csv.gz)",
    "zip": "is a ZIP archive (an Excel workbook?), not CSV text",
    "utf16": "is UTF-16 text; the contract asks for UTF-8",
    "binary": "holds binary data, not CSV text",
    "text": "holds text (CSV?), not Parquet data",
}


def _suffix(drop: Drop) -> str:
    name = drop.path.name.lower()
    return next((ext for ext in FORMATS if name.endswith(ext)), drop.path.suffix)


def read_drop(drop: Drop, data: bytes) -> pl.DataFrame:
    """A landing file's bytes as a frame: CSV cells stay text until typed, Parquet keeps its
    types. Raises `FileRejected` when the bytes are not what the file's name says, or are too
    big to read safely (a decompression bomb, an absurd header)."""
    kind = _content_kind(data)
    if kind == "empty":
        raise FileRejected("the file is empty (0 bytes)")
    if drop.fmt == "parquet":
        if kind != "parquet":
            raise FileRejected(f"the file is named .parquet but {_KIND_TEXT[kind]}")
        if not data.endswith(b"PAR1"):
            raise FileRejected(
                "the Parquet file is truncated (no footer): was it copied before it was complete?"
            )
        try:
            check_parquet_header(data)
            frame = _plain_values(pl.read_parquet(io.BytesIO(data)), drop.entity)
        except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
            raise FileRejected(f"cannot read the Parquet file: {_one_line(exc)}") from exc
    else:
        if _suffix(drop) == ".csv.gz":
            if kind != "gzip":
                raise FileRejected(f"the file is named .csv.gz but is not gzip-compressed ({kind})")
            data = inflate_gzip(data)
            kind = _content_kind(data)
            if kind == "empty":
                raise FileRejected("the file is empty (no bytes once decompressed)")
        if kind != "text":
            raise FileRejected(f"the file is named {_suffix(drop)} but {_KIND_TEXT[kind]}")
        check_csv_header(data)
        frame = _read_csv(data)
    names = [c.strip().lstrip("\ufeff") for c in frame.columns]
    twice = sorted(name for name, n in Counter(names).items() if n > 1)
    if twice:
        # Polars renames an exact repeat (status_duplicated_0, see check_columns); a repeat
        # that differs only by spaces around it would collide once the names are trimmed.
        raise FileRejected(
            "the header names a column more than once (spaces around names aside): "
            + ", ".join(twice)[:300]
        )
    return frame.rename(dict(zip(frame.columns, names, strict=True)))


_ZEROS: Final = re.compile(rb"\0*")


def inflate_gzip(data: bytes) -> bytes:
    """A ``.csv.gz`` inflated (every gzip member, as gzip does), never past a bound: more than
    `INFLATE_RATIO` times its size (within the limits) rejects the file as a zip bomb."""
    limit = min(INFLATE_MAX_LIMIT, max(INFLATE_MIN_LIMIT, INFLATE_RATIO * len(data)))
    view = memoryview(data)
    out: list[bytes] = []
    size = pos = 0
    member: Any = None  # the gzip member being inflated
    try:
        while True:
            if member is None or member.eof:
                # Zero bytes after a member are padding (gzip skips them too).
                padding = _ZEROS.match(data, pos)
                assert padding is not None  # zero or more: it always matches
                pos = padding.end()
                if pos >= len(data):
                    break
                member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # checks header, CRC
            elif pos >= len(data):
                raise EOFError("the stream ends before its end-of-stream marker")
            # Small pieces of input, so that what is left over is never a copy of the rest.
            piece = view[pos : pos + INFLATE_STEP]
            chunk = member.decompress(piece, limit + 1 - size)
            pos += len(piece) - len(member.unconsumed_tail) - len(member.unused_data)
            size += len(chunk)
            if size > limit:
                raise FileRejected(
                    f"the gzip stream inflates to more than {limit / (1 << 20):.0f} MiB from "
                    f"{len(data):,} bytes: a suspected zip bomb (split the export, or send "
                    "Parquet)"
                )
            out.append(chunk)
    except (EOFError, zlib.error) as exc:
        raise FileRejected(f"the gzip stream is truncated or corrupt: {exc}") from exc
    return b"".join(out)


_HEADER_FIELD: Final = re.compile(rb'(?:"(?:[^"]++|"")*+(?:"|\Z))?[^,\r\n]*+')
"""One header field as RFC 4180 reads it: optionally quoted (a quote only opens a field)."""


def check_csv_header(data: bytes) -> None:
    """Refuse a header row over `MAX_HEADER_BYTES` or of more than `MAX_COLUMNS` columns,
    looking at its bytes only: Polars would allocate for every column before reading a row."""
    head = data[:MAX_HEADER_BYTES]
    pos, columns = 0, 1
    while True:
        end = _HEADER_FIELD.match(head, pos)
        assert end is not None  # every pattern part may match nothing
        pos = end.end()
        if pos >= len(head):
            if len(data) > len(head):
                raise FileRejected(
                    f"the header row is longer than {MAX_HEADER_BYTES >> 20} MiB "
                    "(or a quote in it is never closed)"
                )
            return
        if head[pos] != ord(","):
            return  # the end of the line, so of the header
        columns += 1
        pos += 1
        if columns > MAX_COLUMNS:
            raise FileRejected(f"the header has more than {MAX_COLUMNS:,} columns")


def check_parquet_header(data: bytes) -> None:
    """Refuse a Parquet file of more than `MAX_COLUMNS` columns or names over
    `MAX_HEADER_BYTES`, from its footer's schema, before reading any data."""
    schema = pl.read_parquet_schema(io.BytesIO(data))
    if len(schema) > MAX_COLUMNS:
        raise FileRejected(f"the file has {len(schema):,} columns; at most {MAX_COLUMNS:,}")
    if sum(len(name.encode()) for name in schema) > MAX_HEADER_BYTES:
        raise FileRejected(f"the column names add up to more than {MAX_HEADER_BYTES >> 20} MiB")


def _plain_values(frame: pl.DataFrame, entity: str | None) -> pl.DataFrame:
    """A Parquet frame whose every column can be shown as text: nested and binary columns
    (kept only as unknown extras) become JSON and base64. A contract column of such a type
    rejects the file."""
    contract = drop_columns(entity) if entity else {}
    wrong = []
    exprs = []
    for name, dtype in frame.schema.items():
        if dtype == pl.Binary:
            exprs.append(pl.col(name).bin.encode("base64"))
        elif isinstance(dtype, pl.List | pl.Array | pl.Struct):
            wrapped = pl.struct(name).struct.json_encode()  # {"name":value}
            value = wrapped.str.strip_prefix("{" + json.dumps(name) + ":").str.strip_suffix("}")
            exprs.append(value.alias(name))
        else:
            continue
        if name in contract:
            wrong.append(f"{name} ({dtype})")
    if wrong:
        raise FileRejected(f"column(s) of a type the contract does not allow: {', '.join(wrong)}")
    return frame.with_columns(exprs) if exprs else frame


def _read_csv(data: bytes) -> pl.DataFrame:
    """RFC 4180 CSV (UTF-8, optional BOM, LF or CRLF) with a header, every cell as text."""
    try:
        return pl.read_csv(
            data,
            has_header=True,
            separator=",",
            quote_char='"',
            encoding="utf8",
            infer_schema=False,
            raise_if_empty=True,
            truncate_ragged_lines=False,
        )
    except pl.exceptions.NoDataError as exc:
        raise FileRejected("the file has no header row (it is blank)") from exc
    except pl.exceptions.PolarsError as exc:
        message = str(exc)
        if "utf-8" in message.lower() or "utf8" in message.lower():
            raise FileRejected(_utf8_problem(data)) from exc
        if "more fields" in message:
            raise FileRejected(
                "a row has more fields than the header (is a value with a comma unquoted?)"
            ) from exc
        # Polars' first paragraph says what and where; the rest is advice about its options.
        first = " ".join(message.split("\n\n", 1)[0].split())[:300]
        raise FileRejected(f"malformed CSV (an unclosed quote?): {first}") from exc


def _utf8_problem(data: bytes) -> str:
    """Where the first byte that is not UTF-8 sits, for the reason a person reads."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start : exc.start + 1].hex()
        return (
            f"the file is not valid UTF-8 text: byte 0x{byte} on line {line} "
            "(exported as Latin-1 / Windows-1252?)"
        )
    return "the file is not valid UTF-8 text"


def _one_line(exc: BaseException) -> str:
    return one_line(str(exc))[:300]


def check_columns(frame: pl.DataFrame, entity: str, *, fmt: str | None = "csv") -> None:
    """Reject a file without rows, without a required column, with a column twice, or with a
    NUL in a column name."""
    if any("\x00" in c for c in frame.columns):
        raise FileRejected("a column name holds a NUL character (is the file binary?)")
    duplicated = sorted(
        {m.group(1) for c in frame.columns if (m := re.match(r"(.+)_duplicated_\d+$", c))}
        & set(frame.columns)
    )
    if duplicated:
        raise FileRejected(f"the header names a column more than once: {', '.join(duplicated)}")
    missing = [c for c in required_columns(entity) if c not in frame.columns]
    if missing:
        hint = ""
        if len(frame.columns) == 1 and re.search(r"[;\t|]", frame.columns[0]):
            hint = " (the header has one column: is the file comma-separated?)"
        elif not set(frame.columns) & set(drop_columns(entity)):
            hint = " (no column of the contract at all: does the file start with a header row?)"
        found = ", ".join(frame.columns)
        raise FileRejected(
            f"missing required column(s) {', '.join(missing)}; found "
            f"{found[:300] or 'no columns'}{hint}"
        )
    if frame.height == 0:
        raise FileRejected(
            "the file has a header but no rows" if fmt == "csv" else "the file has no rows"
        )


# Typing and validating


TIMESTAMP_RANGE: Final = (datetime(1900, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))
"""Timestamps a drop may hold: from the first to before the second."""

_RFC3339: Final = "%Y-%m-%dT%H:%M:%S%.f%z"
_RFC3339_NAIVE: Final = "%Y-%m-%dT%H:%M:%S%.f"
_OFFSET_RE: Final = r"(Z|[+-]\d{2}:?\d{2})$"
_TRUE: Final = ("true", "t", "1")
_FALSE: Final = ("false", "f", "0")


def parse_timestamps(text: pl.Expr) -> pl.Expr:
    """ISO 8601 / RFC 3339 text -> UTC timestamps (naive text is UTC); null where unparseable."""
    norm = (
        text.str.strip_chars()
        .str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", "${1}T")
        .str.replace(r"Z$", "+00:00")
    )
    with_offset = norm.str.to_datetime(_RFC3339, strict=False, time_unit="us", time_zone="UTC")
    naive = pl.coalesce(
        norm.str.to_datetime(_RFC3339_NAIVE, strict=False, time_unit="us"),
        norm.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="us"),
        norm.str.to_datetime("%Y-%m-%d", strict=False, time_unit="us"),
    ).dt.replace_time_zone("UTC")
    return pl.when(norm.str.contains(_OFFSET_RE)).then(with_offset).otherwise(naive)


def parse_timestamp_series(text: pl.Series) -> pl.Series:
    """`parse_timestamps` on a column, trying the common exact spellings first.

    Most exports use one or two spellings; parsing those with fixed formats and sending only
    the remainder through the general rules keeps a million-row column well under a second.
    Each stage gives the general rules' answer wherever it gives one at all.
    """
    col = pl.col(text.name)
    ends_z = col.str.ends_with("Z")
    # Whole seconds in UTC ("Z", "+00:00") or naive (= UTC), "T" or space: Polars' fast
    # fixed-width parser. A replaced space can only match the format at the date's end.
    utc_text = (
        pl.when(ends_z).then(col.str.strip_suffix("Z")).otherwise(col.str.strip_suffix("+00:00"))
    ).str.replace(" ", "T", literal=True, n=1)
    # Any offset, fractional seconds: one strptime format.
    offset_text = (
        pl.when(ends_z).then(col.str.strip_suffix("Z") + "+00:00").otherwise(col)
    ).str.replace(" ", "T", literal=True, n=1)
    stages = (
        utc_text.str.to_datetime(
            "%Y-%m-%dT%H:%M:%S", strict=False, time_unit="us"
        ).dt.replace_time_zone("UTC"),
        offset_text.str.to_datetime(_RFC3339, strict=False, time_unit="us", time_zone="UTC"),
        parse_timestamps(col),
    )
    frame = text.to_frame()
    out = frame.select(stages[0]).to_series()
    for stage in stages[1:]:
        todo = out.is_null() & text.is_not_null()
        if not todo.any():
            break
        idx = todo.arg_true()
        out = out.scatter(idx, frame[idx].select(stage).to_series())
    return out


def _parse_text(text: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.String:
        # A blank cell is a missing value, like an empty one.
        return pl.when(text.str.strip_chars() == "").then(None).otherwise(text)
    if isinstance(dtype, pl.Datetime):
        return parse_timestamps(text)
    if dtype == pl.Boolean:
        low = text.str.strip_chars().str.to_lowercase()
        return pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False)
    if dtype == pl.Int64:
        # "60" and "60.0" are whole numbers; "60.5" is not.
        as_float = text.str.strip_chars().cast(pl.Float64, strict=False)
        return pl.when(as_float == as_float.floor()).then(as_float.cast(pl.Int64, strict=False))
    return text.str.strip_chars().cast(dtype, strict=False)


def _coerce_typed(col: pl.Expr, source: pl.DataType, dtype: pl.DataType) -> pl.Expr:
    """A typed (Parquet) column -> the contract's type."""
    if source == pl.String:
        return _parse_text(col, dtype)
    if isinstance(dtype, pl.Datetime):
        if isinstance(source, pl.Datetime):
            if source.time_zone is None:  # naive means UTC
                return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
            return col.dt.convert_time_zone("UTC").cast(pl.Datetime("us", "UTC"))
        if source == pl.Date:
            return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        # As long as the column (a bare literal would make a one-row result).
        return pl.repeat(None, pl.len(), dtype=dtype)
    if dtype == pl.Int64 and source.is_float():
        return pl.when(col == col.floor()).then(col.cast(pl.Int64, strict=False))
    if dtype == pl.Boolean and source.is_integer():
        return pl.when(col.is_in([0, 1])).then(col == 1)  # 1/0 only, as in text
    return col.cast(dtype, strict=False)


_CAST_ERRORS: Final = (
    pl.exceptions.InvalidOperationError,
    pl.exceptions.ComputeError,
    pl.exceptions.SchemaError,
)
"""What Polars raises for a cast it does not support at all (e.g. Date -> Boolean)."""


def _coerce_typed_column(values: pl.Series, dtype: pl.DataType) -> pl.Series:
    """`_coerce_typed` on a column; all null when Polars cannot cast its type at all, so that
    each of its values is rejected with its row, as a value that does not parse is."""
    try:
        expr = _coerce_typed(pl.col(values.name), values.dtype, dtype)
        return values.to_frame().select(expr.alias(values.name)).to_series()
    except _CAST_ERRORS:
        return pl.repeat(None, values.len(), dtype=dtype, eager=True).alias(values.name)


def coerce_column(values: pl.Series, dtype: pl.DataType) -> pl.Series:
    """A read column (text, or typed from Parquet) -> the contract's type; null where it
    cannot be converted (timestamps: also outside the years `TIMESTAMP_RANGE` allows)."""
    if isinstance(dtype, pl.Datetime):
        if values.dtype == pl.String:
            out = parse_timestamp_series(values)
        else:
            out = _coerce_typed_column(values, dtype)
        # Year 0 or 9999 is a broken export, not a session; it would also break every window.
        low, high = TIMESTAMP_RANGE
        return (
            out.to_frame()
            .select(
                pl.when(pl.col(out.name).is_between(low, high, closed="left")).then(
                    pl.col(out.name)
                )
            )
            .to_series()
        )
    return _coerce_typed_column(values, dtype)


def _blank(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.String:
        return col.is_null() | (col.str.strip_chars() == "")
    return col.is_null()


@dataclass(frozen=True)
class TypedDrop:
    """A file's rows typed to the contract, split into loadable and rejected."""

    valid: pl.DataFrame  # raw_<entity> columns but the load's (load_id, source_file)
    rejected: pl.DataFrame  # line_number, column_name, reason, raw_record
    rows_read: int

    @property
    def rows_rejected(self) -> int:
        """Rows with at least one failure."""
        return self.rejected.get_column("line_number").n_unique()


_ROW: Final = "\x00row"
_FILE: Final = "\x00file"
_LINE: Final = "\x00line"
"""Working columns added to a file's rows while typing: a NUL in their names keeps them apart
from any column of a drop (a header with a NUL in a name is refused by `check_columns`)."""
_IDS: Final = (_ROW, _FILE, _LINE)
"""Columns `type_and_validate_many` adds: the row's position in the group, its file's index
in the group and its record number in that file."""


def type_and_validate(frame: pl.DataFrame, entity: str, *, first_line: int) -> TypedDrop:
    """Type a file's columns and validate its rows against the entity's Pandera model.

    ``first_line`` is the line number of the first data row (2 for a CSV with a header).
    Rows with every cell empty (blank lines) are skipped: neither counted, loaded nor rejected.
    """
    return type_and_validate_many([frame], entity, first_line=first_line)[0]


def type_and_validate_many(
    frames: Sequence[pl.DataFrame], entity: str, *, first_line: int
) -> list[TypedDrop]:
    """`type_and_validate` for files of one entity and the same columns (names, order and
    types), typed and validated together (one Pandera call): each file's outcome is what it
    would be alone."""
    frame = frames[0]
    columns = drop_columns(entity)
    extras = [c for c in frame.columns if c not in columns]
    source = pl.concat(
        [
            f.with_row_index(_LINE).with_columns(pl.lit(i, dtype=pl.UInt32).alias(_FILE))
            for i, f in enumerate(frames)
        ],
        how="vertical",
    ).with_row_index(_ROW)
    if frame.width:
        # A blank line, or one of commas only, reads as a row of nulls.
        source = source.filter(~pl.all_horizontal(pl.exclude(_IDS).is_null()))
    typed_columns = [source.get_column(c) for c in _IDS]
    parse_errors = []
    for name, dtype in columns.items():
        if name not in frame.columns:
            typed_columns.append(
                pl.repeat(None, source.height, dtype=dtype, eager=True).alias(name)
            )
            continue
        values = coerce_column(source.get_column(name), dtype)
        typed_columns.append(values)
        failed = source.select(~_blank(pl.col(name), frame.schema[name])).to_series()
        failed = failed & values.is_null()
        if failed.any():
            # Text that could not be parsed at all: one failure per cell, with the value.
            parse_errors.append(
                source.filter(failed).select(
                    _ROW,
                    pl.lit(name).alias("column_name"),
                    (
                        pl.lit(f"not a valid {_type_name(dtype)}: ")
                        + pl.col(name).cast(pl.String).str.slice(0, 80)
                    ).alias("reason"),
                )
            )
    typed = pl.DataFrame(typed_columns)
    # Rule failures (required, allowed values, ranges, cross-field) from the Pandera model,
    # collected lazily: every failure of every row at once.
    rule_errors = _pandera_failures(typed, entity)
    failures = pl.concat([*parse_errors, rule_errors], how="vertical_relaxed").unique(
        [_ROW, "column_name"], keep="first", maintain_order=True
    )
    bad_rows = failures.get_column(_ROW).unique().implode()
    line = pl.col(_LINE).cast(pl.Int64) + first_line
    # The row as it was read, to fix and re-drop: built for rejected rows only.
    raw_records = source.filter(pl.col(_ROW).is_in(bad_rows)).select(
        _ROW,
        _FILE,
        _LINE,
        pl.struct(pl.exclude(_IDS).cast(pl.String)).struct.json_encode().alias("raw_record"),
    )
    rejected = (
        failures.join(raw_records, on=_ROW)
        .sort(_ROW, "column_name")
        .select(_FILE, line.alias("line_number"), "column_name", "reason", "raw_record")
    )
    # Unknown columns ride along as one JSON object per row.
    extra = (
        pl.struct([pl.col(c).cast(pl.String) for c in extras]).struct.json_encode()
        if extras
        else pl.lit(None, dtype=pl.String)
    )
    keep = ~pl.col(_ROW).is_in(bad_rows)
    extra_column = source.select(_ROW, extra.alias("extra_columns")).get_column("extra_columns")
    valid = typed.with_columns(extra_column).filter(keep)
    valid = valid.select(pl.exclude(_IDS), line.alias("source_line"), _FILE)
    # Rows stay in file order, so each file's rows are one slice of the group's.
    read, loaded, bad = (_rows_per_file(f, len(frames)) for f in (source, valid, rejected))
    out = []
    at_valid = at_bad = 0
    for n_read, n_valid, n_bad in zip(read, loaded, bad, strict=True):
        out.append(
            TypedDrop(
                valid=valid.slice(at_valid, n_valid).drop(_FILE),
                rejected=rejected.slice(at_bad, n_bad).drop(_FILE),
                rows_read=n_read,
            )
        )
        at_valid += n_valid
        at_bad += n_bad
    return out


def _rows_per_file(frame: pl.DataFrame, files: int) -> list[int]:
    """How many rows of ``frame`` each of ``files`` files has (by ``_file``)."""
    counts = dict(frame.get_column(_FILE).value_counts().iter_rows())
    return [counts.get(i, 0) for i in range(files)]


def _type_name(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "timestamp (ISO 8601, years 1900-2199)"
    if dtype == pl.Boolean:
        return "boolean (true/false, 1/0, t/f)"
    if dtype == pl.Int64:
        return "whole number"
    if dtype == pl.Float64:
        return "number"
    return str(dtype)


def _pandera_failures(typed: pl.DataFrame, entity: str) -> pl.DataFrame:
    """Every rule failure of the entity's model: ``_row``, ``column_name``, ``reason``."""
    model = DROP_MODELS[entity]
    empty = pl.DataFrame(schema={_ROW: pl.UInt32, "column_name": pl.String, "reason": pl.String})
    try:
        model.validate(typed.drop(_IDS), lazy=True)
        return empty
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    except pa.errors.SchemaError as exc:  # pragma: no cover - lazy mode raises SchemaErrors
        raise FileRejected(f"schema error: {_one_line(exc)}") from exc
    if cases.height == 0 or "index" not in cases.columns:
        return empty
    if cases.get_column("index").null_count() == cases.height:
        # A failure that is not about rows (e.g. a column type): the file as a whole.
        raise FileRejected(
            "schema error: " + "; ".join(cases.get_column("check").cast(pl.String).unique())
        )
    cases = cases.drop_nulls("index")
    # Pandera reports positions in the validated frame; map them back to the file's rows.
    rows = typed.get_column(_ROW).gather(cases.get_column("index").cast(pl.UInt32))
    check = pl.col("check").cast(pl.String)
    value = pl.col("failure_case").cast(pl.String).str.slice(0, 80)
    reason = (
        pl.when(check.is_in(["not_nullable", "str_length(1, None)"]))
        .then(pl.lit("required value is missing"))
        .when(check.str.starts_with("isin("))
        .then(
            pl.format(
                "value '{}' not allowed; expected one of {}",
                value,
                check.str.strip_prefix("isin(").str.replace_all(r"[()' ]", ""),
            )
        )
        .when(check.str.starts_with("greater_than_or_equal_to("))
        .then(
            pl.format(
                "must be >= {} (got {})",
                check.str.strip_prefix("greater_than_or_equal_to(").str.strip_suffix(")"),
                value,
            )
        )
        .otherwise(check)
    )
    return cases.select(
        rows.alias(_ROW),
        pl.when(pl.col("column") == model.__name__)
        .then(pl.lit("completed_time"))  # the models' only cross-field rule is on it
        .otherwise(pl.col("column"))
        .alias("column_name"),
        reason.alias("reason"),
    )


def touched_range(entity: str, valid: pl.DataFrame) -> tuple[datetime | None, datetime | None]:
    """The earliest and latest scheduled time among a load's rows (None for tutors)."""
    column = TOUCHED_TIME_COLUMN.get(entity)
    if column is None or valid.height == 0:
        return None, None
    values = valid.get_column(column)
    low, high = values.min(), values.max()
    assert low is None or isinstance(low, datetime)
    assert high is None or isinstance(high, datetime)
    return low, high


# Loading, archiving, quarantining


def _fail(rows: int) -> None:
    raise InjectedFailure(f"injected failure after {rows} rows")


def load_drop(
    con: duckdb.DuckDBPyConnection,
    drop: Drop,
    digest: str,
    typed: TypedDrop,
    *,
    fail_after_rows: int | None = None,
) -> int:
    """Load one typed file in a single transaction; return its load id.

    ``fail_after_rows`` fails after inserting that many rows, inside the transaction (tests of
    atomicity).
    """
    return load_drops(con, [(drop, digest, typed)], fail_after_rows=fail_after_rows)[0]


LEDGER_SCHEMA: Final[dict[str, pl.DataType]] = {
    "file_hash": pl.String(),
    "load_id": pl.Int64(),
    "entity": pl.String(),
    "file_name": pl.String(),
    "loaded_at": pl.Datetime("us", "UTC"),
    "rows_read": pl.Int64(),
    "rows_loaded": pl.Int64(),
    "rows_rejected": pl.Int64(),
    "min_scheduled_time": pl.Datetime("us", "UTC"),
    "max_scheduled_time": pl.Datetime("us", "UTC"),
}
"""Columns of ``loaded_files`` a load writes."""


def _tagged(frames: Sequence[pl.DataFrame], per_file: pl.DataFrame) -> pl.DataFrame:
    """Files' rows one after another, each row with its file's columns of ``per_file`` (one
    row per file, in the same order)."""
    heights = pl.Series("_n", [f.height for f in frames], dtype=pl.Int64)
    tags = (
        per_file.with_columns(heights)
        .filter(pl.col("_n") > 0)  # an empty list would explode into a row of nulls
        .select(pl.exclude("_n").repeat_by(pl.col("_n")))
        .explode(per_file.columns)
    )
    return pl.concat(frames, how="vertical").hstack(tags)


def load_drops(
    con: duckdb.DuckDBPyConnection,
    files: Sequence[tuple[Drop, str, TypedDrop]],
    *,
    fail_after_rows: int | None = None,
) -> list[int]:
    """Load typed files, in order, in a single transaction; return their load ids.

    Each file gets what a load of its own would give: a load id (in the files' order), its
    rows and rejected rows under that id and its name, and its ``loaded_files`` entry.
    ``fail_after_rows`` fails after inserting that many rows, inside the transaction (tests of
    atomicity).
    """
    drops = [drop for drop, _, _ in files]
    names = [drop.path.name for drop in drops]
    entities = [drop.entity for drop in drops]
    assert None not in entities
    loaded_at = datetime.now(UTC)
    con.execute("BEGIN TRANSACTION")
    try:
        ids = [
            int(row[0])
            for row in con.execute(
                load_sql("load_ids_next_select"), {"files": len(files)}
            ).fetchall()
        ]
        tags = pl.DataFrame(
            {"load_id": ids, "source_file": names, "entity": entities},
            schema={"load_id": pl.Int64, "source_file": pl.String, "entity": pl.String},
        )
        rejected = _tagged([typed.rejected for _, _, typed in files], tags).select(
            "load_id", "entity", "source_file", "line_number", "column_name", "reason", "raw_record"
        )
        ranges = [touched_range(drop.entity or "", typed.valid) for drop, _, typed in files]
        ledger = pl.DataFrame(
            [
                (
                    digest,
                    load_id,
                    drop.entity,
                    drop.path.name,
                    loaded_at,
                    typed.rows_read,
                    typed.valid.height,
                    typed.rows_rejected,
                    low,
                    high,
                )
                for (drop, digest, typed), load_id, (low, high) in zip(
                    files, ids, ranges, strict=True
                )
            ],
            schema=LEDGER_SCHEMA,
            orient="row",
        )
        inserted = 0
        for entity in dict.fromkeys(entities):
            assert entity is not None
            mine = [i for i, e in enumerate(entities) if e == entity]
            valid = _tagged(
                [files[i][2].valid for i in mine], tags[mine].select("load_id", "source_file")
            ).select(list(raw_frame_schema(entity)))
            if fail_after_rows is not None:
                valid = valid.head(max(0, fail_after_rows - inserted))
            con.register("incoming_rows", valid)
            # The table name comes from a closed set (raw_table), never from input.
            con.execute(f"INSERT INTO {raw_table(entity)} BY NAME SELECT * FROM incoming_rows")  # noqa: S608
            con.unregister("incoming_rows")
            inserted += valid.height
        if fail_after_rows is not None:
            _fail(fail_after_rows)
        con.register("incoming_rejects", rejected)
        con.execute("INSERT INTO rejected_rows BY NAME SELECT * FROM incoming_rejects")
        con.register("incoming_files", ledger)
        con.execute(load_sql("loaded_files_batch_insert"))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for name in ("incoming_rows", "incoming_rejects", "incoming_files"):
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)
    return ids


def _free_name(folder: Path, name: str, digest: str) -> Path:
    """``folder/name``, or with (part of) the hash before the suffix when that name is taken."""
    target = folder / name
    stem, dot, suffix = name.partition(".")
    n = 0
    while target.exists() or target.is_symlink():
        n += 1
        tag = digest[:12] if n == 1 else f"{digest[:12]}-{n}"
        target = folder / f"{stem}.{tag}{dot}{suffix}"
    return target


def destination(folder: Path, path: Path, digest: str) -> Path:
    """Where a landing file will go in ``folder`` (created if need be): a name not taken."""
    folder.mkdir(parents=True, exist_ok=True)
    return _free_name(folder, path.name, digest)


def move_file(path: Path, folder: Path, digest: str, *, target: Path | None = None) -> Path:
    """Move a landing file (a link as a link) into ``folder`` without overwriting anything
    (to ``target``, its `destination` chosen before, when given)."""
    if target is None:
        target = destination(folder, path, digest)
    shutil.move(str(path), target)
    return target


def beside(target: Path, suffix: str) -> Path:
    """The path of a sidecar of ``target`` (its reason, its rejected rows)."""
    return target.with_name(target.name + suffix)


def one_line(text: str) -> str:
    """Text that stays on one line wherever it is written (a reason from a file's own header
    names could otherwise add lines to a sidecar, a log or a report)."""
    return " ".join(text.split())


def write_file(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write a text file whole or not at all, never through a link at ``path``.

    The text goes to a new temporary file beside it, created exclusively (so a link planted
    in the folder is never followed), that then replaces ``path`` (a link there included).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, SIDECAR_MODE)
        with open(fd, "w", newline="", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def neutralize_formula(value: str) -> str:
    """A cell that a spreadsheet would run as a formula, made inert."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_safe_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV a person may open in a spreadsheet (every cell formula-neutralized), whole
    or not at all."""

    def write(fh: TextIO) -> None:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else neutralize_formula(str(v)) for v in row])

    write_file(path, write)


def write_rejected_csv(con: duckdb.DuckDBPyConnection, load_id: int, target: Path) -> None:
    """Write a load's rejected rows beside its archived file."""
    rows = con.execute(load_sql("rejected_rows_select"), {"load_id": load_id}).fetchall()
    if rows:
        write_safe_csv(target, ("line_number", "column", "reason", "record"), rows)


def _quarantine(
    con: duckdb.DuckDBPyConnection, drop: Drop, digest: str, reason: str, quarantine_dir: Path
) -> FileResult:
    now = datetime.now(UTC)
    reason = one_line(reason)
    target = destination(quarantine_dir, drop.path, digest)
    # The reason first: a crash in between leaves a reason without its file, never the reverse.
    sidecar = (
        f"file: {one_line(drop.path.name)}\nsha256: {digest}\n"
        f"quarantined_at: {now.isoformat()}\nreason: {reason}\n"
        "Fix the file and drop it into the landing folder again.\n"
    )
    write_file(beside(target, REASON_SUFFIX), lambda fh: fh.write(sidecar))
    move_file(drop.path, quarantine_dir, digest, target=target)
    con.execute(
        load_sql("quarantined_files_insert"),
        {"file_hash": digest, "file_name": drop.path.name, "at": now, "reason": reason},
    )
    log.warning("quarantined %s: %s", drop.path.name, reason)
    return FileResult(
        file_name=drop.path.name,
        entity=drop.entity,
        file_hash=digest,
        outcome="quarantined",
        reason=reason,
        moved_to=target,
    )


def _duplicate(
    con: duckdb.DuckDBPyConnection,
    drop: Drop,
    digest: str,
    already: tuple[Any, ...],
    archive_dir: Path,
) -> FileResult:
    """Archive a file whose bytes were loaded before (a re-drop, or a crash after commit)."""
    load_id, first_name, loaded_at = already
    path = drop.path
    target = destination(archive_dir, path, digest)
    reason = one_line(
        f"same bytes as {first_name}, loaded as load {load_id} at {loaded_at:%Y-%m-%d %H:%M} UTC"
    )
    # The sidecar first, as for a load: a crash in between leaves the file in landing, and
    # the next run writes it again.
    if first_name == path.name and target.name == path.name:
        # The load committed but its file never reached the archive (a crash in between):
        # finish the job as the load would have.
        write_rejected_csv(con, load_id, beside(target, REJECTED_SUFFIX))
    else:
        note = f"nothing loaded: {reason}\n"
        write_file(beside(target, REASON_SUFFIX), lambda fh: fh.write(note))
    moved = move_file(path, archive_dir, digest, target=target)
    log.info("%s: nothing new, %s", path.name, reason)
    return FileResult(path.name, drop.entity, digest, "duplicate", reason=reason, moved_to=moved)


@dataclass(frozen=True)
class PreparedFile:
    """A landing file read, hashed, typed and validated, not yet loaded (`prepare_file`)."""

    path: Path
    drop: Drop
    digest: str = ""
    typed: TypedDrop | None = None
    rejected: str | None = None  # why nothing of the file can be loaded
    link_target: str | None = None  # a symbolic link: quarantined as it is, never read
    gone: bool = False  # no longer in the landing folder
    load_id: int | None = None  # loaded with its batch (`ingest_landing`), not yet archived


UNREADABLE: Final = (
    pl.exceptions.PolarsError,
    pl.exceptions.PanicException,  # a Polars bug met by odd input (a BaseException)
    pa.errors.SchemaError,
    pa.errors.SchemaErrors,
    ValueError,  # decoding errors (UnicodeDecodeError) among them
    ArithmeticError,
    EOFError,
    csv.Error,
    zlib.error,
)
"""Errors that reading or typing a file's bytes may raise: the file is quarantined with them."""


def prepare_file(path: Path) -> PreparedFile:
    """Everything of a file's ingest that needs no warehouse: read it once (the bytes hashed
    are the bytes loaded, even if the file changes meanwhile), type and validate its rows.
    Runs ahead of loading in `ingest_landing`, on another core."""
    ready, frame = _read_file(path)
    return ready if frame is None else _validated(ready, frame)


def prepare_files(paths: Sequence[Path], *, max_rows: int) -> list[PreparedFile]:
    """`prepare_file` for the first of ``paths`` (at least one, and no more once ``max_rows``
    rows are read), in order: files of one entity and column layout are typed and validated
    together (one Pandera call), each ending as it would alone."""
    read: list[tuple[PreparedFile, pl.DataFrame | None]] = []
    rows = 0
    for path in paths:
        if rows >= max_rows:
            break
        ready, frame = _read_file(path)
        read.append((ready, frame))
        rows += 0 if frame is None else frame.height
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (ready, frame) in enumerate(read):
        if frame is not None:
            key = (ready.drop.entity, ready.drop.fmt, tuple(frame.schema.items()))
            groups.setdefault(key, []).append(i)
    out = [ready for ready, _ in read]
    for members in groups.values():
        frames = [frame for i in members if (frame := read[i][1]) is not None]
        typed = _validated_together(frames, out[members[0]].drop)
        for pos, i in enumerate(members):
            out[i] = (
                _validated(out[i], frames[pos]) if typed is None else _checked(out[i], typed[pos])
            )
    return out


def _validated_together(frames: Sequence[pl.DataFrame], drop: Drop) -> list[TypedDrop] | None:
    """`type_and_validate_many` on a group of files; None when the group is one file, or
    fails as a whole (each file is then validated alone, so that a file breaking typing is
    quarantined alone and the others load)."""
    if len(frames) < 2 or drop.entity is None:
        return None
    try:
        return type_and_validate_many(frames, drop.entity, first_line=_first_line(drop))
    except (Exception, pl.exceptions.PanicException) as exc:
        log.info("validating %d %s files one by one: %s", len(frames), drop.entity, exc)
        return None


def _first_line(drop: Drop) -> int:
    """The line number of a file's first data row (a CSV's first line is its header)."""
    return 2 if drop.fmt == "csv" else 1


def _read_file(path: Path) -> tuple[PreparedFile, pl.DataFrame | None]:
    """A file read, hashed and its columns checked; its frame is None when it ends here
    (a link, gone, or rejected)."""
    drop = classify(path)
    if path.is_symlink():
        return PreparedFile(path, drop, link_target=os.readlink(path)), None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return PreparedFile(path, drop, gone=True), None
    digest = hashlib.sha256(data).hexdigest()
    ready = PreparedFile(path, drop, digest)
    try:
        if drop.entity is None:
            raise FileRejected(
                "the file name does not start with an entity: "
                + ", ".join(f"{e}*" for e in DROP_MODELS)
            )
        if drop.fmt is None:
            raise FileRejected("unsupported extension; expected one of " + ", ".join(FORMATS))
        frame = read_drop(drop, data)
        del data
        check_columns(frame, drop.entity, fmt=drop.fmt)
    except FileRejected as exc:
        return replace(ready, rejected=str(exc)), None
    except UNREADABLE as exc:
        return _unreadable(ready, exc), None
    return ready, frame


def _validated(ready: PreparedFile, frame: pl.DataFrame) -> PreparedFile:
    """A read file typed and validated on its own."""
    assert ready.drop.entity is not None
    try:
        typed = type_and_validate(frame, ready.drop.entity, first_line=_first_line(ready.drop))
    except FileRejected as exc:
        return replace(ready, rejected=str(exc))
    except UNREADABLE as exc:
        return _unreadable(ready, exc)
    return _checked(ready, typed)


def _checked(ready: PreparedFile, typed: TypedDrop) -> PreparedFile:
    """A validated file, rejected whole when none of its rows is loadable."""
    if typed.valid.height > 0:
        return replace(ready, typed=typed)
    if typed.rows_read == 0:
        return replace(ready, rejected="the file has no rows (only blank lines)")
    first = typed.rejected.row(0, named=True)
    return replace(
        ready,
        rejected=f"every one of {typed.rows_read} rows is invalid (e.g. line "
        f"{first['line_number']}, {first['column_name']}: {first['reason']})",
    )


def _unreadable(ready: PreparedFile, exc: BaseException) -> PreparedFile:
    # A file that breaks reading or typing in a way not foreseen: quarantined with the
    # error, never left in landing to fail every later run (a poison pill).
    log.warning("cannot read %s", ready.path.name, exc_info=True)
    why = f"cannot read or validate the file ({type(exc).__name__}: {_one_line(exc)})"
    return replace(ready, rejected=why)


def ingest_file(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    *,
    archive_dir: Path,
    quarantine_dir: Path,
    fail_after_rows: int | None = None,
    prepared: PreparedFile | None = None,
) -> FileResult:
    """Load one landing file (or recognise it as loaded already) and move it out of landing.

    A symbolic link is quarantined as it is: its target is never opened. ``prepared`` is the
    file's `prepare_file`, when it was done ahead (with its ``load_id`` when its batch loaded
    it: the file is then archived only).
    """
    ready = prepared if prepared is not None and prepared.path == path else prepare_file(path)
    drop = ready.drop
    if ready.load_id is not None:
        return _archive_loaded(con, ready, ready.load_id, archive_dir)
    if ready.link_target is not None:
        link = ready.link_target
        digest = hashlib.sha256(os.fsencode(link)).hexdigest()
        reason = f"a symbolic link (to {link}); only regular files are ingested, never read"
        return _quarantine(con, drop, digest, reason, quarantine_dir)
    if ready.gone:
        reason = "no longer in the landing folder (ingested or moved by another run)"
        log.warning("skipped %s: %s", path.name, reason)
        return FileResult(path.name, drop.entity, "", "skipped", reason=reason)
    digest = ready.digest
    already = fetch_one(con, load_sql("loaded_files_by_hash_select"), [digest])
    if already is not None:
        return _duplicate(con, drop, digest, already, archive_dir)
    if ready.rejected is not None:
        return _quarantine(con, drop, digest, ready.rejected, quarantine_dir)
    assert ready.typed is not None
    load_id = load_drop(con, drop, digest, ready.typed, fail_after_rows=fail_after_rows)
    return _archive_loaded(con, ready, load_id, archive_dir)


def _archive_loaded(
    con: duckdb.DuckDBPyConnection, ready: PreparedFile, load_id: int, archive_dir: Path
) -> FileResult:
    """Move a loaded file to the archive, its rejected rows (if any) in a CSV beside it."""
    path, drop, digest, typed = ready.path, ready.drop, ready.digest, ready.typed
    assert typed is not None
    target = destination(archive_dir, path, digest)
    if typed.rows_rejected:
        # Before the move: a crash in between leaves the file in landing, and the next run
        # (which finds it loaded) writes the CSV again. Once moved, no run revisits it.
        write_rejected_csv(con, load_id, beside(target, REJECTED_SUFFIX))
    moved = move_file(path, archive_dir, digest, target=target)
    result = FileResult(
        file_name=path.name,
        entity=drop.entity,
        file_hash=digest,
        outcome="loaded",
        rows_read=typed.rows_read,
        rows_loaded=typed.valid.height,
        rows_rejected=typed.rows_rejected,
        load_id=load_id,
        moved_to=moved,
    )
    log.info("loaded %s: %d rows, %d rejected", path.name, result.rows_loaded, result.rows_rejected)
    return result


def ingest_landing(
    con: duckdb.DuckDBPyConnection,
    landing_dir: Path,
    *,
    archive_dir: Path,
    quarantine_dir: Path,
    paths: Sequence[Path] | None = None,
    min_age_s: float = 0.0,
) -> IngestReport:
    """Ingest every file waiting in the landing folder (or just ``paths``), oldest first.

    A requested path outside the landing folder (or gone, or still being written) is skipped
    with its reason in the report, and never touched.
    """
    report = IngestReport()
    if paths is None:
        todo = list_landing(landing_dir, min_age_s=min_age_s)
    else:
        todo = []
        for p in paths:
            problem = check_landing_path(p, landing_dir)
            if problem is None:
                todo.append(p if p.is_absolute() else landing_dir / p)
            else:
                log.warning("skipped %s: %s", p, problem)
                report.files.append(
                    FileResult(p.name, classify(p).entity, "", "skipped", reason=problem)
                )
        todo.sort(key=_drop_order)
        todo = list(dict.fromkeys(todo))  # a path asked for twice is one file
    with _checkpoints_deferred(con, len(todo)):
        if len(todo) >= BATCH_MIN_FILES:
            report.files.extend(
                _ingest_batches(con, todo, archive_dir=archive_dir, quarantine_dir=quarantine_dir)
            )
        else:
            report.files.extend(
                _ingest_one_by_one(
                    con, todo, archive_dir=archive_dir, quarantine_dir=quarantine_dir
                )
            )
    # Once per pass, not per file: merging is a join against every current row.
    if report.count("loaded"):
        refresh_current(con)
    return report


def _ingest_one_by_one(
    con: duckdb.DuckDBPyConnection, todo: Sequence[Path], *, archive_dir: Path, quarantine_dir: Path
) -> list[FileResult]:
    """Ingest files in order, each loaded in a transaction of its own."""
    # The next file is read and validated (Polars, Pandera) on another thread while this one
    # loads (DuckDB): the two overlap on two cores. Files still load one at a time, in order,
    # and a loaded file is not kept in memory.
    with closing(one_ahead(map(prepare_file, todo), "prepare")) as prepared_files:
        return [
            ingest_file(
                con, path, archive_dir=archive_dir, quarantine_dir=quarantine_dir, prepared=prepared
            )
            for path, prepared in zip(todo, prepared_files, strict=True)
        ]


def _ingest_batches(
    con: duckdb.DuckDBPyConnection, todo: Sequence[Path], *, archive_dir: Path, quarantine_dir: Path
) -> list[FileResult]:
    """Ingest files in order, in batches of consecutive files (`BATCH_MAX_FILES`,
    `BATCH_MAX_ROWS`), each batch's loadable files loaded in one transaction."""

    def prepared_batches() -> Iterator[list[PreparedFile]]:
        start = 0
        while start < len(todo):
            batch = prepare_files(todo[start : start + BATCH_MAX_FILES], max_rows=BATCH_MAX_ROWS)
            start += len(batch)  # at least one file
            yield batch

    # The next batch is read and validated while this one loads, as one by one.
    results: list[FileResult] = []
    with closing(one_ahead(prepared_batches(), "prepare")) as batches:
        for batch in batches:
            results.extend(
                _ingest_batch(con, batch, archive_dir=archive_dir, quarantine_dir=quarantine_dir)
            )
            del batch  # not kept while the next one loads
    return results


def _ingest_batch(
    con: duckdb.DuckDBPyConnection,
    batch: Sequence[PreparedFile],
    *,
    archive_dir: Path,
    quarantine_dir: Path,
) -> list[FileResult]:
    """Load a batch's loadable files in one transaction, then archive, quarantine or skip
    each of its files in order, as `ingest_file` does one file."""
    hashes = [p.digest for p in batch if p.typed is not None]
    seen = {
        row[0]
        for row in con.execute(
            load_sql("loaded_files_by_hashes_select"), {"hashes": hashes}
        ).fetchall()
    }
    loadable: list[tuple[PreparedFile, TypedDrop]] = []
    for p in batch:
        # A second copy of bytes in the batch is a duplicate of the first, once it is loaded.
        if p.typed is not None and p.digest not in seen:
            seen.add(p.digest)
            loadable.append((p, p.typed))
    ids = load_drops(con, [(p.drop, p.digest, t) for p, t in loadable]) if loadable else []
    loaded = {p.path: replace(p, load_id=i) for (p, _), i in zip(loadable, ids, strict=True)}
    # After the commit: duplicates (of this batch's loads too) and quarantines are recorded
    # outside its transaction, and a crash before a move leaves that file to the next run.
    return [
        ingest_file(
            con,
            p.path,
            archive_dir=archive_dir,
            quarantine_dir=quarantine_dir,
            prepared=loaded.get(p.path, p),
        )
        for p in batch
    ]


@contextlib.contextmanager
def _checkpoints_deferred(con: duckdb.DuckDBPyConnection, files: int) -> Iterator[None]:
    """For a pass of many files: no automatic checkpoint between them (by default DuckDB
    checkpoints every 16 MB of WAL, rewriting storage every few files), one at the end."""
    if files < DEFER_CHECKPOINTS_FILES:
        yield
        return
    con.execute("SET checkpoint_threshold = $threshold", {"threshold": PASS_CHECKPOINT_THRESHOLD})
    try:
        yield
    finally:
        con.execute("RESET checkpoint_threshold")
        with contextlib.suppress(duckdb.Error):  # closing the warehouse checkpoints too
            con.execute("CHECKPOINT")


def _drop_order(path: Path) -> tuple[int, str]:
    try:
        return path.lstat().st_mtime_ns, path.name
    except FileNotFoundError:
        return 0, path.name
