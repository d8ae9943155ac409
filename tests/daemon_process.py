"""A real `forwarder run` process for the tests, its JSON log lines read as they come, and
its fixtures (`daemon_env`, `start_daemon`), registered in `tests/conftest.py`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

__all__ = ["Daemon", "daemon_env", "start_daemon"]


class Daemon:
    """A `forwarder run` process whose JSON log lines are read as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, object]] = []
        self.lines: list[str] = []  # all of stdout, as written
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("{"):
                with self._changed:
                    self.events.append(json.loads(line))
                    self._changed.notify_all()

    def wait_for_event(
        self,
        name: str,
        timeout: float = 20,
        *,
        after: int = 0,
        where: Callable[[dict[str, object]], bool] = lambda e: True,
    ) -> dict[str, object]:
        """The first event `name` (from the `after`-th line on) for which `where` holds."""

        def found() -> dict[str, object] | None:
            return next(
                (e for e in self.events[after:] if e["event"] == name and where(e)), None
            )

        with self._changed:
            ok = self._changed.wait_for(lambda: found() is not None, timeout)
            assert ok, f"no {name} event in {[e['event'] for e in self.events]}"
            event = found()
            assert event is not None
            return event

    def names(self) -> list[object]:
        with self._changed:
            return [e["event"] for e in self.events]

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        """Wait for the exit: (status, stderr)."""
        self.process.wait(timeout=timeout)
        self._reader.join(5)
        assert self.process.stderr is not None
        stderr = self.process.stderr.read()
        return self.process.returncode, stderr

    def stop(self, timeout: float = 10) -> tuple[int, list[dict[str, object]], str]:
        self.process.send_signal(signal.SIGTERM)
        status, stderr = self.wait(timeout)
        self.close()
        return status, self.events, stderr

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


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
