"""Mail servers whose Debian packages cannot be installed next to ours, run from their files.

Cyrus IMAP and Courier-IMAP conflict with ``dovecot-imapd``, and Exim with
``postfix`` (/work/shared/real-servers-notes.md).  ``bash .ci/system-deps
servers`` (``make test-servers``) therefore does not install them: it unpacks
their .deb files into :data:`UNPACKED` and installs only the libraries they link
to.  A :class:`Sandbox` runs them there, in their own mount and PID namespaces
(``unshare``), as if installed:

* ``/usr`` is the unpacked tree laid over the system's (a read-only overlay), so
  the binaries and the paths compiled into them (``/usr/lib/courier-authlib``,
  ``/usr/sbin/exim4`` re-executing itself) are where the package would put them;
* ``/etc`` and ``/run`` are overlays whose upper layer is the instance's own
  (:attr:`Sandbox.etc`, written before the start: ``/etc/courier/authdaemonrc``,
  the ``Debian-exim`` user of :meth:`Sandbox.add_system_user`), so fixed paths
  such as Courier's ``/run/courier/authdaemon/socket`` are private to it;
* ``/dev/log`` is a socket read by the sandbox's first process
  (tests/servers/sandbox_init.py), which writes every message to
  :attr:`Sandbox.syslog_path` (Cyrus and Courier log only to syslog).

That first process is PID 1 of the namespace: :meth:`Sandbox.stop` sends it
SIGTERM, it stops the daemons, and the kernel ends whatever they left.  Servers
listen on loopback ports of the host's network, and write their mail under the
instance's directory, which the tests read directly.  Everything here runs as
root.  Tests using a fixture of these servers are marked ``servers`` (``make
test-servers``) and are skipped when the unpacked tree is missing, except under
CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers.common import log_tail, wait_for_port
from tests.servers.systemd import in_ci

__all__ = [
    "SANDBOXED_FIXTURES",
    "UNPACKED",
    "Command",
    "Sandbox",
    "require_unpacked",
    "sandbox",
    "unavailable",
]

UNPACKED = Path("/opt/forwarder-test-servers/root")
INIT = Path(__file__).with_name("sandbox_init.py")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The session fixtures of the servers run here (each module adds its own): a test
# that uses one is marked ``servers``.
SANDBOXED_FIXTURES: set[str] = {"sandbox"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs an unpacked server is marked ``servers`` (``make test-servers``)."""
    for item in items:
        if SANDBOXED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


def unavailable(*binaries: str) -> str | None:
    """Why these unpacked binaries (paths under /usr, as in the package) cannot run here."""
    if os.geteuid() != 0:
        return "the unpacked mail servers run as root"
    missing = [b for b in binaries if not (UNPACKED / b.lstrip("/")).exists()]
    if missing or not (UNPACKED / ".unpacked").exists():
        return (
            f"{UNPACKED} lacks {', '.join(missing) or 'its .unpacked list'} "
            "(bash .ci/system-deps servers, as `make test-servers` runs)"
        )
    return None


def require_unpacked(*binaries: str) -> None:
    """Skip the test when the binaries are not unpacked; fail instead under CI."""
    reason = unavailable(*binaries)
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason}; CI must not skip the real-server checks")
        pytest.skip(reason)


@dataclass(frozen=True)
class Command:
    """A command run in the sandbox, with exactly this environment (plus ``PATH``)."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)

    def spec(self) -> dict[str, object]:
        return {"argv": list(self.argv), "env": {"PATH": PATH, **self.env}}


class Sandbox:
    """The namespaces one server instance runs in; its files under ``base_dir/sandbox``."""

    def __init__(self, base_dir: Path) -> None:
        self.dir = base_dir / "sandbox"
        self.etc = self.dir / "etc"  # the upper layer of /etc: what the instance adds
        self.syslog_path = base_dir / "syslog"
        self._process: subprocess.Popen[bytes] | None = None
        for name in ("etc", "etc.work", "run", "run.work", "dev", "dev.work"):
            (self.dir / name).mkdir(parents=True, exist_ok=True)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def add_system_user(self, name: str, uid: int, gid: int, home: str = "/nonexistent") -> None:
        """Add a user and its group to the sandbox's /etc/passwd and /etc/group."""
        for table, line in (
            ("passwd", f"{name}:x:{uid}:{gid}::{home}:/usr/sbin/nologin\n"),
            ("group", f"{name}:x:{gid}:\n"),
        ):
            own = self.etc / table
            if not own.exists():
                shutil.copy2(Path("/etc") / table, own)
            with own.open("a") as file:
                file.write(line)

    def start(self, daemons: Sequence[Command], setup: Sequence[Command] = ()) -> None:
        """Run ``setup`` to completion, then start ``daemons``; returns at once."""
        if self.running:
            raise RuntimeError("sandbox already running")
        d = self.dir
        spec = {
            "overlays": [
                {"target": "/usr", "lower": [str(UNPACKED / "usr"), "/usr"]},
                *(
                    {
                        "target": f"/{name}",
                        "lower": [f"/{name}"],
                        "upper": str(d / name),
                        "work": str(d / f"{name}.work"),
                    }
                    for name in ("etc", "run", "dev")
                ),
            ],
            "syslog": str(self.syslog_path),
            "setup": [c.spec() for c in setup],
            "daemons": [c.spec() for c in daemons],
        }
        (d / "spec.json").write_text(json.dumps(spec, indent=1))
        # --kill-child: should this test process die, the sandbox goes with it.
        with self.syslog_path.open("ab") as errors:
            self._process = subprocess.Popen(
                [
                    "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                    "--mount-proc", "--kill-child=SIGTERM",
                    sys.executable, str(INIT), str(d / "spec.json"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )

    def wait_for_greetings(
        self,
        host: str,
        probes: Sequence[tuple[int, bytes]],
        timeout: float,
        what: str,
        tail: Callable[[], str] | None = None,
    ) -> None:
        """Until each ``(port, greeting)`` greets; if the sandbox ends first or the time
        runs out, stop it and raise with the end of its log (``tail``)."""
        deadline = time.monotonic() + timeout
        for port, greeting in probes:
            while not wait_for_port(host, port, min(deadline, time.monotonic() + 0.2), greeting):
                if self.exited() is not None or time.monotonic() >= deadline:
                    self.stop()
                    log = (tail or self.log_tail)()
                    raise RuntimeError(f"{what} did not start on port {port}\n{log}")

    def exited(self) -> int | None:
        """The sandbox's exit status once it has ended (a daemon exited, a setup failed)."""
        return None if self._process is None else self._process.poll()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the sandbox's PID 1 and wait until everything in it has ended."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        init = self._init_pid(process.pid)
        if init is not None:
            os.kill(init, signal.SIGTERM)
        else:  # unshare has not forked yet: its death signals the child
            process.kill()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired as error:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"sandbox did not stop within {timeout} s\n{self.log_tail()}"
            ) from error

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside the running sandbox (its /usr, /etc and /run), checked."""
        if self._process is None or (init := self._init_pid(self._process.pid)) is None:
            raise RuntimeError("sandbox not running")
        result = subprocess.run(
            ["nsenter", "-t", str(init), "--mount", "--pid", "--", *argv],
            env={"PATH": PATH, **(env or {})},
            input=input,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stderr.decode(errors='replace')}")
        return result

    def log_tail(self, lines: int = 30) -> str:
        return log_tail((self.syslog_path,), lines)

    def pids(self) -> list[int]:
        """The host pids of every process now in the sandbox (its PID namespace)."""
        if self._process is None or (init := self._init_pid(self._process.pid)) is None:
            return []
        try:
            namespace = os.readlink(f"/proc/{init}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "pid") == namespace:
                        found.append(int(entry.name))
                except OSError:
                    pass  # gone meanwhile
        return found

    @staticmethod
    def _init_pid(unshare_pid: int, timeout: float = 5.0) -> int | None:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
        deadline = time.monotonic() + timeout
        while True:
            try:
                pids = children.read_text().split()
            except OSError:
                return None  # unshare has exited
            if pids:
                return int(pids[0])
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox not started yet, stopped at the end of the test."""
    require_unpacked()
    box = Sandbox(tmp_path)
    try:
        yield box
    finally:
        box.stop()
