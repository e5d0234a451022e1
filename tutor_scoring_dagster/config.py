"""Every setting the project reads from the environment: its variable, default and meaning.

This table is the one source of configuration. Dagster resources (``defs/resources.py``) and the
``tutor-scoring`` command both resolve their values through :func:`load_settings`, at run time
rather than import time, so a test or a deployment differs only in its environment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from tutor_scoring_dagster.params import RULES_PATH, AssessParams, DriverParams, TierParams


@dataclass(frozen=True)
class Setting:
    """One environment variable the project reads."""

    env: str
    default: str | None
    help: str
    secret: bool = False


def _attribute_docs(cls: type) -> dict[str, str]:
    """The first sentence of each attribute's docstring in ``cls``'s source."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = " ".join(after.value.value.replace("``", "`").split())
            docs[node.target.id] = text.split(". ")[0].rstrip(".") + "."
    return docs


TUNED: Final[dict[str, type]] = {"RISK_TIER_": TierParams, "RISK_DRIVER_": DriverParams}
"""Parameter classes configured field by field: ``RISK_TIER_CUSUM_H`` is ``TierParams.cusum_h``.
Their defaults live in the classes (calibrated by simulation, docs/risk-tiers.md)."""
SHARED_FIELDS: Final = {"threshold"}
"""Fields set by a setting of their own (``RISK_THRESHOLD``), not by a prefixed one."""


def _tuned_settings() -> tuple[Setting, ...]:
    settings = []
    for prefix, cls in TUNED.items():
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SHARED_FIELDS:
                continue
            if f.name not in docs:  # the README's table describes each setting by it
                raise TypeError(f"{cls.__name__}.{f.name} needs a docstring")
            help_text = docs[f.name]
            settings.append(Setting(f"{prefix}{f.name.upper()}", str(f.default), help_text))
    return tuple(settings)


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("TUTOR_SCORING_HOME", "data", "Base folder of every default path below."),
    Setting("TUTOR_SCORING_LANDING_DIR", "{home}/landing", "Where the platform drops exports."),
    Setting(
        "TUTOR_SCORING_ARCHIVE_DIR", "{landing}/archive", "Loaded files (with rejected-row CSVs)."
    ),
    Setting(
        "TUTOR_SCORING_QUARANTINE_DIR",
        "{landing}/quarantine",
        "Unloadable files, each with a .reason.txt sidecar.",
    ),
    Setting("TUTOR_SCORING_WAREHOUSE", "{home}/warehouse.duckdb", "The DuckDB warehouse file."),
    Setting(
        "TUTOR_SCORING_WAREHOUSE_MEMORY",
        "1GB",
        "DuckDB's memory (cache and work, 128MB or more); more spills to disk beside it.",
    ),
    Setting(
        "DATABASE_URL",
        "sqlite:///{home}/scores.sqlite",
        "Serving store, a SQLAlchemy URL (postgresql+psycopg://user:pass@host/db in production).",
        secret=True,
    ),
    Setting(
        "TUTOR_SCORING_START_DATE",
        "2023-01-01",
        "First daily score partition (read when the code location loads).",
    ),
    Setting(
        "SERVING_HORIZON_DAYS",
        "180",
        "Days of sessions and reschedules published to the store for drill-down (0: all).",
    ),
    Setting("RISK_THRESHOLD", "0.15", "A window's reschedule rate above this is high risk."),
    Setting("MIN_SESSIONS", "5", "Sessions a window needs before its rate can flag a tutor."),
    Setting("TUTOR_SCORING_SITE_DIR", "{home}/site", "Where the dashboard site is written."),
    Setting("EMAIL_SERVICE", "outbox", "Email backend: outbox | smtp | sendgrid."),
    Setting("EMAIL_OUTBOX_DIR", "{home}/outbox", "Where the outbox backend writes .eml files."),
    Setting("ADMIN_EMAIL", "admin@example.com", "Recipients of reports, comma-separated."),
    Setting("EMAIL_FROM", "tutor-scoring@example.com", "Sender address of reports."),
    Setting("SMTP_HOST", "localhost", "SMTP server (EMAIL_SERVICE=smtp)."),
    Setting("SMTP_PORT", "25", "SMTP port (EMAIL_SERVICE=smtp)."),
    Setting("SMTP_USERNAME", None, "SMTP login, if the server wants one."),
    Setting("SMTP_PASSWORD", None, "SMTP password.", secret=True),
    Setting("SMTP_STARTTLS", "false", "Upgrade the SMTP connection with STARTTLS."),
    Setting("SENDGRID_API_KEY", None, "SendGrid API key (EMAIL_SERVICE=sendgrid).", secret=True),
    Setting("SENDGRID_HOST", "https://api.sendgrid.com", "SendGrid API base URL."),
    # Read by reports.ReportSettings.from_env (listed here so this table stays complete).
    Setting("DIGEST_WHEN_NOTHING_NEW", "false", "Send the hourly digest even in a quiet hour."),
    Setting("TUTOR_ALERTS", "true", "An alert per tutor who newly crosses the risk rule."),
    Setting("PER_SESSION_REPORTS", "false", "Batched per-session reports (the old system's)."),
    Setting("SESSION_REPORT_BATCH_SIZE", "200", "About how many sessions per session report."),
    Setting("DIGEST_MAX_ROWS", "50", "Tutors listed per digest section (the rest counted)."),
    Setting("EMAIL_MAX_ATTEMPTS", "8", "Attempts per report key (each up to 3 sends)."),
    Setting(
        "EMAIL_PENDING_LEASE_MINUTES",
        "10",
        "A claimed report never recorded as sent after this long is resent (same key; same "
        "Message-ID over SMTP and in the outbox).",
    ),
    Setting("REPORT_LATENCY_TARGET_MINUTES", "60", "p95 session-to-email latency allowed."),
    Setting(
        "RISK_ACTIONS_FILE",
        "rules/recommended_actions.csv",
        "The reviewed rule table mapping risk drivers to recommended actions.",
    ),
    *_tuned_settings(),
)


def setting_default(env: str) -> str:
    """The default of the setting named ``env`` (for a module that reads its own settings)."""
    for s in SETTINGS:
        if s.env == env and s.default is not None:
            return s.default
    raise KeyError(f"no setting {env} with a default")


def settings_table() -> str:
    """The README's configuration table (markdown), generated from :data:`SETTINGS`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "-" if s.default is None else f"`{s.default}`"
        default = default.replace("{home}", "$HOME").replace("{landing}", "$LANDING")
        rows.append(f"| `{s.env}` | {default} | {s.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration."""

    home: Path
    landing_dir: Path
    archive_dir: Path
    quarantine_dir: Path
    warehouse: Path
    warehouse_memory: str
    database_url: str
    start_date: str
    serving_horizon_days: int
    risk_threshold: float
    min_sessions: int
    site_dir: Path
    email_service: str
    outbox_dir: Path
    admin_emails: tuple[str, ...]
    email_from: str
    smtp_host: str
    smtp_port: int
    smtp_username: str | None
    smtp_password: str | None
    smtp_starttls: bool
    sendgrid_api_key: str | None
    sendgrid_host: str
    assess: AssessParams = dataclasses.field(default_factory=AssessParams)


def _tuned(cls: type, prefix: str, raw: Mapping[str, str | None]) -> Any:
    """An instance of a parameter class from its prefixed settings (its own checks apply)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in SHARED_FIELDS:
            continue
        env = f"{prefix}{f.name.upper()}"
        text = raw.get(env) or str(f.default)
        kind: type[int] | type[float] = int if isinstance(f.default, int) else float
        try:
            values[f.name] = kind(text)
        except ValueError:
            raise ValueError(f"{env} must be a {kind.__name__}, got {text!r}") from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"bad {prefix}* setting: {exc}") from None


TRUE_WORDS: Final = frozenset({"1", "true", "t", "yes", "on"})
"""A setting's text that means yes (lower case, trimmed)."""
FALSE_WORDS: Final = frozenset({"0", "false", "f", "no", "off"})
"""A setting's text that means no (lower case, trimmed)."""
MEMORY_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(i?)B?", re.IGNORECASE)
"""A memory size as DuckDB writes one: a number and a unit (1GB, 512MB, 1.5G, 2GiB)."""
MIN_WAREHOUSE_MEMORY: Final = 128 * 1000**2
"""Below this DuckDB cannot open the warehouse's bigger queries (50MB failed a 9M-row sort)."""


def memory_size(text: str, name: str = "TUTOR_SCORING_WAREHOUSE_MEMORY") -> str:
    """``text`` stripped, if it is a memory size DuckDB takes (``1GB``, ``512MB``, ``2GiB``)
    of at least :data:`MIN_WAREHOUSE_MEMORY`; else a ValueError naming ``name``."""
    size = text.strip()
    match = MEMORY_SIZE.fullmatch(size)
    if match is None:
        raise ValueError(f"{name} must be a size such as 1GB or 512MB, got {text!r}")
    number, unit, binary = match.groups()
    scale = (1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1)
    if float(number) * scale < MIN_WAREHOUSE_MEMORY:
        raise ValueError(f"{name} must be at least 128MB (DuckDB's bigger queries), got {text!r}")
    return size


def yes_or_no(text: str, name: str) -> bool:
    """A yes/no setting's text (:data:`TRUE_WORDS`, :data:`FALSE_WORDS`); anything else is a
    ValueError naming ``name``: a typo must not quietly mean no."""
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be true or false, got {text!r}")


Number = TypeVar("Number", int, float)


def number(text: str, name: str, kind: type[Number]) -> Number:
    """A numeric setting's text as ``kind``; else a ValueError naming ``name``."""
    try:
        return kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {text!r}") from None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve every setting from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    raw: dict[str, str | None] = {}
    for s in SETTINGS:
        value = env.get(s.env) or s.default
        raw[s.env] = value
    home = raw["TUTOR_SCORING_HOME"] or "data"
    landing = (raw["TUTOR_SCORING_LANDING_DIR"] or "").format(home=home)

    def path(name: str) -> Path:
        return Path((raw[name] or "").format(home=home, landing=landing))

    def text(name: str) -> str:
        return (raw[name] or "").format(home=home, landing=landing)

    threshold = number(text("RISK_THRESHOLD"), "RISK_THRESHOLD", float)
    min_sessions = number(text("MIN_SESSIONS"), "MIN_SESSIONS", int)
    smtp_port = number(text("SMTP_PORT"), "SMTP_PORT", int)
    horizon = number(text("SERVING_HORIZON_DAYS"), "SERVING_HORIZON_DAYS", int)
    if horizon < 0:
        raise ValueError(f"SERVING_HORIZON_DAYS must be 0 (keep all) or more, got {horizon}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"RISK_THRESHOLD must be a fraction in [0, 1], got {threshold}")
    if min_sessions < 1:
        raise ValueError(f"MIN_SESSIONS must be at least 1, got {min_sessions}")
    warehouse_memory = memory_size(text("TUTOR_SCORING_WAREHOUSE_MEMORY"))
    rules = Path(text("RISK_ACTIONS_FILE"))
    assess = AssessParams(
        tiers=_tuned(TierParams, "RISK_TIER_", raw),
        drivers=_tuned(DriverParams, "RISK_DRIVER_", raw),
        # A relative path not found here is one of the project's own files.
        rules_path=(rules if rules.exists() else RULES_PATH.parent.parent / rules).absolute(),
    ).with_threshold(threshold)
    return Settings(
        home=Path(home),
        landing_dir=Path(landing),
        archive_dir=path("TUTOR_SCORING_ARCHIVE_DIR"),
        quarantine_dir=path("TUTOR_SCORING_QUARANTINE_DIR"),
        warehouse=path("TUTOR_SCORING_WAREHOUSE"),
        warehouse_memory=warehouse_memory,
        database_url=text("DATABASE_URL"),
        start_date=text("TUTOR_SCORING_START_DATE"),
        serving_horizon_days=horizon,
        risk_threshold=threshold,
        min_sessions=min_sessions,
        site_dir=path("TUTOR_SCORING_SITE_DIR"),
        email_service=text("EMAIL_SERVICE").strip().lower(),
        outbox_dir=path("EMAIL_OUTBOX_DIR"),
        admin_emails=tuple(a.strip() for a in text("ADMIN_EMAIL").split(",") if a.strip()),
        email_from=text("EMAIL_FROM"),
        smtp_host=text("SMTP_HOST"),
        smtp_port=smtp_port,
        smtp_username=raw["SMTP_USERNAME"],
        smtp_password=raw["SMTP_PASSWORD"],
        smtp_starttls=yes_or_no(text("SMTP_STARTTLS"), "SMTP_STARTTLS"),
        sendgrid_api_key=raw["SENDGRID_API_KEY"],
        sendgrid_host=text("SENDGRID_HOST"),
        assess=assess,
    )
