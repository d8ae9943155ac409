"""A real `forwarder run` process for the tests, its JSON log lines read as they come, and
its fixtures (`daemon_env`, `start_daemon`), registered in `tests/conftest.py`."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.forwarder_process import ForwarderProcess

__all__ = ["Daemon", "daemon_env", "start_daemon"]


class Daemon(ForwarderProcess):
    """A `forwarder run` process whose JSON log lines are read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(env, "run")

    def stop(self, timeout: float = 10) -> tuple[int, list[dict[str, object]], str]:
        """SIGTERM, then the exit status, every event and stderr."""
        self.send(signal.SIGTERM)
        status, stderr = self.wait(timeout)
        self.close()
        return status, self.events, stderr


@pytest.fixture
def daemon_env(env_for_subprocess: dict[str, str]) -> dict[str, str]:
    env_for_subprocess["FORWARDER_POLL_INTERVAL"] = "3600"  # only IDLE can be quick
    return env_for_subprocess


@pytest.fixture
def start_daemon() -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    class Tracked(Daemon):
        def __init__(self, env: dict[str, str]) -> None:
            super().__init__(env)
            started.append(self)

    yield Tracked
    for daemon in started:
        daemon.close()
