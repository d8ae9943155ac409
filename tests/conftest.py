"""Shared fixtures: real Dovecot, SMTP and PostgreSQL servers (tests/servers/), settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from forwarder.config import Settings, load_settings
from forwarder.cycle import Forwarder
from forwarder.factory import build_forwarder
from forwarder.imap_source import ImapSource
from forwarder.reporting import CycleSummary
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import StateStore

if TYPE_CHECKING:
    from tests.servers import MailServer, SmtpSink

# Real servers (one module each, with its fixtures), then faults in front of them.
# The package comes first: that marks all its modules for assertion rewriting
# before its __init__ imports them.
pytest_plugins = [
    "tests.servers",
    "tests.servers.dovecot",
    "tests.servers.sink",
    "tests.servers.postgres",
    "tests.servers.postfix",
    "tests.servers.systemd",
    "tests.servers.journald",
    "tests.servers.sandbox",  # Cyrus, Courier and Exim, unpacked: make test-servers
    "tests.servers.cyrus",
    "tests.servers.exim",
    "tests.servers.courier",
    "tests.faults",
    "tests.imap_faults",
    "tests.disk",  # a small tmpfs that fills up
    "tests.deployment",  # the project installed in a systemd container
    "tests.daemon_process",
]

LISTS: dict[str, list[str]] = {
    "contact@example.org": ["alice@example.org", "bob@example.org"],
    "compta@example.org": ["bob@example.org", "carol@example.org"],
    "direction@example.org": ["dave@example.org"],
}
ADMIN = "lists-admin@example.org"

MakeSettings = Callable[..., Settings]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FORWARDER_* or libpq PG* variable or .env file of the developer leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("FORWARDER_", "PG")) or name in (
            "CREDENTIALS_DIRECTORY",
            "NOTIFY_SOCKET",
            "STATE_DIRECTORY",  # the default state file: tests never use the system's
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


class ImapAccount(Protocol):
    """A test IMAP server's catch-all login (Dovecot, Cyrus, Courier)."""

    host: str
    imap_port: int
    username: str
    password: str


def settings_for(
    account: ImapAccount, smtp: SmtpSink, state_db: Path | str, **overrides: Any
) -> Settings:
    """Settings reading ``account``'s INBOX in clear and sending to ``smtp`` (LISTS, ADMIN)."""
    values: dict[str, Any] = {
        "_env_file": None,
        "imap_host": account.host,
        "imap_port": account.imap_port,
        "imap_security": "none",
        "imap_username": account.username,
        "imap_password": account.password,
        "smtp_host": smtp.host,
        "smtp_port": smtp.port,
        "smtp_security": "none",
        "lists": LISTS,
        "envelope_sender": ADMIN,
        "state_db": state_db,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def make_settings(mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path) -> MakeSettings:
    def make(**overrides: Any) -> Settings:
        state_db = overrides.pop("state_db", tmp_path / "state.db")
        return settings_for(mailbox, smtp_sink, state_db, **overrides)

    return make


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    return make_settings()


def make_forwarder(settings: Settings, store: StateStore, now: float | None = None) -> Forwarder:
    """The pipeline of the settings' one mailbox, as the commands build it."""
    kwargs = {"clock": lambda: now} if now is not None else {}
    return build_forwarder(settings, settings.mailboxes()[0], store, **kwargs)  # type: ignore[arg-type]


def imap_source(settings: Settings) -> ImapSource:
    """The IMAP source of the settings' one mailbox."""
    return ImapSource(settings.mailboxes()[0].imap, settings.tls_ca_file)


async def forward_once(settings: Settings, now: float | None = None) -> CycleSummary:
    """One poll cycle with a fresh Forwarder, as `forwarder once` does."""
    store = SqliteStateStore(settings.state_db)
    forwarder = make_forwarder(settings, store, now)
    try:
        return await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()


@pytest.fixture
def env_for_subprocess(
    mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path
) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    from tests.servers import server_env  # imported late: pytest_plugins rewrites it first

    env.update(server_env(mailbox, smtp_sink, tmp_path / "state.db", LISTS, ADMIN))
    yield env
