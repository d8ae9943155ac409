"""Real mail servers for the test suite, on free loopback ports.

* :class:`MailServer` runs a private Dovecot 2.3 (IMAP + LMTP) from a temporary
  directory with a catch-all mailbox, the way an MTA would deliver to it.
* :class:`SmtpSink` is an aiosmtpd server recording every transaction, with
  hooks to refuse recipients or the DATA phase.

The pytest fixtures at the bottom are re-exported by ``tests/conftest.py``.
Everything here must run as root (Dovecot's privilege separation needs the
``dovecot``/``dovenull``/``nobody`` system users), as tests and CI do.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from imapclient import IMAPClient

__all__ = [
    "MailServer",
    "Received",
    "SmtpSink",
    "free_port",
    "mailbox",
    "mailserver",
    "smtp_sink",
    "tls_mailbox",
    "tls_mailserver",
    "wait_for_port",
]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    Needed only for servers that must be told a concrete port (Dovecot); the
    port could in theory be taken before the server binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, deadline: float, greeting: bytes = b"") -> bool:
    """Poll until ``host:port`` accepts a connection (and its first line starts
    with ``greeting``) or the monotonic ``deadline`` passes."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                if not greeting or sock.makefile("rb").readline().startswith(greeting):
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _port_is_bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- Dovecot


class MailServer:
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
    """

    username: str = "catchall@example.org"
    password: str = "secret"

    def __init__(
        self, tls: bool = False, host: str = LOOPBACK, start_timeout: float = 10.0
    ) -> None:
        self.host = host
        self.tls = tls
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.base_dir.chmod(0o755)  # Dovecot's unprivileged processes must traverse it
        self.run_dir = self.base_dir / "run"
        self.home = self.base_dir / "mail" / "catchall"
        self.maildir = self.home / "Maildir"
        self.config_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.imap_port = 0
        self.lmtp_port = 0
        self.imaps_port: int | None = None
        self.ca_file: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._uid = pwd.getpwnam("nobody").pw_uid
        self._gid = grp.getgrnam("nogroup").gr_gid
        self._prepare_dirs()
        if tls:
            self.ca_file = self._make_certificate()

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> MailServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            while not _port_is_bindable(self.host, port):
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"port {port} still busy after Dovecot stopped")
                time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop Dovecot and remove its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.stderr_path, self.log_path):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                text += f"--- {path.name}\n" + "\n".join(tail) + "\n"
        return text

    # ---------------------------------------------------------------- mail

    def deliver(self, raw: bytes, rcpts: list[str], sender: str = "sender@remote.example") -> None:
        """Deliver ``raw`` by LMTP in one transaction; raise if any recipient is refused.

        Not ``LMTP.sendmail()``: LMTP answers DATA once per accepted recipient
        and smtplib reads only the first reply, so with several recipients the
        rest would be taken for the reply to QUIT.
        """
        lmtp = smtplib.LMTP(self.host, self.lmtp_port, timeout=10)
        try:
            lmtp.ehlo_or_helo_if_needed()
            code, reply = lmtp.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, sender)
            refused: dict[str, tuple[int, bytes]] = {}
            for rcpt in rcpts:
                code, reply = lmtp.rcpt(rcpt)
                if code not in (250, 251):
                    refused[rcpt] = (code, reply)
            if refused:
                raise smtplib.SMTPRecipientsRefused(refused)
            lmtp.data(raw)  # raises unless the first recipient's reply is 250
            for rcpt in rcpts[1:]:
                code, reply = lmtp.getreply()
                if code != 250:
                    refused[rcpt] = (code, reply)
            if refused:
                raise smtplib.SMTPRecipientsRefused(refused)
            lmtp.quit()
        finally:
            lmtp.close()

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

    def messages(self) -> list[tuple[int, set[bytes], bytes]]:
        """(uid, flags, raw message) of every message in INBOX, by UID."""
        with self.imap() as client:
            client.select_folder("INBOX", readonly=True)
            uids = client.search("ALL")
            fetched = client.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
            client.logout()
        return [
            (uid, set(data[b"FLAGS"]), data[b"BODY[]"]) for uid, data in sorted(fetched.items())
        ]

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
            client.select_folder("INBOX")
            uids = client.search("ALL")
            if uids:
                client.delete_messages(uids)
                client.expunge()
            client.unselect_folder()
            folders = [name for _flags, _delim, name in client.list_folders()]
            for name in sorted(folders, key=len, reverse=True):  # children first
                if name.upper() != "INBOX":
                    client.delete_folder(name)
            client.logout()

    def recreate_inbox(self) -> None:
        """Wipe the mailbox on disk so INBOX comes back empty with a new UIDVALIDITY.

        Dovecot refuses to delete INBOX over IMAP, so this stops the server (if
        running), removes everything in the maildir except Dovecot's
        ``dovecot-uidvalidity*`` files (which make the next UIDVALIDITY larger
        than the last, even within the same second) and starts it again.
        Clients connected at that moment are disconnected.
        """
        was_running = self.running
        self.stop()
        if self.maildir.exists():
            for entry in self.maildir.iterdir():
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
        os.chown(self.home, self._uid, self._gid)
        users = self.base_dir / "users"
        users.write_text(f"{self.username}:{{PLAIN}}{self.password}\n")
        users.chmod(0o644)

    def _make_certificate(self) -> Path:
        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl command is needed for MailServer(tls=True)")
        cert, key = self.base_dir / "cert.pem", self.base_dir / "key.pem"
        options = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
        san = f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{self.host}"
        subprocess.run(
            [
                "openssl",
                "req",
                *options.split(),
                "-subj",
                "/CN=localhost",
                "-addext",
                san,
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
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
            mail_location = maildir:~/Maildir
            mail_fsync = never
            # Processes killed while handshaking with stats delay shutdown by 5 s.
            stats_writer_socket_path =
            passdb {{
              driver = passwd-file
              args = scheme=PLAIN username_format=%u {d}/users
            }}
            userdb {{
              driver = static
              args = uid={self._uid} gid={self._gid} home={self.home} allow_all_users=yes
            }}
            protocol imap {{
              mail_max_userip_connections = 100
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


# --------------------------------------------------------------------------- SMTP sink


@dataclass
class Received:
    """One SMTP transaction accepted by :class:`SmtpSink`."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    auth_login: str | None = None


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        responses = self.sink.rcpt_responses
        override = responses.get(address) or responses.get(address.lower())
        if override is not None:
            return override
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_response is not None:
            return self.sink.data_response
        assert envelope.mail_from is not None and envelope.original_content is not None
        self.sink._record(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content),
                mail_options=list(envelope.mail_options),
                auth_login=session.auth_data if session.authenticated else None,
            )
        )
        return "250 OK"


class _PortZeroController(Controller):
    """aiosmtpd's Controller binding port 0 (no race) and reading back the real port."""

    def _create_server(self) -> Any:
        async def bind() -> Any:
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
            )
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


class SmtpSink:
    """An aiosmtpd server on a free loopback port that records every transaction.

    ``Received.data`` are the exact bytes of the DATA section after
    dot-unstuffing (aiosmtpd's ``envelope.original_content``, no decoding):
    CRLF line endings are preserved as sent, a bare LF stays a bare LF, and
    the CRLF before the final ``.`` belongs to the data.  Note that Python's
    ``smtplib`` appends a CRLF when the message does not end with one, so
    ``data`` is then ``raw + b"\\r\\n"``.

    SMTPUTF8 and 8BITMIME are advertised (``enable_SMTPUTF8=True``).  With
    ``auth=(username, password)`` AUTH PLAIN/LOGIN is offered without TLS and
    required before MAIL.

    Fault injection, changeable at any time from the test thread:
    ``rcpt_responses`` maps a recipient address to the reply for its RCPT
    (e.g. ``"550 5.1.1 no such user"``) and ``data_response`` replaces the
    reply to DATA (e.g. ``"451 4.3.0 try later"``); such transactions are not
    recorded.

    ``stop()`` then ``start()`` rebinds the same port.
    """

    host: str = LOOPBACK

    def __init__(self, auth: tuple[str, str] | None = None) -> None:
        self.auth = auth
        self.port = 0
        self.received: list[Received] = []
        self.rcpt_responses: dict[str, str] = {}
        self.data_response: str | None = None
        self._changed = threading.Condition()
        self._controller: _PortZeroController | None = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SmtpSink already running")
        kwargs: dict[str, Any] = {}
        if self.auth is not None:
            # auth_required=True would warn about plaintext AUTH; handle_MAIL enforces it.
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        controller = _PortZeroController(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            decode_data=False,
            enable_SMTPUTF8=True,
            **kwargs,
        )
        controller.start()
        self.port = controller.port
        self._controller = controller

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def clear(self) -> None:
        """Forget received transactions and fault injections."""
        with self._changed:
            self.received.clear()
        self.rcpt_responses.clear()
        self.data_response = None

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` transactions were received; return a copy of them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(
                    f"expected {n} transaction(s) within {timeout} s, got "
                    f"{len(self.received)}: {self.received!r}"
                )
            return list(self.received)

    def _record(self, received: Received) -> None:
        with self._changed:
            self.received.append(received)
            self._changed.notify_all()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            if (login, password) == self.auth:
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)


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


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh SmtpSink per test (starting one takes a few milliseconds)."""
    with SmtpSink() as sink:
        yield sink
