"""Real servers for the test suite, on free loopback ports, one module each.

* :mod:`tests.servers.common`: loopback address, free ports, readiness probes,
  self-signed certificates, ``server_env``.
* :mod:`tests.servers.dovecot`: :class:`MailServer`, a private Dovecot (IMAP +
  LMTP) with a catch-all mailbox; fixtures ``mailserver``, ``mailbox``,
  ``tls_mailserver``, ``tls_mailbox``.
* :mod:`tests.servers.sink`: :class:`SmtpSink`, an aiosmtpd server recording
  every transaction; fixtures ``smtp_sink``, ``starttls_sink``.
* :mod:`tests.servers.postfix`: :class:`PostfixServer` (MX and submission) in
  front of a :class:`DomainMailServer` (Dovecot with a mailbox per person and
  the catch-all); fixtures ``postfix_domain`` (per session), ``postfix``.
* :mod:`tests.servers.postgres`: :class:`PostgresCluster`, a private PostgreSQL
  cluster; fixtures ``postgres_cluster`` (per session), ``postgres_db`` (a
  fresh database per test).
* :mod:`tests.servers.systemd`: :class:`Container`, a minimal Debian booted with
  systemd-nspawn on :mod:`tests.servers.systemd_rootfs` (a cached root file
  system); :mod:`tests.servers.systemd_mail` runs a Dovecot and an SMTP sink
  inside it; fixture ``systemd_rootfs``, whose tests are marked ``container``.
* :mod:`tests.servers.sandbox`: :class:`Sandbox`, mount and PID namespaces in
  which Cyrus IMAP, Courier-IMAP and Exim run from their unpacked packages
  (they conflict with Dovecot's and Postfix's): :mod:`tests.servers.cyrus`
  (fixtures ``cyrus``, ``cyrus_dedup``), :mod:`tests.servers.courier`
  (``courier``, ``courier_without_keywords``, ``courier_plain_idle``) and
  :mod:`tests.servers.exim` (``exim_dovecot``, ``exim_cyrus``,
  ``exim_cyrus_dedup``, ``exim_submission``); their tests are marked ``servers``
  (``make test-servers``).
* :mod:`tests.servers.journald`: :class:`Journald`, a private systemd-journald
  in its own mount namespace; fixture ``journald``.

``from tests.servers import X`` works for every server class and for the
helpers of :mod:`tests.servers.common`.  The
fixtures are registered by listing each submodule in ``pytest_plugins``
(``tests/conftest.py``); they are deliberately not re-exported here, so that no
fixture is registered twice.  Everything here must run as root, as tests and
CI do.
"""

from tests.servers.common import (
    LOOPBACK,
    free_port,
    port_is_bindable,
    self_signed_certificate,
    server_env,
    wait_for_port,
)
from tests.servers.dovecot import MailServer
from tests.servers.journald import Journald
from tests.servers.postfix import DomainMailServer, PostfixServer
from tests.servers.postgres import PostgresCluster, PostgresDatabase, postgres_bin_dir
from tests.servers.sink import Received, SinkTls, SmtpSink
from tests.servers.systemd import Bind, Container

__all__ = [
    "LOOPBACK",
    "Bind",
    "Container",
    "DomainMailServer",
    "Journald",
    "MailServer",
    "PostfixServer",
    "PostgresCluster",
    "PostgresDatabase",
    "Received",
    "SinkTls",
    "SmtpSink",
    "free_port",
    "port_is_bindable",
    "postgres_bin_dir",
    "self_signed_certificate",
    "server_env",
    "wait_for_port",
]
