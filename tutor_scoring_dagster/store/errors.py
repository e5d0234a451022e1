"""One clear line for each way the serving store can be out of reach or out of step."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import make_url

UPGRADE_HINT: Final = "run `tutor-scoring db upgrade`"
BAD_CREDENTIALS: Final = ("password authentication failed", "no password supplied")
_UNKNOWN_ROLE: Final = re.compile(r'role ".*" does not exist')
_NO_TABLE: Final = re.compile(r'no such table|relation ".*" does not exist')
_NO_COLUMN: Final = re.compile(
    r"no such column|has no column named|column \S+ (of relation \S+ )?does not exist"
)


@dataclass(frozen=True)
class StoreProblem:
    """What went wrong with the serving store, what to do, and whether waiting may help."""

    message: str
    retryable: bool


class StoreSchemaError(RuntimeError):
    """The store's schema is not the one this code was written for."""


class SchemaBehindError(StoreSchemaError):
    """The store is at an older migration than this code needs, and upgrading is left to people."""


class SchemaAheadError(StoreSchemaError):
    """The store is at a migration this code does not know: newer code migrated it."""


def safe_url(url: str | sa.URL) -> str:
    """``url`` with its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable DATABASE_URL>"


def missing_sqlite_file(url: str) -> str | None:
    """When ``url`` names a SQLite file that is not there: what to do (a reader must not
    create an empty store, which then reads as one at an unknown migration)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None  # explain() words a bad URL when it is used
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or name in (None, "", ":memory:"):
        return None
    if Path(str(name)).exists():
        return None
    return (
        f"{safe_url(url)} does not exist yet: run the pipeline once (or `tutor-scoring db upgrade`)"
    )


def explain(exc: BaseException, url: str | sa.URL) -> StoreProblem:
    """Turn a driver, SQLAlchemy or schema error into one line for people (never a password)."""
    where = safe_url(url)
    if isinstance(exc, StoreSchemaError):
        return StoreProblem(str(exc), retryable=False)
    text = " ".join(str(getattr(exc, "orig", None) or exc).split())
    lowered = text.lower()
    if isinstance(exc, sa.exc.ArgumentError | sa.exc.NoSuchModuleError):
        return StoreProblem(
            f"DATABASE_URL is not a usable SQLAlchemy URL ({where}); expected e.g. "
            "postgresql+psycopg://user:password@host:5432/db or sqlite:///path/scores.sqlite",
            retryable=False,
        )
    if any(s in lowered for s in BAD_CREDENTIALS) or _UNKNOWN_ROLE.search(lowered):
        return StoreProblem(
            f"the serving store at {where} refused the credentials; check the user and "
            "password in DATABASE_URL",
            retryable=False,
        )
    if "database" in lowered and "does not exist" in lowered:
        return StoreProblem(
            f"the database named in DATABASE_URL does not exist on {where}; create it "
            "(createdb) or fix the URL",
            retryable=False,
        )
    if "permission denied" in lowered:
        return StoreProblem(
            f"the user in DATABASE_URL lacks a privilege on {where} ({text[:200]}); grant it "
            "or use the store's owner",
            retryable=False,
        )
    if "unable to open database file" in lowered:
        return StoreProblem(
            f"cannot open the SQLite file of {where}; check that its folder exists and is "
            "writable, or fix DATABASE_URL",
            retryable=False,
        )
    if "database is locked" in lowered:
        return StoreProblem(
            f"the SQLite file of {where} stayed locked by another writer; retry once it is done",
            retryable=True,
        )
    if _NO_COLUMN.search(lowered):
        # A store at an older migration than this code (its tables are there); before
        # the tables' pattern, which Postgres's "column x of relation y" would match.
        return StoreProblem(
            f"the serving store at {where} lacks a column this code reads ({text[:120]}): "
            f"its schema is older than this code; {UPGRADE_HINT}",
            retryable=False,
        )
    if _NO_TABLE.search(lowered):
        return StoreProblem(
            f"the serving store at {where} lacks a table this code reads ({text[:120]}): run "
            "the pipeline once, or `tutor-scoring db upgrade`",
            retryable=False,
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | ConnectionError):
        return StoreProblem(
            f"cannot reach the serving store at {where}; check that the server is running and "
            "that the host and port in DATABASE_URL are right",
            retryable=True,
        )
    return StoreProblem(f"serving store error at {where}: {text[:300]}", retryable=False)
