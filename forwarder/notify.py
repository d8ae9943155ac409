"""The sd_notify protocol: tell systemd (Type=notify) that we are ready, alive, stopping.

A datagram of newline-separated `KEY=value` fields to the AF_UNIX socket named by
`NOTIFY_SOCKET` (a leading `@` is the abstract namespace). Without that variable
every method is a no-op, so the daemon calls them unconditionally. A failed send
is logged once, at warning, and never raised: the service must not stop because
its supervisor cannot be told something.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("forwarder.notify")

_SEND_TIMEOUT = 2.0  # seconds; systemd reads its socket promptly


def _one_line(value: str | int) -> str:
    return " ".join(str(value).splitlines())


class Notifier:
    """Sends sd_notify messages to `address`; does nothing when `address` is None."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address is not None and self.address[0] not in "/@":
            log.warning(
                "notify_socket_unsupported",
                notify_socket=self.address,
                hint="only AF_UNIX paths and @abstract names are supported",
            )
            self.address = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` fields in one datagram (newlines in values become spaces).

        True if it was sent; False when disabled or the send failed (logged once)."""
        if self.address is None or not fields:
            return False
        for key in fields:
            if not key.isidentifier():
                raise ValueError(f"sd_notify field name {key!r} is not a plain name")
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(payload.encode(), target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "notify_failed", notify_socket=self.address, error=str(exc), fields=list(fields)
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """RELOADING=1 (with MONOTONIC_USEC, which systemd 253 and later want); READY=1
        says the reload is over."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WatchdogSec=), or None: no pings needed.

        None when there is no notify socket, `WATCHDOG_USEC` is unset or invalid, or
        `WATCHDOG_PID` names another process (the variables were inherited).
        """
        if self.address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
