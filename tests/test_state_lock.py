"""One forwarder process per state file, however the file is named: a `forwarder run`
holds it, and a `forwarder once` reaching the same file through a symbolic link or
another relative path is refused with the one-line error (exit 1) before it contacts
any server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forwarder_process import ForwarderProcess


@pytest.fixture
def holder(env_for_subprocess: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A `forwarder run` holding tmp_path/state/state.db, ready (its first cycle done)."""
    state = tmp_path / "state" / "state.db"
    state.parent.mkdir()
    env = {**env_for_subprocess, "FORWARDER_STATE_DB": str(state)}
    run = ForwarderProcess(env, "run")
    try:
        run.wait_for_event("ready")
        yield state
        run.send(signal.SIGTERM)
        status, stderr = run.wait()
        assert status == 0, stderr
    finally:
        run.close()


def once(env: dict[str, str], state_db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "once"],
        env={**env, "FORWARDER_STATE_DB": state_db},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "is in use by another forwarder process" in line, line
    assert "run one instance per state file" in line


def test_a_second_process_through_a_symbolic_link_is_refused(
    holder: Path,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    link = tmp_path / "elsewhere" / "state-link.db"
    link.parent.mkdir()
    link.symlink_to(holder)
    result = once(env_for_subprocess, str(link), tmp_path)
    assert_refused(result)
    assert str(link) in result.stderr


def test_a_second_process_through_another_relative_path_is_refused(
    holder: Path,
    env_for_subprocess: dict[str, str],
    tmp_path: Path,
) -> None:
    cwd = tmp_path / "elsewhere" / "deeper"
    cwd.mkdir(parents=True)
    relative = os.path.relpath(holder, cwd)  # ../../state/state.db
    assert relative.startswith("..")
    assert_refused(once(env_for_subprocess, relative, cwd))
