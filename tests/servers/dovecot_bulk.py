"""Many messages in a test Dovecot's INBOX at once, for scale tests and the bench.

Delivering 100,000 messages by LMTP takes minutes; :func:`fill` writes the mail
files straight into the mail store and lets Dovecot index them (``doveadm
force-resync``), in seconds. Both of :class:`MailServer`'s formats:

* Maildir: one file per message in ``cur/``, named so that Dovecot gives UIDs in
  the order written (it sorts new files by the time in their names) and with
  ``S=``/``W=`` (sizes) in the name, as its own LMTP does;
* sdbox: ``u.<UID>`` files in Dovecot's dbox layout (a header line, the message
  with LF line ends, then the metadata: received time, virtual size, GUID), as
  its own LMTP writes them. The bench's figure wants sdbox: with Maildir, Dovecot
  re-reads its whole uidlist at every new session.

Each message looks delivered by LMTP to one recipient (``Return-Path:``,
``Delivered-To:``, ``Received: ... for <rcpt>`` on top), with its own
Message-ID; every ``unmatched_every``-th one is for an address that names no list.
The server must be running (UIDNEXT is asked over IMAP, then ``doveadm`` runs).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.servers.dovecot import MailServer

__all__ = ["FAST_DIR", "Filled", "bulk_message", "fill"]

# Creating a file costs about 1 ms on this machine's ext4, 13 us on tmpfs: a server
# for many messages is better made with MailServer(parent=FAST_DIR).
FAST_DIR = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
LIST_ADDRESS = "contact@example.org"
UNMATCHED_ADDRESS = "nobody-here@example.org"
_DATE = "Tue, 24 Nov 2026 10:00:00 +0000"


@dataclass(frozen=True)
class Filled:
    """What :func:`fill` wrote: UIDs ``first_uid`` to ``last_uid``."""

    first_uid: int
    last_uid: int
    unmatched: frozenset[int]  # UIDs of the messages naming no list
    write_seconds: float
    index_seconds: float

    @property
    def count(self) -> int:
        return self.last_uid - self.first_uid + 1


def bulk_message(n: int, rcpt: str) -> bytes:
    """Message number ``n`` for ``rcpt``, with CRLF line ends, as Dovecot's LMTP stores it."""
    return (
        f"Return-Path: <sender@remote.example>\r\n"
        f"Delivered-To: {rcpt}\r\n"
        f"Received: from [127.0.0.1] by bulk with LMTP id {n}\r\n"
        f"\tfor <{rcpt}>; {_DATE}\r\n"
        f"From: Customer <customer@remote.example>\r\n"
        f"To: {rcpt}\r\n"
        f"Subject: Bulk message {n}\r\n"
        f"Date: {_DATE}\r\n"
        f"Message-ID: <bulk-{n}@remote.example>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"Message number {n}.\r\n"
    ).encode()


def fill(
    server: MailServer,
    count: int,
    *,
    unmatched_every: int = 3,
    to: str = LIST_ADDRESS,
    unmatched_to: str = UNMATCHED_ADDRESS,
) -> Filled:
    """Append ``count`` messages to INBOX; every ``unmatched_every``-th names no list."""
    with server.imap() as client:
        first = int(client.folder_status("INBOX", ["UIDNEXT"])[b"UIDNEXT"])
        client.logout()
    uids = range(first, first + count)
    unmatched = frozenset(uid for uid in uids if (uid - first) % unmatched_every == 0)
    started = time.monotonic()
    writer = _MaildirWriter(server) if server.mail_format == "maildir" else _SdboxWriter(server)
    for uid in uids:
        writer.write(uid, bulk_message(uid, unmatched_to if uid in unmatched else to))
    written = time.monotonic()
    _doveadm(server, "force-resync", "-u", server.username, "INBOX")
    return Filled(
        first, first + count - 1, unmatched, written - started, time.monotonic() - written
    )


def _doveadm(server: MailServer, *args: str) -> None:
    subprocess.run(
        ["doveadm", "-c", str(server.config_path), *args],
        check=True,
        capture_output=True,
        timeout=600,
    )


class _Writer:
    """Writes mail files owned by the mail user, as Dovecot would."""

    def __init__(self, server: MailServer, directory: Path) -> None:
        self.uid, self.gid = server.mail_uid, server.mail_gid
        self.directory = directory
        self.stamp = int(time.time())
        for path in reversed([directory, *directory.parents]):
            if path == server.home or server.home not in path.parents:
                continue
            if not path.exists():
                path.mkdir(mode=0o700)
                os.chown(path, self.uid, self.gid)

    def _create(self, name: str, data: bytes) -> None:
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchown(fd, self.uid, self.gid)
            os.write(fd, data)
        finally:
            os.close(fd)


class _MaildirWriter(_Writer):
    def __init__(self, server: MailServer) -> None:
        super().__init__(server, server.maildir / "cur")
        for sibling in ("new", "tmp"):
            (server.maildir / sibling).mkdir(mode=0o700, exist_ok=True)
            os.chown(server.maildir / sibling, self.uid, self.gid)

    def write(self, uid: int, message: bytes) -> None:
        stored = message.replace(b"\r\n", b"\n")
        # Dovecot gives new files their UIDs in the order of the time in their names.
        seconds, micros = self.stamp + uid // 1_000_000, uid % 1_000_000
        name = f"{seconds}.M{micros}P{os.getpid()}.bulk,S={len(stored)},W={len(message)}:2,"
        self._create(name, stored)


class _SdboxWriter(_Writer):
    def __init__(self, server: MailServer) -> None:
        super().__init__(server, server.mail_root / "mailboxes" / "INBOX" / "dbox-Mails")

    def write(self, uid: int, message: bytes) -> None:
        stored = message.replace(b"\r\n", b"\n")
        header = b"2 M1e C%x\n\x01\x02N%s%016X\n" % (self.stamp, b" " * 10, len(stored))
        metadata = b"\n\x01\x03\nR%x\nV%x\nG%s\n\n" % (
            self.stamp,
            len(message),
            uuid.uuid4().hex.encode(),
        )
        self._create(f"u.{uid}", header + stored + metadata)
