"""`forwarder run`: the service. One worker per mailbox (`forwarder.worker`, managed by
`forwarder.fleet`), and around them:

* systemd (`forwarder.notify`): READY once every mailbox worked here was tried once (its
  logins attempted: done, or failed and retried with back-off), so that a backlog does
  not hold up the start; WATCHDOG only while healthy (`forwarder.health`: no cycle stuck,
  the state file still the one opened); a one-line STATUS; STOPPING;
* SIGHUP: the configuration is loaded again and checked in full; an invalid one is
  logged (`reload_failed`) and the running one kept; otherwise what changed is logged
  (`forwarder.reload`) and applied between cycles: mailboxes added start, removed ones
  stop after their cycle, changed ones take their new settings at their next cycle;
* SIGTERM/SIGINT: see `Fleet.stop`; the process exits 0;
* FORWARDER_METRICS_ADDRESS: Prometheus metrics (`forwarder.metrics`).

A refused login stops the process (status 3) only when it serves the one mailbox of the
environment, as before; with a mailboxes file that mailbox is retried with a long
back-off and reported, and the others go on. A worker's loop that ends unexpectedly, or
a state file deleted under the service, stops the process with status 1: systemd
restarts it. No path leaves the process up and idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

import structlog

from forwarder.config import Settings, load_settings
from forwarder.errors import EXIT_OK, ForwarderError
from forwarder.executor import DaemonThreadPool
from forwarder.factory import open_store, owner_id
from forwarder.fleet import Fleet
from forwarder.health import STUCK_MARGIN, Health, raise_file_limit
from forwarder.mailbox import Mailbox
from forwarder.metrics import Metrics
from forwarder.notify import Notifier
from forwarder.reload import compare, keep_restart_only, log_changes
from forwarder.reporting import CycleSummary
from forwarder.service import report
from forwarder.state import StateStore
from forwarder.worker import MailboxWorker, WorkerOptions

log = structlog.get_logger("forwarder.daemon")
TICK = 1.0  # seconds between two health checks
THREADS = 96  # blocking calls at once (cycles, IDLE logins, the store)


def stuck_after(mailboxes: Sequence[Mailbox]) -> float:
    """Longer than any single IMAP or SMTP operation of these mailboxes may take."""
    longest = max((t for m in mailboxes for t in (m.imap.timeout, m.smtp.timeout)), default=0)
    return longest + STUCK_MARGIN


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        *,
        load: Callable[[], Settings] = load_settings,
        notifier: Notifier | None = None,
        stuck: float | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.load = load
        self.notifier = notifier or Notifier.from_env()
        mailboxes = settings.mailboxes()
        self.health = Health(store, stuck or stuck_after(mailboxes))
        self._fixed_stuck = stuck is not None
        options = WorkerOptions(
            poll_interval=settings.poll_interval,
            ca_file=settings.tls_ca_file,
            single_connection=settings.imap_connections == 1,
            refused_is_fatal=settings.mailboxes_file is None,  # the one mailbox of the variables
        )
        self.metrics = Metrics() if settings.metrics_address else None
        self.fleet = Fleet(
            settings, store, owner_id(), options, self, metrics=self.metrics, ended=self._ended
        )
        self.stop = asyncio.Event()
        self.totals = CycleSummary()
        self.error: ForwarderError | None = None  # why the process stops, if not a signal
        self.ready = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._status_changed = False

    @property
    def workers(self) -> dict[str, MailboxWorker]:
        return self.fleet.workers

    def _ended(self, worker: MailboxWorker, task: asyncio.Task[None]) -> None:
        """A worker's loop ends only when told to: anything else stops the process."""
        if worker.stopping or self.stop.is_set():
            return
        error = None if task.cancelled() else task.exception()
        detail = f"{type(error).__name__}: {error}" if error is not None else "it returned"
        log.error("worker_ended", mailbox=worker.name, error=detail)
        self._fail(ForwarderError(f"the loop of mailbox {worker.name} ended ({detail})"))

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        """The health checks end with the process only: a bug there stops it (status 1)."""
        if self.stop.is_set() or task.cancelled():
            return
        error = task.exception()
        log.error("worker_ended", mailbox=None, error=f"{type(error).__name__}: {error}")
        self._fail(ForwarderError(f"the health checks ended ({type(error).__name__}: {error})"))

    def _fail(self, error: ForwarderError) -> None:
        if self.error is None:
            self.error = error
        self.stop.set()

    # ------------------------------------------------------------------ WorkerEvents

    def holds(self, worker: MailboxWorker) -> bool:
        return self.fleet.leases.holds(worker.name)

    def tried(self, worker: MailboxWorker | None) -> None:
        """READY once every mailbox was tried once (at once when none is worked here)."""
        if self.ready or not all(w.tried for w in self.workers.values()):
            return
        self.ready = True
        self.notifier.ready()
        log.info(
            "ready",
            mailboxes=len(self.workers),
            lists=sum(len(w.forwarder.lists) for w in self.workers.values()),
        )

    def cycle_finished(
        self,
        worker: MailboxWorker,
        duration: float,
        summary: CycleSummary | None,
        error: BaseException | None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.cycle(worker.name, duration, error)
        if summary is not None:
            self.totals.add(summary)
        self._status_changed = True

    def fatal(self, worker: MailboxWorker, error: ForwarderError) -> None:
        self._fail(error)

    def idle_error(self, worker: MailboxWorker) -> None:
        if self.metrics is not None:
            self.metrics.idle_error(worker.name)

    # ------------------------------------------------------------------ metrics (MailboxState)

    def mailbox_workers(self) -> Iterable[MailboxWorker]:
        return self.workers.values()

    def deferred_counts(self) -> dict[str, int]:
        return self.store.deferred_counts()

    # ------------------------------------------------------------------ health

    async def supervise(self) -> None:
        """Ping the watchdog while healthy, publish STATUS, follow the leases; stop if the
        state file went."""
        interval = self.notifier.watchdog_interval()
        tick = min(TICK, interval) if interval else TICK
        last_ping = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if gone := self.health.state_file_gone():
                self._fail(gone)
                return
            self.fleet.reconcile()
            stuck = self.health.stuck(list(self.workers.values()), now)
            if not stuck and interval is not None and now - last_ping >= interval:
                self.notifier.watchdog()
                last_ping = now
            if self._status_changed:
                self._status_changed = False
                self.notifier.status(self._status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), tick)

    def _status(self) -> str:
        t = self.totals
        failing = sum(1 for w in self.workers.values() if w.failures)
        return (
            f"{datetime.now(UTC):%H:%M:%S}Z: {len(self.workers)} mailboxes, {failing} failing; "
            f"since start: {t.forwarded} forwarded, {t.deferred} deferred, {t.failed} failed"
        )

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        if self.stop.is_set():
            return
        self._reload_again = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reloads())

    async def _reloads(self) -> None:
        while self._reload_again and not self.stop.is_set():
            self._reload_again = False
            self.notifier.reloading()
            try:
                await self.reload()
            finally:
                self.notifier.ready()

    async def reload(self) -> None:
        log.info("reload_requested")
        try:
            settings = await asyncio.to_thread(self.load)
            changes = await asyncio.to_thread(compare, self.settings, settings)
            settings = keep_restart_only(self.settings, settings)
            mailboxes = {m.name: m for m in settings.mailboxes()}
        except Exception as exc:
            log.error(
                "reload_failed",
                error=str(exc) or type(exc).__name__,
                error_type=type(exc).__name__,
                kept="the configuration in use",
            )
            return
        log_changes(changes)
        fleet = self.fleet
        self.settings = fleet.settings = settings
        fleet.configured = mailboxes
        if not self._fixed_stuck:
            self.health.stuck_after = stuck_after(list(mailboxes.values()))
        if changes.poll_interval:
            fleet.options = dataclasses.replace(fleet.options, poll_interval=settings.poll_interval)
        changed = {c.name for c in changes.mailboxes}
        for name, worker in fleet.workers.items():
            worker.options = fleet.options
            if changes.poll_interval:
                fleet.schedule(worker)
            if name in changed or changes.cycle_options:
                worker.replace(fleet.build(mailboxes[name]))
        fleet.leases.names = list(mailboxes)
        await fleet.leases.beat()  # mailboxes added are taken now, not at the next beat
        fleet.reconcile()  # removed ones stop after their cycle, added ones start
        await fleet.settled()
        await fleet.unused_pools()

    # ------------------------------------------------------------------ run and stop

    def request_stop(self, signame: str) -> None:
        log.info("stop_requested", signal=signame)
        self.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        mailboxes = self.settings.mailboxes()
        if self.metrics is not None and self.settings.metrics_address:
            try:
                self.metrics.serve(self.settings.metrics_address)
            except ForwarderError as exc:
                return report(exc, "fatal_error")
            self.metrics.watch(self)
        raise_file_limit(len(mailboxes))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        log.info(
            "started",
            mailboxes=len(mailboxes),
            lists=sum(len(m.lists) for m in mailboxes),
            poll_interval=self.settings.poll_interval,
        )
        await self.fleet.start()
        self.tried(None)  # no mailbox worked here: nothing to wait for
        supervisor = asyncio.create_task(self.supervise())
        supervisor.add_done_callback(self._supervisor_ended)
        try:
            await self.stop.wait()
        finally:
            self.notifier.stopping()
            if self._reload_task is not None:
                self._reload_task.cancel()
            await self.fleet.stop()
            supervisor.cancel()
            if self.metrics is not None:
                self.metrics.close()
            self.store.close()
            self.notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped", **self.totals.as_dict())
        if self.error is not None:
            return report(self.error, "fatal_error")
        return EXIT_OK


async def run_daemon(settings: Settings) -> int:
    asyncio.get_running_loop().set_default_executor(DaemonThreadPool(THREADS))
    try:
        store = open_store(settings)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    return await Daemon(settings, store).run()
