"""A real systemd in a container: the cached Debian root file system
(:mod:`tests.servers.systemd_rootfs`) booted with systemd-nspawn.

Every container boots on an overlay of read-only layers (the root file system,
and upper layers saved from earlier containers) plus its own upper directory,
mounted inside a private mount namespace (``unshare --mount``), with
``systemd-nspawn --boot --private-network``: the container has its own PID 1,
journal and loopback, so its servers use fixed ports without clashing with the
host's. Commands run in it with ``nsenter`` into all its namespaces, with an
empty environment. It boots in about a second; :meth:`Container.stop` ends it at
once (SIGKILL to its PID 1 ends its whole PID namespace; the overlay goes with
the mount namespace) and leaves its upper directory, which can then be a layer
of the next containers.

Never boot systemd on the host's own root, and never bind the host's device
nodes into a container (/work/shared/real-servers-notes.md): nspawn gives the
container its own ``/dev``, and only directories are bound here.

Needs root and the Debian packages ``mmdebstrap`` and ``systemd-container``
(``bash .ci/system-deps container``). Without them the tests that use the
``systemd_rootfs`` fixture are skipped, except under CI, where they fail. Those
tests are marked ``container``: ``make test-systemd`` runs them, ``make test`` not.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.servers.common import Server
from tests.servers.systemd_rootfs import cache_dir, cached_rootfs

__all__ = [
    "Bind",
    "Container",
    "in_ci",
    "required_tool",
    "systemd_rootfs",
    "unavailable",
    "wait_until",
]

# Host commands and the Debian package bringing each.
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "systemd-nspawn": "systemd-container",
    "unshare": "util-linux",
    "nsenter": "util-linux",
}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The environment of every command run in the container: nothing of the host's.
CONTAINER_ENV = (f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_COLORS=0")
BOOT_TIMEOUT = 120.0

T = TypeVar("T")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def required_tool(command: str, package: str, purpose: str) -> str:
    """The path of a host command the tests need: skipped when it is missing, failed under
    CI (which must not skip these checks)."""
    path = shutil.which(command)
    if path is None:
        message = (
            f"{command} is not installed: it comes with the Debian package {package} "
            "(bash .ci/system-deps, as `make test` runs)"
        )
        if in_ci():
            pytest.fail(f"{message}; CI must not skip {purpose}")
        pytest.skip(message)
    return path


def unavailable() -> str | None:
    """Why containers cannot run here, or None."""
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        return (
            f"missing Debian packages {', '.join(missing)} "
            "(bash .ci/system-deps container, as `make test-systemd` runs)"
        )
    return None


# --------------------------------------------------------------------------- the container


@dataclass(frozen=True)
class Bind:
    """A host directory bound into the container (never a device node)."""

    source: Path
    target: str
    read_only: bool = True

    def option(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.source}:{self.target}"


class Container(Server):
    """One booted container: its overlay layers, its PID 1, commands run in it.

    ``layers`` are read-only lower directories, topmost first (the last one is
    the root file system); what the container writes lands in ``upper``, which
    :meth:`stop` leaves in place so that it can be the top layer of later
    containers (:meth:`close` removes it).
    """

    def __init__(self, layers: Sequence[Path], binds: Sequence[Bind] = ()) -> None:
        self.layers = list(layers)
        self.binds = list(binds)
        self.workdir = Path(tempfile.mkdtemp(prefix="systemd-container-"))
        self.upper = self.workdir / "upper"
        self.name = f"forwarder-test-{secrets.token_hex(4)}"  # nspawn: letters, digits, -
        self.console_log = self.workdir / "console.log"
        self.leader = 0  # the container's PID 1, as seen from the host
        self._process: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot, and return once the container's systemd reports it finished starting up.

        nspawn is given a notify socket: it sends ``X_NSPAWN_LEADER_PID`` as soon
        as the container's PID 1 exists, and with ``--notify-ready=yes`` forwards
        the READY=1 that systemd sends when the boot transaction is complete (the
        units enabled for multi-user.target started, or failed). A container that
        does not boot is closed (its directory removed) before the error is raised.
        """
        try:
            self._boot(timeout)
        except BaseException:
            self.close()
            raise

    def _boot(self, timeout: float) -> None:
        for sub in ("upper", "work", "merged"):
            (self.workdir / sub).mkdir()
        lower = ":".join(str(layer) for layer in self.layers)
        options = f"lowerdir={lower},upperdir={self.upper},workdir={self.workdir / 'work'}"
        nspawn = [
            "systemd-nspawn", "--quiet", "--boot", "--directory", str(self.workdir / "merged"),
            "--machine", self.name, "--private-network", "--register=no", "--keep-unit",
            "--link-journal=no", "--console=read-only", "--notify-ready=yes", "--settings=no",
            "--resolv-conf=off", "--timezone=off", *(bind.option() for bind in self.binds),
        ]  # fmt: skip
        script = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"'
        notify_path = self.workdir / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            with open(self.console_log, "wb") as console:
                self._process = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                     options, str(self.workdir / "merged"), *nspawn],
                    env={"PATH": PATH, "NOTIFY_SOCKET": str(notify_path)},
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                )  # fmt: skip
            self._await_ready(notify, time.monotonic() + timeout)

    def _await_ready(self, notify: socket.socket, deadline: float) -> None:
        assert self._process is not None
        ready = False
        while not ready:
            if self._process.poll() is not None:
                raise RuntimeError(f"the container exited while booting\n{self.console_tail()}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the container did not boot in time\n{self.console_tail()}")
            notify.settimeout(0.5)  # to notice nspawn exiting; not a readiness delay
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                continue
            for line in message.splitlines():
                key, _, value = line.partition("=")
                if key == "X_NSPAWN_LEADER_PID":
                    self.leader = int(value)
                ready = ready or line == "READY=1"
        if not self.leader:
            raise RuntimeError("systemd-nspawn did not report the container's PID 1")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """End the container at once: SIGKILL to its PID 1 ends every process in it."""
        process, self._process = self._process, None
        if process is None:
            return
        if self.leader and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.leader = 0

    def close(self) -> None:
        """Kill the container and remove its directory, upper layer included."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def console_tail(self, lines: int = 40) -> str:
        text = self.console_log.read_text(errors="replace") if self.console_log.exists() else ""
        return "--- console\n" + "\n".join(text.splitlines()[-lines:])

    # ---------------------------------------------------------------- commands

    def run(
        self,
        *argv: str,
        input: bytes | str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container (all its namespaces, root, empty environment)."""
        if not self.running:
            raise RuntimeError("the container is not running")
        command = [
            "nsenter", "--target", str(self.leader), "--all", "--root", "--wd",
            "env", "-i", *CONTAINER_ENV, *argv,
        ]  # fmt: skip
        data = input.encode() if isinstance(input, str) else input
        result = subprocess.run(
            command,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        done = subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)!r} in the container exited {done.returncode}\n"
                f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
            )
        return done

    def shell(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a bash script in the container (``set -euo pipefail``)."""
        return self.run("bash", "-euo", "pipefail", "-c", script, check=check)

    def write(self, path: str, content: bytes | str, mode: int = 0o644) -> None:
        """Create or replace a file in the container, parent directories included."""
        self.run(
            "sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "sh", path, f"{mode:o}", input=content,
        )  # fmt: skip

    def read(self, path: str) -> bytes:
        """A file of the running container, read through ``/proc/PID/root``."""
        return self.host_path(path).read_bytes()

    def host_path(self, path: str) -> Path:
        """The host's view of ``path`` in the container (absolute symlinks in it would
        resolve on the host: use it for plain directories and files only)."""
        return Path(f"/proc/{self.leader}/root") / path.lstrip("/")

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``, as raw strings."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *options: str) -> str:
        """The unit's journal lines (``journalctl -u UNIT -o cat``), e.g. ``"-p", "err"``."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *options).stdout

    def diagnosis(self, unit: str) -> str:
        """What to print when a check on ``unit`` fails: its status and journal."""
        status = self.systemctl("status", unit, check=False).stdout
        return f"--- systemctl status {unit}\n{status}\n--- journal\n{self.journal(unit)[-6000:]}"


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """Poll ``condition`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- fixtures


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs a container is marked ``container`` (``make test-systemd``)."""
    for item in items:
        if "systemd_rootfs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.container)


@pytest.fixture(scope="session")
def systemd_rootfs() -> Path:
    """The cached root file system (built on first use); skipped when containers
    cannot run here, failed instead under CI."""
    reason = unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"{reason}; CI must not skip the systemd checks")
        pytest.skip(reason)
    return cached_rootfs(cache_dir())
