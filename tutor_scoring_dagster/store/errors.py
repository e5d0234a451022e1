"""One clear line for each way the serving store can be out of reach."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import make_url


@dataclass(frozen=True)
class StoreProblem:
    """What went wrong with the serving store, what to do, and whether waiting may help."""

    message: str
    retryable: bool


def safe_url(url: str) -> str:
    """``url`` with its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable DATABASE_URL>"


def explain(exc: BaseException, url: str) -> StoreProblem:
    """Turn a driver/SQLAlchemy error into one line for people (never with the password)."""
    where = safe_url(url)
    text = " ".join(str(getattr(exc, "orig", None) or exc).split()).lower()
    if isinstance(exc, sa.exc.ArgumentError | sa.exc.NoSuchModuleError):
        return StoreProblem(
            f"DATABASE_URL is not a usable SQLAlchemy URL ({where}); expected e.g. "
            "postgresql+psycopg://user:password@host:5432/db or sqlite:///path/scores.sqlite",
            retryable=False,
        )
    if "password authentication failed" in text or ("role" in text and "does not exist" in text):
        return StoreProblem(
            f"the serving store at {where} refused the credentials; check the user and "
            "password in DATABASE_URL",
            retryable=False,
        )
    if "database" in text and "does not exist" in text:
        return StoreProblem(
            f"the database named in DATABASE_URL does not exist on {where}; create it "
            "(createdb) or fix the URL",
            retryable=False,
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | ConnectionError):
        return StoreProblem(
            f"cannot reach the serving store at {where} (is the server running and the host "
            "and port right?); the run retries with backoff",
            retryable=True,
        )
    return StoreProblem(f"serving store error at {where}: {text[:300]}", retryable=False)
