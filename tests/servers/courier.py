"""A private Courier-IMAP 5.0 on a free loopback port, and its fixtures.

Courier conflicts with the Dovecot packages: it runs from its unpacked .deb files
in a :class:`~tests.servers.sandbox.Sandbox` (``make test-servers``).  Its login
daemon has fixed paths (``/etc/courier/authdaemonrc``, the modules in
``/usr/lib/courier-authlib``, the socket ``/run/courier/authdaemon/socket``):
the sandbox's private ``/etc`` and ``/run`` hold this instance's.  Two daemons
run there, as Debian's init scripts would start them: ``authdaemond`` (the
``authuserdb`` module, ``/etc/courier/userdb`` built by ``makeuserdb``) and
``couriertcpd`` running ``imaplogin`` then ``imapd`` for each connection, with
the settings of ``/etc/courier/imapd`` given as its environment (Debian's
defaults, :data:`DEBIAN_IMAPD`, then the instance's).

The catch-all is a Maildir written directly, as an MTA's maildir delivery does
(Postfix's ``virtual``, Exim's ``appendfile``): :meth:`CourierServer.deliver`
puts ``Delivered-To: <address>`` on top, as Postfix's ``virtual`` would.

Facts seen here (/work/shared/real-servers-notes.md): no MOVE; with
``IMAP_KEYWORDS=0`` a STORE naming a keyword is answered ``BAD``; IDLE reports
new mail only at its next check, every ``IMAP_IDLE_TIMEOUT`` (60 s) with
Debian's defaults, within about a second with ``IMAP_ENHANCEDIDLE=1``
(:data:`RECIPE_IMAPD`, what docs/deployments.md says, checked by
tests/test_deployments_doc.py).  Courier logs to syslog: the sandbox writes it
to ``syslog`` in the instance directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.servers.common import (
    LOOPBACK,
    ImapCatchAll,
    Server,
    free_port,
    wait_ports_free,
)
from tests.servers.sandbox import SANDBOXED_FIXTURES, Command, Sandbox, require_unpacked

__all__ = [
    "DEBIAN_IMAPD",
    "RECIPE_IMAPD",
    "CourierServer",
    "courier",
    "courier_plain_idle",
    "courier_without_keywords",
]

SANDBOXED_FIXTURES.update(
    {"courier_server", "courier_without_keywords_server", "courier_plain_idle_server"}
)
AUTHDAEMOND = "/usr/lib/courier/courier-authlib/authdaemond"
COURIERTCPD = "/usr/sbin/couriertcpd"
IMAPLOGIN = "/usr/lib/courier/courier/imaplogin"
IMAPD = "/usr/bin/imapd"

# Debian's /etc/courier/imapd, the settings that matter here.
DEBIAN_IMAPD = {
    "IMAP_CAPABILITY": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT "
    "THREAD=REFERENCES SORT QUOTA IDLE",
    "IMAP_KEYWORDS": "1",
    "IMAP_ACL": "1",
    "IMAP_IDLE_TIMEOUT": "60",
    "IMAP_ENHANCEDIDLE": "0",
    "IMAP_MAILBOX_SANITY_CHECK": "1",
    "IMAP_USELOCKS": "1",
    "IMAP_UMASK": "022",
    "IMAP_TRASHFOLDERNAME": "Trash",
    "IMAP_EMPTYTRASH": "Trash:7",
    "IMAP_MOVE_EXPUNGE_TO_TRASH": "0",
    "IMAP_STARTTLS": "NO",
    "MAILDIRPATH": "Maildir",
}
# docs/deployments.md, "Courier-IMAP": what to change in /etc/courier/imapd.
RECIPE_IMAPD = {"IMAP_ENHANCEDIDLE": "1"}


class CourierServer(ImapCatchAll, Server):
    """Courier-IMAP with one catch-all Maildir, the /etc/courier/imapd settings given."""

    username = "catchall@example.org"
    password = "secret"

    def __init__(self, settings: Mapping[str, str] = RECIPE_IMAPD, start_timeout: float = 20):
        self.host = LOOPBACK
        self.settings = {**DEBIAN_IMAPD, **settings}
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="courier-"))
        self.base_dir.chmod(0o755)
        self.sandbox = Sandbox(self.base_dir)
        self.home = self.base_dir / "mail" / "catchall"
        self.maildir = self.home / "Maildir"
        self.mail_uid, self.mail_gid = 65534, 65534  # nobody, nogroup
        self.imap_port = 0
        self._count = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.sandbox.running

    def start(self) -> None:
        if self.running:
            raise RuntimeError("Courier already running")
        if self.imap_port == 0:
            self.imap_port = free_port(self.host)
            self._prepare()
        tcpd = [
            COURIERTCPD, f"-address={self.host}", "-nodnslookup", "-noidentlookup",
            "-maxprocs=40", "-maxperip=20", str(self.imap_port), IMAPLOGIN, IMAPD, "Maildir",
        ]
        self.sandbox.start(
            [Command([AUTHDAEMOND]), Command(tcpd, self.settings)],
            setup=[Command(["/usr/sbin/makeuserdb"])],
        )
        self.sandbox.wait_for_greetings(
            self.host, [(self.imap_port, b"* OK")], self.start_timeout, "Courier"
        )

    def stop(self, timeout: float = 15.0) -> None:
        self.sandbox.stop(timeout)
        wait_ports_free(self.host, (self.imap_port,), timeout, "Courier")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return self.sandbox.log_tail(lines)

    # ---------------------------------------------------------------- mail

    def deliver(self, raw: bytes, rcpts: list[str]) -> None:
        """Store one copy per recipient in the Maildir, ``Delivered-To:`` on top."""
        for rcpt in rcpts:
            self._count += 1
            name = f"{time.time_ns()}.P{os.getpid()}Q{self._count}.test"
            staged = self.maildir / "tmp" / name
            staged.write_bytes(f"Delivered-To: {rcpt}\n".encode() + raw.replace(b"\r\n", b"\n"))
            os.chown(staged, self.mail_uid, self.mail_gid)
            staged.rename(self.maildir / "new" / name)

    # ---------------------------------------------------------------- internals

    def _prepare(self) -> None:
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        subprocess.run(
            ["chown", "-R", f"{self.mail_uid}:{self.mail_gid}", str(self.home)], check=True
        )
        etc = self.sandbox.etc / "courier"
        etc.mkdir()
        (etc / "authdaemonrc").write_text(
            'authmodulelist="authuserdb"\ndaemons=1\nauthdaemonvar=/run/courier/authdaemon\n'
            'DEBUG_LOGIN=0\nDEFAULTOPTIONS=""\nLOGGEROPTS=""\n'
        )
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=self.password.encode(), capture_output=True, check=True,
        ).stdout.decode().strip()
        fields = f"uid={self.mail_uid}|gid={self.mail_gid}|home={self.home}|"
        fields += f"mail={self.maildir}|systempw={hashed}"
        userdb = etc / "userdb"
        userdb.write_text(f"{self.username}\t{fields}\n")
        userdb.chmod(0o600)
        (self.sandbox.dir / "run" / "courier" / "authdaemon").mkdir(parents=True)


# --------------------------------------------------------------------------- fixtures


def _session_courier(settings: Mapping[str, str]) -> Iterator[CourierServer]:
    require_unpacked(AUTHDAEMOND, COURIERTCPD, IMAPLOGIN, IMAPD)
    server = CourierServer(settings)
    try:
        server.start()
        yield server
    finally:
        server.close()


def _emptied(server: CourierServer) -> CourierServer:
    if not server.running:
        server.start()
    server.clear()
    return server


@pytest.fixture(scope="session")
def courier_server() -> Iterator[CourierServer]:
    """Courier as docs/deployments.md sets it (IMAP_ENHANCEDIDLE=1), keywords on."""
    yield from _session_courier(RECIPE_IMAPD)


@pytest.fixture
def courier(courier_server: CourierServer) -> CourierServer:
    return _emptied(courier_server)


@pytest.fixture(scope="session")
def courier_without_keywords_server() -> Iterator[CourierServer]:
    """Courier with IMAP_KEYWORDS=0: no user keyword can be stored."""
    yield from _session_courier({**RECIPE_IMAPD, "IMAP_KEYWORDS": "0"})


@pytest.fixture
def courier_without_keywords(courier_without_keywords_server: CourierServer) -> CourierServer:
    return _emptied(courier_without_keywords_server)


@pytest.fixture(scope="session")
def courier_plain_idle_server() -> Iterator[CourierServer]:
    """Courier with Debian's IDLE settings (IMAP_ENHANCEDIDLE=0)."""
    yield from _session_courier({})


@pytest.fixture
def courier_plain_idle(courier_plain_idle_server: CourierServer) -> CourierServer:
    return _emptied(courier_plain_idle_server)
