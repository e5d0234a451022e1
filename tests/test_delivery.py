"""Delivery backends against real protocols on 127.0.0.1: an aiosmtpd server, a local HTTP
server speaking SendGrid's v3 mail/send, and the filesystem outbox."""

from __future__ import annotations

import json
import logging
import pickle
import re
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from fakes import FakeSendGrid, Reply, fake_sendgrid

from tutor_scoring_dagster.delivery import (
    KEY_HEADER,
    SENDGRID_CUSTOM_ARG,
    DeliveryError,
    OutboxSender,
    OutgoingEmail,
    SendGridSender,
    SmtpSender,
    make_sender,
    message_id_for,
    send_with_retries,
    to_mime,
)

KEY = "digest:2026-11-25T10:00Z"
INSTALLATION = "0123456789abcdef"
API_KEY = "SG.fakekeyfortests.doNotLeakThis0123456789"
HTML = (
    '<html><body><h1 style="color: #b00">Tutors at risk</h1><p>Zoë - 3 no-shows</p></body></html>'
)


def make_email(key: str = KEY, **overrides: Any) -> OutgoingEmail:
    fields: dict[str, Any] = {
        "idempotency_key": key,
        "subject": "Tutor risk digest - 25 Nov",
        "sender": "Tutor Scoring <reports@example.com>",
        "recipients": ("admin@example.com", "ops@example.com"),
        "html": HTML,
        "text": "Tutors at risk\n\nZoë - 3 no-shows\n",
    }
    fields.update(overrides)
    fields.setdefault("message_id", message_id_for(fields["idempotency_key"] or "-", INSTALLATION))
    return OutgoingEmail(**fields)


def parse(raw: bytes) -> EmailMessage:
    # On the wire lines end in CRLF; the parser would keep the CR in decoded bodies.
    return message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=default_policy)


def assert_is_the_email(msg: EmailMessage, email: OutgoingEmail) -> None:
    assert msg["Subject"] == email.subject
    assert msg["From"] == email.sender
    assert [a.addr_spec for a in msg["To"].addresses] == list(email.recipients)
    assert msg["Message-ID"] == email.message_id
    assert msg[KEY_HEADER] == email.idempotency_key
    assert msg["Date"] is not None
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert cast(EmailMessage, parts[0]).get_content() == email.text
    assert cast(EmailMessage, parts[1]).get_content().rstrip("\n") == email.html


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the message itself ---------------------------------------------------------------------


def test_to_mime_round_trips_through_the_email_parser() -> None:
    email = make_email(html="<p>" + "x" * 2000 + "</p>")  # CSS inlining makes long lines
    raw = to_mime(email).as_bytes()
    assert max(len(line) for line in raw.splitlines()) <= 78
    raw.decode("ascii")  # 7-bit clean: no 8BITMIME needed from the server
    assert_is_the_email(parse(raw), email)


def test_message_id_is_one_per_key_and_deployment() -> None:
    """A resend keeps its Message-ID; another report, or the same report from another
    deployment (staging beside production), has another one."""
    ours = message_id_for(KEY, INSTALLATION)
    assert ours == message_id_for(KEY, INSTALLATION)
    assert ours != message_id_for(KEY + "x", INSTALLATION)
    assert ours != message_id_for(KEY, "fedcba9876543210")
    assert re.fullmatch(r"<[0-9a-f]{24}\.0123456789abcdef@tutor-scoring\.local>", ours)
    assert len(f"Message-ID: {ours}") <= 78  # one header line, never folded
    assert to_mime(make_email())["Message-ID"] == to_mime(make_email())["Message-ID"] == ours
    for bad in (
        "",
        "ABC",
        "a b",
        "0123456789abcde",
        "0123456789abcdef0",
        "a\r\nBcc: victim@example.com",
    ):
        with pytest.raises(ValueError):
            message_id_for(KEY, bad)


@pytest.mark.parametrize(
    "overrides",
    [
        {"subject": "hi\r\nBcc: victim@example.com"},
        {"recipients": ()},
        {"recipients": "admin@example.com"},
        {"text": " "},
        {"idempotency_key": ""},
        {"message_id": " "},
        {"message_id": "<a@b>\r\nBcc: victim@example.com"},
    ],
)
def test_outgoing_email_rejects_unsendable_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_email(**overrides)


# --- outbox ---------------------------------------------------------------------------------


def test_outbox_keeps_the_file_it_wrote_and_reports_its_message_id(tmp_path: Path) -> None:
    """A key's file, written under another installation id (before migration 0004, or before
    the store's id was made again), is kept, and its own Message-ID is what the ledger gets."""
    sender = OutboxSender(tmp_path / "outbox")
    first = make_email(message_id=message_id_for(KEY, "fedcba9876543210"))
    assert sender.send(first) == first.message_id
    assert sender.send(make_email()) == first.message_id
    [stored] = (tmp_path / "outbox").iterdir()
    assert parse(stored.read_bytes())["Message-ID"] == first.message_id


def test_outbox_writes_a_parseable_eml(tmp_path: Path) -> None:
    sender = OutboxSender(tmp_path / "outbox")
    email = make_email()
    assert sender.send(email) == message_id_for(KEY, INSTALLATION)
    files = list((tmp_path / "outbox").iterdir())
    assert files == [sender.path_for(KEY)]
    assert files[0].suffix == ".eml"
    assert_is_the_email(parse(files[0].read_bytes()), email)


def test_outbox_same_key_twice_writes_once(tmp_path: Path) -> None:
    sender = OutboxSender(tmp_path)
    first = sender.send(make_email())
    path = sender.path_for(KEY)
    before = path.read_bytes()
    second = sender.send(make_email(subject="a different rendering"))
    assert first == second
    assert list(tmp_path.iterdir()) == [path]
    assert path.read_bytes() == before


def test_outbox_keeps_distinct_keys_apart_inside_the_directory(tmp_path: Path) -> None:
    sender = OutboxSender(tmp_path)
    keys = ["a:b", "a/b", "../../etc/passwd"]
    for key in keys:
        sender.send(make_email(key))
    assert len({sender.path_for(k) for k in keys}) == 3
    assert sorted(p.parent for p in tmp_path.iterdir()) == [tmp_path] * 3
    assert parse(sender.path_for("a/b").read_bytes())[KEY_HEADER] == "a/b"


def test_outbox_unwritable_is_a_delivery_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DeliveryError):
        OutboxSender(tmp_path / "file" / "outbox").send(make_email())


# --- SMTP -----------------------------------------------------------------------------------

PASSWORD = "s3cret-smtp-password"


@dataclass
class Mailbox:
    """aiosmtpd handler: keeps what it receives; 'permanent*'/'busy*' recipients are refused."""

    envelopes: list[Envelope] = field(default_factory=list)

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.startswith("permanent"):
            return "550 5.1.1 No such user"
        if address.startswith("busy"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


def check_login(
    server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"reports", PASSWORD.encode())
    # handled=False: aiosmtpd itself then answers a failure with 535.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox, port = Mailbox(), free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        server_hostname="localhost",
        authenticator=check_login,
        auth_require_tls=False,  # no certificate in tests; never do this in production
    )
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def smtp_sender(port: int, **kwargs: Any) -> SmtpSender:
    return SmtpSender("127.0.0.1", port, timeout=5, local_hostname="localhost", **kwargs)


def test_smtp_delivers_both_parts(smtp_server: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp_server
    email = make_email()
    assert smtp_sender(port).send(email) == message_id_for(KEY, INSTALLATION)
    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "reports@example.com"
    assert envelope.rcpt_tos == list(email.recipients)
    assert_is_the_email(parse(cast(bytes, envelope.original_content)), email)


def test_smtp_login(smtp_server: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp_server
    smtp_sender(port, username="reports", password=PASSWORD).send(make_email())
    assert len(mailbox.envelopes) == 1

    with pytest.raises(DeliveryError) as caught:
        smtp_sender(port, username="reports", password="wrong-" + PASSWORD).send(make_email())
    assert not caught.value.retryable
    assert caught.value.status == 535
    assert PASSWORD not in str(caught.value)
    assert len(mailbox.envelopes) == 1


@pytest.mark.parametrize(
    ("recipient", "retryable"), [("permanent@x.org", False), ("busy@x.org", True)]
)
def test_smtp_refused_recipient(
    smtp_server: tuple[Mailbox, int], recipient: str, retryable: bool
) -> None:
    mailbox, port = smtp_server
    with pytest.raises(DeliveryError) as caught:
        smtp_sender(port).send(make_email(recipients=(recipient,)))
    assert caught.value.retryable is retryable
    assert recipient in str(caught.value)
    assert mailbox.envelopes == []


def test_smtp_partly_refused_recipients_still_count_as_sent(
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp_server
    smtp_sender(port).send(make_email(recipients=("admin@example.com", "permanent@x.org")))
    assert mailbox.envelopes[0].rcpt_tos == ["admin@example.com"]


def test_smtp_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        smtp_sender(free_port()).send(make_email())
    assert caught.value.retryable
    assert "\n" not in str(caught.value)


# --- SendGrid -------------------------------------------------------------------------------


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with fake_sendgrid(message_ids=False) as fake:
        yield fake


def errors(message: str) -> bytes:
    return json.dumps({"errors": [{"message": message, "field": None}]}).encode()


def test_sendgrid_posts_the_v3_mail_send_body(
    sendgrid: FakeSendGrid, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # python_http_client logs request headers at DEBUG
    sendgrid.script.append(Reply(202, {"X-Message-Id": "sg-abc123"}))
    email = make_email()
    assert SendGridSender(API_KEY, host=sendgrid.url).send(email) == "sg-abc123"

    [request] = sendgrid.requests
    assert request["path"] == "/v3/mail/send"
    assert request["auth"] == f"Bearer {API_KEY}"
    body = request["json"]
    assert body["from"] == {"name": "Tutor Scoring", "email": "reports@example.com"}
    assert body["subject"] == email.subject
    [personalization] = body["personalizations"]
    assert [to["email"] for to in personalization["to"]] == list(email.recipients)
    assert body["content"] == [
        {"type": "text/plain", "value": email.text},
        {"type": "text/html", "value": email.html},
    ]
    assert body["headers"] == {KEY_HEADER: KEY}
    assert body["custom_args"] == {SENDGRID_CUSTOM_ARG: KEY}
    assert "HEADERS" in caplog.text
    assert API_KEY not in caplog.text


def test_sendgrid_without_message_id_header_returns_empty(sendgrid: FakeSendGrid) -> None:
    assert SendGridSender(API_KEY, host=sendgrid.url).send(make_email()) == ""


def test_sendgrid_429_honours_retry_after(sendgrid: FakeSendGrid) -> None:
    sendgrid.script.append(Reply(429, {"Retry-After": "2"}, errors("too many requests")))
    sendgrid.script.append(Reply(202, {"X-Message-Id": "sg-2"}))
    delays: list[float] = []
    sender = SendGridSender(API_KEY, host=sendgrid.url)
    result = send_with_retries(sender, make_email(), base_delay_s=0.01, sleep=delays.append)
    assert result == "sg-2"
    assert delays == [2.0]
    assert len(sendgrid.requests) == 2
    assert sendgrid.accepted().total() == 1


def test_sendgrid_retry_after_as_http_date(sendgrid: FakeSendGrid) -> None:
    later = formatdate(time.time() + 20, usegmt=True)
    sendgrid.script.append(Reply(429, {"Retry-After": later}, b""))
    with pytest.raises(DeliveryError) as caught:
        SendGridSender(API_KEY, host=sendgrid.url).send(make_email())
    assert caught.value.retryable
    assert caught.value.retry_after is not None
    assert 15 < caught.value.retry_after <= 20


def test_sendgrid_500_then_202_backs_off_once(sendgrid: FakeSendGrid) -> None:
    sendgrid.script.append(Reply(500, {}, errors("internal error")))
    delays: list[float] = []
    sender = SendGridSender(API_KEY, host=sendgrid.url)
    send_with_retries(sender, make_email(), base_delay_s=0.25, sleep=delays.append)
    assert delays == [0.25]
    assert len(sendgrid.requests) == 2
    assert sendgrid.accepted().total() == 1


def test_sendgrid_401_fails_at_once_without_leaking_the_key(sendgrid: FakeSendGrid) -> None:
    # A server echoing the key must not get it into our error either.
    sendgrid.script.append(Reply(401, {"WWW-Authenticate": API_KEY}, errors(f"bad key {API_KEY}")))
    delays: list[float] = []
    sender = SendGridSender(API_KEY, host=sendgrid.url)
    with pytest.raises(DeliveryError) as caught:
        send_with_retries(sender, make_email(), sleep=delays.append)
    error = caught.value
    assert not error.retryable
    assert error.status == 401
    assert delays == []
    assert len(sendgrid.requests) == 1
    assert "401" in str(error) and "SENDGRID_API_KEY" in str(error)
    assert "\n" not in str(error)
    shown = "".join(traceback.format_exception(error)) + repr(error) + repr(sender)
    assert API_KEY not in shown


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (403, False), (404, False), (413, False), (502, True), (503, True)],
)
def test_sendgrid_status_mapping(sendgrid: FakeSendGrid, status: int, retryable: bool) -> None:
    sendgrid.script.append(Reply(status, {}, errors("nope")))
    with pytest.raises(DeliveryError) as caught:
        SendGridSender(API_KEY, host=sendgrid.url).send(make_email())
    assert caught.value.retryable is retryable
    assert caught.value.status == status
    assert "nope" in str(caught.value)


def test_sendgrid_server_that_never_answers_times_out(sendgrid: FakeSendGrid) -> None:
    sendgrid.hang = True
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        SendGridSender(API_KEY, host=sendgrid.url, timeout=0.3).send(make_email())
    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert "timed out" in str(caught.value)


def test_sendgrid_connection_refused_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        SendGridSender(API_KEY, host=f"http://127.0.0.1:{free_port()}").send(make_email())
    assert caught.value.retryable


# --- send_with_retries ----------------------------------------------------------------------


@dataclass
class FlakySender:
    """Raises the given errors in turn, then succeeds."""

    failures: list[DeliveryError]
    name: str = "flaky"
    sends_message_id: bool = True
    calls: int = 0

    def send(self, email: OutgoingEmail) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "id-1"


def transient(retry_after: float | None = None) -> DeliveryError:
    return DeliveryError("temporarily unavailable", retryable=True, retry_after=retry_after)


def test_backoff_doubles_up_to_the_cap() -> None:
    sender, delays = FlakySender([transient() for _ in range(5)]), list[float]()
    result = send_with_retries(
        sender, make_email(), attempts=6, base_delay_s=1, max_delay_s=5, sleep=delays.append
    )
    assert result == "id-1"
    assert delays == [1, 2, 4, 5, 5]
    assert sender.calls == 6


def test_last_error_is_raised_after_the_last_attempt() -> None:
    failures = [transient(), transient(), DeliveryError("third", retryable=True)]
    last = failures[-1]
    sender, delays = FlakySender(failures), list[float]()
    with pytest.raises(DeliveryError) as caught:
        send_with_retries(sender, make_email(), attempts=3, sleep=delays.append)
    assert caught.value is last
    assert delays == [1, 2]
    assert sender.calls == 3


def test_non_retryable_error_is_raised_at_once() -> None:
    sender, delays = FlakySender([DeliveryError("forbidden", retryable=False)]), list[float]()
    with pytest.raises(DeliveryError, match="forbidden"):
        send_with_retries(sender, make_email(), attempts=5, sleep=delays.append)
    assert delays == []
    assert sender.calls == 1


def test_retry_after_is_a_lower_bound_and_too_long_a_wait_gives_up() -> None:
    delays: list[float] = []
    sender = FlakySender([transient(retry_after=7), transient(retry_after=0.5)])
    send_with_retries(sender, make_email(), attempts=3, base_delay_s=1, sleep=delays.append)
    assert delays == [7, 2]

    sender = FlakySender([transient(retry_after=3600)])
    with pytest.raises(DeliveryError):
        send_with_retries(sender, make_email(), max_delay_s=30, sleep=delays.append)
    assert delays == [7, 2]
    assert sender.calls == 1


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        send_with_retries(FlakySender([]), make_email(), attempts=0)


def test_delivery_error_survives_pickling() -> None:
    error = pickle.loads(
        pickle.dumps(DeliveryError("x\ny", retryable=True, retry_after=3, status=429))
    )
    assert (str(error), error.retryable, error.retry_after, error.status) == ("x y", True, 3, 429)


# --- make_sender ----------------------------------------------------------------------------

SETTINGS: dict[str, Any] = {
    "outbox_dir": Path("data/outbox"),
    "smtp_host": "",
    "smtp_port": 25,
    "smtp_username": None,
    "smtp_password": None,
    "smtp_starttls": False,
    "sendgrid_api_key": None,
    "sendgrid_host": "https://api.sendgrid.com",
}


def test_make_sender_builds_each_backend() -> None:
    outbox = make_sender("outbox", **SETTINGS)
    assert isinstance(outbox, OutboxSender) and outbox.outbox_dir == Path("data/outbox")

    smtp = make_sender(
        "SMTP",
        **{
            **SETTINGS,
            "smtp_host": "mail.example.com",
            "smtp_port": 587,
            "smtp_username": "u",
            "smtp_password": "p",
            "smtp_starttls": True,
        },
    )
    assert isinstance(smtp, SmtpSender)
    assert (smtp.host, smtp.port, smtp.username, smtp.starttls) == (
        "mail.example.com",
        587,
        "u",
        True,
    )

    sg = make_sender("sendgrid", **{**SETTINGS, "sendgrid_api_key": API_KEY})
    assert isinstance(sg, SendGridSender) and sg.host == "https://api.sendgrid.com"


@pytest.mark.parametrize(
    ("service", "overrides", "variable"),
    [
        ("carrier-pigeon", {}, "EMAIL_SERVICE"),
        ("sendgrid", {}, "SENDGRID_API_KEY"),
        ("sendgrid", {"sendgrid_api_key": ""}, "SENDGRID_API_KEY"),
        ("smtp", {}, "SMTP_HOST"),
    ],
)
def test_make_sender_names_the_variable_to_set(
    service: str, overrides: dict[str, Any], variable: str
) -> None:
    with pytest.raises(ValueError, match=variable) as caught:
        make_sender(service, **{**SETTINGS, **overrides})
    assert "\n" not in str(caught.value)


def test_sendgrid_host_must_be_a_url() -> None:
    with pytest.raises(ValueError, match="http"):
        SendGridSender(API_KEY, host="api.sendgrid.com")
