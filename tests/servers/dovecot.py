"""A private Dovecot 2.3 (IMAP + LMTP) on free loopback ports, and its fixtures.

:class:`MailServer` runs Dovecot from a temporary directory with a catch-all
mailbox, the way an MTA would deliver to it.  It must run as root (Dovecot's
privilege separation needs the ``dovecot``/``dovenull``/``nobody`` system
users), as tests and CI do.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from imapclient import IMAPClient

from tests.servers.common import (
    LOOPBACK,
    ImapCatchAll,
    Server,
    empty_inbox,
    free_port,
    lmtp_deliver,
    log_tail,
    port_is_bindable,
    self_signed_certificate,
    wait_for_port,
)

__all__ = ["MailFormat", "MailServer", "mailbox", "mailserver", "tls_mailbox", "tls_mailserver"]

MailFormat = Literal["maildir", "sdbox"]


class MailServer(ImapCatchAll, Server):
    """A private Dovecot (IMAP + LMTP) with one catch-all mailbox.

    Every LMTP recipient, whatever its address, is stored in the one maildir
    that ``username``/``password`` log in to over IMAP.  Dovecot's LMTP adds
    ``Return-Path:`` and ``Received:`` to each stored message.  Only when the
    LMTP transaction had exactly one recipient does it also add
    ``Delivered-To: <rcpt>`` and put ``for <rcpt>`` in ``Received:``; with
    several recipients each gets an identical copy naming none of them.

    Dovecot runs in the foreground (``dovecot -F``) as a child of the test
    process; ``stop()`` sends SIGTERM to the pid in ``run/master.pid``.
    ``restart()`` keeps the ports and the mail store.

    With ``tls=True`` a self-signed certificate for ``localhost``/127.0.0.1 is
    generated (``ca_file``), ``ssl = required`` is set, ``imap_port`` offers
    STARTTLS and ``imaps_port`` implicit TLS.  LMTP stays plaintext.  Dovecot
    counts a connection whose remote IP equals its local IP as secured, so on
    127.0.0.1 plaintext LOGIN is still allowed; with ``host="127.0.0.2"``
    (clients then connect from 127.0.0.1) ``ssl = required`` is enforced.

    ``mail_format`` is ``"maildir"`` (``maildir`` is its directory) or ``"sdbox"``
    (Dovecot's own one-file-per-message format, which keeps everything in its
    index: ``mail_root``); ``imap_connections`` is Dovecot's
    ``mail_max_userip_connections`` (1: a second session of the account is refused
    with ``NO [LIMIT]``); ``parent`` is where its temporary directory goes
    (``tests.servers.dovecot_bulk.FAST_DIR``, a tmpfs, for many messages).
    ``tests.servers.dovecot_bulk.fill()`` writes many messages at once.
    """

    username: str = "catchall@example.org"
    password: str = "secret"
    # Other logins to the same mailbox, for the credential tests. Written at start:
    # Dovecot may not see a passwd-file line added in the second of its last read.
    other_logins: ClassVar[dict[str, str]] = {
        "utf8@example.org": 'pässwörd-€-"\\-🔑',  # UTF-8 of 2, 3 and 4 bytes, IMAP escapes
    }

    def __init__(
        self,
        tls: bool = False,
        host: str = LOOPBACK,
        start_timeout: float = 10.0,
        *,
        mail_format: MailFormat = "maildir",
        imap_connections: int = 100,
        parent: Path | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.mail_format = mail_format
        self.imap_connections = imap_connections
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="dovecot-", dir=parent))
        self.base_dir.chmod(0o755)  # Dovecot's unprivileged processes must traverse it
        self.run_dir = self.base_dir / "run"
        self.home = self.base_dir / "mail" / "catchall"
        self.maildir = self.home / "Maildir"
        self.mail_root = self.maildir if mail_format == "maildir" else self.home / "sdbox"
        self.config_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.imap_port = 0
        self.lmtp_port = 0
        self.imaps_port: int | None = None
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.mail_uid = pwd.getpwnam("nobody").pw_uid
        self.mail_gid = grp.getgrnam("nogroup").gr_gid
        self._prepare_dirs()
        if tls:
            self.ca_file = self._make_certificate()

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start Dovecot and wait until IMAP and LMTP accept connections.

        The first start picks free ports (retrying if one was taken in the
        meantime); later starts reuse them.
        """
        if self.running:
            raise RuntimeError("Dovecot already running")
        first = self.imap_port == 0
        for attempt in range(3):
            if first:
                self.imap_port, self.lmtp_port = free_port(self.host), free_port(self.host)
                self.imaps_port = free_port(self.host) if self.tls else None
            try:
                self._start_once()
                return
            except RuntimeError as error:
                if not first or "Address already in use" not in str(error) or attempt == 2:
                    raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master and wait until it exited and the ports are free again."""
        process, self._process = self._process, None
        if process is None:
            return
        pid_file = self.run_dir / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = process.pid
        if process.poll() is None:
            os.kill(pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired as timeout_error:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"Dovecot did not stop within {timeout} s\n{self.log_tail()}"
            ) from timeout_error
        # Login processes may hold the listening sockets a little longer.
        deadline = time.monotonic() + timeout
        for port in self._ports():
            while not port_is_bindable(self.host, port):
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"port {port} still busy after Dovecot stopped")
                time.sleep(0.02)

    def close(self) -> None:
        """Stop Dovecot and remove its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail((self.stderr_path, self.log_path), lines)

    # ---------------------------------------------------------------- mail

    def deliver(self, raw: bytes, rcpts: list[str], sender: str = "sender@remote.example") -> None:
        """Deliver ``raw`` by LMTP in one transaction; raise if any recipient is refused."""
        lmtp_deliver(self.host, self.lmtp_port, raw, rcpts, sender)

    def imap(self) -> IMAPClient:
        """A logged-in IMAP connection (plain, or implicit TLS when ``tls``)."""
        if self.tls:
            assert self.imaps_port is not None
            context = ssl.create_default_context(cafile=str(self.ca_file))
            client = IMAPClient(
                self.host, port=self.imaps_port, ssl=True, ssl_context=context, timeout=10
            )
        else:
            client = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=10)
        client.login(self.username, self.password)
        return client

    def uidvalidity(self) -> int:
        with self.imap() as client:
            status = client.folder_status("INBOX", ["UIDVALIDITY"])
            client.logout()
        return int(status[b"UIDVALIDITY"])

    def clear(self) -> None:
        """Expunge every message of INBOX and delete every other folder.

        UIDs keep increasing and UIDVALIDITY is unchanged; see ``recreate_inbox()``.
        """
        with self.imap() as client:
            empty_inbox(client)
            folders = [name for _flags, _delim, name in client.list_folders()]
            for name in sorted(folders, key=len, reverse=True):  # children first
                if name.upper() != "INBOX":
                    client.delete_folder(name)
            client.logout()

    def recreate_inbox(self) -> None:
        """Wipe the mailbox on disk so INBOX comes back empty with a new UIDVALIDITY.

        Dovecot refuses to delete INBOX over IMAP, so this stops the server (if
        running), removes everything in ``mail_root`` except Dovecot's
        ``dovecot-uidvalidity*`` files (which make the next UIDVALIDITY larger
        than the last, even within the same second) and starts it again.
        Clients connected at that moment are disconnected.
        """
        was_running = self.running
        self.stop()
        if self.mail_root.exists():
            for entry in self.mail_root.iterdir():
                if entry.name.startswith("dovecot-uidvalidity"):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if was_running:
            self.start()

    # ---------------------------------------------------------------- internals

    def _ports(self) -> list[int]:
        return [p for p in (self.imap_port, self.lmtp_port, self.imaps_port) if p]

    def _prepare_dirs(self) -> None:
        self.run_dir.mkdir()
        (self.base_dir / "state").mkdir()
        (self.base_dir / "mail").mkdir(mode=0o755)
        self.home.mkdir(mode=0o700)
        os.chown(self.home, self.mail_uid, self.mail_gid)
        users = self.base_dir / "users"
        logins = {self.username: self.password, **self.other_logins}
        users.write_text(
            "".join(f"{name}:{{PLAIN}}{password}\n" for name, password in logins.items()),
            encoding="utf-8",
        )
        users.chmod(0o644)

    def _make_certificate(self) -> Path:
        cert, _key = self_signed_certificate(self.base_dir, self.host)
        return cert

    def _config(self) -> str:
        d = self.base_dir
        if self.tls:
            ssl_settings = f"""\
                ssl = required
                ssl_cert = <{d}/cert.pem
                ssl_key = <{d}/key.pem
                ssl_min_protocol = TLSv1.2
                """
        else:
            ssl_settings = "ssl = no\n"
        return textwrap.dedent(ssl_settings) + textwrap.dedent(f"""\
            protocols = imap lmtp
            listen = {self.host}
            base_dir = {self.run_dir}
            state_dir = {d}/state
            instance_name = dovecot-test-{d.name}
            log_path = {self.log_path}
            auth_verbose = yes
            default_internal_user = dovecot
            default_login_user = dovenull
            disable_plaintext_auth = no
            auth_mechanisms = plain login
            mail_location = {self.mail_format}:{self.mail_root}
            mail_fsync = never
            # Processes killed while handshaking with stats delay shutdown by 5 s.
            stats_writer_socket_path =
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN username_format=%u {d}/users
            }}
            userdb {{
              driver = static
              args = uid={self.mail_uid} gid={self.mail_gid} home={self.home} allow_all_users=yes
            }}
            protocol imap {{
              mail_max_userip_connections = {self.imap_connections}
            }}
            service imap-login {{
              inet_listener imap {{
                address = {self.host}
                port = {self.imap_port}
              }}
              inet_listener imaps {{
                address = {self.host}
                port = {self.imaps_port or 0}
              }}
            }}
            service lmtp {{
              inet_listener lmtp {{
                address = {self.host}
                port = {self.lmtp_port}
              }}
            }}
            service stats {{
              unix_listener stats-reader {{
                mode = 0666
              }}
              unix_listener stats-writer {{
                mode = 0666
              }}
            }}
            """)

    def _start_once(self) -> None:
        self.config_path.write_text(self._config())
        with open(self.stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        # Wait for the greetings, not just the listening sockets: SIGTERM'd
        # while still reading their configuration, Dovecot's children take
        # seconds to exit.
        deadline = time.monotonic() + self.start_timeout
        probes = [(self.imap_port, b"* OK"), (self.lmtp_port, b"220")]
        if self.imaps_port:
            probes.append((self.imaps_port, b""))
        for port, greeting in probes:
            while not wait_for_port(
                self.host, port, min(deadline, time.monotonic() + 0.2), greeting
            ):
                if self._process.poll() is not None or time.monotonic() >= deadline:
                    process, self._process = self._process, None
                    if process.poll() is None:
                        process.kill()
                    process.wait()
                    raise RuntimeError(f"Dovecot did not start on port {port}\n{self.log_tail()}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mailserver() -> Iterator[MailServer]:
    """One plaintext Dovecot for the whole session."""
    server = MailServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def mailbox(mailserver: MailServer) -> MailServer:
    """The session's Dovecot, restarted if a test left it stopped, with an empty INBOX."""
    if not mailserver.running:
        mailserver.start()
    mailserver.clear()
    return mailserver


@pytest.fixture(scope="session")
def tls_mailserver() -> Iterator[MailServer]:
    """One Dovecot with ``ssl = required`` (STARTTLS on imap_port, TLS on imaps_port)."""
    server = MailServer(tls=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def tls_mailbox(tls_mailserver: MailServer) -> MailServer:
    if not tls_mailserver.running:
        tls_mailserver.start()
    tls_mailserver.clear()
    return tls_mailserver
