"""Push: a second IMAP connection in IDLE (RFC 2177) that wakes the poll cycle on new mail.

It runs in its own thread because imapclient blocks. IDLE is re-issued every
`idle_renew` seconds (29 minutes at most: servers may drop an IDLE after 30);
any error closes the connection and retries with backoff, the poll keeps running.
A login refused for now (`ImapBusyError`: a connection limit) is retried with a
longer backoff, never given up; only refused credentials end the thread (the poll
cycle reports them and stops).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from forwarder.errors import AuthError, ForwarderError, ImapBusyError
from forwarder.imap_source import ImapSource
from forwarder.mailbox import ImapEndpoint

log = structlog.get_logger("forwarder.idle")
IDLE_RENEW = 29 * 60.0
CHECK_EVERY = 1.0  # how often the thread looks at the stop flag while idling
NEW_MAIL = (b"EXISTS", b"RECENT")
MAX_BACKOFF = 60.0
MAX_BUSY_BACKOFF = 300.0  # a connection limit does not go away quickly


class IdleWatcher:
    def __init__(
        self,
        endpoint: ImapEndpoint,
        wake: Callable[[], None],
        *,
        ca_file: Path | None = None,
        renew: float = IDLE_RENEW,
    ) -> None:
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.wake = wake
        self.renew = min(renew, IDLE_RENEW)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imap-idle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            source = ImapSource(self.endpoint, self.ca_file)
            limit = MAX_BACKOFF
            try:
                source.connect()
                if b"IDLE" not in source.capabilities:
                    log.info(
                        "idle_unavailable",
                        server=source.server,
                        fallback="polling every FORWARDER_POLL_INTERVAL",
                    )
                    return
                delay = 1.0
                self.wake()  # whatever arrived while we were not listening
                self._idle(source)
            except AuthError as exc:
                log.error("idle_failed", error=str(exc))  # the poll cycle reports and stops
                return
            except ImapBusyError as exc:
                log.warning("idle_refused", error=str(exc), retry_in=delay)
                limit = MAX_BUSY_BACKOFF
            except (ForwarderError, OSError) as exc:
                log.warning("idle_interrupted", error=str(exc), retry_in=delay)
            except Exception as exc:  # never let the thread die silently
                log.error(
                    "idle_interrupted",
                    error=str(exc) or type(exc).__name__,
                    error_type=type(exc).__name__,
                    retry_in=delay,
                )
            finally:
                source.close()
            self._stop.wait(delay)
            delay = min(delay * 2, limit)

    def _idle(self, source: ImapSource) -> None:
        client = source.client
        assert client is not None
        log.info("idle_started", server=source.server)
        while not self._stop.is_set():
            client.idle()
            deadline = time.monotonic() + self.renew
            try:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    responses = client.idle_check(timeout=CHECK_EVERY)
                    if any(len(r) > 1 and r[1] in NEW_MAIL for r in responses):
                        self.wake()
            finally:
                client.idle_done()
