"""The report flow over real protocols on 127.0.0.1 (an aiosmtpd server, a local HTTP server
speaking SendGrid's v3 mail/send to the real client): failures are recorded and retried with
backoff on later ticks, every message reaches the receiver once, and an attempt whose outcome
is unknown is resent with the same Message-ID."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, cast

import duckdb
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from fakes import FakeSendGrid, Reply, fake_sendgrid
from test_reports import T, build_scenario, publish_only

from tutor_scoring_dagster import warehouse
from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.delivery import (
    KEY_HEADER,
    SENDGRID_CUSTOM_ARG,
    DeliveryError,
    EmailSender,
    OutboxSender,
    OutgoingEmail,
    SendGridSender,
    SmtpSender,
    message_id_for,
)
from tutor_scoring_dagster.reports import (
    DeliveryOutcome,
    ReportSettings,
    deliver_due,
    find_due_work,
    report_config,
)
from tutor_scoring_dagster.scoring import RiskRule
from tutor_scoring_dagster.store import ledger
from tutor_scoring_dagster.store.publish import create_store_engine

ALERT = "alert:B:2026-03-01"
DIGEST = "digest:2026-03-01T12:00Z"
API_KEY = "SG.fake-key-for-tests.0123456789"


@pytest.fixture
def store(home: Settings) -> Iterator[sa.Engine]:
    """A published snapshot as of T with two reports due: the alert for B and the digest."""
    build_scenario(home.landing_dir)
    publish_only(T)
    engine = create_store_engine(home.database_url)
    yield engine
    engine.dispose()


def tick(
    engine: sa.Engine,
    home: Settings,
    sender: EmailSender,
    at: datetime,
    settings: ReportSettings | None = None,
    sleeps: list[float] | None = None,
) -> DeliveryOutcome:
    """One sensor tick and the run it launches, at the instant ``at``."""
    settings = settings or ReportSettings()
    work = find_due_work(engine, now=at, settings=settings)
    config = report_config(
        RiskRule(),
        settings,
        backend=sender.name,
        sender_address="Tutor Scoring <reports@example.com>",
        recipients=("admin@example.com",),
    )
    with ExitStack() as stack:

        def open_warehouse() -> duckdb.DuckDBPyConnection:
            return stack.enter_context(warehouse.connect(home.warehouse))

        return deliver_due(
            engine,
            sender,
            work,
            config=config,
            warehouse=open_warehouse,
            now=lambda: at,
            sleep=(sleeps if sleeps is not None else []).append,
        )


def tick_killed_after_sending(
    engine: sa.Engine,
    home: Settings,
    sender: EmailSender,
    at: datetime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tick whose run dies after the provider accepted its first message, before the
    ledger recorded it: that key stays pending, its outcome unknown."""
    real_mark_sent = ledger.mark_sent

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("worker killed")

    monkeypatch.setattr(ledger, "mark_sent", crash)
    with pytest.raises(RuntimeError):
        tick(engine, home, sender, at)
    monkeypatch.setattr(ledger, "mark_sent", real_mark_sent)


def parse(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=default_policy)
    return cast(EmailMessage, msg)


# --- SMTP ----------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """An SMTP handler that refuses DATA with 451 while ``down``."""

    down: bool = False
    refused: int = 0
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        if self.down:
            self.refused += 1
            return "451 4.3.0 Mail server temporarily unavailable"
        self.messages.append(parse(cast(bytes, envelope.original_content)))
        return "250 Message accepted for delivery"

    def keys(self) -> list[str]:
        return sorted(str(m[KEY_HEADER]) for m in self.messages)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, SmtpSender]]:
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, server_hostname="localhost")
    controller.start()
    try:
        yield mailbox, SmtpSender("127.0.0.1", port, timeout=5, local_hostname="localhost")
    finally:
        controller.stop()


def test_smtp_failure_then_recovery_delivers_each_message_once(
    store: sa.Engine, home: Settings, smtp: tuple[Mailbox, SmtpSender]
) -> None:
    mailbox, sender = smtp
    now = datetime.now(UTC)
    mailbox.down = True
    sleeps: list[float] = []
    first = tick(store, home, sender, now, sleeps=sleeps)
    assert sorted(first.failed) == [ALERT, DIGEST] and first.sent == []
    assert mailbox.refused == 6 and sleeps == [1.0, 2.0, 1.0, 2.0]  # 3 sends each, backing off
    for key in (ALERT, DIGEST):
        entry = ledger.get(store, key)
        assert entry is not None and entry.status == "failed" and entry.attempts == 1
        assert entry.next_attempt_at == now + timedelta(minutes=5)
        assert "451" in (entry.error_message or "") and "attempt 1 of 8" in (
            entry.error_message or ""
        )

    mailbox.down = False
    assert not find_due_work(store, now=now + timedelta(minutes=1), settings=ReportSettings())
    second = tick(store, home, sender, now + timedelta(minutes=6))
    assert sorted(second.sent) == [ALERT, DIGEST]
    third = tick(store, home, sender, now + timedelta(minutes=30))
    assert (third.sent, third.failed, third.skipped) == ([], {}, [])

    assert mailbox.keys() == [ALERT, DIGEST]  # each exactly once
    for msg in mailbox.messages:
        key = str(msg[KEY_HEADER])
        assert msg["Message-ID"] == message_id_for(key, ledger.installation_id(store))
        assert msg.get_content_type() == "multipart/alternative"
        html = msg.get_body(("html",))
        assert html is not None and "&lt;b&gt;Co&lt;/b&gt;" in html.get_content()
    for key in (ALERT, DIGEST):
        entry = ledger.get(store, key)
        assert entry is not None and (entry.status, entry.attempts) == ("sent", 2)
        assert entry.error_message is None
        assert entry.provider_message_id == message_id_for(key, ledger.installation_id(store))


def test_two_deployments_sending_one_report_give_it_two_message_ids(
    store: sa.Engine,
    home: Settings,
    smtp: tuple[Mailbox, SmtpSender],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Staging and production, each with its own store, send the same alert and digest to one
    mailbox: mail services that thread or dedupe by Message-ID must see four messages."""
    mailbox, sender = smtp
    now = datetime.now(UTC)
    assert sorted(tick(store, home, sender, now).sent) == [ALERT, DIGEST]
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'staging.sqlite'}")
    publish_only(T)
    staging = create_store_engine(f"sqlite:///{tmp_path / 'staging.sqlite'}")
    try:
        assert sorted(tick(staging, home, sender, now).sent) == [ALERT, DIGEST]
        installations = {ledger.installation_id(store), ledger.installation_id(staging)}
    finally:
        staging.dispose()
    assert len(installations) == 2
    assert mailbox.keys() == [ALERT, ALERT, DIGEST, DIGEST]
    assert len({m["Message-ID"] for m in mailbox.messages}) == 4


@pytest.mark.parametrize("backend", ["smtp", "outbox"])
def test_an_unknown_outcome_is_resent_with_the_same_message_id(
    store: sa.Engine,
    home: Settings,
    smtp: tuple[Mailbox, SmtpSender],
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
) -> None:
    mailbox, smtp_sender = smtp
    sender: EmailSender = smtp_sender if backend == "smtp" else OutboxSender(home.outbox_dir)
    now = datetime.now(UTC)

    # The run dies right after the provider accepted the alert, before the ledger knew.
    tick_killed_after_sending(store, home, sender, now, monkeypatch)
    entry = ledger.get(store, ALERT)
    assert entry is not None and entry.status == "pending"
    # The claim recorded the Message-ID the message went out with; the store's installation
    # id is then made again (a restored backup): the resend must still carry the first one.
    first_id = message_id_for(ALERT, ledger.installation_id(store))
    assert entry.provider_message_id == first_id
    with store.begin() as conn:
        conn.execute(sa.text("UPDATE installation SET installation_id = 'fedcba9876543210'"))

    # Within the claim's lease the key is in flight: not touched. The digest goes out.
    soon = tick(store, home, sender, now + timedelta(minutes=5))
    assert soon.sent == [DIGEST] and ALERT not in soon.skipped
    # After it, the outcome is unknown: resent unchanged, and the ledger says so.
    later = tick(store, home, sender, now + timedelta(minutes=11))
    assert later.sent == [ALERT] and later.resent_unknown == [ALERT]
    entry = ledger.get(store, ALERT)
    assert entry is not None and (entry.status, entry.attempts) == ("sent", 2)
    assert "possible duplicate" in (entry.error_message or "")
    assert entry.provider_message_id == first_id
    assert not find_due_work(store, now=now + timedelta(hours=1), settings=ReportSettings())

    if backend == "smtp":
        # The receiver got the alert twice, with one Message-ID to dedupe on.
        assert mailbox.keys() == [ALERT, ALERT, DIGEST]
        ids = {m["Message-ID"] for m in mailbox.messages if m[KEY_HEADER] == ALERT}
        assert ids == {first_id}
        assert "same Message-ID and key header" in (entry.error_message or "")
    else:
        # The outbox is idempotent per key: still one file.
        files = sorted(p.name for p in Path(home.outbox_dir).glob("*.eml"))
        assert len(files) == 2 and files[0].startswith("alert_B_2026-03-01")


def test_a_claim_that_recorded_no_message_id_is_not_said_to_keep_one(store: sa.Engine) -> None:
    """A key claimed by code that recorded no Message-ID (before this ledger kept them) and
    resent after an unknown outcome: the ledger must not claim both copies shared one."""
    now = datetime.now(UTC)
    first = ledger.claim(
        store, key="k", kind="alert", recipients=["a@x.org"], covers_as_of=None, now=now
    )
    assert first is not None and first.entry.provider_message_id is None
    again = ledger.claim(
        store,
        key="k",
        kind="alert",
        recipients=["a@x.org"],
        covers_as_of=None,
        now=now + timedelta(minutes=11),
        message_id="<new@tutor-scoring.local>",
    )
    assert again is not None and again.outcome_unknown and not again.kept_message_id
    assert again.entry.provider_message_id == "<new@tutor-scoring.local>"
    assert "resent with the same key" in (again.entry.error_message or "")
    ledger.mark_sent(store, again, provider_message_id="<new@tutor-scoring.local>", now=now)
    entry = ledger.get(store, "k")
    assert entry is not None and entry.error_message is not None
    assert entry.error_message.endswith("both carried the same key header")


# --- SendGrid ------------------------------------------------------------------------------


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with fake_sendgrid() as fake:
        yield fake


def test_sendgrid_throttling_errors_and_bad_key_then_each_message_once(
    store: sa.Engine, home: Settings, sendgrid: FakeSendGrid
) -> None:
    sender = SendGridSender(API_KEY, host=sendgrid.url, timeout=5)
    now = datetime.now(UTC)
    sendgrid.script += [Reply(429, {"Retry-After": "3"}), Reply(202)]  # the alert, throttled once
    sendgrid.script += [Reply(500), Reply(500), Reply(500)]  # the digest, three times
    sleeps: list[float] = []
    first = tick(store, home, sender, now, sleeps=sleeps)
    assert first.sent == [ALERT] and list(first.failed) == [DIGEST]
    assert sleeps == [3.0, 1.0, 2.0]  # Retry-After honoured, then exponential backoff
    assert "HTTP 500" in first.failed[DIGEST]

    sendgrid.script.append(Reply(401))
    second = tick(store, home, sender, now + timedelta(minutes=5))
    assert list(second.failed) == [DIGEST] and "SENDGRID_API_KEY" in second.failed[DIGEST]
    assert len(sendgrid.requests) == 6  # a 401 is not retried within the run
    entry = ledger.get(store, DIGEST)
    assert entry is not None and entry.next_attempt_at == now + timedelta(minutes=15)
    assert API_KEY not in (entry.error_message or "")

    third = tick(store, home, sender, now + timedelta(minutes=15))
    assert third.sent == [DIGEST]
    assert sorted(sendgrid.accepted().elements()) == [ALERT, DIGEST]  # each accepted exactly once
    for request in sendgrid.requests:
        assert request["path"] == "/v3/mail/send" and request["auth"] == f"Bearer {API_KEY}"
        key = request["json"]["custom_args"][SENDGRID_CUSTOM_ARG]
        assert request["json"]["headers"] == {KEY_HEADER: key}
    sent = ledger.get(store, DIGEST)
    assert sent is not None and sent.provider_message_id == "sg-7" and sent.attempts == 3


def test_a_sendgrid_resend_is_not_said_to_share_a_message_id(
    store: sa.Engine, home: Settings, sendgrid: FakeSendGrid, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SendGrid gives each request its own id: after an unknown outcome, the ledger says the
    two copies share the key, and records no Message-ID of ours for them."""
    sender = SendGridSender(API_KEY, host=sendgrid.url, timeout=5)
    now = datetime.now(UTC)
    tick_killed_after_sending(store, home, sender, now, monkeypatch)
    entry = ledger.get(store, ALERT)
    assert entry is not None and entry.status == "pending" and entry.provider_message_id is None

    later = tick(store, home, sender, now + timedelta(minutes=11))
    assert ALERT in later.resent_unknown
    entry = ledger.get(store, ALERT)
    assert entry is not None and entry.status == "sent"
    assert (entry.error_message or "").endswith("both carried the same key header")
    assert (entry.provider_message_id or "").startswith("sg-")
    assert sendgrid.accepted()[ALERT] == 2


# --- limits and concurrency ----------------------------------------------------------------


@dataclass
class Counting:
    """Wraps a backend: counts sends per key, optionally failing or slow."""

    inner: EmailSender | None = None
    fail: bool = False
    delay: float = 0.0
    name: str = "counting"
    sends_message_id: bool = True
    sends: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, email: OutgoingEmail) -> str:
        with self.lock:
            self.sends[email.idempotency_key] = self.sends.get(email.idempotency_key, 0) + 1
        time.sleep(self.delay)
        if self.fail or self.inner is None:
            raise DeliveryError("mail relay down", retryable=True)
        return self.inner.send(email)


def test_gives_up_after_the_last_attempt_and_says_so(store: sa.Engine, home: Settings) -> None:
    settings = ReportSettings(max_attempts=2)
    sender = Counting(fail=True)
    now = datetime.now(UTC)
    tick(store, home, sender, now, settings)
    tick(store, home, sender, now + timedelta(minutes=5), settings)
    for key in (ALERT, DIGEST):
        entry = ledger.get(store, key)
        assert entry is not None and entry.final and entry.status == "failed"
        assert (entry.error_message or "").startswith("gave up after 2 attempts: mail relay down")
    assert sender.sends == {ALERT: 6, DIGEST: 6}  # 2 claims x 3 sends each
    assert not find_due_work(store, now=now + timedelta(days=1), settings=settings)


def test_two_runs_at_once_send_each_message_once(
    home: Settings, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_url)
    build_scenario(home.landing_dir)
    publish_only(T)
    engine = create_store_engine(pg_url)
    sender = Counting(inner=OutboxSender(home.outbox_dir), delay=0.2)
    now = datetime.now(UTC)
    outcomes: list[DeliveryOutcome] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcomes.append(tick(engine, home, sender, now))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert errors == []
    assert sender.sends == {ALERT: 1, DIGEST: 1}
    assert sorted(k for o in outcomes for k in o.sent) == [ALERT, DIGEST]
