"""Where the project's non-Python files live: ``sql/``, ``reports/`` and ``migrations/``.

They sit at the repository's top level; a wheel carries them in ``_resources/`` inside the
package (pyproject.toml, hatch ``force-include``), so both layouts resolve here and nowhere else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Final

_PACKAGE_DIR: Final = Path(__file__).resolve().parent


def _resource_root() -> Path:
    bundled = _PACKAGE_DIR / "_resources"
    return bundled if bundled.is_dir() else _PACKAGE_DIR.parent


RESOURCE_ROOT: Final = _resource_root()
SQL_DIR: Final = RESOURCE_ROOT / "sql"
REPORTS_DIR: Final = RESOURCE_ROOT / "reports"
MIGRATIONS_DIR: Final = RESOURCE_ROOT / "migrations"


@cache
def load_sql(name: str) -> str:
    """The text of ``sql/<name>.sql`` (one statement; values are bound as parameters)."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
