"""Landing drops -> warehouse: read, type, validate and load each file exactly once.

A file is identified by the sha256 of its bytes. Each file loads in one DuckDB transaction
(its valid rows, its rejected rows and its ``loaded_files`` entry together), then moves to the
archive; a file with nothing loadable moves to quarantine with a ``.reason.txt`` sidecar.
Nothing in the landing folder is ever deleted.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import duckdb
import pandera.polars as pa
import polars as pl

from tutor_scoring_dagster.schemas import DROP_MODELS, drop_columns, required_columns
from tutor_scoring_dagster.warehouse import fetch_one, raw_frame_schema, raw_table

log = logging.getLogger(__name__)

FORMATS: Final = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet"}
IN_PROGRESS_SUFFIXES: Final = (".tmp", ".part", ".partial", ".crdownload")
REJECTED_SUFFIX: Final = ".rejected.csv"
REASON_SUFFIX: Final = ".reason.txt"

Outcome = Literal["loaded", "quarantined", "duplicate"]


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
    file_hash: str
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


def list_landing(landing_dir: Path) -> list[Path]:
    """Candidate files in the landing folder (not subfolders), oldest first."""
    if not landing_dir.is_dir():
        return []
    paths = [p for p in landing_dir.iterdir() if p.is_file() and not is_in_progress(p)]
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes: a drop's identity."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Reading and typing


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
    with_offset = norm.str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_unit="us", time_zone="UTC"
    )
    naive = pl.coalesce(
        norm.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", strict=False, time_unit="us"),
        norm.str.to_datetime("%Y-%m-%dT%H:%M", strict=False, time_unit="us"),
        norm.str.to_datetime("%Y-%m-%d", strict=False, time_unit="us"),
    ).dt.replace_time_zone("UTC")
    return pl.when(norm.str.contains(_OFFSET_RE)).then(with_offset).otherwise(naive)


def _parse_text(text: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.String:
        return text
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
        return pl.lit(None, dtype=dtype)
    if dtype == pl.Int64 and source.is_float():
        return pl.when(col == col.floor()).then(col.cast(pl.Int64, strict=False))
    return col.cast(dtype, strict=False)


def read_drop(con: duckdb.DuckDBPyConnection, drop: Drop) -> pl.DataFrame:
    """Read a landing file with DuckDB's readers; CSV cells stay text until typed."""
    path = str(drop.path)
    try:
        if drop.fmt == "csv":
            rel = con.read_csv(
                path,
                header=True,
                all_varchar=True,
                sep=",",
                quotechar='"',
                escapechar='"',
                encoding="utf-8",
                strict_mode=True,
                null_padding=False,
            )
        else:
            rel = con.read_parquet(path)
        frame = rel.pl()
    except (duckdb.Error, OSError, pl.exceptions.PolarsError) as exc:
        raise FileRejected(f"cannot read the file as {drop.fmt}: {_one_line(exc)}") from exc
    return frame.rename({c: c.strip().lstrip("\ufeff") for c in frame.columns})


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500]


def check_columns(frame: pl.DataFrame, entity: str) -> None:
    """Reject a file without rows or without a required column."""
    missing = [c for c in required_columns(entity) if c not in frame.columns]
    if missing:
        hint = ""
        if len(frame.columns) == 1 and re.search(r"[;\t|]", frame.columns[0]):
            hint = " (the header has one column: is the file comma-separated?)"
        raise FileRejected(
            f"missing required column(s) {', '.join(missing)}; found "
            f"{', '.join(frame.columns) or 'no columns'}{hint}"
        )
    if frame.height == 0:
        raise FileRejected("the file has a header but no rows")


@dataclass(frozen=True)
class TypedDrop:
    """A file's rows typed to the contract, split into loadable and rejected."""

    valid: pl.DataFrame  # raw_<entity> columns
    rejected: pl.DataFrame  # line_number, column_name, reason, raw_record
    rows_read: int


def type_and_validate(frame: pl.DataFrame, entity: str, *, first_line: int) -> TypedDrop:
    """Type a file's columns and validate its rows against the entity's Pandera model.

    ``first_line`` is the line number of the first data row (2 for a CSV with a header).
    """
    columns = drop_columns(entity)
    extras = [c for c in frame.columns if c not in columns]
    source = frame.with_row_index("_row")
    typed_exprs = []
    parse_failures = []
    for name, dtype in columns.items():
        if name not in frame.columns:
            typed_exprs.append(pl.lit(None, dtype=dtype).alias(name))
            continue
        src_type = frame.schema[name]
        expr = _coerce_typed(pl.col(name), src_type, dtype).alias(name)
        typed_exprs.append(expr)
        present = pl.col(name).is_not_null()
        if src_type == pl.String:
            present = present & (pl.col(name).str.strip_chars() != "")
        parse_failures.append(
            pl.when(present & expr.is_null())
            .then(pl.lit(f"not a valid {_type_name(dtype)}"))
            .alias(name)
        )
    raw_record = pl.struct(pl.all().exclude("_row").cast(pl.String)).struct.json_encode()
    extra_expr = (
        pl.struct([pl.col(c).cast(pl.String) for c in extras]).struct.json_encode()
        if extras
        else pl.lit(None, dtype=pl.String)
    )
    typed = source.select(
        pl.col("_row"),
        *typed_exprs,
        extra_expr.alias("extra_columns"),
        raw_record.alias("_raw_record"),
        *[f.name.suffix("__parse") for f in parse_failures],
    )
    # Text that could not be parsed at all: one failure per cell.
    parse_cols = [c for c in typed.columns if c.endswith("__parse")]
    parse_errors = (
        typed.select("_row", *parse_cols)
        .unpivot(index="_row", variable_name="column_name", value_name="reason")
        .drop_nulls("reason")
        .with_columns(pl.col("column_name").str.strip_suffix("__parse"))
    )
    if parse_errors.height:
        failed_values = source.select(
            "_row", *[pl.col(c).cast(pl.String) for c in columns if c in frame.columns]
        ).unpivot(index="_row", variable_name="column_name", value_name="value")
        parse_errors = parse_errors.join(failed_values, on=["_row", "column_name"]).select(
            "_row",
            "column_name",
            (pl.col("reason") + pl.lit(": ") + pl.col("value").str.slice(0, 80)).alias("reason"),
        )
    typed = typed.drop(parse_cols)
    # Rule failures (required, allowed values, ranges, cross-field) from the Pandera model,
    # collected lazily: every failure of every row at once.
    rule_errors = _pandera_failures(typed.drop("extra_columns", "_raw_record"), entity)
    failures = pl.concat([parse_errors, rule_errors], how="vertical_relaxed").unique(
        ["_row", "column_name"], keep="first", maintain_order=True
    )
    bad_rows = failures.get_column("_row").unique()
    valid = typed.filter(~pl.col("_row").is_in(bad_rows.implode()))
    rejected = (
        failures.join(typed.select("_row", "_raw_record"), on="_row")
        .sort("_row", "column_name")
        .select(
            (pl.col("_row").cast(pl.Int64) + first_line).alias("line_number"),
            "column_name",
            "reason",
            pl.col("_raw_record").alias("raw_record"),
        )
    )
    valid = valid.with_columns(
        (pl.col("_row").cast(pl.Int64) + first_line).alias("source_line")
    ).drop("_row", "_raw_record")
    return TypedDrop(valid=valid, rejected=rejected, rows_read=frame.height)


def _type_name(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "timestamp (ISO 8601)"
    if dtype == pl.Boolean:
        return "boolean (true/false, 1/0, t/f)"
    if dtype == pl.Int64:
        return "whole number"
    if dtype == pl.Float64:
        return "number"
    return str(dtype)


# Pandera's names for a check -> the reason a person reads.
_CHECK_REASONS: Final = {
    "not_nullable": "required value is missing",
    "str_length(1, None)": "required value is missing",
}


def _pandera_failures(typed: pl.DataFrame, entity: str) -> pl.DataFrame:
    model = DROP_MODELS[entity]
    empty = pl.DataFrame(schema={"_row": pl.UInt32, "column_name": pl.String, "reason": pl.String})
    try:
        model.validate(typed.drop("_row"), lazy=True)
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
    model_name = model.__name__
    return cases.select(
        pl.col("index").cast(pl.UInt32).alias("_row"),
        pl.when(pl.col("column") == model_name)
        .then(pl.lit("completed_time"))  # the model's only cross-field rule is on it
        .otherwise(pl.col("column"))
        .alias("column_name"),
        pl.col("check")
        .replace(_CHECK_REASONS)
        .map_elements(_readable_check, return_dtype=pl.String)
        .alias("reason"),
    )


def _readable_check(check: str) -> str:
    if check.startswith("isin("):
        return "value not allowed; expected one of " + check[len("isin(") : -1]
    if check.startswith("greater_than_or_equal_to("):
        return "must be >= " + check[len("greater_than_or_equal_to(") : -1]
    return check


# Loading, archiving, quarantining


def load_drop(
    con: duckdb.DuckDBPyConnection,
    drop: Drop,
    digest: str,
    typed: TypedDrop,
    *,
    fail_after_rows: int | None = None,
) -> int:
    """Load one typed file in a single transaction; return its load id.

    ``fail_after_rows`` raises after inserting that many rows (tests of atomicity).
    """
    assert drop.entity is not None
    table = raw_table(drop.entity)
    order = list(raw_frame_schema(drop.entity))
    con.execute("BEGIN TRANSACTION")
    try:
        row = fetch_one(con, "SELECT nextval('load_ids')")
        assert row is not None
        load_id = int(row[0])  # type: ignore[call-overload]
        valid = typed.valid.with_columns(
            pl.lit(load_id, dtype=pl.Int64).alias("load_id"),
            pl.lit(drop.path.name).alias("source_file"),
        ).select(order)
        rejected = typed.rejected.with_columns(
            pl.lit(load_id, dtype=pl.Int64).alias("load_id"),
            pl.lit(drop.entity).alias("entity"),
            pl.lit(drop.path.name).alias("source_file"),
        ).select(
            "load_id", "entity", "source_file", "line_number", "column_name", "reason", "raw_record"
        )
        if fail_after_rows is not None:
            valid = valid.head(fail_after_rows)
        con.register("incoming_rows", valid)
        con.register("incoming_rejects", rejected)
        # The table name comes from a closed set (raw_table), never from input.
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")  # noqa: S608
        if fail_after_rows is not None:
            raise RuntimeError(f"injected failure after {fail_after_rows} rows")
        con.execute("INSERT INTO rejected_rows BY NAME SELECT * FROM incoming_rejects")
        con.execute(
            "INSERT INTO loaded_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                digest,
                load_id,
                drop.entity,
                drop.path.name,
                datetime.now(UTC),
                typed.rows_read,
                typed.valid.height,
                typed.rejected.get_column("line_number").n_unique(),
            ],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        for name in ("incoming_rows", "incoming_rejects"):
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)
    return load_id


def _free_name(folder: Path, name: str, digest: str) -> Path:
    """``folder/name``, or with the hash before the suffix when another file holds that name."""
    target = folder / name
    if not target.exists():
        return target
    stem, dot, suffix = name.partition(".")
    return folder / f"{stem}.{digest[:12]}{dot}{suffix}"


def move_file(path: Path, folder: Path, digest: str) -> Path:
    """Move a landing file into ``folder`` without overwriting anything."""
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, path.name, digest)
    shutil.move(str(path), target)
    return target


def neutralize_formula(value: str) -> str:
    """A cell that a spreadsheet would run as a formula, made inert."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def write_safe_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV a person may open in a spreadsheet: every cell formula-neutralized."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else neutralize_formula(str(v)) for v in row])
    os.replace(tmp, path)


def write_rejected_csv(con: duckdb.DuckDBPyConnection, load_id: int, target: Path) -> None:
    """Write a load's rejected rows beside its archived file."""
    rows = con.execute(
        "SELECT line_number, column_name, reason, raw_record FROM rejected_rows "
        "WHERE load_id = ? ORDER BY line_number, column_name",
        [load_id],
    ).fetchall()
    if rows:
        write_safe_csv(target, ("line_number", "column", "reason", "record"), rows)


def _quarantine(
    con: duckdb.DuckDBPyConnection, drop: Drop, digest: str, reason: str, quarantine_dir: Path
) -> FileResult:
    moved = move_file(drop.path, quarantine_dir, digest)
    sidecar = moved.with_name(moved.name + REASON_SUFFIX)
    sidecar.write_text(
        f"file: {drop.path.name}\nsha256: {digest}\n"
        f"quarantined_at: {datetime.now(UTC).isoformat()}\nreason: {reason}\n"
        "Fix the file and drop it into the landing folder again.\n",
        encoding="utf-8",
    )
    con.execute(
        "INSERT INTO quarantined_files VALUES (?, ?, ?, ?)",
        [digest, drop.path.name, datetime.now(UTC), reason],
    )
    log.warning("quarantined %s: %s", drop.path.name, reason)
    return FileResult(
        file_name=drop.path.name,
        entity=drop.entity,
        file_hash=digest,
        outcome="quarantined",
        reason=reason,
        moved_to=moved,
    )


def ingest_file(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    *,
    archive_dir: Path,
    quarantine_dir: Path,
) -> FileResult:
    """Load one landing file (or recognise it as loaded already) and move it out of landing."""
    drop = classify(path)
    digest = file_hash(path)
    already = fetch_one(
        con, "SELECT load_id, file_name, loaded_at FROM loaded_files WHERE file_hash = ?", [digest]
    )
    if already is not None:
        # Same bytes as a loaded file (a re-drop, or a crash after commit): load nothing.
        load_id, first_name, loaded_at = already
        moved = move_file(path, archive_dir, digest)
        if first_name == path.name and not moved.with_name(moved.name + REJECTED_SUFFIX).exists():
            write_rejected_csv(con, load_id, moved.with_name(moved.name + REJECTED_SUFFIX))
        reason = (
            f"same bytes as {first_name}, loaded as load {load_id} "
            f"at {loaded_at:%Y-%m-%d %H:%M} UTC"
        )
        if first_name != path.name:
            moved.with_name(moved.name + REASON_SUFFIX).write_text(
                f"nothing loaded: {reason}\n", encoding="utf-8"
            )
        return FileResult(
            path.name, drop.entity, digest, "duplicate", reason=reason, moved_to=moved
        )
    try:
        if drop.entity is None:
            raise FileRejected(
                "the file name does not start with an entity: "
                + ", ".join(f"{e}*" for e in DROP_MODELS)
            )
        if drop.fmt is None:
            raise FileRejected("unsupported extension; expected one of " + ", ".join(FORMATS))
        if path.stat().st_size == 0:
            raise FileRejected("the file is empty (0 bytes)")
        frame = read_drop(con, drop)
        check_columns(frame, drop.entity)
        typed = type_and_validate(frame, drop.entity, first_line=2 if drop.fmt == "csv" else 1)
        if typed.valid.height == 0:
            first = typed.rejected.row(0, named=True)
            raise FileRejected(
                f"every one of {typed.rows_read} rows is invalid (e.g. line "
                f"{first['line_number']}, {first['column_name']}: {first['reason']})"
            )
    except FileRejected as exc:
        return _quarantine(con, drop, digest, str(exc), quarantine_dir)
    load_id = load_drop(con, drop, digest, typed)
    moved = move_file(path, archive_dir, digest)
    write_rejected_csv(con, load_id, moved.with_name(moved.name + REJECTED_SUFFIX))
    result = FileResult(
        file_name=path.name,
        entity=drop.entity,
        file_hash=digest,
        outcome="loaded",
        rows_read=typed.rows_read,
        rows_loaded=typed.valid.height,
        rows_rejected=typed.rejected.get_column("line_number").n_unique(),
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
) -> IngestReport:
    """Ingest every file waiting in the landing folder (or just ``paths``), oldest first."""
    report = IngestReport()
    todo = list_landing(landing_dir) if paths is None else [p for p in paths if p.is_file()]
    for path in todo:
        report.files.append(
            ingest_file(con, path, archive_dir=archive_dir, quarantine_dir=quarantine_dir)
        )
    return report
