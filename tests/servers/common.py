"""What every test server shares: the loopback address, free ports, readiness
probes and self-signed certificates."""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Self

from imapclient import IMAPClient

if TYPE_CHECKING:
    from tests.servers.dovecot import MailServer
    from tests.servers.sink import SmtpSink

__all__ = [
    "LOOPBACK",
    "ImapCatchAll",
    "Server",
    "empty_inbox",
    "free_port",
    "inbox_messages",
    "lmtp_deliver",
    "log_tail",
    "port_is_bindable",
    "self_signed_certificate",
    "server_env",
    "wait_for_port",
    "wait_ports_free",
]

LOOPBACK = "127.0.0.1"


class Server:
    """What the test servers' classes share: ``with server:`` starts it and
    closes it at the end; ``restart()`` is ``stop()`` then ``start()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop, and remove whatever the server left on disk."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def restart(self) -> None:
        self.stop()
        self.start()


class ImapCatchAll:
    """A test server's catch-all over IMAP: ``host``, ``imap_port``, ``username`` and
    ``password`` are the subclass's; ``imap()`` logs in without TLS."""

    host: str
    imap_port: int
    username: str
    password: str

    def imap(self) -> IMAPClient:
        client = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=10)
        client.login(self.username, self.password)
        return client

    def messages(self) -> list[tuple[int, set[bytes], bytes]]:
        """(uid, flags, raw message) of every message in INBOX, by UID."""
        with self.imap() as client:
            found = inbox_messages(client)
            client.logout()
        return found

    def clear(self) -> None:
        """Expunge every message of INBOX (UIDs go on increasing, UIDVALIDITY stays)."""
        with self.imap() as client:
            empty_inbox(client)
            client.logout()


def wait_ports_free(host: str, ports: Iterable[int], timeout: float, what: str) -> None:
    """Until every one of ``ports`` can be bound again (a server stopped)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while port and not port_is_bindable(host, port):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"port {port} still busy after {what} stopped")
            time.sleep(0.02)


def log_tail(paths: Iterable[Path], lines: int = 30) -> str:
    """The last ``lines`` lines of each existing file of ``paths``, each under its name."""
    text = ""
    for path in paths:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            text += f"--- {path.name}\n" + "\n".join(tail) + "\n"
    return text


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


def port_is_bindable(host: str, port: int) -> bool:
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


def server_env(
    mail: MailServer,
    smtp: SmtpSink,
    state_db: Path,
    lists: dict[str, list[str]],
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


def lmtp_deliver(
    host: str, port: int, raw: bytes, rcpts: list[str], sender: str = "sender@remote.example"
) -> None:
    """Deliver ``raw`` by LMTP in one transaction; raise if any recipient is refused.

    Not ``LMTP.sendmail()``: LMTP answers DATA once per accepted recipient
    and smtplib reads only the first reply, so with several recipients the
    rest would be taken for the reply to QUIT.
    """
    lmtp = smtplib.LMTP(host, port, timeout=10)
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


def inbox_messages(client: IMAPClient) -> list[tuple[int, set[bytes], bytes]]:
    """(uid, flags, raw message) of every message in INBOX, by UID (selected read-only)."""
    client.select_folder("INBOX", readonly=True)
    uids = client.search("ALL")
    fetched = client.fetch(uids, ["FLAGS", "BODY.PEEK[]"]) if uids else {}
    return [(uid, set(data[b"FLAGS"]), data[b"BODY[]"]) for uid, data in sorted(fetched.items())]


def empty_inbox(client: IMAPClient) -> None:
    """Expunge every message of INBOX (UIDs go on increasing, UIDVALIDITY stays)."""
    client.select_folder("INBOX")
    uids = client.search("ALL")
    if uids:
        client.delete_messages(uids)
        client.expunge()
    client.close_folder()
