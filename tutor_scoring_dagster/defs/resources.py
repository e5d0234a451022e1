"""Every resource of the code location. A field left unset takes its environment variable
(see ``config.SETTINGS``) when a run starts, so tests and deployments differ only in
configuration; a value set here or in the launchpad wins."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from pydantic import Field
from sqlalchemy.engine import Engine

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings, load_settings, memory_size
from tutor_scoring_dagster.delivery import EmailSender, sender_from_settings
from tutor_scoring_dagster.params import AssessParams
from tutor_scoring_dagster.scoring import RiskRule
from tutor_scoring_dagster.store.publish import create_store_engine


def _settings() -> Settings:
    return load_settings()


class LandingResource(dg.ConfigurableResource):
    """The landing folder and where its files go after ingest."""

    landing_dir: str | None = Field(default=None, description="Env TUTOR_SCORING_LANDING_DIR.")
    archive_dir: str | None = Field(default=None, description="Env TUTOR_SCORING_ARCHIVE_DIR.")
    quarantine_dir: str | None = Field(
        default=None, description="Env TUTOR_SCORING_QUARANTINE_DIR."
    )

    def landing(self) -> Path:
        return Path(self.landing_dir) if self.landing_dir else _settings().landing_dir

    def archive(self) -> Path:
        return Path(self.archive_dir) if self.archive_dir else _settings().archive_dir

    def quarantine(self) -> Path:
        return Path(self.quarantine_dir) if self.quarantine_dir else _settings().quarantine_dir


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file."""

    path: str | None = Field(default=None, description="Env TUTOR_SCORING_WAREHOUSE.")
    memory_limit: str | None = Field(
        default=None, description="Env TUTOR_SCORING_WAREHOUSE_MEMORY (e.g. 1GB)."
    )

    def file(self) -> Path:
        return Path(self.path) if self.path else _settings().warehouse

    def memory(self) -> str:
        """DuckDB's memory limit for the warehouse (checked: a size of 128MB or more)."""
        if self.memory_limit:
            return memory_size(self.memory_limit, "the warehouse resource's memory_limit")
        return _settings().warehouse_memory

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection with the schema in place (waits while another writer holds the file)."""
        with warehouse.connect(self.file(), memory_limit=self.memory()) as con:
            if not read_only:
                warehouse.ensure_schema(con)
            yield con


class ServingStoreResource(dg.ConfigurableResource):
    """The serving store (Postgres in production, SQLite by default)."""

    database_url: str | None = Field(
        default=None, description="Env DATABASE_URL (kept out of the UI: it may hold a password)."
    )
    horizon_days: int | None = Field(default=None, description="Env SERVING_HORIZON_DAYS (0: all).")

    def url(self) -> str:
        return self.database_url or _settings().database_url

    def horizon(self) -> int:
        return (
            self.horizon_days if self.horizon_days is not None else _settings().serving_horizon_days
        )

    @contextmanager
    def engine(self) -> Iterator[Engine]:
        engine = create_store_engine(self.url())
        try:
            yield engine
        finally:
            engine.dispose()


class RiskRuleResource(dg.ConfigurableResource):
    """The risk rule's parameters (DESIGN.md, "Scores")."""

    threshold: float | None = Field(default=None, description="Env RISK_THRESHOLD (default 0.15).")
    min_sessions: int | None = Field(default=None, description="Env MIN_SESSIONS (default 5).")

    def rule(self) -> RiskRule:
        s = _settings()
        return RiskRule(
            threshold=self.threshold if self.threshold is not None else s.risk_threshold,
            min_sessions=self.min_sessions if self.min_sessions is not None else s.min_sessions,
        )

    def assess_params(self) -> AssessParams:
        """Risk tiers, drivers and actions (env RISK_TIER_*, RISK_DRIVER_*, RISK_ACTIONS_FILE);
        the tiers judge this rule's threshold."""
        return _settings().assess.with_threshold(self.rule().threshold)


class EmailResource(dg.ConfigurableResource):
    """Who gets reports and how they are delivered (outbox | smtp | sendgrid).

    Secrets (SENDGRID_API_KEY, SMTP_PASSWORD) are read from the environment only, never from
    run configuration, so they do not show in the Dagster UI.
    """

    service: str | None = Field(
        default=None, description="Env EMAIL_SERVICE: outbox | smtp | sendgrid."
    )
    outbox_dir: str | None = Field(default=None, description="Env EMAIL_OUTBOX_DIR.")
    recipients: str | None = Field(default=None, description="Env ADMIN_EMAIL, comma-separated.")
    sender_address: str | None = Field(default=None, description="Env EMAIL_FROM.")

    def settings(self) -> Settings:
        return _settings()

    def to(self) -> tuple[str, ...]:
        if self.recipients:
            return tuple(a.strip() for a in self.recipients.split(",") if a.strip())
        return _settings().admin_emails

    def from_address(self) -> str:
        return self.sender_address or _settings().email_from

    def sender(self) -> EmailSender:
        return sender_from_settings(
            _settings(),
            service=self.service,
            outbox_dir=Path(self.outbox_dir) if self.outbox_dir else None,
        )


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources every asset of the code location uses, all configured from the env."""
    return {
        "landing": LandingResource(),
        "warehouse": WarehouseResource(),
        "serving_store": ServingStoreResource(),
        "risk_rule": RiskRuleResource(),
        "email": EmailResource(),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=default_resources())
