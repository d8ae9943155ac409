"""The sandbox the unpacked servers run in (tests/servers/sandbox.py)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.servers.sandbox import UNPACKED, Command, Sandbox


def wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() >= deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def test_syslog_messages_land_in_the_instance_log(sandbox: Sandbox) -> None:
    sandbox.start([Command(["sh", "-c", "logger -t probe hello-from-inside; exec sleep 60"])])
    wait_for(lambda: "probe: hello-from-inside" in sandbox.syslog_path.read_text(), "syslog line")


def test_usr_is_the_unpacked_tree_and_etc_run_are_private(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    (sandbox.etc / "probe.conf").write_text("mine\n")
    out = tmp_path / "out"
    script = (
        f"test -x /usr/sbin/exim4 && cat /etc/probe.conf > {out} && "
        f"mkdir -p /run/probe-dir && echo ok >> {out}; exec sleep 60"
    )
    sandbox.start([Command(["sh", "-c", script])])
    wait_for(lambda: out.exists() and out.read_text() == "mine\nok\n", "probe output")
    assert (UNPACKED / "usr/sbin/exim4").exists() and not Path("/usr/sbin/exim4").exists()
    assert not Path("/etc/probe.conf").exists() and not Path("/run/probe-dir").exists()


def test_stop_ends_every_process_left_in_it(sandbox: Sandbox, tmp_path: Path) -> None:
    started = tmp_path / "started"
    # A grandchild that ignores SIGTERM and outlives its parent.
    script = f"(trap '' TERM; sleep 300 & touch {started}; wait) & exec sleep 300"
    sandbox.start([Command(["sh", "-c", script])])
    wait_for(started.exists, "the grandchild")
    pids = sandbox.pids()
    assert len(pids) >= 4  # init, sleep, the subshell, its sleep
    sandbox.stop()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_failing_daemon_ends_the_sandbox_and_says_so(sandbox: Sandbox) -> None:
    sandbox.start([Command(["sh", "-c", "exit 3"])])
    wait_for(lambda: sandbox.exited() is not None, "sandbox exit")
    assert sandbox.exited() == 1
    assert "sandbox: sh exited with 3" in sandbox.syslog_path.read_text()
