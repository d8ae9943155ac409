"""The default state file: never relative to the working directory (issue 8.8)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forwarder import state_location
from forwarder.config import load_process_settings
from forwarder.errors import StateError
from forwarder.factory import open_store
from forwarder.state_location import default_state_db
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink
from tests.test_cli import forwarder

HOME = Path("/home/ann")


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        pytest.param(
            {"STATE_DIRECTORY": "/var/lib/forwarder"},
            0,
            "/var/lib/forwarder/state.db",
            id="systemd-state-directory",
        ),
        pytest.param(
            {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"},
            1000,
            "/var/lib/a/state.db",
            id="systemd-first-of-several",
        ),
        pytest.param({}, 0, "/var/lib/forwarder/state.db", id="root"),
        pytest.param({}, 1000, "/home/ann/.local/state/forwarder/state.db", id="user"),
        pytest.param(
            {"XDG_STATE_HOME": "/srv/state"},
            1000,
            "/srv/state/forwarder/state.db",
            id="user-xdg-state-home",
        ),
        pytest.param(
            {"XDG_STATE_HOME": "relative"},
            1000,
            "/home/ann/.local/state/forwarder/state.db",
            id="user-relative-xdg-ignored",
        ),
    ],
)
def test_default_state_file_does_not_depend_on_the_working_directory(environ, euid, expected):
    path, _why = default_state_db(environ, euid, HOME)
    assert path == Path(expected)


def test_settings_use_the_default_state_file_when_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    settings = load_process_settings(_env_file=None)
    assert settings.state_db == tmp_path / "state" / "state.db"
    assert settings.state_db_is_default


def test_the_default_directory_is_created_with_mode_0700(monkeypatch, tmp_path):
    monkeypatch.setattr(state_location.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    settings = load_process_settings(_env_file=None)
    assert settings.state_db == tmp_path / "xdg" / "forwarder" / "state.db"
    open_store(settings).close()
    assert settings.state_db.is_file()
    assert (settings.state_db.parent.stat().st_mode & 0o777) == 0o700


def test_an_explicit_state_file_needs_an_existing_directory(tmp_path):
    settings = load_process_settings(_env_file=None, state_db=tmp_path / "missing" / "state.db")
    assert not settings.state_db_is_default
    with pytest.raises(StateError, match="does not exist"):
        open_store(settings)
    assert not (tmp_path / "missing").exists()


def test_reading_the_default_state_creates_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    with pytest.raises(StateError):
        open_store(load_process_settings(_env_file=None), readonly=True)
    assert not (tmp_path / "state").exists()


def test_once_from_another_directory_finds_the_same_state(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    """The 8.8 scenario: the service runs in one directory, an admin runs `once` in another."""
    del env_for_subprocess["FORWARDER_STATE_DB"]
    env_for_subprocess["STATE_DIRECTORY"] = str(tmp_path / "var-lib-forwarder")
    mailbox.deliver(build_message(), ["contact@example.org"])
    for directory in ("service", "admin"):
        cwd = tmp_path / directory
        cwd.mkdir()
        result = forwarder(env_for_subprocess, "once", cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert list(cwd.iterdir()) == []
    assert len(smtp_sink.received) == 1
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert "message_forwarded" not in events
    assert (tmp_path / "var-lib-forwarder" / "state.db").is_file()
    assert os.stat(tmp_path / "var-lib-forwarder").st_mode & 0o777 == 0o700
