"""A `forwarder` command run as a real process, its JSON log lines read as they come, so
that a test can act at a moment the process reports (an event), not after a sleep."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

Event = dict[str, object]


class ForwarderProcess:
    """`python -m forwarder ARGS` with `env`; stdout's JSON lines collected in `events`."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forwarder", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[Event] = []
        self.lines: list[str] = []  # all of stdout, as written
        self._ended = False  # stdout closed: no event will come
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
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for_event(
        self, name: str, timeout: float = 60, where: Callable[[Event], bool] = lambda e: True
    ) -> Event:
        """The first event `name` for which `where` holds; fails if the output ends first."""

        def found() -> Event | None:
            return next((e for e in self.events if e["event"] == name and where(e)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._ended, timeout)
            event = found()
        assert event is not None, f"no {name} event in {self.names()}"
        return event

    def wait_for_count(self, names: tuple[str, ...], count: int = 1, timeout: float = 60) -> bool:
        """Wait until `count` events named one of `names` have come: False if the output
        ended first (the process exited)."""

        def seen() -> int:
            return sum(1 for e in self.events if e["event"] in names)

        with self._changed:
            return self._changed.wait_for(lambda: seen() >= count or self._ended, timeout) and (
                seen() >= count
            )

    def names(self) -> list[object]:
        with self._changed:
            return [e["event"] for e in self.events]

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        """Wait for the exit: (status, stderr)."""
        self.process.wait(timeout=timeout)
        self._reader.join(5)
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
