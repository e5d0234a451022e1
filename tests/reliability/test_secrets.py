"""Secrets: a SendGrid API key and a Postgres password given through the environment never
show up anywhere a person or another system can read them: captured stdout/stderr, Python
logging (DEBUG included), Dagster's event log of the run, the ledger's error messages, the
messages sent, the command line's output, and the one-line errors of a failing run."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from tutor_scoring_dagster.config import Settings
from tutor_scoring_dagster.defs.jobs import run_pipeline
from tutor_scoring_dagster.defs.reports.sensors import report_sensor
from tutor_scoring_dagster.defs.resources import ServingStoreResource

from ._support import (
    FakeSendGrid,
    Reply,
    T,
    build_drops,
    env_for,
    fake_sendgrid,
    ledger_rows,
)

API_KEY = "SG.reliability-secret-key." + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex + "-Secr3t"


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with fake_sendgrid() as fake:
        yield fake


@pytest.fixture
def password_url(pg_admin: sa.Engine, pg_url: str) -> Iterator[str]:
    """The throwaway database, owned by a role that logs in with a password, over TCP."""
    role = f"reliab_{uuid.uuid4().hex[:10]}"
    db = sa.make_url(pg_url).database
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(sa.text(f'ALTER DATABASE "{db}" OWNER TO {role}'))
    url = sa.make_url(pg_url).set(username=role, password=PASSWORD, host="127.0.0.1", port=5432)
    yield url.render_as_string(hide_password=False)
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))


def leaks(text: str) -> list[str]:
    found = [name for name, s in (("API key", API_KEY), ("password", PASSWORD)) if s in text]
    # The key's distinctive part alone, too (a truncated or re-quoted key is still a leak).
    if API_KEY.rsplit(".", 1)[1] in text and "API key" not in found:
        found.append("API key (part)")
    return found


def event_log_text(instance: dg.DagsterInstance) -> str:
    texts = []
    for run in instance.get_runs():
        texts.append(dg.serialize_value(run))
        texts += [dg.serialize_value(e) for e in instance.all_logs(run.run_id)]
    return "\n".join(texts)


def test_keys_and_passwords_never_appear_in_logs_events_ledger_or_mail(
    home: Settings,
    password_url: str,
    sendgrid: FakeSendGrid,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DATABASE_URL", password_url)
    monkeypatch.setenv("EMAIL_SERVICE", "sendgrid")
    monkeypatch.setenv("SENDGRID_API_KEY", API_KEY)
    monkeypatch.setenv("SENDGRID_HOST", sendgrid.url)
    caplog.set_level(logging.DEBUG)
    build_drops(home.landing_dir)
    # First message refused (401), the second answered 500 once: both echo the key back.
    sendgrid.script += [Reply(401), Reply(500)]
    with dg.instance_for_test() as instance:
        summary = run_pipeline(as_of=T, history_days=2, instance=instance, log_level="DEBUG")
        events = event_log_text(instance)
        sensor = report_sensor(
            dg.build_sensor_context(instance=instance),
            serving_store=ServingStoreResource(),
        )
    assert not summary.success  # a report failed, and the run says so
    assert summary.value("tutor_scores", "tutor_scores_rows") > 0  # the rest went through
    assert len(sendgrid.requests) >= 4
    assert {r["auth"] for r in sendgrid.requests} == {f"Bearer {API_KEY}"}  # it was used

    rows = ledger_rows(password_url)
    errors = [r["error_message"] or "" for r in rows]
    assert any("401" in e and "SENDGRID_API_KEY" in e for e in errors), errors
    out, err = capfd.readouterr()
    sources = {
        "stdout": out,
        "stderr": err,
        "python logging": caplog.text,
        "dagster event log": events,
        "run summary": summary.render() + repr(summary.errors),
        "ledger": json.dumps(rows, default=str),
        "messages sent": "\n".join(r["body"] for r in sendgrid.requests),
        "sensor": repr(sensor),
    }
    assert "Bearer" in caplog.text or "sendgrid" in caplog.text.lower()  # logging was captured
    for name, text in sources.items():
        assert not leaks(text), f"{leaks(text)} in {name}"


def _cli(
    home: Settings, tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    script = shutil.which("tutor-scoring", path=str(Path(sys.executable).parent))
    assert script
    return subprocess.run(
        [script, *args],
        env=env_for(home, TUTOR_SCORING_LOG_LEVEL="DEBUG", **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("127.0.0.1:1", id="server-unreachable"),
        pytest.param("127.0.0.1:5432/no_such_database_here", id="database-missing"),
    ],
)
def test_a_failing_store_is_explained_without_its_password(
    home: Settings, tmp_path: Path, pg_admin: sa.Engine, where: str
) -> None:
    host, _, db = where.partition("/")
    url = f"postgresql+psycopg://someone:{PASSWORD}@{host}/{db or 'scores'}"
    build_drops(home.landing_dir)
    secrets = {"DATABASE_URL": url, "SENDGRID_API_KEY": API_KEY, "EMAIL_SERVICE": "sendgrid"}
    runs = [
        _cli(home, tmp_path, "health", **secrets),
        _cli(home, tmp_path, "db", "current", **secrets),
    ]
    if db:
        # Not retryable, so `run` fails at once (an unreachable server is retried for about
        # two minutes: test_outages covers that run with a fast clock).
        run = _cli(
            home, tmp_path, "run", "--as-of", T.isoformat(), "--history-days", "1", **secrets
        )
        assert run.returncode == 1 and "FAILED" in run.stdout
        assert "someone:***@" in run.stdout  # it says where, with the password hidden
        runs.append(run)
    for done in runs:
        assert done.returncode != 0, done.args
        text = done.stdout + done.stderr
        assert not leaks(text), f"{leaks(text)} in `{' '.join(done.args[1:3])}`:\n{text[-2000:]}"
