"""One mailbox's loop in `forwarder run`.

A worker runs its mailbox's cycles one at a time. It is woken by its poll job (the
daemon's scheduler, every FORWARDER_POLL_INTERVAL), by IMAP IDLE (`forwarder.idle`) and
by its own back-off after a failure. Everything that can go wrong stays inside it: any
exception of a cycle is logged (`cycle_failed`, with its type) and the cycle is retried
with back-off, so one mailbox whose server is down or whose login is refused never
stops or slows the others. Every log line it writes carries `mailbox`.

Its first cycle starts with the logins alone (`tried` then says the mailbox was tried
once: the daemon sends READY when every mailbox was; a refusal that stops the process,
exit 3, comes before READY, so that `systemctl start` fails). IDLE starts after the first
successful cycle, on a second connection (`IdleWatcher`), or on the cycle's own
connection between cycles when FORWARDER_IMAP_CONNECTIONS=1 or when the server refused
a second login for now (`ImapBusyError`).

A cycle holds one of the daemon's cycle slots (a semaphore) while it runs, which bounds
the memory of many mailboxes with a backlog at once. `progress` is the time the cycle
last completed a blocking call (`forwarder.executor`); the daemon uses it to tell a
stuck cycle from a slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from forwarder.cycle import Forwarder
from forwarder.errors import EXIT_CONFIG, AuthError, ForwarderError, ImapBusyError
from forwarder.executor import PROGRESS
from forwarder.idle import IDLE_RENEW, shutdown_socket
from forwarder.mailbox import SmtpEndpoint
from forwarder.reporting import CycleSummary
from forwarder.watch import Watch

log = structlog.get_logger("forwarder.daemon")
T = TypeVar("T")
MAX_BACKOFF = 300.0
SAVE_AT_STOP = 1.0  # seconds a stop tries to write replies a failed commit left in memory
REFUSED_BACKOFF = (300.0, 3600.0)  # refused credentials: first and longest wait
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class WorkerOptions:
    poll_interval: float
    ca_file: Path | None = None
    single_connection: bool = False  # FORWARDER_IMAP_CONNECTIONS=1
    refused_is_fatal: bool = False  # one mailbox from the environment: exit 3 as before
    idle_renew: float = IDLE_RENEW


class WorkerEvents(Protocol):
    """What the daemon (and its metrics) hear from a worker."""

    def tried(self, worker: MailboxWorker) -> None: ...

    def holds(self, worker: MailboxWorker) -> bool: ...

    def cycle_finished(
        self,
        worker: MailboxWorker,
        duration: float,
        summary: CycleSummary | None,
        error: BaseException | None,
    ) -> None: ...

    def fatal(self, worker: MailboxWorker, error: ForwarderError) -> None: ...

    def idle_error(self, worker: MailboxWorker) -> None: ...


def backoff(error: BaseException, failures: int, poll_interval: float) -> float:
    """Seconds before trying again after `failures` failures in a row, with +-20% jitter so
    that mailboxes failing together (a shared server down) do not retry together."""
    if isinstance(error, AuthError) or getattr(error, "exit_status", None) == EXIT_CONFIG:
        first, longest = REFUSED_BACKOFF  # waiting rarely fixes it; a lockout might follow
        base: float = min(first * (1 << min(failures - 1, 30)), longest)
    else:
        base = min(float(1 << min(failures, 30)), MAX_BACKOFF, poll_interval)
    return round(base * random.uniform(0.8, 1.2), 1)


def where(error: BaseException) -> str | None:
    """Where in the forwarder an unexpected exception came from (`forwarder/x.py:12 in f`),
    for a bug report: the traceback itself is not logged, as the variables of its frames
    may hold secrets."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).is_relative_to(_PACKAGE)]
    if not frames:
        return None
    frame = (ours or frames)[-1]
    name = Path(frame.filename)
    shown = name.relative_to(_PACKAGE.parent) if name.is_relative_to(_PACKAGE) else name
    return f"{shown}:{frame.lineno} in {frame.name}"


class MailboxWorker:
    def __init__(
        self,
        forwarder: Forwarder,
        options: WorkerOptions,
        slots: asyncio.Semaphore,
        events: WorkerEvents,
    ) -> None:
        self.forwarder = forwarder
        self.name = forwarder.mailbox.name
        self.options = options
        self.slots = slots
        self.events = events
        self.wake = asyncio.Event()
        self.stopping = False
        self.tried = False
        self.failures = 0  # cycles failed in a row
        self.last_success: float | None = None  # wall-clock time of the last good cycle
        self.cycle_started: float | None = None  # monotonic; None between cycles
        self.progress = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.watch = Watch(self)
        self._pending: Forwarder | None = None  # a reloaded configuration, for the next cycle

    # ------------------------------------------------------------------ control

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.run(), name=f"mailbox {self.name}")
        return self.task

    def poll(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        """Finish the deliveries in flight, then end the loop (nothing is cut here)."""
        self.stopping = True
        self.forwarder.stopping = True
        self.wake.set()
        self.watch.stop()

    def cut(self) -> None:
        """Shut down its IMAP connections now: what blocks on them returns at once. (The
        SMTP pool is shared with other mailboxes: the fleet closes it.)"""
        self.stop()
        self.watch.cut()
        shutdown_socket(self.forwarder.source.client)

    async def close(self) -> None:
        """Write the replies a failed commit left in memory if the store takes them now
        (else say how many are lost), then log out (the caller bounds the time; `cut`
        first if it runs out)."""
        try:
            await self.forwarder.save_results(SAVE_AT_STOP)
        except ForwarderError as exc:
            log.error("replies_lost", error=str(exc))
        await asyncio.to_thread(self.forwarder.source.close)

    @property
    def pending_smtp(self) -> SmtpEndpoint | None:
        """The SMTP endpoint of a reloaded configuration not yet taken."""
        return self._pending.mailbox.smtp if self._pending is not None else None

    def replace(self, forwarder: Forwarder) -> None:
        """A reloaded configuration: used from the next cycle on (never mid-cycle)."""
        self._pending = forwarder
        self.wake.set()

    @property
    def watching(self) -> str | None:
        """How new mail is noticed besides the poll: `idle`, `idle-same-connection`, None."""
        return self.watch.how

    def stuck_for(self, now: float) -> float:
        """Seconds the current cycle has gone without completing a blocking call (0 when
        no cycle runs)."""
        if self.cycle_started is None:
            return 0.0
        return now - max(self.cycle_started, self.progress)

    def _progressed(self) -> None:
        self.progress = time.monotonic()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        PROGRESS.set(self._progressed)
        structlog.contextvars.bind_contextvars(mailbox=self.name)
        self.wake.set()
        try:
            while not self.stopping:
                await self.watch.wait()
                if self.stopping:
                    break
                self.wake.clear()
                await self._swap()
                if not self.events.holds(self):
                    continue  # another instance works it now; the daemon stops this worker
                if await self._cycle():
                    break  # fatal: the daemon stops
        finally:
            await self.watch.stopped()

    async def _cycle(self) -> bool:
        """One attempt; True when the failure is fatal for the process."""
        started = time.monotonic()
        logins = not self.tried
        try:
            if logins:
                try:
                    await self._in_slot(self.forwarder.connect)  # logins alone, then READY
                except Exception as exc:
                    self.tried = True
                    if not self._fatal(exc):  # a fatal refusal exits before READY
                        self.events.tried(self)
                    raise
                self.tried = True
                self.events.tried(self)
                logins = False
            summary = await self._in_slot(self.forwarder.run_cycle)
        except Exception as exc:
            self.failures += 1
            self.events.cycle_finished(self, time.monotonic() - started, None, exc)
            if logins:  # run_cycle records its own failures; this one is recorded here
                await self._record_failure(exc)
            return await self._failed(exc)
        self.failures = 0
        self.last_success = time.time()
        self.events.cycle_finished(self, time.monotonic() - started, summary, None)
        self.watch.cycle_succeeded()
        return False

    async def _in_slot(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self.slots:
            self.cycle_started = self.progress = time.monotonic()
            try:
                return await call()
            finally:
                self.cycle_started = None

    def _fatal(self, exc: Exception) -> bool:
        """Refused credentials (or configuration) of the one mailbox of the environment:
        the process stops (exit 3), since waiting will not fix them."""
        return self.options.refused_is_fatal and (
            isinstance(exc, AuthError) or getattr(exc, "exit_status", None) == EXIT_CONFIG
        )

    async def _failed(self, exc: Exception) -> bool:
        if self._fatal(exc):
            assert isinstance(exc, ForwarderError)
            self.events.fatal(self, exc)
            return True
        delay = backoff(exc, self.failures, self.options.poll_interval)
        unexpected = not isinstance(exc, ForwarderError)
        log.error(
            "cycle_failed",
            error=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            error_at=where(exc) if unexpected else None,
            failures=self.failures,
            retry_in=delay,
        )
        if isinstance(exc, ImapBusyError) and self.watch.watcher is not None:
            self.watch.go_single(exc)  # the IDLE connection may be what the limit counts
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped(), delay)
        self.wake.set()
        return False

    async def _record_failure(self, exc: Exception) -> None:
        """A cycle record for failed logins, so that `status` shows them too."""
        try:
            await asyncio.to_thread(
                self.forwarder.reporter.cycle, CycleSummary(), str(exc) or type(exc).__name__
            )
        except Exception as store_error:
            log.error("state_store_error", error=str(store_error) or type(store_error).__name__)

    async def _stopped(self) -> None:
        while not self.stopping:
            await self.wake.wait()
            self.wake.clear()
        self.wake.set()

    async def _swap(self) -> None:
        pending = self._pending
        if pending is None or self.forwarder.committer.failed:
            return  # replies not yet written belong to this forwarder: it writes them first
        self._pending = None
        old, self.forwarder = self.forwarder, pending
        endpoint_changed = old.mailbox.imap != pending.mailbox.imap
        try:
            await asyncio.to_thread(old.source.close)  # the SMTP pool is the fleet's
        except Exception as exc:
            log.warning("close_failed", error=str(exc) or type(exc).__name__)
        if endpoint_changed:
            self.watch.reset()
