"""Run the whole pipeline once in this process and SIGKILL the process at an injected point.

Usage: ``python crash_driver.py POINT NTH`` with the project's environment variables set (the
test passes TUTOR_SCORING_HOME, DATABASE_URL, ...). The process kills itself with SIGKILL the
NTH time execution reaches POINT (no cleanup, no ``finally``, no atexit: a power cut, an OOM
kill). Nothing in the project is edited: internal functions are wrapped at run time only.

Exit status: -9 (killed) when the point was reached; 3 when the run ended without reaching it
(the injection point is wrong, the test must fail); 0/1 never expected.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

POINT, NTH = sys.argv[1], int(sys.argv[2])
_hits = 0


def hit() -> None:
    """Count one arrival at the point; die on the NTH."""
    global _hits
    _hits += 1
    if _hits == NTH:
        sys.stdout.write(f"killing at {POINT} #{NTH}\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class KillingConnection:
    """A DuckDB connection that dies just before running a statement matching ``pattern``."""

    def __init__(self, con: Any, pattern: str) -> None:
        self._con = con
        self._pattern = re.compile(pattern)

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        if self._pattern.search(sql):
            hit()
        return self._con.execute(sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def on_connection(module: Any, name: str, pattern: str) -> None:
    """Wrap ``module.name(con, ...)`` so it runs on a connection that dies at ``pattern``."""
    real = getattr(module, name)

    def wrapped(con: Any, *args: Any, **kwargs: Any) -> Any:
        return real(KillingConnection(con, pattern), *args, **kwargs)

    setattr(module, name, wrapped)


def before(module: Any, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    """Die just before a call of ``module.name`` (for which ``when`` holds)."""
    real = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            hit()
        return real(*args, **kwargs)

    setattr(module, name, wrapped)


def after(module: Any, name: str) -> None:
    """Die just after a call of ``module.name`` returned."""
    real = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        hit()
        return result

    setattr(module, name, wrapped)


def install() -> None:
    from tutor_scoring_dagster import delivery, ingest, reports
    from tutor_scoring_dagster.defs.scores import assets as score_assets
    from tutor_scoring_dagster.paths import load_sql
    from tutor_scoring_dagster.store import publish

    if POINT.startswith("batch-"):
        # A backfill's or a rebuild's pass (ingested in batches of files, one transaction each)
        # on these few drops, in batches of as many files as the test says.
        ingest.BATCH_MIN_FILES = 1
        ingest.BATCH_MAX_FILES = int(os.environ["RELIABILITY_BATCH_FILES"])
    if POINT == "batch-insert":
        # Inside a batch's load transaction: its files' rows inserted, their rejects and
        # loaded_files entries not yet.
        on_connection(ingest, "load_drops", r"^INSERT INTO rejected_rows")
    elif POINT == "batch-archive":
        # A batch committed; its files not all moved out of the landing folder yet.
        before(ingest, "move_file")
    elif POINT == "ingest-insert":
        # Inside a file's load transaction: its rows inserted, its rejects and its
        # loaded_files entry not yet.
        on_connection(ingest, "load_drop", r"^INSERT INTO rejected_rows")
    elif POINT == "ingest-archive":
        # A load committed; its file not yet moved out of the landing folder.
        before(ingest, "move_file")
    elif POINT == "ingest-after-last-file":
        # Every file loaded and archived; whatever the pass does after its files (e.g.
        # refreshing derived tables) not done yet. NTH 0 means the last file.
        global NTH
        if NTH == 0:
            from tutor_scoring_dagster.config import load_settings

            NTH = len(ingest.list_landing(load_settings().landing_dir))
        after(ingest, "ingest_file")
    elif POINT == "ingest-rejected-csv":
        # A load committed; its rejected-rows CSV not yet written (nor, since the CSV goes
        # first, its file archived).
        def has_rejects(con: Any, load_id: int, target: Any) -> bool:
            rows = con.execute(load_sql("rejected_rows_select"), {"load_id": load_id}).fetchall()
            return bool(rows)

        before(ingest, "write_rejected_csv", has_rejects)
    elif POINT == "score-activity":
        # Daily activity: the partition range's rows deleted, new ones not yet inserted.
        on_connection(score_assets, "materialize_daily_activity", r"^INSERT INTO tutor_daily")
    elif POINT == "score-current":
        # The current snapshot (and its drivers): old rows deleted, new ones not yet inserted.
        on_connection(score_assets, "replace_tables", r"^INSERT INTO tutor_scores_current")
    elif POINT == "publish-copy":
        # In the middle of COPY .. FROM STDIN into a staging table, whichever format (CSV or
        # binary) its chunks are in.
        def halved(real: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def chunks(*args: Any) -> Iterator[Any]:
                for chunk in real(*args):
                    half = len(chunk) // 2
                    yield chunk[:half]
                    hit()
                    yield chunk[half:]

            return chunks

        for name in ("_csv_chunks", "_binary_chunks"):
            setattr(publish, name, halved(getattr(publish, name)))
    elif POINT == "publish-merge":
        # In the publish transaction: some tables upserted, the rest not.
        before(publish, "_merge")
    elif POINT == "send-before":
        # A report claimed in the ledger and rendered, not yet handed to the provider.
        before(reports, "send_with_retries")
    elif POINT == "send-after":
        # The provider has the message; the ledger does not know yet.
        after(delivery.OutboxSender, "send")
    else:
        raise SystemExit(f"unknown point {POINT}")


def main() -> int:
    import warnings

    warnings.filterwarnings("ignore")
    install()
    from tutor_scoring_dagster.defs.jobs import run_pipeline

    as_of = datetime.fromisoformat(os.environ["RELIABILITY_AS_OF"]).astimezone(UTC)
    summary = run_pipeline(as_of=as_of, history_days=int(os.environ["RELIABILITY_HISTORY_DAYS"]))
    print(summary.render())
    print(f"never reached {POINT} #{NTH} ({_hits} hits)")
    return 3


if __name__ == "__main__":
    sys.exit(main())
