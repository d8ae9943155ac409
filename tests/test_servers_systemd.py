"""The systemd container harness (tests/servers/systemd.py) does what the deployment
tests rely on: layers, isolation from the host, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers.systemd import Bind, Container


def test_what_a_container_wrote_is_seen_by_one_booted_on_its_layer(systemd_rootfs: Path) -> None:
    first = Container([systemd_rootfs])
    try:
        first.start()
        first.write("/etc/written-by-the-first", "hello\n")
        first.stop()  # not close(): that would remove its upper directory
        with Container([first.upper, systemd_rootfs]) as second:
            assert second.run("cat", "/etc/written-by-the-first").stdout == "hello\n"
    finally:
        first.close()


def test_commands_run_as_the_containers_pid_1_sees_them(
    systemd_rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST_ONLY_VARIABLE", "leaked")
    with Container([systemd_rootfs]) as container:
        assert "HOST_ONLY_VARIABLE" not in container.run("env").stdout
        assert container.run("cat", "/proc/1/comm").stdout == "systemd\n"
        assert container.systemctl("is-system-running").stdout.strip() == "running"
        links = container.run("ls", "/sys/class/net").stdout.split()
        assert links == ["lo"]  # --private-network: only its own loopback


def test_stop_ends_every_process_and_the_overlay(systemd_rootfs: Path) -> None:
    container = Container([systemd_rootfs])
    try:
        container.start()
        leader = container.leader
        merged = str(container.workdir / "merged")
        container.stop()
        assert not Path(f"/proc/{leader}").exists()
        assert merged not in Path("/proc/self/mountinfo").read_text()
        assert container.upper.is_dir()  # kept: it can be a layer
    finally:
        container.close()
    assert not container.workdir.exists()


def test_a_container_that_does_not_boot_is_removed(systemd_rootfs: Path, tmp_path: Path) -> None:
    missing = Bind(tmp_path / "missing", "/srv/missing")
    container = Container([systemd_rootfs], [missing])
    with pytest.raises(RuntimeError, match="exited while booting"):
        container.start()
    assert not container.workdir.exists()
