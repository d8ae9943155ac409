"""What one catch-all needs, apart from process-wide settings: its IMAP endpoint, the
SMTP endpoint that re-sends its mail, its lists and its envelope sender.

Plain frozen data, built from the configuration (`forwarder.config`); every
component takes the piece it uses (an `ImapSource` an `ImapEndpoint`, a relay
an `SmtpEndpoint`), never the whole configuration.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import SecretStr

Security = Literal["tls", "starttls", "none"]
DEFAULT_IMAP_PORTS: dict[str, int] = {"tls": 993, "starttls": 143, "none": 143}
DEFAULT_SMTP_PORTS: dict[str, int] = {"tls": 465, "starttls": 587, "none": 25}
DEFAULT_MAILBOX = "default"  # the name of the one mailbox configured by FORWARDER_* variables
# A mailbox name keys the state store: short, safe in a log line, a file name or a metric label.
MAILBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class ImapEndpoint:
    host: str
    port: int
    security: Security
    username: str
    password: SecretStr
    folder: str = "INBOX"
    timeout: float = 120.0

    @property
    def server(self) -> str:
        return f"IMAP server {self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SmtpEndpoint:
    host: str
    port: int
    security: Security
    username: str | None = None
    password: SecretStr | None = None
    timeout: float = 600.0
    connections: int = 4
    helo_name: str | None = None  # FORWARDER_SMTP_HELO_NAME; None: the FQDN or an address literal

    @property
    def server(self) -> str:
        return f"SMTP server {self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One catch-all and its lists. `name` keys everything the state store keeps for it."""

    name: str
    imap: ImapEndpoint
    smtp: SmtpEndpoint
    lists: dict[str, tuple[str, ...]]  # list address -> member accounts, nested lists expanded
    envelope_sender: str
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(json.dumps(sorted(self.lists.items())).encode()).hexdigest()
        object.__setattr__(self, "fingerprint", digest[:16])
