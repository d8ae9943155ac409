"""The configuration as the command line sees it, against the real servers: `forwarder
config`, commands without passwords, `--mailbox`, a mailboxes file, and settings that
would inject protocol commands (issue 8.9)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.test_cli import forwarder

CANARY = "canary-Cfg-Pa55w0rd"


def state_only(tmp_path: Path) -> dict[str, str]:
    """The process's environment (no FORWARDER_* left: conftest) with only the state file."""
    return {**os.environ, "FORWARDER_STATE_DB": str(tmp_path / "state.db")}


def settings_of(stdout: str) -> dict[str, tuple[str, str]]:
    """`NAME = value  # source` lines -> {NAME: (value, source)}."""
    found = {}
    for line in stdout.splitlines():
        if " = " in line and not line.startswith("#"):
            setting, _, rest = line.partition(" = ")
            value, _, source = rest.rpartition(" # ")
            found[setting] = (value.strip(), source)
    return found


def events(stdout: str) -> list[str]:
    return [json.loads(line)["event"] for line in stdout.splitlines() if line.startswith("{")]


# forwarder config --------------------------------------------------------------------


def test_config_prints_each_setting_with_its_source_and_masks_secrets(
    env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    env = env_for_subprocess
    env["FORWARDER_IMAP_PASSWORD"] = CANARY
    env["FORWARDER_POLL_INTERVAL"] = "10m"
    del env["FORWARDER_LOG_FORMAT"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp_password").write_text(CANARY + "-smtp\n")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    env["FORWARDER_SMTP_USERNAME"] = "relay@example.org"
    (tmp_path / ".env").write_text("FORWARDER_LOG_LEVEL=debug\nFORWARDER_IMAP_FOLDER=Lists\n")
    env["FORWARDER_IMAP_FOLDER"] = "INBOX"  # the environment wins over .env
    result = forwarder(env, "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert CANARY not in result.stdout + result.stderr
    shown = settings_of(result.stdout)
    assert shown["FORWARDER_IMAP_PASSWORD"] == ("********", "environment")
    assert shown["FORWARDER_SMTP_PASSWORD"] == (
        "********",
        f"credential file {credentials / 'smtp_password'}",
    )
    assert shown["FORWARDER_POLL_INTERVAL"] == ("10m", "environment")
    assert shown["FORWARDER_LOG_LEVEL"] == ("debug", f".env {tmp_path / '.env'}")
    assert shown["FORWARDER_IMAP_FOLDER"] == ("INBOX", "environment")
    assert shown["FORWARDER_RETRY_FOR"] == ("5d", "default")
    assert shown["FORWARDER_SMTP_PORT"][1] == "environment"
    assert shown["FORWARDER_TLS_CA_FILE"] == ("", "unset")


def test_config_needs_no_password_and_no_list(tmp_path: Path) -> None:
    env = state_only(tmp_path)
    result = forwarder(env, "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = settings_of(result.stdout)
    assert shown["FORWARDER_IMAP_PASSWORD"] == ("", "unset")
    assert shown["FORWARDER_STATE_DB"] == (str(tmp_path / "state.db"), "environment")
    assert shown["FORWARDER_IMAP_PORT"] == ("993 (for tls)", "default")


def test_config_shows_each_mailbox_of_a_mailboxes_file(tmp_path: Path) -> None:
    path = tmp_path / "mailboxes.toml"
    path.write_text(
        '[[mailbox]]\nname = "acme"\nimap_username = "catchall@acme.example"\n'
        'imap_password_file = "acme.imap"\n\n'
        '[[mailbox]]\nname = "globex"\nsmtp_host = "smtp.globex.example"\n'
    )
    env = {
        **state_only(tmp_path),
        "FORWARDER_MAILBOXES_FILE": str(path),
        "FORWARDER_SMTP_HOST": "relay.example.net",
        "FORWARDER_SMTP_USERNAME": "relay@example.net",
        "FORWARDER_SMTP_PASSWORD": CANARY,
    }
    result = forwarder(env, "config", "--mailbox", "acme", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert CANARY not in result.stdout
    section = result.stdout.split("[mailbox acme]\n")[1]
    shown = settings_of(section)
    assert shown["imap_username"] == ("catchall@acme.example", "mailboxes file")
    assert shown["imap_password_file"] == (str(tmp_path / "acme.imap"), "mailboxes file")
    assert shown["smtp_host"] == ("relay.example.net", "environment (FORWARDER_SMTP_HOST)")
    assert shown["smtp_password"] == ("********", "environment (FORWARDER_SMTP_PASSWORD)")
    assert shown["folder"] == ("INBOX", "default")
    assert "[mailbox globex]" not in result.stdout
    everything = forwarder(env, "config", cwd=tmp_path)
    globex = settings_of(everything.stdout.split("[mailbox globex]\n")[1])
    assert globex["smtp_host"] == ("smtp.globex.example", "mailboxes file")
    assert globex["smtp_username"] == ("", "unset")  # the relay's login stays with the relay


# Commands that never talk to the mail servers need no password ------------------------


def test_status_runs_with_only_the_state_settings(tmp_path: Path) -> None:
    from forwarder.sqlite_store import SqliteStateStore

    SqliteStateStore(tmp_path / "state.db").close()
    env = state_only(tmp_path)
    result = forwarder(env, "status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"state store: {tmp_path / 'state.db'}\n")


def test_once_still_needs_the_passwords(tmp_path: Path) -> None:
    env = state_only(tmp_path)
    result = forwarder(env, "once", cwd=tmp_path)
    assert result.returncode == 2
    assert "is required but not set" in result.stderr


@pytest.mark.parametrize("command", ["once", "check", "status", "config"])
def test_an_unknown_mailbox_is_exit_2_listing_the_configured_ones(
    env_for_subprocess: dict[str, str], command: str
) -> None:
    result = forwarder(env_for_subprocess, command, "--mailbox", "initech")
    assert result.returncode == 2
    assert result.stderr == (
        "forwarder: configuration error: --mailbox initech: no such mailbox; configured: default\n"
    )


# Many mailboxes against the real servers ---------------------------------------------


@pytest.fixture
def two_folders(
    mailbox: MailServer, env_for_subprocess: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    """Two mailboxes on the one test account: `main` reads INBOX for contact@, `side` reads
    the folder Side for compta@. The IMAP login and the SMTP sink come from the variables."""
    with mailbox.imap() as client:
        client.create_folder("Side")
        client.append("Side", build_message(to="compta@example.org"))
        client.logout()
    mailbox.deliver(build_message(), ["contact@example.org"])
    path = tmp_path / "mailboxes.toml"
    path.write_text(
        '[[mailbox]]\nname = "main"\n'
        'lists = { "contact@example.org" = ["alice@example.org", "bob@example.org"] }\n\n'
        '[[mailbox]]\nname = "side"\nfolder = "Side"\n'
        'lists = { "compta@example.org" = ["carol@example.org"] }\n'
    )
    env = dict(env_for_subprocess)
    del env["FORWARDER_LISTS"]
    env["FORWARDER_MAILBOXES_FILE"] = str(path)
    return env


def test_once_with_a_mailboxes_file_serves_every_mailbox(
    two_folders: dict[str, str], smtp_sink: SmtpSink
) -> None:
    result = forwarder(two_folders, "once")
    assert result.returncode == 0, result.stderr
    assert sorted(sorted(r.rcpt_tos) for r in smtp_sink.received) == [
        ["alice@example.org", "bob@example.org"],
        ["carol@example.org"],
    ]


def test_once_with_mailbox_serves_only_that_one(
    two_folders: dict[str, str], smtp_sink: SmtpSink
) -> None:
    result = forwarder(two_folders, "once", "--mailbox", "side")
    assert result.returncode == 0, result.stderr
    assert [r.rcpt_tos for r in smtp_sink.received] == [["carol@example.org"]]
    again = forwarder(two_folders, "once")
    assert again.returncode == 0, again.stderr
    assert sorted(sorted(r.rcpt_tos) for r in smtp_sink.received) == [
        ["alice@example.org", "bob@example.org"],
        ["carol@example.org"],
    ]


# CR LF in a setting must never reach the server (issue 8.9) ---------------------------


def test_a_username_with_crlf_sends_nothing_to_the_real_dovecot(
    mailbox: MailServer, env_for_subprocess: dict[str, str]
) -> None:
    with mailbox.imap() as client:
        client.create_folder("Victim")
        client.logout()
    with FaultProxy(mailbox.host, mailbox.imap_port, record=True) as proxy:
        env_for_subprocess["FORWARDER_IMAP_PORT"] = str(proxy.port)
        env_for_subprocess["FORWARDER_IMAP_USERNAME"] = (
            f'{mailbox.username} "{mailbox.password}"\r\nZ1 DELETE Victim'
        )
        for command in ("once", "check"):
            result = forwarder(env_for_subprocess, command)
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith(
                "forwarder: configuration error: FORWARDER_IMAP_USERNAME: contains CR and LF"
            )
            assert result.stderr.count("\n") == 1
        assert proxy.recorded("client") == b""
    with mailbox.imap() as client:
        folders = [name for _flags, _delimiter, name in client.list_folders()]
        client.logout()
    assert "Victim" in folders


def test_an_unreadable_credential_file_is_exit_2_in_one_line(
    env_for_subprocess: dict[str, str], tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials"
    (credentials / "imap_password").mkdir(parents=True)  # read() fails: EISDIR
    env_for_subprocess["CREDENTIALS_DIRECTORY"] = str(credentials)
    result = forwarder(env_for_subprocess, "once")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "forwarder: configuration error: FORWARDER_IMAP_PASSWORD: cannot read the credential "
        f"file {credentials / 'imap_password'} ("
    )
    assert "Traceback" not in result.stderr
