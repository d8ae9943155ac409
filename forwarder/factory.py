"""Building the resources of a run from the settings: the state store, and for each
mailbox its IMAP source, SMTP pool and pipeline. Tests build their own and pass them in.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable

from forwarder.config import ProcessSettings
from forwarder.cycle import CycleOptions, Forwarder
from forwarder.errors import ConfigError
from forwarder.imap_source import ImapSource
from forwarder.mailbox import Mailbox
from forwarder.smtp_pool import SmtpPool
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import StateStore
from forwarder.state_location import create_default_directory


def owner_id() -> str:
    """Who claims deliveries: unique per process, readable in the store."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def open_store(
    settings: ProcessSettings, *, exclusive: bool = True, readonly: bool = False
) -> StateStore:
    """The configured state store: PostgreSQL when FORWARDER_STATE_URL is set (shared by
    instances: `exclusive` does not apply), else the SQLite file. Raises StateError when
    it cannot be opened."""
    if settings.state_url is None:
        if settings.state_db_is_default and not readonly:
            create_default_directory(settings.state_db)
        return SqliteStateStore(settings.state_db, exclusive=exclusive, readonly=readonly)
    try:
        from forwarder.pg_store import PgStateStore
    except ImportError:
        raise ConfigError(
            "FORWARDER_STATE_URL: PostgreSQL needs psycopg; install forwarder[postgres]"
        ) from None
    password = settings.state_password
    return PgStateStore(
        settings.state_url.get_secret_value(),
        password=password.get_secret_value() if password else None,
        ca_file=settings.tls_ca_file,
        readonly=readonly,
    )


def store_label(settings: ProcessSettings) -> str:
    """The state store as a person recognises it, without any password."""
    if settings.state_url is None:
        return str(settings.state_db)
    from forwarder.pg_connect import target

    return target(settings.state_url.get_secret_value()).label


def cycle_options(settings: ProcessSettings) -> CycleOptions:
    return CycleOptions(
        fetch_batch_bytes=settings.fetch_batch_bytes,
        fetch_batch_messages=settings.fetch_batch_messages,
        retry_for=settings.retry_for,
        state_retention=settings.state_retention,
        claim_lease=settings.takeover_after,
    )


def build_forwarder(
    settings: ProcessSettings,
    mailbox: Mailbox,
    store: StateStore,
    *,
    owner: str | None = None,
    clock: Callable[[], float] = time.time,
    smtp: SmtpPool | None = None,
) -> Forwarder:
    """`smtp`: a pool shared with other mailboxes of the same SMTP endpoint (`forwarder
    run`: a provider's relay gets a few connections, not some per mailbox)."""
    return Forwarder(
        mailbox,
        cycle_options(settings),
        store,
        ImapSource(mailbox.imap, settings.tls_ca_file),
        smtp or SmtpPool(mailbox.smtp, settings.tls_ca_file),
        owner=owner or owner_id(),
        clock=clock,
    )
