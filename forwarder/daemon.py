"""`forwarder run`: the service.

One task runs the poll cycles, one at a time. It is woken by the APScheduler
poll job (every FORWARDER_POLL_INTERVAL seconds: the safety net and the clock of
deferred retries), by the IMAP IDLE watcher as soon as new mail arrives, and by
its own backoff after a failure. SIGTERM/SIGINT finish the messages in flight,
commit, log a summary and exit 0. systemd is told READY, WATCHDOG, STATUS, STOPPING.

On a store shared by several instances (PostgreSQL), a cycle runs only while this
instance holds the mailbox's lease (`forwarder.mailbox_leases`); it is woken when
the lease is gained.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from forwarder.config import Settings
from forwarder.errors import EXIT_OK, AuthError, ConfigError, ForwarderError
from forwarder.factory import build_forwarder, open_store, owner_id
from forwarder.idle import IdleWatcher
from forwarder.mailbox_leases import MailboxLeases
from forwarder.notify import Notifier
from forwarder.reporting import CycleSummary
from forwarder.service import report
from forwarder.state import StateStore

log = structlog.get_logger("forwarder.daemon")
STOP_GRACE = 8.0  # seconds to finish the messages in flight (systemd waits 15)
MAX_BACKOFF = 300.0


class Daemon:
    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.mailbox = settings.mailboxes()[0]
        owner = owner_id()
        self.forwarder = build_forwarder(settings, self.mailbox, store, owner=owner)
        self.leases = MailboxLeases(
            store, owner, [self.mailbox.name], settings.takeover_after, self.gained
        )
        self.held_elsewhere = False
        self.notifier = Notifier.from_env()
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.totals = CycleSummary()
        self.fatal: ForwarderError | None = None
        self.ready = False

    def request_stop(self, signame: str) -> None:
        log.info("stop_requested", signal=signame)
        self.forwarder.stopping = True
        self.stop.set()
        self.wake.set()

    async def poll_job(self) -> None:
        self.wake.set()

    def gained(self, mailboxes: set[str]) -> None:
        self.held_elsewhere = False
        self.wake.set()

    async def run_cycles(self) -> None:
        failures = 0
        while not self.stop.is_set():
            await self.wake.wait()
            self.wake.clear()
            if self.stop.is_set():
                return
            try:
                if not self.ready:
                    await self.forwarder.connect()
                    self._ready()
                if not self.leases.holds(self.mailbox.name):
                    if not self.held_elsewhere:  # woken again when the lease is gained
                        log.info("mailbox_held_elsewhere", mailbox=self.mailbox.name)
                        self.held_elsewhere = True
                    continue
                summary = await self.forwarder.run_cycle()
            except AuthError as exc:
                self.fatal = exc  # does not heal by waiting
                self.stop.set()
                return
            except ForwarderError as exc:
                failures += 1
                delay = min(2.0**failures, MAX_BACKOFF, self.settings.poll_interval)
                log.error("cycle_failed", error=str(exc), retry_in=delay)
                self.notifier.status(f"last cycle failed, retrying in {delay:.0f}s: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                self.wake.set()
                continue
            failures = 0
            self._after_cycle(summary)

    def _ready(self) -> None:
        """Both logins succeeded: tell systemd the service is up."""
        self.ready = True
        self.notifier.ready()
        log.info("ready", lists=len(self.forwarder.lists))

    def _after_cycle(self, summary: CycleSummary) -> None:
        self.totals.add(summary)
        self.notifier.watchdog()
        t = self.totals
        self.notifier.status(
            f"last cycle {datetime.now(UTC):%H:%M:%S}Z: {summary.forwarded} forwarded, "
            f"{summary.deferred} deferred, {summary.failed} failed; since start: "
            f"{t.forwarded} forwarded, {t.deferred} deferred, {t.failed} failed"
        )

    async def watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while not self.stop.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)


async def run_daemon(settings: Settings) -> int:
    if len(settings.mailboxes()) > 1:  # until the daemon runs one worker per mailbox
        return report(
            ConfigError(
                f"FORWARDER_MAILBOXES_FILE: `forwarder run` serves a single mailbox in this "
                f"version, and the file has {len(settings.mailboxes())}; run `forwarder once` "
                "(one cycle of every mailbox) from a timer instead"
            ),
            "fatal_error",
        )
    try:
        store = open_store(settings)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    daemon = Daemon(settings, store)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop, sig.name)
    scheduler = AsyncIOScheduler(event_loop=loop)
    scheduler.add_job(
        daemon.poll_job,
        "interval",
        seconds=settings.poll_interval,
        id="poll",
        next_run_time=datetime.now(UTC),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )

    def wake_from_thread() -> None:
        loop.call_soon_threadsafe(daemon.wake.set)

    idle = IdleWatcher(daemon.mailbox.imap, wake_from_thread, ca_file=settings.tls_ca_file)
    log.info("started", lists=len(daemon.forwarder.lists), poll_interval=settings.poll_interval)
    await daemon.leases.start()
    scheduler.start()
    idle.start()
    runner = asyncio.create_task(daemon.run_cycles())
    watchdog = asyncio.create_task(daemon.watchdog())
    try:
        await daemon.stop.wait()
    finally:
        daemon.notifier.stopping()
        daemon.forwarder.stopping = True
        scheduler.shutdown(wait=False)
        try:  # the messages in flight are finished and committed
            await asyncio.wait_for(asyncio.shield(runner), STOP_GRACE)
        except TimeoutError:
            runner.cancel()  # unmarked messages are simply looked at again next time
            log.warning("stop_timeout", grace_seconds=STOP_GRACE)
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        watchdog.cancel()
        await daemon.leases.stop()
        await asyncio.to_thread(idle.stop)
        await daemon.forwarder.close()
        store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped", **daemon.totals.as_dict())
    if daemon.fatal is not None:
        return report(daemon.fatal, "fatal_error")
    return EXIT_OK
