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

import asyncio
import grp
import json
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
from typing import Any, Literal, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
)
from imapclient import IMAPClient

__all__ = [
    "MailServer",
    "Received",
    "SinkTls",
    "SmtpSink",
    "free_port",
    "mailbox",
    "mailserver",
    "self_signed_certificate",
    "server_env",
    "smtp_sink",
    "starttls_sink",
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


def self_signed_certificate(directory: Path, host: str = LOOPBACK) -> tuple[Path, Path]:
    """``cert.pem`` and ``key.pem`` in ``directory``: a self-signed certificate for
    ``localhost``, 127.0.0.1 and ``host`` (the certificate is its own CA file)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed for TLS test servers")
    cert, key = directory / "cert.pem", directory / "key.pem"
    options = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    san = f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{host}"
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
    return cert, key


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
    tls: bool = False  # the transaction went over TLS (STARTTLS or implicit)


SinkTls = Literal["starttls", "implicit"]


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def _command(self, name: str) -> None:
        """Log the command, then wait for the delay configured for it, if any."""
        self.sink._log_command(name)
        delay = self.sink.delay.get(name, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        await self._command("EHLO")
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        if not self.sink.offer_starttls:
            responses = [r for r in responses if r[4:].upper() != "STARTTLS"]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        await self._command("MAIL")
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.sink.mail_response is not None:
            return self.sink.mail_response
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
        await self._command("RCPT")
        responses = self.sink.rcpt_responses
        override = responses.get(address) or responses.get(address.lower())
        if override is not None:
            return override
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("DATA")
        if self.sink.data_response is not None:
            return self.sink.data_response
        assert envelope.mail_from is not None and envelope.original_content is not None
        assert server.transport is not None
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content),
            mail_options=list(envelope.mail_options),
            auth_login=session.auth_data if session.authenticated else None,
            tls=server.transport.get_extra_info("ssl_object") is not None,
        )
        if self.sink._take_disconnect(received):
            # abort(): the transport drops what is written from now on, so the
            # reply aiosmtpd pushes after this hook never reaches the client.
            cast(asyncio.Transport, server.transport).abort()
            return "250 OK (never sent)"
        self.sink._record(received)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("RSET")
        return "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        await self._command("NOOP")
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._command("QUIT")
        return "221 Bye"


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP with the sink's line length limit, registering its connections."""

    def __init__(self, handler: _Handler, *, sink: SmtpSink, **kwargs: Any) -> None:
        self.line_length_limit = sink.max_line_length  # read by SMTP.__init__
        self._sink = sink
        super().__init__(handler, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self._sink._closed(self)


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


class _SinkController(_PortZeroController):
    """Builds each connection's SMTP from the sink's settings at that moment."""

    def __init__(self, sink: SmtpSink, **kwargs: Any) -> None:
        self.sink = sink
        super().__init__(_Handler(sink), **kwargs)

    def factory(self) -> SMTP:
        sink = self.sink
        kwargs = dict(self.SMTP_kwargs)
        kwargs["data_size_limit"] = sink.size_limit
        if sink.tls == "starttls":
            kwargs.update(tls_context=sink._server_context, require_starttls=sink.require_starttls)
        return _SinkSMTP(self.handler, sink=sink, **kwargs)


class SmtpSink:
    """An aiosmtpd server on a free loopback port that records every transaction.

    ``Received.data`` are the exact bytes of the DATA section after
    dot-unstuffing (aiosmtpd's ``envelope.original_content``, no decoding):
    CRLF line endings are preserved as sent, a bare LF stays a bare LF, and
    the CRLF before the final ``.`` belongs to the data.  Note that Python's
    ``smtplib`` appends a CRLF when the message does not end with one, so
    ``data`` is then ``raw + b"\\r\\n"``.

    SMTPUTF8 and 8BITMIME are advertised (``enable_SMTPUTF8=True``), and
    ``SIZE <size_limit>`` unless ``size_limit`` is None or 0; a larger DATA is
    refused with 552.  A data line longer than ``max_line_length`` (aiosmtpd's
    1001 by default, as RFC 5321 allows) is refused with 500; raise it to
    record whatever a client sends.  With ``auth=(username, password)`` AUTH
    PLAIN/LOGIN is offered (without TLS too) and required before MAIL.

    TLS, with a fresh self-signed certificate for localhost/127.0.0.1 whose
    file is ``ca_file``: ``tls="starttls"`` offers STARTTLS (``require_starttls``
    refuses every other command before it, with 530); ``offer_starttls=False``
    then leaves STARTTLS out of the EHLO reply, like a downgrading middlebox,
    although the server could do it; ``tls="implicit"`` speaks TLS from the
    first byte (SMTPS).  ``Received.tls`` tells whether a transaction was
    encrypted.

    Fault injection, changeable at any time from the test thread (the size
    and line limits and the TLS options apply to connections opened later):

    * ``rcpt_responses`` maps a recipient address to the reply for its RCPT
      (e.g. ``"550 5.1.1 no such user"``); ``mail_response`` replaces the reply
      to MAIL FROM and ``data_response`` the reply after DATA (e.g.
      ``"451 4.3.0 try later"``); such transactions are not recorded.
    * ``disconnect_after_data = n``: for the next ``n`` transactions, the server
      receives the whole DATA, then drops the connection without replying.
      Those transactions are recorded in ``received_then_dropped`` (the server
      did get the bytes), not in ``received``.
    * ``delay`` maps a command name (``EHLO``, ``MAIL``, ``RCPT``, ``DATA``,
      ``RSET``, ``NOOP``, ``QUIT``) to seconds to wait before replying to it; for
      DATA the wait starts once the whole message is in.  A client that gives
      up meanwhile closes the connection and the transaction is dropped.
    * ``drop_connections()`` closes every open connection at once.

    ``commands`` lists the name of every command the sink answered, in order
    (not STARTTLS and AUTH, which aiosmtpd handles itself).

    ``stop()`` then ``start()`` rebinds the same port.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        auth: tuple[str, str] | None = None,
        *,
        tls: SinkTls | None = None,
        offer_starttls: bool = True,
        require_starttls: bool = False,
        size_limit: int | None = DATA_SIZE_DEFAULT,
        max_line_length: int = SMTP.line_length_limit,
    ) -> None:
        self.auth = auth
        self.tls = tls
        self.offer_starttls = offer_starttls
        self.require_starttls = require_starttls
        self.size_limit = size_limit
        self.max_line_length = max_line_length
        self.port = 0
        self.received: list[Received] = []
        self.received_then_dropped: list[Received] = []
        self.commands: list[str] = []
        self.rcpt_responses: dict[str, str] = {}
        self.mail_response: str | None = None
        self.data_response: str | None = None
        self.disconnect_after_data = 0
        self.delay: dict[str, float] = {}
        self.ca_file: Path | None = None
        self._cert_dir: Path | None = None
        self._server_context: ssl.SSLContext | None = None
        self._changed = threading.Condition()
        self._sessions: set[_SinkSMTP] = set()
        self._controller: _SinkController | None = None
        if tls is not None:
            self._cert_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
            cert, key = self_signed_certificate(self._cert_dir, self.host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
            self.ca_file, self._server_context = cert, context

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SmtpSink already running")
        kwargs: dict[str, Any] = {}
        if self.auth is not None:
            # auth_required=True would warn about plaintext AUTH; handle_MAIL enforces it.
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if self.tls == "implicit":
            kwargs["ssl_context"] = self._server_context
        controller = _SinkController(
            self,
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
        """Close every connection, then stop listening."""
        controller, self._controller = self._controller, None
        if controller is not None:
            try:
                self._drop_connections(controller)
            finally:
                controller.stop()

    def close(self) -> None:
        """Stop, and remove the certificate if there is one."""
        self.stop()
        if self._cert_dir is not None:
            shutil.rmtree(self._cert_dir, ignore_errors=True)
            self._cert_dir = None

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection now (without a reply); return once they are gone."""
        if self._controller is None:
            raise RuntimeError("SmtpSink not running")
        self._drop_connections(self._controller, timeout)

    def clear(self) -> None:
        """Forget received transactions, commands and fault injections."""
        with self._changed:
            self.received.clear()
            self.received_then_dropped.clear()
            self.commands.clear()
            self.disconnect_after_data = 0
        self.rcpt_responses.clear()
        self.mail_response = None
        self.data_response = None
        self.delay.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` transactions were received; return a copy of them."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(
                    f"expected {n} transaction(s) within {timeout} s, got "
                    f"{len(self.received)}: {self.received!r}"
                )
            return list(self.received)

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._sessions)

    # ---------------------------------------------------------------- internals

    def _drop_connections(self, controller: _SinkController, timeout: float = 5.0) -> None:
        def abort_all() -> None:
            for session in list(self._sessions):
                if session.transport is not None:
                    cast(asyncio.Transport, session.transport).abort()

        controller.loop.call_soon_threadsafe(abort_all)
        with self._changed:
            if not self._changed.wait_for(lambda: not self._sessions, timeout):
                raise TimeoutError(f"{len(self._sessions)} SMTP connection(s) did not close")

    def _opened(self, session: _SinkSMTP) -> None:
        with self._changed:
            self._sessions.add(session)  # again after STARTTLS: a set
            self._changed.notify_all()

    def _closed(self, session: _SinkSMTP) -> None:
        with self._changed:
            self._sessions.discard(session)
            self._changed.notify_all()

    def _log_command(self, name: str) -> None:
        with self._changed:
            self.commands.append(name)

    def _take_disconnect(self, received: Received) -> bool:
        with self._changed:
            if self.disconnect_after_data <= 0:
                return False
            self.disconnect_after_data -= 1
            self.received_then_dropped.append(received)
            self._changed.notify_all()
            return True

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


@pytest.fixture
def starttls_sink() -> Iterator[SmtpSink]:
    """An SmtpSink offering STARTTLS with a self-signed certificate (``ca_file``)."""
    with SmtpSink(tls="starttls") as sink:
        yield sink


def server_env(
    mail: MailServer, smtp: SmtpSink, state_db: Path, lists: dict[str, list[str]],
    envelope_sender: str,
) -> dict[str, str]:
    """FORWARDER_* variables pointing a forwarder process at these servers."""
    return {
        "FORWARDER_IMAP_HOST": mail.host,
        "FORWARDER_IMAP_PORT": str(mail.imap_port),
        "FORWARDER_IMAP_SECURITY": "none",
        "FORWARDER_IMAP_USERNAME": mail.username,
        "FORWARDER_IMAP_PASSWORD": mail.password,
        "FORWARDER_SMTP_HOST": smtp.host,
        "FORWARDER_SMTP_PORT": str(smtp.port),
        "FORWARDER_SMTP_SECURITY": "none",
        "FORWARDER_LISTS": json.dumps(lists),
        "FORWARDER_ENVELOPE_SENDER": envelope_sender,
        "FORWARDER_STATE_DB": str(state_db),
        "FORWARDER_LOG_FORMAT": "json",
    }
