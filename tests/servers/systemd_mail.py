"""A private Dovecot and an SMTP sink inside a systemd test container.

The container has its own network namespace (only loopback), so the servers
listen on fixed ports there without clashing with anything on the host.

* Dovecot is Debian's own ``dovecot.service`` with a configuration of ours: IMAP
  on 143 and LMTP on 24, plaintext, one catch-all mailbox (every LMTP recipient
  lands in it) that ``catchall@example.org`` / ``secret`` logs in to.
* The SMTP sink (:mod:`tests.servers.systemd_sink`) runs as ``smtp-sink.service`` on
  port 2525 and writes every transaction to a file; :func:`received` reads them.

Both are enabled and ordered before ``forwarder.service``, so that at boot the
forwarder starts once they accept connections (as a forwarder on the mail
server's own host would be configured).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.servers.sink import Received
from tests.servers.systemd import Container

IMAP_PORT = 143
LMTP_PORT = 24
SMTP_PORT = 2525
CATCHALL = "catchall@example.org"
CATCHALL_PASSWORD = "secret"
SINK_DIR = "/var/lib/smtp-sink"
SINK_PROGRAM = "/usr/local/lib/smtp-sink/systemd_sink.py"
MAIL_HOME = "/var/mail/catchall"

DOVECOT_CONF = f"""\
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u /etc/dovecot/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={MAIL_HOME} allow_all_users=yes
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {IMAP_PORT}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {LMTP_PORT}
  }}
}}
"""

SINK_UNIT = f"""\
[Unit]
Description=SMTP sink recording every transaction (forwarder tests)
Before=forwarder.service

[Service]
Type=notify
ExecStart=/usr/bin/python3 {SINK_PROGRAM} 127.0.0.1 {SMTP_PORT} {SINK_DIR}

[Install]
WantedBy=multi-user.target
"""

BEFORE_FORWARDER = "[Unit]\nBefore=forwarder.service\n"

# One LMTP transaction with one recipient: Dovecot then writes it into Received: ... for <>.
LMTP_DELIVER = f"""\
import smtplib, sys
lmtp = smtplib.LMTP("127.0.0.1", {LMTP_PORT})
lmtp.sendmail(sys.argv[1], [sys.argv[2]], sys.stdin.buffer.read())
lmtp.quit()
"""


def install_mail_servers(container: Container) -> None:
    """Configure, enable and (re)start Dovecot and the sink in a running container."""
    container.write("/etc/dovecot/dovecot.conf", DOVECOT_CONF)
    container.write("/etc/dovecot/users", f"{CATCHALL}:{{PLAIN}}{CATCHALL_PASSWORD}\n")
    container.write("/etc/systemd/system/dovecot.service.d/before-forwarder.conf", BEFORE_FORWARDER)
    container.write(SINK_PROGRAM, (Path(__file__).parent / "systemd_sink.py").read_bytes())
    container.write("/etc/systemd/system/smtp-sink.service", SINK_UNIT)
    container.run("install", "-d", "-o", "nobody", "-g", "nogroup", "-m", "0700", MAIL_HOME)
    container.systemctl("daemon-reload")
    container.systemctl("restart", "dovecot")
    container.systemctl("enable", "--now", "smtp-sink")


def deliver(container: Container, raw: bytes, rcpt: str, sender: str = "a@remote.example") -> None:
    """Deliver ``raw`` to the catch-all by LMTP, for the one recipient ``rcpt``."""
    container.run("python3", "-c", LMTP_DELIVER, sender, rcpt, input=raw)


def received(container: Container) -> list[Received]:
    """Every transaction the sink accepted so far, in order."""
    directory = container.host_path(SINK_DIR)
    found = []
    for path in sorted(directory.glob("*.json")):
        record = json.loads(path.read_text())
        found.append(
            Received(
                mail_from=record["mail_from"],
                rcpt_tos=record["rcpt_tos"],
                data=base64.b64decode(record["data"]),
                mail_options=record["mail_options"],
            )
        )
    return found
