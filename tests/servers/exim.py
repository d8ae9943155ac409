"""A private Exim 4.96 as the MX of ``example.org``, in front of a catch-all, and its fixtures.

Exim conflicts with the Postfix package: it runs from its unpacked .deb files in a
:class:`~tests.servers.sandbox.Sandbox` (``make test-servers``), as the
``Debian-exim`` user the package would have created (added to the sandbox's
/etc/passwd), with its own configuration file (``exim4 -C``), spool and logs,
listening on a free loopback port.

Every address of ``example.org`` goes to the catch-all, the Exim way: the
``catchall`` router redirects each of them to the catch-all's address, and the
delivery router hands that to one of two transports, both with
``envelope_to_add`` (:data:`RECIPE_ENVELOPE_TO`), so the stored copy names the
addresses it was sent to in ``Envelope-to:``:

* :meth:`EximServer.into_maildir`: ``appendfile`` into the Maildir of a Dovecot
  (tests.servers.dovecot), which serves it over IMAP;
* :meth:`EximServer.into_lmtp`: ``smtp`` with ``protocol = lmtp`` to Cyrus's lmtpd
  (tests.servers.cyrus), the catch-all mailbox named by its local part.

Exim delivers in the background: :meth:`EximServer.wait_idle` waits until every
message it received has left its queue, read from its main log.  The
recipe pieces (:data:`RECIPE_ROUTER`, :data:`RECIPE_ENVELOPE_TO`) are what
``docs/deployments.md`` says, checked by tests/test_deployments_doc.py.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers.common import (
    LOOPBACK,
    Server,
    free_port,
    log_tail,
    wait_ports_free,
)
from tests.servers.cyrus import CyrusServer
from tests.servers.dovecot import MailServer
from tests.servers.sandbox import SANDBOXED_FIXTURES, Command, Sandbox, require_unpacked
from tests.servers.sink import SmtpSink

__all__ = [
    "EXIM",
    "LMTP_TRANSPORT",
    "MAILDIR_TRANSPORT",
    "RECIPE_ENVELOPE_TO",
    "RECIPE_ROUTER",
    "EximServer",
    "exim_cyrus",
    "exim_cyrus_dedup",
    "exim_dovecot",
    "exim_submission",
]

EXIM = "/usr/sbin/exim4"
DOMAIN = "example.org"
EXIM_USER = "Debian-exim"
SANDBOXED_FIXTURES.update(
    {"exim_dovecot_server", "exim_cyrus_server", "exim_cyrus_dedup_server", "exim_submission"}
)
SUBMISSION_LOGIN = "forwarder@example.org"
SUBMISSION_PASSWORD = "submit-secret"

# docs/deployments.md, "Behind Exim": every address of the domain to the catch-all...
RECIPE_ROUTER = """\
catchall:
  driver = redirect
  domains = example.org
  local_parts = ! catchall
  data = catchall@example.org
"""
# ... and the transport that delivers into it records the addresses it was sent to.
RECIPE_ENVELOPE_TO = "envelope_to_add = true"
# The two transports into the catch-all (docs/deployments.md gives LMTP_TRANSPORT).
MAILDIR_TRANSPORT = f"""\
catchall_delivery:
  driver = appendfile
  directory = {{maildir}}
  maildir_format
  user = {{uid}}
  group = {{gid}}
  delivery_date_add
  return_path_add
  {RECIPE_ENVELOPE_TO}
"""
LMTP_TRANSPORT = f"""\
catchall_delivery:
  driver = smtp
  protocol = lmtp
  hosts = {{host}}
  port = {{port}}
  hosts_override
  allow_localhost
  return_path_add
  {RECIPE_ENVELOPE_TO}
"""

_RECEIVED = re.compile(r"^\S+ \S+ (\S+) <= ", re.M)
_COMPLETED = re.compile(r"^\S+ \S+ (\S+) Completed", re.M)


def _free_id(*tables: str) -> int:
    """An id used by no line of /etc/passwd nor /etc/group."""
    used = {
        int(line.split(":")[2])
        for table in tables
        for line in Path(table).read_text().splitlines()
        if line.count(":") >= 2 and line.split(":")[2].isdigit()
    }
    return next(n for n in range(200, 1000) if n not in used)


MX_ACL = """\
acl_check_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted
"""
MX_ROUTERS = RECIPE_ROUTER + """
catchall_delivery:
  driver = accept
  domains = +local_domains
  transport = catchall_delivery
"""
# Submission: Debian's exim4-config puts every authenticated client in submission mode,
# which adds Message-Id: and Date: to a message lacking them ...
SUBMISSION_ACL = """\
acl_check_rcpt:
  accept authenticated = *
         control = submission/sender_retain
  deny message = 5.7.1 authentication required
"""
# ... so docs/deployments.md exempts the forwarder's login, before that statement.
RECIPE_SUBMISSION_EXEMPTION = """\
  accept authenticated = *
         condition = ${if eq{$authenticated_id}{forwarder@example.org}}
         control = suppress_local_fixups
"""
RECIPE_SUBMISSION_ACL = SUBMISSION_ACL.replace(
    "acl_check_rcpt:\n", "acl_check_rcpt:\n" + RECIPE_SUBMISSION_EXEMPTION
)
SUBMISSION_ROUTERS = """\
onward:
  driver = accept
  transport = onward
"""
SUBMISSION_TRANSPORT = """\
onward:
  driver = smtp
  hosts = {host}
  port = {port}
  hosts_override
  allow_localhost
"""
AUTHENTICATORS = """\
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{@LOGIN@}}{eq{$auth3}{@PASSWORD@}}}}
  server_set_id = $auth2
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and {{eq{$auth1}{@LOGIN@}}{eq{$auth2}{@PASSWORD@}}}}
  server_set_id = $auth1
"""


class EximServer(Server):
    """A private Exim: the MX of ``example.org`` in front of a catch-all (``store``), or
    a submission server relaying to another SMTP server (:meth:`submission`)."""

    catchall = f"catchall@{DOMAIN}"  # where every address of the domain is redirected

    def __init__(
        self,
        transport: str,
        store: MailServer | CyrusServer | None,
        *,
        acl: str = MX_ACL,
        routers: str = MX_ROUTERS,
        authenticators: str = "",
        start_timeout: float = 20,
    ) -> None:
        self.host = LOOPBACK
        self._store = store  # the server holding the catch-all, read over IMAP
        self._sections = (acl, routers, transport, authenticators)
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="exim-"))
        self.base_dir.chmod(0o755)
        self.sandbox = Sandbox(self.base_dir)
        self.log_path = self.base_dir / "log" / "mainlog"
        self.port = 0

    @property
    def store(self) -> MailServer | CyrusServer:
        if self._store is None:
            raise AttributeError("a submission Exim has no catch-all")
        return self._store

    @classmethod
    def into_maildir(cls, dovecot: MailServer) -> EximServer:
        """Deliver into the Maildir of ``dovecot``'s catch-all, as its mail user."""
        return cls(
            MAILDIR_TRANSPORT.format(
                maildir=dovecot.maildir, uid=dovecot.mail_uid, gid=dovecot.mail_gid
            ),
            dovecot,
        )

    @classmethod
    def into_lmtp(cls, cyrus: CyrusServer) -> EximServer:
        """Deliver by LMTP over TCP to ``cyrus``'s lmtpd, for the mailbox ``catchall``."""
        return cls(LMTP_TRANSPORT.format(host=cyrus.host, port=cyrus.lmtp_port), cyrus)

    @classmethod
    def submission(
        cls, host: str, port: int, login: str, password: str, acl: str = RECIPE_SUBMISSION_ACL
    ) -> EximServer:
        """A submission server (AUTH PLAIN/LOGIN for ``login``, no TLS) relaying every
        message to ``host:port``."""
        authenticators = AUTHENTICATORS.replace("@LOGIN@", login)
        return cls(
            SUBMISSION_TRANSPORT.format(host=host, port=port),
            None,
            acl=acl.replace("forwarder@example.org", login),
            routers=SUBMISSION_ROUTERS,
            authenticators=authenticators.replace("@PASSWORD@", password),
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self.sandbox.running

    def start(self) -> None:
        if self.running:
            raise RuntimeError("Exim already running")
        if self.port == 0:
            self.port = free_port(self.host)
            self._prepare()
        self.sandbox.start([Command([EXIM, "-C", str(self.base_dir / "exim.conf"), "-bdf"])])
        self.sandbox.wait_for_greetings(
            self.host, [(self.port, b"220")], self.start_timeout, "Exim", self.log_tail
        )

    def stop(self, timeout: float = 15.0) -> None:
        self.sandbox.stop(timeout)
        wait_ports_free(self.host, (self.port,), timeout, "Exim")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return log_tail((self.log_path, self.base_dir / "log" / "paniclog",
                         self.sandbox.syslog_path), lines)

    # ---------------------------------------------------------------- mail

    def send_to_mx(
        self, raw: bytes, rcpts: list[str], sender: str = "customer@remote.example"
    ) -> None:
        """Hand a message to the MX in one transaction, as another domain's server would."""
        options = [] if raw.isascii() else ["BODY=8BITMIME"]
        with smtplib.SMTP(self.host, self.port, local_hostname="mx.remote.example") as smtp:
            smtp.sendmail(sender, rcpts, raw, mail_options=options)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every message Exim received so far has left its queue (its main log)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            waiting = set(_RECEIVED.findall(text)) - set(_COMPLETED.findall(text))
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Exim still holds {sorted(waiting)} after {timeout} s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    # ---------------------------------------------------------------- internals

    def _prepare(self) -> None:
        d = self.base_dir
        uid = _free_id("/etc/passwd", "/etc/group")
        self.sandbox.add_system_user(EXIM_USER, uid, uid, "/nonexistent")
        for sub in ("spool", "log"):
            (d / sub).mkdir()
            shutil.chown(d / sub, uid, uid)
        # Exim keeps root for a -C file only if listed there (Debian's TRUSTED_CONFIG_LIST);
        # otherwise its deliveries, re-executed with -C, cannot switch to the mailbox's user.
        (self.sandbox.etc / "exim4").mkdir()
        (self.sandbox.etc / "exim4" / "trusted_configs").write_text(f"{d}/exim.conf\n")
        acl, routers, transports, authenticators = self._sections
        main = textwrap.dedent(f"""\
            primary_hostname = mx.{DOMAIN}
            domainlist local_domains = {DOMAIN}
            spool_directory = {d}/spool
            log_file_path = {d}/log/%slog
            pid_file_path = {d}/exim.pid
            local_interfaces = {self.host}
            daemon_smtp_ports = {self.port}
            acl_smtp_rcpt = acl_check_rcpt
            keep_environment =
            tls_advertise_hosts =
            # The sandbox's network has no DNS for these names.
            host_lookup =
            rfc1413_hosts =
            """)
        sections = [
            ("acl", acl), ("routers", routers), ("transports", transports),
            ("retry", "*  *  F,1h,1m\n"), ("authenticators", authenticators),
        ]
        text = main + "".join(f"\nbegin {name}\n\n{body}" for name, body in sections if body)
        (d / "exim.conf").write_text(text)
        (d / "exim.conf").chmod(0o644)


# --------------------------------------------------------------------------- fixtures


def _started(server: EximServer) -> Iterator[EximServer]:
    try:
        server.start()
        yield server
    finally:
        server.close()


def _idle(server: EximServer) -> EximServer:
    if not server.store.running:
        server.store.start()
    server.wait_idle()
    server.store.clear()
    return server


@pytest.fixture(scope="session")
def exim_dovecot_server() -> Iterator[EximServer]:
    """Exim delivering into the Maildir of a Dovecot catch-all (``.store``) of its own."""
    require_unpacked(EXIM)
    dovecot = MailServer()
    try:
        dovecot.start()
        yield from _started(EximServer.into_maildir(dovecot))
    finally:
        dovecot.close()


@pytest.fixture
def exim_dovecot(exim_dovecot_server: EximServer) -> EximServer:
    """The session's Exim in front of Dovecot, idle, with an empty catch-all."""
    return _idle(exim_dovecot_server)


@pytest.fixture(scope="session")
def exim_cyrus_server(cyrus_server: CyrusServer) -> Iterator[EximServer]:
    """Exim delivering by LMTP into the session's Cyrus (duplicatesuppression: 0)."""
    require_unpacked(EXIM)
    yield from _started(EximServer.into_lmtp(cyrus_server))


@pytest.fixture
def exim_cyrus(exim_cyrus_server: EximServer) -> EximServer:
    return _idle(exim_cyrus_server)


@pytest.fixture(scope="session")
def exim_cyrus_dedup_server(cyrus_dedup_server: CyrusServer) -> Iterator[EximServer]:
    """Exim delivering by LMTP into a Cyrus with the default duplicatesuppression: 1."""
    require_unpacked(EXIM)
    yield from _started(EximServer.into_lmtp(cyrus_dedup_server))


@pytest.fixture
def exim_cyrus_dedup(exim_cyrus_dedup_server: EximServer) -> EximServer:
    return _idle(exim_cyrus_dedup_server)


@pytest.fixture
def exim_submission(smtp_sink: SmtpSink) -> Iterator[Callable[..., EximServer]]:
    """Starts an Exim submission server with the given RCPT ACL (``RECIPE_SUBMISSION_ACL``
    by default, or ``SUBMISSION_ACL``), relaying to ``smtp_sink``; login ``SUBMISSION_LOGIN``."""
    require_unpacked(EXIM)
    started: list[EximServer] = []

    def start(acl: str = RECIPE_SUBMISSION_ACL) -> EximServer:
        server = EximServer.submission(
            smtp_sink.host, smtp_sink.port, SUBMISSION_LOGIN, SUBMISSION_PASSWORD, acl
        )
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()
