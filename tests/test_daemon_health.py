"""`forwarder run` never stays up doing nothing: any failure of a cycle is reported and
retried, READY means every mailbox was tried, the watchdog is fed only while cycles make
progress, and a state file deleted under it stops it."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from forwarder.config import Settings
from forwarder.daemon import Daemon
from forwarder.notify import Notifier
from forwarder.sqlite_store import SqliteStateStore
from tests.conftest import MakeSettings
from tests.daemon_process import Daemon as DaemonProcess
from tests.faults import FaultProxy, Side
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink


class GarblingProxy(FaultProxy):
    """Dovecot behind a proxy that, while `garble` is set, answers SELECT with a UIDVALIDITY
    that is not a number: a hostile server, and an error no code path expects."""

    garble = False

    def _write(self, writer: asyncio.StreamWriter, side: Side, data: bytes) -> None:
        if side == "server" and self.garble:
            data = re.sub(rb"\[UIDVALIDITY \d+\]", b"[UIDVALIDITY none]", data)
        super()._write(writer, side, data)


@pytest.fixture
def garbling_proxy(mailbox: MailServer) -> Iterator[GarblingProxy]:
    with GarblingProxy(mailbox.host, mailbox.imap_port) as proxy:
        yield proxy


def test_an_unexpected_exception_in_a_cycle_is_reported_and_retried(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    start_daemon: type[DaemonProcess],
    garbling_proxy: GarblingProxy,
) -> None:
    garbling_proxy.garble = True
    mailbox.deliver(build_message(), ["contact@example.org"])
    env = {
        **env_for_subprocess,
        "FORWARDER_IMAP_PORT": str(garbling_proxy.port),
        "FORWARDER_POLL_INTERVAL": "1",
    }
    daemon = start_daemon(env)
    failed = daemon.wait_for_event("cycle_failed")
    assert failed["error_type"] == "ValueError"
    assert failed["mailbox"] == "default"
    assert str(failed["error_at"]).startswith("forwarder/imap_source.py:")
    garbling_proxy.garble = False
    smtp_sink.wait_for(1, timeout=30)  # retried with back-off, then forwarded
    status, _, stderr = daemon.stop()
    assert status == 0, stderr


def test_ready_is_sent_once_every_mailbox_was_tried_even_if_its_server_is_down(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    env_for_subprocess: dict[str, str],
    start_daemon: type[DaemonProcess],
    imap_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    imap_proxy.refuse_connections()
    mailbox.deliver(build_message(), ["contact@example.org"])
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        env = {
            **env_for_subprocess,
            "FORWARDER_IMAP_PORT": str(imap_proxy.port),
            "FORWARDER_POLL_INTERVAL": "1",
            "NOTIFY_SOCKET": str(path),
        }
        daemon = start_daemon(env)
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "READY=1" not in seen and time.monotonic() < deadline:
            seen += sock.recv(4096).decode().splitlines()
        assert "READY=1" in seen
    assert "connection refused" in str(daemon.wait_for_event("cycle_failed")["error"])
    imap_proxy.accept_connections()
    smtp_sink.wait_for(1, timeout=30)
    status, _, stderr = daemon.stop()
    assert status == 0, stderr


def test_a_state_file_deleted_under_the_service_stops_it_with_status_1(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[DaemonProcess],
    tmp_path: Path,
) -> None:
    daemon = start_daemon(daemon_env)
    daemon.wait_for_event("ready")
    (tmp_path / "state.db").unlink()
    status, stderr = daemon.wait(timeout=30)
    assert status == 1
    assert "was deleted while the service was running" in stderr
    assert "restarts on the file now at that path" in stderr


# ------------------------------------------------------------------------ in process


class HangingStore:
    """The real SQLite store, with a disk that stops answering when `hang` is set: the
    next `folder` call blocks until `resume` is set (what no timeout bounds)."""

    def __init__(self, store: SqliteStateStore) -> None:
        self.store = store
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.resume = threading.Event()

    def folder(self, *args: Any) -> Any:
        if self.hang.is_set():
            self.hanging.set()
            self.resume.wait(30)
        return self.store.folder(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_the_watchdog_is_not_fed_while_a_cycle_is_stuck(
    make_settings: MakeSettings, mailbox: MailServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    settings: Settings = make_settings(poll_interval=3600)
    store = HangingStore(SqliteStateStore(settings.state_db))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.setblocking(False)
    notifier = Notifier(str(tmp_path / "notify.sock"), watchdog_usec="100000")  # ping: 50 ms
    daemon = Daemon(settings, store, notifier=notifier, stuck=0.3)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()

    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(daemon.run())
        await _until(loop, listener, "WATCHDOG=1")
        store.hang.set()
        daemon.workers["default"].poll()
        await asyncio.to_thread(store.hanging.wait, 10)
        while not any(e["event"] == "cycle_stuck" for e in logs):
            await asyncio.sleep(0.05)
        _drain(listener)
        await asyncio.sleep(0.5)  # ten ping periods: a healthy daemon pings in each
        assert "WATCHDOG=1" not in _drain(listener)
        store.resume.set()
        await _until(loop, listener, "WATCHDOG=1")  # progress again
        daemon.request_stop("SIGTERM")
        assert await running == 0
    listener.close()
    stuck = next(e for e in logs if e["event"] == "cycle_stuck")
    assert stuck["mailbox"] == "default"


async def _until(loop: asyncio.AbstractEventLoop, sock: socket.socket, line: str) -> None:
    """Read datagrams until one has `line` (20 s at most)."""

    async def read() -> None:
        while line not in (await loop.sock_recv(sock, 4096)).decode().splitlines():
            pass

    await asyncio.wait_for(read(), 20)


def _drain(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    while True:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return lines
