"""A private Cyrus IMAP 3.6 (IMAP + LMTP) on free loopback ports, and its fixtures.

Cyrus conflicts with the Dovecot packages: it runs from its unpacked .deb files
in a :class:`~tests.servers.sandbox.Sandbox` (``make test-servers``).  Its
``master`` runs ``imapd`` and ``lmtpd`` from the instance's own ``imapd.conf``
and ``cyrus.conf``; logins are checked against a sasldb file (``saslpasswd2``).
The catch-all is the mailbox ``user/catchall``, created by the admin at the
first start.  LMTP runs with ``-a`` (no authentication), as for an MTA on the
same host.  Cyrus logs only to syslog: the sandbox writes it to ``syslog`` in
the instance directory.

Facts seen here (/work/shared/real-servers-notes.md): lmtpd delivers by
local part (``catchall``, ``catchall@example.org``) and refuses an unknown
mailbox, so a catch-all is the MTA's doing (tests.servers.exim); it records no
envelope recipient (its ``Received:`` has no ``for`` clause, no
``Delivered-To:``); with ``duplicatesuppression: 1`` (the default) a second
message with the same Message-ID for the same mailbox is accepted (250) and
dropped ("dupelim: eliminated duplicate message" in the log).
:data:`RECIPE_IMAPD` is what ``docs/deployments.md`` says to set, checked by
tests/test_deployments_doc.py.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.servers.common import (
    LOOPBACK,
    ImapCatchAll,
    Server,
    free_port,
    lmtp_deliver,
    wait_ports_free,
)
from tests.servers.sandbox import SANDBOXED_FIXTURES, Command, Sandbox, require_unpacked

__all__ = ["BIN", "RECIPE_IMAPD", "CyrusServer", "cyrus", "cyrus_dedup", "cyrus_server"]

BIN = "/usr/lib/cyrus/bin"
# docs/deployments.md, "Cyrus IMAP": what a catch-all served by Cyrus needs in imapd.conf.
RECIPE_IMAPD = {"duplicatesuppression": "0"}
SANDBOXED_FIXTURES.update({"cyrus_server", "cyrus_dedup_server"})
CYRUS_USER = "mail"  # owns the spool; the package's own "cyrus" user does not exist here


class CyrusServer(ImapCatchAll, Server):
    """Cyrus IMAP with one catch-all mailbox; ``duplicatesuppression`` as given."""

    username = "catchall"
    password = "secret"
    admin = "cyrusadmin"

    def __init__(self, duplicatesuppression: bool = False, start_timeout: float = 20) -> None:
        self.host = LOOPBACK
        self.duplicatesuppression = duplicatesuppression
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="cyrus-"))
        self.base_dir.chmod(0o755)
        self.sandbox = Sandbox(self.base_dir)
        self.imap_port = 0
        self.lmtp_port = 0
        self._created = False

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.sandbox.running

    def start(self) -> None:
        if self.running:
            raise RuntimeError("Cyrus already running")
        if self.imap_port == 0:
            self.imap_port, self.lmtp_port = free_port(self.host), free_port(self.host)
            self._prepare()
        conf = self.base_dir / "imapd.conf"
        self.sandbox.start(
            [Command([f"{BIN}/master", "-C", str(conf), "-M", str(self.base_dir / "cyrus.conf"),
                      "-p", str(self.base_dir / "master.pid")])]
        )
        probes = [(self.imap_port, b"* OK"), (self.lmtp_port, b"220")]
        self.sandbox.wait_for_greetings(self.host, probes, self.start_timeout, "Cyrus")
        if not self._created:
            with IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=10) as client:
                client.login(self.admin, self.password)
                client.create_folder(f"user/{self.username}")
                client.logout()
            self._created = True

    def stop(self, timeout: float = 15.0) -> None:
        self.sandbox.stop(timeout)
        wait_ports_free(self.host, (self.imap_port, self.lmtp_port), timeout, "Cyrus")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return self.sandbox.log_tail(lines)

    def log(self) -> str:
        path = self.sandbox.syslog_path
        return path.read_text(errors="replace") if path.exists() else ""

    # ---------------------------------------------------------------- mail

    def deliver(self, raw: bytes, rcpts: list[str], sender: str = "sender@remote.example") -> None:
        """Deliver by LMTP in one transaction (recipients: mailbox names, ``catchall``)."""
        lmtp_deliver(self.host, self.lmtp_port, raw, rcpts, sender)

    # ---------------------------------------------------------------- internals

    def _prepare(self) -> None:
        d = self.base_dir
        for sub in ("conf/db", "conf/proc", "conf/socket", "conf/lock", "conf/log", "conf/msg",
                    "conf/ptclient", "conf/quota", "conf/sieve", "conf/user", "spool", "sieve"):
            (d / sub).mkdir(parents=True)
        for name, password in ((self.username, self.password), (self.admin, self.password)):
            subprocess.run(
                ["saslpasswd2", "-f", str(d / "sasldb2"), "-p", "-c", name],
                input=password.encode(), check=True, capture_output=True,
            )
        settings = {
            "configdirectory": f"{d}/conf",
            "partition-default": f"{d}/spool",
            "sievedir": f"{d}/sieve",
            "cyrus_user": CYRUS_USER,
            "cyrus_group": CYRUS_USER,
            "admins": self.admin,
            "sasl_pwcheck_method": "auxprop",
            "sasl_auxprop_plugin": "sasldb",
            "sasl_sasldb_path": f"{d}/sasldb2",
            "sasl_mech_list": "PLAIN LOGIN",
            "allowplaintext": "yes",
            "unixhierarchysep": "yes",
            "syslog_prefix": f"cyrus-test-{d.name}",
            **RECIPE_IMAPD,
            "duplicatesuppression": "1" if self.duplicatesuppression else "0",
        }
        (d / "imapd.conf").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
        conf = f"-C {d}/imapd.conf"
        (d / "cyrus.conf").write_text(textwrap.dedent(f"""\
            START {{
              recover cmd="{BIN}/ctl_cyrusdb {conf} -r"
            }}
            SERVICES {{
              imap cmd="{BIN}/imapd {conf}" listen="{self.host}:{self.imap_port}" prefork=0
              lmtp cmd="{BIN}/lmtpd {conf} -a" listen="{self.host}:{self.lmtp_port}" prefork=0
            }}
            EVENTS {{
            }}
            DAEMON {{
            }}
            """))
        shutil.chown(d / "sasldb2", CYRUS_USER, CYRUS_USER)
        for path in (d / "conf", d / "spool", d / "sieve"):
            subprocess.run(["chown", "-R", f"{CYRUS_USER}:{CYRUS_USER}", str(path)], check=True)


# --------------------------------------------------------------------------- fixtures


def _session_cyrus(duplicatesuppression: bool) -> Iterator[CyrusServer]:
    require_unpacked(f"{BIN}/master", f"{BIN}/imapd", f"{BIN}/lmtpd")
    server = CyrusServer(duplicatesuppression=duplicatesuppression)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def cyrus_server() -> Iterator[CyrusServer]:
    """One Cyrus for the session, as docs/deployments.md sets it (duplicatesuppression: 0)."""
    yield from _session_cyrus(duplicatesuppression=False)


@pytest.fixture
def cyrus(cyrus_server: CyrusServer) -> CyrusServer:
    """The session's Cyrus, restarted if a test left it stopped, with an empty INBOX."""
    if not cyrus_server.running:
        cyrus_server.start()
    cyrus_server.clear()
    return cyrus_server


@pytest.fixture(scope="session")
def cyrus_dedup_server() -> Iterator[CyrusServer]:
    """A Cyrus with the default ``duplicatesuppression: 1``."""
    yield from _session_cyrus(duplicatesuppression=True)


@pytest.fixture
def cyrus_dedup(cyrus_dedup_server: CyrusServer) -> CyrusServer:
    cyrus_dedup_server.clear()
    return cyrus_dedup_server
