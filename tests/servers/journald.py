"""A private systemd-journald, to see what the journal records of a process's output.

journald runs in its own mount namespace (``unshare --mount``, as root) with a
tmpfs on ``/run``: its sockets (``/run/systemd/journal/...``) and its volatile
journal (``/run/log/journal``) are its own, reached from outside through
``/proc/PID/root``. It reads no kernel messages and forwards nothing. It says
READY=1 over sd_notify on an abstract socket (abstract names belong to the
network namespace, which is shared).

``stream(identifier)`` opens a stdout stream as systemd does for a service
(identifier, priority 6, level prefix on) and returns it with the
``JOURNAL_STREAM`` value a service would see. ``follow(identifier)`` collects
that identifier's entries as journald writes them (``journalctl --follow``);
``Follower.wait_for(text)`` returns once an entry's MESSAGE contains ``text``;
``query(identifier, *args)`` is ``journalctl ARGS`` (``--priority=err``...).

Fixture: ``journald`` (one per session; skipped unless root, since it needs a
mount namespace).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.common import Server, log_tail

__all__ = ["Follower", "Journald", "journald"]

JOURNALD = Path("/lib/systemd/systemd-journald")
CONFIG = """\
[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
Audit=no
"""


class Follower:
    """The entries of one identifier, as `journalctl --follow` prints them."""

    def __init__(self, journal: Path, identifier: str) -> None:
        self.entries: list[dict[str, str]] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            ["journalctl", "-D", str(journal), "--follow", "--all", "--lines=all", "-o", "json",
             f"SYSLOG_IDENTIFIER={identifier}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.entries.append(json.loads(line))
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 20.0) -> list[dict[str, str]]:
        """All entries so far, once one of them has `text` in its MESSAGE."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in e.get("MESSAGE", "") for e in self.entries), timeout
            )
            assert found, f"no journal entry with {text!r} in {self.entries}"
            return list(self.entries)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Journald(Server):
    def __init__(self, start_timeout: float = 10.0) -> None:
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="journald-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._followers: list[Follower] = []

    @property
    def root(self) -> Path:
        """journald's view of the file system (its /run is its own)."""
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/root")

    def start(self) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"forwarder-test-journald-{os.getpid()}-{id(self)}"
        notify.bind("\0" + name)
        notify.settimeout(self.start_timeout)
        (self.base_dir / "journald.conf").write_text(CONFIG)
        script = (
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journald.conf.d && "
            f"cp {self.base_dir}/journald.conf /run/systemd/journald.conf.d/test.conf && "
            f"exec {JOURNALD}"
        )
        with open(self.base_dir / "journald.log", "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                env={"PATH": os.environ.get("PATH", ""), "NOTIFY_SOCKET": "@" + name},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"systemd-journald did not start\n{self.log_tail()}") from None
        finally:
            notify.close()

    def stream(self, identifier: str) -> tuple[socket.socket, str]:
        """A stdout stream to the journal, and the JOURNAL_STREAM naming it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.root / "run/systemd/journal/stdout"))
        # identifier, unit, priority, level prefix, forward to syslog, kmsg, console
        sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        sock.shutdown(socket.SHUT_RD)
        status = os.fstat(sock.fileno())
        return sock, f"{status.st_dev}:{status.st_ino}"

    def follow(self, identifier: str) -> Follower:
        follower = Follower(self.root / "run/log/journal", identifier)
        self._followers.append(follower)
        return follower

    def query(self, identifier: str, *args: str) -> list[dict[str, str]]:
        """`journalctl ARGS` on this journal, for one identifier."""
        result = subprocess.run(
            ["journalctl", "-D", str(self.root / "run/log/journal"), "--all", "-o", "json",
             *args, f"SYSLOG_IDENTIFIER={identifier}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines()]

    def stop(self) -> None:
        for follower in self._followers:
            follower.close()
        self._followers.clear()
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail([self.base_dir / "journald.log"], lines)


@pytest.fixture(scope="session")
def journald() -> Iterator[Journald]:
    """One private systemd-journald for the session (root only: it needs a mount namespace)."""
    if os.geteuid() != 0 or not JOURNALD.exists() or shutil.which("unshare") is None:
        pytest.skip("a private systemd-journald needs root, systemd and unshare")
    server = Journald()
    try:
        server.start()
        yield server
    finally:
        server.close()
