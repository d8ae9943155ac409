"""No secret ever leaves the process: not in logs, exception texts, reprs or the state store."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from forwarder.config import load_settings
from forwarder.errors import (
    EXIT_AUTH,
    ConfigError,
    ForwarderError,
    ImapAuthError,
    SmtpAuthError,
)
from tests.conftest import LISTS, MakeSettings, forward_once
from tests.leaks import SECRET, spellings
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.test_daemon import Daemon

CANARY = "canary-Pw-7f3Qz9-do-not-log"
SMTP_USER = "relay@example.org"


def texts_of(error: BaseException) -> list[str]:
    """Everything an operator could see of an exception, causes included."""
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


async def test_a_canary_password_appears_in_no_log_event_exception_repr_or_state(
    mailbox: MailServer,
    make_settings: MakeSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every library logger, at its most verbose
    seen: list[str] = []
    errors: list[BaseException] = []
    with capture_logs() as events:
        # A whole cycle that needs the canary to log in to the SMTP server.
        mailbox.deliver(build_message(), ["contact@example.org"])
        with SmtpSink(auth=(SMTP_USER, CANARY)) as sink:
            settings = make_settings(
                smtp_port=sink.port, smtp_username=SMTP_USER, smtp_password=CANARY
            )
            seen += [repr(settings), str(settings), settings.model_dump_json()]
            seen += [repr(settings.model_dump())]
            await forward_once(settings)
            assert len(sink.received) == 1  # the canary was really used

        # The SMTP server refusing the canary.
        mailbox.deliver(build_message(), ["contact@example.org"])
        with SmtpSink(auth=(SMTP_USER, "another-password")) as sink:
            settings = make_settings(
                smtp_port=sink.port, smtp_username=SMTP_USER, smtp_password=CANARY
            )
            with pytest.raises(SmtpAuthError) as smtp_refused:
                await forward_once(settings)
            errors.append(smtp_refused.value)

        # The IMAP server refusing the canary.
        with pytest.raises(ImapAuthError) as imap_refused:
            await forward_once(make_settings(imap_password=CANARY))
        errors.append(imap_refused.value)

        # Configuration errors while the canary is set, as arguments and in the environment.
        base = {
            "_env_file": None,
            "imap_host": "imap.example.org",
            "imap_username": "catchall@example.org",
            "smtp_host": "smtp.example.org",
            "smtp_username": "relay@example.org",
        }
        for bad in ({"lists": "{not json"}, {"smtp_port": "0"}, {"tls_ca_file": "/nonexistent"}):
            with pytest.raises(ConfigError) as config_error:
                load_settings(**base, imap_password=CANARY, smtp_password=CANARY, **bad)
            errors.append(config_error.value)
        monkeypatch.setenv("FORWARDER_IMAP_PASSWORD", CANARY)
        monkeypatch.setenv("FORWARDER_SMTP_PASSWORD", CANARY)
        monkeypatch.setenv("FORWARDER_LISTS", '{"contact@example.org": []}')
        with pytest.raises(ConfigError) as env_error:
            load_settings(**base)
        errors.append(env_error.value)
        monkeypatch.setenv("FORWARDER_LISTS", json.dumps(LISTS))
        settings = load_settings(**base, envelope_sender="lists-admin@example.org")
        [box] = settings.mailboxes()
        assert box.imap.password.get_secret_value() == CANARY  # read from the environment
        seen += [repr(settings), str(settings), settings.model_dump_json(), repr(box), str(box)]

    assert len(errors) == 6 and all(isinstance(e, ForwarderError) for e in errors)
    assert any(e["event"] == "cycle_finished" for e in events)
    captured = capsys.readouterr()
    # Every library's records, except those of the test SMTP server (aiosmtpd's "mail.log").
    records = [r for r in caplog.records if not r.name.startswith("mail.log")]
    assert {r.name.partition(".")[0] for r in records} >= {"imapclient"}
    seen += [repr(e) for e in events] + [captured.out, captured.err]
    seen += [logging.Formatter().format(r) for r in records]
    seen += [text for error in errors for text in texts_of(error)]
    leaks = [text for text in seen if CANARY in text]
    assert leaks == []
    for path in tmp_path.glob("state.db*"):  # the state store and its WAL
        assert CANARY.encode() not in path.read_bytes()


def test_non_ascii_passwords_appear_in_no_output_of_a_running_forwarder(
    mailbox: MailServer, env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    """A real `forwarder run`, debug logs: logins with UTF-8 passwords, then a refused one."""
    imap_user = "utf8@example.org"
    imap_password = MailServer.other_logins[imap_user]
    smtp_password = SECRET  # another non-ASCII password, with both quotes and a backslash
    env = dict(env_for_subprocess, FORWARDER_LOG_LEVEL="debug", FORWARDER_POLL_INTERVAL="3600")
    env.update(
        FORWARDER_IMAP_USERNAME=imap_user,
        FORWARDER_IMAP_PASSWORD=imap_password,
        FORWARDER_SMTP_USERNAME=SMTP_USER,
        FORWARDER_SMTP_PASSWORD=smtp_password,
    )
    mailbox.deliver(build_message(), ["contact@example.org"])
    with SmtpSink(auth=(SMTP_USER, smtp_password)) as sink:
        env["FORWARDER_SMTP_PORT"] = str(sink.port)
        daemon = Daemon(env)
        try:
            daemon.wait_for_event("message_forwarded")
            daemon.wait_for_event("idle_started")
            # The SMTP server now refuses the password: `run` stops on it (exit 3).
            sink.auth = (SMTP_USER, "another-password")
            sink.drop_connections()
            mailbox.deliver(build_message(), ["contact@example.org"])
            status = daemon.process.wait(timeout=30)
            assert daemon.process.stderr is not None
            stderr = daemon.process.stderr.read()
        finally:
            daemon.close()  # after the last stdout line was read
    assert status == EXIT_AUTH
    output = "".join(daemon.lines) + stderr
    assert "refused the login" in stderr
    for password in (imap_password, smtp_password):
        leaks = [name for name, spelt in spellings(password).items() if spelt in output]
        assert leaks == []
