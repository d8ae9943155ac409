"""A private Postfix in front of a private Dovecot, for a whole mail domain, and its fixtures.

:class:`DomainMailServer` is a Dovecot (tests.servers.dovecot) for the domain
``example.org``: real mailboxes for the people (``USERS``), and every other
address of the domain (the list addresses) delivered into the catch-all by a
second userdb, so that Dovecot's LMTP writes ``Delivered-To: <list address>``
with its case and ``+detail``.  Its auth service also listens on a loopback
port, for Postfix's SASL.

:class:`PostfixServer` is a Postfix 3.7 with its own configuration directory,
queue and log file, and two smtpd services on free loopback ports:

* ``mx_port``: the domain's MX.  ``example.org`` and ``example.net`` are
  virtual mailbox domains handed to the Dovecot by LMTP, one recipient per
  transaction (``lmtp_destination_recipient_limit = 1``).  ``example.net`` has
  no catch-all: its unknown users are refused by Dovecot, and Postfix bounces.
* ``submission_port``: STARTTLS required, SASL by the Dovecot, and
  ``smtpd_sender_login_maps``: a login may use only the envelope senders the
  map gives it (set with :meth:`PostfixServer.set_sender_logins`, no reload).
  ``local_header_rewrite_clients`` is empty there, so Postfix adds no
  ``Message-Id:`` or ``Date:``.

The configuration is written once and Postfix is never reloaded: a reload of a
Postfix logging many warnings can deadlock its log daemon.  Postfix delivers
in the background: :meth:`PostfixServer.wait_idle` waits until every message
it queued has left the queue (delivered, bounced or discarded), read from its
log.  ``docs/deployments.md`` ("Behind Postfix") gives the same recipe; ``RECIPE_MAIN``,
``RECIPE_SUBMISSION`` and ``RECIPE_DOMAIN_USERDB`` are checked against it by
tests/test_postfix_server.py.  Everything here runs as root.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.common import (
    LOOPBACK,
    Server,
    free_port,
    log_tail,
    port_is_bindable,
    self_signed_certificate,
    wait_for_port,
)
from tests.servers.dovecot import MailServer

__all__ = [
    "ADMIN",
    "DOMAIN",
    "USERS",
    "DomainMailServer",
    "PostfixServer",
    "postfix",
    "postfix_domain",
]

DOMAIN = "example.org"
OTHER_DOMAIN = "example.net"  # no catch-all: an unknown user there bounces
ADMIN = "lists-admin@example.org"  # the envelope sender: bounces land in its mailbox
USERS = ("alice@example.org", "bob@example.org", "carol@example.org", "dave@example.org", ADMIN)

# The recipe of docs/deployments.md's "Behind Postfix", as this fixture uses it.
RECIPE_MAIN = {
    "virtual_mailbox_domains": f"{DOMAIN}, {OTHER_DOMAIN}",
    "virtual_mailbox_maps": f"inline:{{ @{DOMAIN}=ok, @{OTHER_DOMAIN}=ok }}",
    "lmtp_destination_recipient_limit": "1",
    "smtpd_sasl_type": "dovecot",
    "smtpd_sender_login_maps": "hash:/etc/postfix/sender_logins",
}
RECIPE_SUBMISSION = {
    "smtpd_tls_security_level": "encrypt",
    "smtpd_sasl_auth_enable": "yes",
    "smtpd_tls_auth_only": "yes",
    "smtpd_client_restrictions": "permit_sasl_authenticated,reject",
    "smtpd_relay_restrictions": "permit_sasl_authenticated,reject",
    "smtpd_sender_restrictions": "reject_sender_login_mismatch",
    "local_header_rewrite_clients": "",
}
RECIPE_DOMAIN_USERDB = "args = username_format=@%Ld /etc/dovecot/domains"

_QUEUED = re.compile(r"postfix/cleanup\[\d+\]: ([0-9A-F]+): message-id=")
_REMOVED = re.compile(r"postfix/qmgr\[\d+\]: ([0-9A-F]+): removed")


class DomainMailServer(MailServer):
    """Dovecot for the domain: a mailbox per user of ``USERS``, the rest in the catch-all.

    Every user's password is ``password``.  ``auth_port`` is Dovecot's auth
    service for Postfix (``smtpd_sasl_path = inet:127.0.0.1:<auth_port>``).
    """

    def __init__(self) -> None:
        self.auth_port = 0
        super().__init__()

    def start(self) -> None:
        if self.auth_port == 0:
            self.auth_port = free_port(self.host)
        super().start()

    def maildir_of(self, address: str) -> Path:
        if address.lower() == self.username:
            return self.maildir
        return self.base_dir / "mail" / address.lower() / "Maildir"

    def mailbox(self, address: str) -> list[bytes]:
        """The messages in ``address``'s mailbox, read from its Maildir, oldest first."""
        found: list[tuple[str, bytes]] = []
        for folder in ("new", "cur"):
            directory = self.maildir_of(address) / folder
            if directory.is_dir():
                found += [(p.name, p.read_bytes()) for p in directory.iterdir() if p.is_file()]
        return [raw for _, raw in sorted(found)]  # Maildir names start with the time

    def clear_mailboxes(self) -> None:
        """Empty every user's mailbox (the catch-all: ``clear()``, over IMAP)."""
        for address in USERS:
            for folder in ("new", "cur"):
                directory = self.maildir_of(address) / folder
                if directory.is_dir():
                    for path in directory.iterdir():
                        path.unlink()
        self.clear()

    def _ports(self) -> list[int]:
        return [*super()._ports(), self.auth_port]

    def _prepare_dirs(self) -> None:
        super()._prepare_dirs()
        ids = f"{self.mail_uid}:{self.mail_gid}"
        lines = [f"{self.username}:{{PLAIN}}{self.password}:{ids}::{self.home}::"]
        for address in USERS:
            home = self.base_dir / "mail" / address
            home.mkdir(mode=0o700)
            os.chown(home, self.mail_uid, self.mail_gid)
            lines.append(f"{address}:{{PLAIN}}{self.password}:{ids}::{home}::")
        (self.base_dir / "users").write_text("\n".join(lines) + "\n")
        # Every other address of the domain: the catch-all account, under its own name.
        (self.base_dir / "domains").write_text(
            f"@{DOMAIN}::{self.mail_uid}:{self.mail_gid}::{self.home}::user={self.username}\n"
        )

    def _config(self) -> str:
        d = self.base_dir
        static = textwrap.dedent(f"""\
            userdb {{
              driver = static
              args = uid={self.mail_uid} gid={self.mail_gid} home={self.home} allow_all_users=yes
            }}
            """)
        domain = textwrap.dedent(f"""\
            userdb {{
              driver = passwd-file
              args = username_format=%Lu {d}/users
            }}
            userdb {{
              driver = passwd-file
              {RECIPE_DOMAIN_USERDB.replace("/etc/dovecot/domains", f"{d}/domains")}
            }}
            service auth {{
              inet_listener auth-postfix {{
                address = {self.host}
                port = {self.auth_port}
              }}
            }}
            """)
        location = f"mail_location = {self.mail_format}:{self.mail_root}\n"
        config = super()._config()
        assert static in config and location in config, "tests.servers.dovecot changed"
        # Each user's mail under their own home (the catch-all's: self.maildir).
        own = "mail_location = maildir:~/Maildir\n"
        return config.replace(static, domain).replace(location, own)


class PostfixServer(Server):
    """A private Postfix: MX and submission on loopback, delivering into ``dovecot``."""

    def __init__(
        self, dovecot: DomainMailServer, sender_logins: dict[str, str], start_timeout: float = 20
    ) -> None:
        self.dovecot = dovecot
        self.host = LOOPBACK
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="postfix-"))
        self.base_dir.chmod(0o755)  # Postfix's unprivileged processes must traverse it
        self.config_dir = self.base_dir / "conf"
        self.queue_dir = self.base_dir / "queue"
        self.log_path = self.base_dir / "maillog"
        self.mx_port = 0
        self.submission_port = 0
        self.config_dir.mkdir()
        self.queue_dir.mkdir()
        (self.base_dir / "data").mkdir()
        shutil.chown(self.base_dir / "data", "postfix")
        self.ca_file, self._key = self_signed_certificate(self.config_dir, self.host)
        self._sender_logins = sender_logins

    # ---------------------------------------------------------------- lifecycle

    @property
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    @property
    def running(self) -> bool:
        return self.master_pid is not None

    def start(self) -> None:
        """Write the configuration (the first time) and start; wait for both greetings."""
        if self.running:
            raise RuntimeError("Postfix already running")
        if self.mx_port == 0:
            self.mx_port, self.submission_port = free_port(self.host), free_port(self.host)
            (self.config_dir / "main.cf").write_text(self._main_cf())
            (self.config_dir / "master.cf").write_text(self._master_cf())
            self.set_sender_logins(self._sender_logins)
        self._postfix("start")
        deadline = time.monotonic() + self.start_timeout
        for port in (self.mx_port, self.submission_port):
            if not wait_for_port(self.host, port, deadline, b"220"):
                raise RuntimeError(f"Postfix did not start on port {port}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.master_pid
        if pid is None:
            return
        self._postfix("stop")
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() or not all(
            port_is_bindable(self.host, p) for p in (self.mx_port, self.submission_port)
        ):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"Postfix did not stop within {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail((self.log_path,), lines)

    # ---------------------------------------------------------------- mail

    def set_sender_logins(self, logins: dict[str, str]) -> None:
        """Rewrite ``smtpd_sender_login_maps`` (envelope sender -> logins allowed to use it).

        Built with postmap under another name and renamed over the table, as an
        administrator would: each smtpd notices the replaced file before its next
        connection and restarts ("table ... has changed"), so no reload is needed.
        (Rebuilt in place within the same second as a process opened it, a change
        can go unnoticed: Postfix compares modification times in seconds.)
        """
        table = self.config_dir / "sender_logins"
        staged = self.config_dir / "sender_logins.new"
        staged.write_text("".join(f"{sender} {login}\n" for sender, login in logins.items()))
        self._run("postmap", "-c", str(self.config_dir), f"hash:{staged}")
        staged.with_name(staged.name + ".db").rename(table.with_name(table.name + ".db"))
        staged.rename(table)

    def send_to_mx(
        self, raw: bytes, rcpts: list[str], sender: str = "customer@remote.example"
    ) -> None:
        """Hand a message to the MX as another domain's server would (8BITMIME if 8-bit)."""
        options = [] if raw.isascii() else ["BODY=8BITMIME"]
        with smtplib.SMTP(self.host, self.mx_port, local_hostname="mx.remote.example") as smtp:
            smtp.sendmail(sender, rcpts, raw, mail_options=options)

    def submit(self, raw: bytes, rcpts: list[str], sender: str, login: str, password: str) -> None:
        """Send through the submission service (STARTTLS, AUTH), as a mail client would."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with smtplib.SMTP(self.host, self.submission_port, local_hostname="client.example") as s:
            s.starttls(context=context)
            s.login(login, password)
            options = [] if raw.isascii() else ["BODY=8BITMIME"]
            s.sendmail(sender, rcpts, raw, mail_options=options)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until every message Postfix queued so far has left its queue.

        Read from the log: each queued message has a ``cleanup`` line with its
        queue ID, and a ``qmgr ... removed`` line once delivered, bounced or
        discarded. A bounce is queued before its original is removed, so it is
        waited for too. Raises if a message is still queued (deferred) at the
        deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            waiting = set(_QUEUED.findall(text)) - set(_REMOVED.findall(text))
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Postfix still holds {sorted(waiting)} after {timeout} s\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---------------------------------------------------------------- internals

    def _postfix(self, command: str) -> None:
        self._run("postfix", "-c", str(self.config_dir), command)

    def _run(self, *args: str) -> None:
        result = subprocess.run(args, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}\n{self.log_tail()}")

    def _main_cf(self) -> str:
        d, dovecot = self.base_dir, self.dovecot
        recipe = {
            **RECIPE_MAIN,
            "smtpd_sender_login_maps": f"hash:{self.config_dir}/sender_logins",
        }
        lines = [f"{name} = {value}" for name, value in recipe.items()]
        return textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.queue_dir}
            data_directory = {d}/data
            maillog_file_prefixes = {d}
            maillog_file = {self.log_path}
            inet_interfaces = {self.host}
            inet_protocols = ipv4
            myhostname = mx.example.org
            mydomain = example.org
            # Nothing is delivered locally, and no client is trusted by its address.
            mydestination =
            mynetworks = 192.0.2.1/32
            alias_maps =
            alias_database =
            local_transport = error:5.1.1 no local delivery here
            virtual_transport = lmtp:inet:{dovecot.host}:{dovecot.lmtp_port}
            smtpd_sasl_path = inet:{dovecot.host}:{dovecot.auth_port}
            smtpd_tls_cert_file = {self.ca_file}
            smtpd_tls_key_file = {self._key}
            delay_warning_time = 0
            """) + "\n".join(lines) + "\n"

    def _master_cf(self) -> str:
        options = "".join(
            f"  -o {name}={value}\n" for name, value in RECIPE_SUBMISSION.items()
        )
        h = self.host
        # No chroot: the services read nothing outside this directory and the queue.
        return textwrap.dedent(f"""\
            {h}:{self.mx_port} inet n - n - - smtpd
            {h}:{self.submission_port} inet n - n - - smtpd
              -o syslog_name=postfix/submission
            """) + options + textwrap.dedent("""\
            pickup     unix  n - n 60 1 pickup
            cleanup    unix  n - n -  0 cleanup
            qmgr       unix  n - n 300 1 qmgr
            tlsmgr     unix  - - n 1000? 1 tlsmgr
            rewrite    unix  - - n -  - trivial-rewrite
            bounce     unix  - - n -  0 bounce
            defer      unix  - - n -  0 bounce
            trace      unix  - - n -  0 bounce
            verify     unix  - - n -  1 verify
            flush      unix  n - n 1000? 0 flush
            proxymap   unix  - - n -  - proxymap
            proxywrite unix  - - n -  1 proxymap
            smtp       unix  - - n -  - smtp
            relay      unix  - - n -  - smtp
            showq      unix  n - n -  - showq
            error      unix  - - n -  - error
            retry      unix  - - n -  - error
            discard    unix  - - n -  - discard
            local      unix  - n n -  - local
            virtual    unix  - n n -  - virtual
            lmtp       unix  - - n -  - lmtp
            anvil      unix  - - n -  1 anvil
            scache     unix  - - n -  1 scache
            postlog    unix-dgram n - n - 1 postlogd
            """)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postfix_domain() -> Iterator[PostfixServer]:
    """One Dovecot (the domain) and one Postfix (MX, submission) for the session.

    The catch-all account logs in to submission, and may send as ``ADMIN`` only.
    """
    dovecot = DomainMailServer()
    server: PostfixServer | None = None
    try:
        dovecot.start()
        server = PostfixServer(dovecot, {ADMIN: dovecot.username})
        server.start()
        yield server
    finally:
        if server is not None:
            server.close()  # also after a failed start: its directory goes
        dovecot.close()


@pytest.fixture
def postfix(postfix_domain: PostfixServer) -> PostfixServer:
    """The session's Postfix, idle, with every mailbox empty and the default sender map."""
    postfix_domain.wait_idle()
    postfix_domain.set_sender_logins({ADMIN: postfix_domain.dovecot.username})
    postfix_domain.dovecot.clear_mailboxes()
    return postfix_domain
