"""The sd_notify client against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from forwarder.notify import Notifier


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as NOTIFY_SOCKET spells it

    def receive(self) -> bytes:
        return self.sock.recv(4096)

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"forwarder-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield Listener(sock, "@" + name)


@pytest.fixture
def notifier(listener: Listener) -> Iterator[Notifier]:
    n = Notifier(listener.address)
    yield n
    n.close()


def test_ready(notifier: Notifier, listener: Listener) -> None:
    assert notifier.ready() is True
    assert listener.receive() == b"READY=1"


def test_ready_with_a_status_is_one_datagram(notifier: Notifier, listener: Listener) -> None:
    notifier.ready(status="polling imap.example.org")
    assert listener.receive() == b"READY=1\nSTATUS=polling imap.example.org"
    assert listener.nothing_pending()


def test_watchdog(notifier: Notifier, listener: Listener) -> None:
    notifier.watchdog()
    assert listener.receive() == b"WATCHDOG=1"


def test_stopping(notifier: Notifier, listener: Listener) -> None:
    notifier.stopping()
    assert listener.receive() == b"STOPPING=1"


def test_status(notifier: Notifier, listener: Listener) -> None:
    notifier.status("last cycle ok: 3 messages, 5 deliveries")
    assert listener.receive() == b"STATUS=last cycle ok: 3 messages, 5 deliveries"


def test_status_text_is_kept_on_one_line(notifier: Notifier, listener: Listener) -> None:
    notifier.status("cycle failed:\nIMAP server refused")
    assert listener.receive() == b"STATUS=cycle failed: IMAP server refused"


def test_notify_sends_arbitrary_fields_in_order(notifier: Notifier, listener: Listener) -> None:
    notifier.notify(STATUS="reloading", MAINPID=4242, ERRNO=5)
    assert listener.receive() == b"STATUS=reloading\nMAINPID=4242\nERRNO=5"


def test_several_messages_reuse_the_socket(notifier: Notifier, listener: Listener) -> None:
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert [listener.receive() for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_abstract_namespace_socket(abstract_listener: Listener) -> None:
    n = Notifier(abstract_listener.address)
    try:
        assert n.ready() is True
        assert abstract_listener.receive() == b"READY=1"
    finally:
        n.close()


def test_from_env_reads_notify_socket(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    n = Notifier.from_env()
    try:
        assert n.enabled
        n.watchdog()
        assert listener.receive() == b"WATCHDOG=1"
    finally:
        n.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    assert "NOTIFY_SOCKET" not in os.environ  # removed by the clean_environment fixture
    n = Notifier.from_env()
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.notify(READY=1) is False
    assert n.watchdog_interval() is None


def test_unsupported_address_is_a_no_op() -> None:
    with capture_logs() as logs:
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False
    assert [e["event"] for e in logs] == ["notify_socket_unsupported"]


def test_send_errors_are_not_raised_and_logged_once(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    with capture_logs() as logs:
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.stopping() is False
    n.close()
    assert [(e["event"], e["log_level"]) for e in logs] == [("notify_failed", "warning")]
    assert "nobody-listens.sock" in logs[0]["notify_socket"]


def test_sends_again_once_the_listener_is_back(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    n = Notifier(str(path))
    try:
        with capture_logs():
            assert n.watchdog() is False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(5)
            assert n.watchdog() is True
            assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        n.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("120000000", None, 60.0),
        ("120000000", "self", 60.0),
        ("3000000", "self", 1.5),
        ("1", None, 0.0000005),
        ("120000000", "other", None),
        ("120000000", "not-a-pid", None),
        (None, None, None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, listener: Listener
) -> None:
    env = {"NOTIFY_SOCKET": listener.address}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    assert Notifier.from_env(env).watchdog_interval() == expected


def test_watchdog_interval_needs_a_notify_socket() -> None:
    assert Notifier.from_env({"WATCHDOG_USEC": "120000000"}).watchdog_interval() is None


def test_watchdog_interval_from_the_process_environment(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_interval() == 15.0
