"""Email delivery backends behind one interface (DESIGN.md, "Reports and email").

``EMAIL_SERVICE`` picks the backend: ``outbox`` writes ``.eml`` files, ``smtp`` hands the
message to a mail server, ``sendgrid`` calls SendGrid's v3 API. Every backend takes an
:class:`OutgoingEmail` and either returns a provider message id or raises
:class:`DeliveryError`, which says whether trying again can help. :func:`send_with_retries`
retries those that can. Recording what was sent per idempotency key is the caller's job.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import smtplib
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import EmailPolicy
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.error import URLError

import python_http_client.exceptions
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import CustomArg, Header, Mail
from sendgrid.helpers.mail.exceptions import SendGridException

from tutor_scoring_dagster.config import Settings

logger = logging.getLogger(__name__)

KEY_HEADER: Final = "X-Tutor-Scoring-Key"
"""MIME header (and SendGrid custom header) carrying the idempotency key."""
SENDGRID_CUSTOM_ARG: Final = "tutor_scoring_key"
"""SendGrid ``custom_args`` entry carrying the idempotency key (it shows up in event webhooks)."""
MESSAGE_ID_DOMAIN: Final = "tutor-scoring.local"
DEFAULT_SENDGRID_HOST: Final = "https://api.sendgrid.com"
EMAIL_SERVICES: Final = ("outbox", "smtp", "sendgrid")

_LINE_BREAK = re.compile(r"[\r\n]")


class _SubjectOnOneLine(EmailPolicy):
    """The default policy, except that an ASCII Subject is never folded.

    CPython's folder can move a whole long Subject onto a continuation line, which parsers
    then return with a leading space. RFC 5322 allows 998 characters on a line; every other
    header, non-ASCII subjects (RFC 2047 words must stay short) and the bodies keep to 78.
    """

    def _wide(self, name: str, value: Any) -> bool:
        return name.lower() == "subject" and str(value).isascii()

    def fold(self, name: str, value: Any) -> str:
        if self._wide(name, value):
            return super(_SubjectOnOneLine, self.clone(max_line_length=998)).fold(name, value)
        return super().fold(name, value)

    def fold_binary(self, name: str, value: Any) -> bytes:
        if self._wide(name, value):
            wide = self.clone(max_line_length=998)
            return super(_SubjectOnOneLine, wide).fold_binary(name, value)
        return super().fold_binary(name, value)


_HEADER_POLICY: Final = _SubjectOnOneLine()


@dataclass(frozen=True)
class OutgoingEmail:
    """One rendered message, addressed and ready to hand to any backend."""

    idempotency_key: str
    """Stable across retries, e.g. ``"digest:2026-11-25T10:00Z"``; one key is one message."""
    subject: str
    sender: str
    recipients: tuple[str, ...]
    html: str
    """Already rendered, CSS-inlined HTML."""
    text: str
    """Plain-text alternative of ``html``."""
    message_id: str
    """The Message-ID (outbox, SMTP): the one the ledger recorded with the key's first claim,
    ``message_id_for(idempotency_key, installation)`` of the installation id at that time."""

    def __post_init__(self) -> None:
        if isinstance(self.recipients, str):
            raise ValueError("recipients must be a sequence of addresses, not one string")
        # Lists are accepted for convenience; the frozen dataclass keeps a tuple.
        object.__setattr__(self, "recipients", tuple(self.recipients))
        if not self.idempotency_key.strip():
            raise ValueError("idempotency_key must not be empty")
        if not self.recipients:
            raise ValueError(f"email {self.idempotency_key!r} has no recipients")
        if not self.sender.strip():
            raise ValueError(f"email {self.idempotency_key!r} has no sender")
        if not self.message_id.strip():
            raise ValueError(f"email {self.idempotency_key!r} has no Message-ID")
        # Header injection guard: these values all end up in message headers.
        for field, value in (
            ("idempotency_key", self.idempotency_key),
            ("subject", self.subject),
            ("sender", self.sender),
            ("message_id", self.message_id),
            *(("recipients", r) for r in self.recipients),
        ):
            if _LINE_BREAK.search(value):
                raise ValueError(f"{field} of email {self.idempotency_key!r} contains a line break")
        if not self.text.strip() or not self.html.strip():
            raise ValueError(f"email {self.idempotency_key!r} needs both an HTML and a text body")


class DeliveryError(Exception):
    """A message could not be delivered.

    ``retryable`` says whether the same message may succeed later (timeouts, connection
    errors, throttling, server errors) or needs someone to fix something first (bad
    credentials, rejected request). ``retry_after`` is the provider's requested wait in
    seconds, if it gave one. ``status`` is the HTTP or SMTP reply code, if there was one.
    The message is a single line and never contains credentials.
    """

    def __init__(
        self,
        message: str,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(" ".join(message.split()))
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the attributes when the error crosses a process boundary (pickle).
        return (type(self), (str(self), self.retryable, self.retry_after, self.status))


def message_id_for(idempotency_key: str, installation_id: str) -> str:
    """The Message-ID of the message with this key from this deployment, in the outbox and
    over SMTP: the same for every resend, different for another deployment's message.

    SendGrid assigns its own id instead.
    """
    if not re.fullmatch(r"[0-9a-f]{16}", installation_id):
        raise ValueError(
            f"installation id {installation_id!r} is not 16 hex digits (as migration 0004 "
            "makes them)"
        )
    # 96 bits of the hash: collision-free in practice, and the header stays under 78 chars.
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:24]
    return f"<{digest}.{installation_id}@{MESSAGE_ID_DOMAIN}>"


def to_mime(email: OutgoingEmail, *, date: datetime | None = None) -> EmailMessage:
    """The message as MIME: multipart/alternative with a text/plain and a text/html part.

    ``date`` defaults to now (UTC).
    """
    msg = EmailMessage(policy=_HEADER_POLICY)
    msg["Subject"] = email.subject
    msg["From"] = email.sender
    msg["To"] = ", ".join(email.recipients)
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = email.message_id
    msg[KEY_HEADER] = email.idempotency_key
    # Quoted-printable keeps both parts 7-bit clean (no 8BITMIME needed) and readable in .eml
    # files, and folds the very long lines that CSS inlining produces.
    msg.set_content(email.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(email.html, subtype="html", charset="utf-8", cte="quoted-printable")
    return msg


class EmailSender(Protocol):
    """A delivery backend."""

    name: str
    sends_message_id: bool
    """Whether the message goes out under ``OutgoingEmail.message_id`` (the provider assigns
    its own otherwise)."""

    def send(self, email: OutgoingEmail) -> str:
        """Deliver ``email`` and return the provider's message id; raises DeliveryError."""
        ...


class OutboxSender:
    """Writes each message to ``<outbox_dir>/<safe-key>.eml`` instead of sending it.

    A key that already has a file is not written again; its Message-ID is returned as if it
    had just been sent.
    """

    name = "outbox"
    sends_message_id = True

    def __init__(self, outbox_dir: Path) -> None:
        self.outbox_dir = Path(outbox_dir)

    def path_for(self, idempotency_key: str) -> Path:
        """Where the message with this key is (or will be) stored."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", idempotency_key).strip("._-")[:100]
        # The hash keeps keys distinct that sanitize to the same text ("a:b" vs "a/b").
        digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:12]
        return self.outbox_dir / f"{readable or 'email'}-{digest}.eml"

    def send(self, email: OutgoingEmail) -> str:
        """Store ``email`` as an .eml file; returns its Message-ID."""
        path = self.path_for(email.idempotency_key)
        if path.exists():
            return _message_id_of(path) or email.message_id
        data = to_mime(email).as_bytes()
        try:
            self.outbox_dir.mkdir(parents=True, exist_ok=True)
            # Leading dot and .tmp suffix: readers globbing *.eml never see a partial file.
            fd, tmp_name = tempfile.mkstemp(dir=self.outbox_dir, prefix=".", suffix=".eml.tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                _publish_once(Path(tmp_name), path)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(tmp_name)
        except OSError as exc:
            raise DeliveryError(
                f"could not write {path}: {exc.strerror or exc}",
                retryable=not isinstance(exc, PermissionError | IsADirectoryError),
            ) from exc
        return email.message_id


def _message_id_of(path: Path) -> str | None:
    """The Message-ID of the stored message at ``path`` (written by an earlier attempt, maybe
    under an older form of the id), so that the ledger records what the file says."""
    try:
        with path.open("rb") as fh:
            found = BytesHeaderParser(policy=_HEADER_POLICY).parse(fh)["Message-ID"]
    except OSError:
        return None
    return str(found) if found else None


def _publish_once(tmp: Path, final: Path) -> None:
    # A hard link never overwrites, so two concurrent sends of one key leave the first file
    # in place; os.replace is the fallback for filesystems without hard links.
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    except OSError:
        os.replace(tmp, final)


class SmtpSender:
    """Hands messages to an SMTP server, optionally with STARTTLS and login."""

    name = "smtp"
    sends_message_id = True

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        timeout: float = 10.0,
        local_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.starttls = starttls
        self.timeout = timeout
        self.local_hostname = local_hostname

    def send(self, email: OutgoingEmail) -> str:
        """Send ``email``; returns its Message-ID."""
        msg = to_mime(email)
        where = f"SMTP server {self.host}:{self.port}"
        try:
            with smtplib.SMTP(
                self.host, self.port, timeout=self.timeout, local_hostname=self.local_hostname
            ) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self._password or "")
                refused = smtp.send_message(msg)
        # smtplib's exceptions are OSError subclasses, so they must be caught first.
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(
                f"{where} refused every recipient: {_smtp_refusals(exc.recipients)}",
                retryable=all(400 <= code < 500 for code in codes),
                status=max(codes, default=None),
            ) from exc
        except smtplib.SMTPResponseException as exc:
            code = exc.smtp_code
            reply = _decode(exc.smtp_error)
            hint = " (check the SMTP username and password)" if code in (530, 534, 535) else ""
            raise DeliveryError(
                f"{where} replied {code} {reply}{hint}",
                retryable=400 <= code < 500,
                status=code,
            ) from exc
        except smtplib.SMTPServerDisconnected as exc:
            raise DeliveryError(f"{where} closed the connection: {exc}", retryable=True) from exc
        except smtplib.SMTPException as exc:
            # E.g. STARTTLS or AUTH not offered: configuration, not a passing fault.
            raise DeliveryError(f"{where} cannot be used: {exc}", retryable=False) from exc
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(
                f"{where} TLS certificate rejected: {exc.verify_message}", retryable=False
            ) from exc
        except TimeoutError as exc:
            raise DeliveryError(
                f"{where} timed out after {self.timeout} s", retryable=True
            ) from exc
        except OSError as exc:
            raise DeliveryError(
                f"{where} unreachable: {exc.strerror or exc}", retryable=True
            ) from exc
        if refused:
            # The others already have it; retrying would send them a duplicate.
            logger.warning(
                "%s accepted %s but refused %s",
                where,
                email.idempotency_key,
                _smtp_refusals(refused),
            )
        return str(msg["Message-ID"])


def _smtp_refusals(refused: Mapping[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{addr}: {code} {_decode(reply)}" for addr, (code, reply) in refused.items())


def _decode(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


class SendGridSender:
    """Sends messages through SendGrid's v3 ``/mail/send`` API.

    ``host`` is the API base URL (e.g. ``https://api.eu.sendgrid.com``, or a local fake in
    tests). Returns SendGrid's ``X-Message-Id`` ("" when absent).
    """

    name = "sendgrid"
    sends_message_id = False

    def __init__(
        self, api_key: str, *, host: str = DEFAULT_SENDGRID_HOST, timeout: float = 10.0
    ) -> None:
        if not api_key:
            raise ValueError("SendGridSender needs an API key: set SENDGRID_API_KEY")
        if not host.startswith(("http://", "https://")):
            raise ValueError(f"SendGrid host must be an http(s) URL, got {host!r}")
        self._api_key = api_key
        self.host = host.rstrip("/")
        self.timeout = timeout
        self._client = SendGridAPIClient(api_key=api_key, host=self.host)
        _redact_http_client_logs()

    def __repr__(self) -> str:
        return f"SendGridSender(host={self.host!r}, timeout={self.timeout!r})"

    def request_body(self, email: OutgoingEmail) -> dict[str, Any]:
        """The JSON body posted to ``/v3/mail/send`` for ``email``."""
        try:
            mail = Mail(
                from_email=email.sender,
                to_emails=list(email.recipients),
                subject=email.subject,
                plain_text_content=email.text,
                html_content=email.html,
            )
        except SendGridException as exc:
            # The helper refuses bodies that look like they contain a SendGrid API key.
            raise DeliveryError(
                f"SendGrid client refused to build {email.idempotency_key}: "
                f"{exc.__class__.__name__} (does a body start with an API key?)",
                retryable=False,
            ) from None
        mail.add_header(Header(KEY_HEADER, email.idempotency_key))
        mail.add_custom_arg(CustomArg(SENDGRID_CUSTOM_ARG, email.idempotency_key))
        body: dict[str, Any] = mail.get()
        return body

    def send(self, email: OutgoingEmail) -> str:
        """Send ``email``; returns SendGrid's message id."""
        body = self.request_body(email)
        where = f"SendGrid ({self.host})"
        try:
            # Not SendGridAPIClient.send(): it passes no timeout, and urllib then waits forever.
            response = self._client.client.mail.send.post(request_body=body, timeout=self.timeout)
        except python_http_client.exceptions.HTTPError as exc:
            # `from None`: the library's exception may carry request details; ours has enough.
            raise self._http_error(exc, where) from None
        except URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise DeliveryError(
                    f"{where} timed out after {self.timeout} s", retryable=True
                ) from None
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise DeliveryError(
                    f"{where} TLS certificate rejected: {reason.verify_message}", retryable=False
                ) from None
            detail = reason.strerror if isinstance(reason, OSError) else reason
            raise DeliveryError(
                f"{where} unreachable: {detail or reason}", retryable=True
            ) from None
        except TimeoutError:
            raise DeliveryError(
                f"{where} timed out after {self.timeout} s", retryable=True
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(
                f"{where} connection failed: {exc.__class__.__name__}: {exc}", retryable=True
            ) from None
        return str(response.headers.get("X-Message-Id") or "")

    def _http_error(
        self, exc: python_http_client.exceptions.HTTPError, where: str
    ) -> DeliveryError:
        status = int(getattr(exc, "status_code", 0) or 0)
        reason = _decode(getattr(exc, "reason", "") or "")
        detail = _sendgrid_error_detail(getattr(exc, "body", b""))
        hint = " (check SENDGRID_API_KEY)" if status in (401, 403) else ""
        retryable = status in (408, 429) or status >= 500
        message = f"{where} replied HTTP {status} {reason}{hint}"
        if detail:
            message += f": {detail}"
        retry_after = _parse_retry_after(_header(getattr(exc, "headers", None), "Retry-After"))
        return DeliveryError(
            message.replace(self._api_key, "[redacted]"),
            retryable=retryable,
            retry_after=retry_after if retryable else None,
            status=status or None,
        )


def _sendgrid_error_detail(body: bytes | str | None) -> str:
    # SendGrid errors look like {"errors": [{"message": ..., "field": ...}]}.
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        errors = json.loads(text).get("errors") or []
        messages = [str(e.get("message", "")) for e in errors if isinstance(e, dict)]
        text = "; ".join(m for m in messages if m) or text
    except (ValueError, AttributeError, TypeError):
        pass
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _header(headers: object, name: str) -> str | None:
    if headers is None:
        return None
    getter = getattr(headers, "get", None)
    value = getter(name) if callable(getter) else None
    if value is None and isinstance(headers, Mapping):
        # A plain dict (e.g. an unpickled error) is case-sensitive.
        value = next((v for k, v in headers.items() if str(k).lower() == name.lower()), None)
    return None if value is None else str(value)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_BEARER = re.compile(r"(Bearer\s+)[^\s'\",}]+")


class _RedactBearerTokens(logging.Filter):
    # python_http_client logs every request's headers, Authorization included, at DEBUG.
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Bearer" in message:
            record.msg = _BEARER.sub(r"\1[redacted]", message)
            record.args = ()
        return True


def _redact_http_client_logs() -> None:
    client_logger = logging.getLogger("python_http_client.client")
    if not any(isinstance(f, _RedactBearerTokens) for f in client_logger.filters):
        client_logger.addFilter(_RedactBearerTokens())


def backoff_delay(
    retry: int, *, base_delay_s: float, max_delay_s: float, retry_after: float | None = None
) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): ``base * 2**retry``, capped at
    ``max_delay_s``, but never shorter than the provider's ``retry_after``."""
    delay = min(max_delay_s, base_delay_s * 2.0**retry)
    return max(delay, retry_after or 0.0)


def send_with_retries(
    sender: EmailSender,
    email: OutgoingEmail,
    *,
    attempts: int = 3,
    base_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Send ``email``, retrying retryable failures with exponential backoff.

    A non-retryable error is raised at once. So is a retryable one whose provider asks for a
    longer wait than ``max_delay_s`` (retrying sooner would be refused anyway; the caller's
    next scheduled attempt picks it up). After the last attempt the last error is raised.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for retry in range(attempts - 1):
        try:
            return sender.send(email)
        except DeliveryError as exc:
            if not exc.retryable:
                raise
            delay = backoff_delay(
                retry,
                base_delay_s=base_delay_s,
                max_delay_s=max_delay_s,
                retry_after=exc.retry_after,
            )
            if delay > max_delay_s:
                raise
            logger.warning(
                "%s: sending %s failed (%s); attempt %d of %d in %.1f s",
                sender.name,
                email.idempotency_key,
                exc,
                retry + 2,
                attempts,
                delay,
            )
            sleep(delay)
    return sender.send(email)


def make_sender(
    service: str,
    *,
    outbox_dir: Path,
    smtp_host: str,
    smtp_port: int,
    smtp_username: str | None,
    smtp_password: str | None,
    smtp_starttls: bool,
    sendgrid_api_key: str | None,
    sendgrid_host: str,
) -> EmailSender:
    """The backend named by ``service`` (the ``EMAIL_SERVICE`` setting), configured.

    Raises ValueError naming the environment variable to set when the configuration cannot
    work.
    """
    chosen = service.strip().lower()
    if chosen == "outbox":
        return OutboxSender(outbox_dir)
    if chosen == "smtp":
        if not smtp_host.strip():
            raise ValueError("EMAIL_SERVICE=smtp needs a server: set SMTP_HOST")
        if not 0 < smtp_port < 65536:
            raise ValueError(f"SMTP_PORT must be between 1 and 65535, got {smtp_port}")
        return SmtpSender(
            smtp_host.strip(),
            smtp_port,
            username=smtp_username or None,
            password=smtp_password,
            starttls=smtp_starttls,
        )
    if chosen == "sendgrid":
        if not sendgrid_api_key:
            raise ValueError("EMAIL_SERVICE=sendgrid needs an API key: set SENDGRID_API_KEY")
        return SendGridSender(sendgrid_api_key, host=sendgrid_host or DEFAULT_SENDGRID_HOST)
    choices = ", ".join(EMAIL_SERVICES)
    raise ValueError(f"unknown EMAIL_SERVICE {service!r}: set EMAIL_SERVICE to one of {choices}")


def sender_from_settings(
    settings: Settings, *, service: str | None = None, outbox_dir: Path | None = None
) -> EmailSender:
    """The sender that ``settings`` configure (``service`` / ``outbox_dir`` override them)."""
    return make_sender(
        service or settings.email_service,
        outbox_dir=outbox_dir or settings.outbox_dir,
        smtp_host=settings.smtp_host,
        smtp_port=settings.smtp_port,
        smtp_username=settings.smtp_username,
        smtp_password=settings.smtp_password,
        smtp_starttls=settings.smtp_starttls,
        sendgrid_api_key=settings.sendgrid_api_key,
        sendgrid_host=settings.sendgrid_host,
    )
