"""Local stand-ins for outside services, spoken to over real sockets on 127.0.0.1.

``serve_locally`` runs any ``BaseHTTPRequestHandler`` on a free port for the length of a
``with`` block; ``fake_sendgrid`` uses it for a fake of SendGrid's v3 ``/mail/send`` that the
real ``sendgrid`` client talks to.

Import it as ``from fakes import ...`` from tests/ and tests/reliability/ alike: pytest puts
tests/ on ``sys.path`` (the rootdir of tests/conftest.py, as tests/ is no package).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tutor_scoring_dagster.delivery import SENDGRID_CUSTOM_ARG


@contextmanager
def serve_locally(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) from a background thread; yields the base
    URL (``http://127.0.0.1:PORT``). The server is shut down and closed on the way out."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- SendGrid v3 -------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer of the fake SendGrid: a status, extra headers, a body (None: empty
    for a 2xx, else a SendGrid-style error naming the status), and a delay before answering
    (longer than the client's timeout: the client gives up, nothing is accepted)."""

    status: int = 202
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    delay: float = 0.0


@dataclass
class FakeSendGrid:
    """SendGrid's v3 ``/mail/send``: answers POSTs from ``script`` in order (202 once it runs
    out) and records each request in ``requests`` as a dict: ``path``, ``auth`` (the
    Authorization header), ``body`` (text), ``json``, ``key`` (the idempotency key of the
    custom args), ``status`` (None if never answered) and ``answered`` (the reply was sent,
    without a delay).

    ``message_ids``: a 202 carries ``X-Message-Id: sg-N`` (N: the request's number, from 1).
    ``echo_auth``: error bodies echo the Authorization header, as some proxies and providers
    do, to catch a leaked key. ``hang``: never answer; each request is held until the fake
    stops (at most 5 s), then the connection is closed without a reply."""

    url: str = ""
    script: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    message_ids: bool = True
    echo_auth: bool = False
    hang: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> Counter[str]:
        """Messages accepted (202 sent back in time), per idempotency key."""
        return Counter(r["key"] for r in self.requests if r["status"] == 202 and r["answered"])

    def attempts(self) -> Counter[str]:
        """Requests received, per idempotency key."""
        return Counter(r["key"] for r in self.requests)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        """A request handler class answering for this fake."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def answer(self, http: BaseHTTPRequestHandler) -> None:
        body = http.rfile.read(int(http.headers["Content-Length"]))
        sent = json.loads(body)
        with self.lock:
            reply = None if self.hang else self.script.pop(0) if self.script else Reply()
            record: dict[str, Any] = {
                "path": http.path,
                "auth": http.headers["Authorization"],
                "body": body.decode(),
                "json": sent,
                "key": (sent.get("custom_args") or {}).get(SENDGRID_CUSTOM_ARG),
                "status": None if reply is None else reply.status,
                "answered": False,
            }
            self.requests.append(record)
            number = len(self.requests)
        if reply is None:
            self.release.wait(5)
            return
        time.sleep(reply.delay)
        accepted = reply.status == 202
        headers = {"X-Message-Id": f"sg-{number}"} if self.message_ids and accepted else {}
        headers.update(reply.headers)
        payload = reply.body if reply.body is not None else self.error_body(reply.status, record)
        # Marked before the reply goes out: the client may act on it before this thread resumes.
        record["answered"] = reply.delay == 0
        try:
            http.send_response(reply.status)
            for name, value in headers.items():
                http.send_header(name, value)
            http.send_header("Content-Length", str(len(payload)))
            http.end_headers()
            http.wfile.write(payload)
            http.wfile.flush()
        except OSError:  # the client gave up (timed out) and closed the connection
            record["answered"] = False

    def error_body(self, status: int, record: dict[str, Any]) -> bytes:
        if status == 202:
            return b""
        message = f"status {status}" + (f" for {record['auth']}" if self.echo_auth else "")
        return json.dumps({"errors": [{"message": message, "field": None}]}).encode()


@contextmanager
def fake_sendgrid(**options: Any) -> Iterator[FakeSendGrid]:
    """A running :class:`FakeSendGrid` (``options``: its fields), its ``url`` set."""
    fake = FakeSendGrid(**options)
    with serve_locally(fake.handler()) as url:
        fake.url = url
        try:
            yield fake
        finally:
            fake.release.set()  # let held ("hang") requests go before the server shuts down
