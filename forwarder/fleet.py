"""The workers of the mailboxes this instance works, in `forwarder run`: one per mailbox
configured and held (`forwarder.mailbox_leases`: on SQLite every mailbox is), each with
its APScheduler interval job, the first run of each spread over the interval by its
name so that a thousand mailboxes do not poll at the same instant. The cycle slots (a
semaphore) bound how many cycles run at once, and so the memory of many backlogs.

Mailboxes with the same SMTP endpoint (server, port, security, login) share one pool
of FORWARDER_SMTP_CONNECTIONS connections, opened when needed: a provider's relay sees
a few connections from the process, not one or more per mailbox (a thousand idle
connections would exhaust a Postfix's 100 smtpd processes).

`stop` ends them within the grace: the deliveries in flight get STOP_GRACE seconds;
then every connection still busy is shut down (a server gone silent is not waited for),
and LOGOUT/QUIT go out everywhere at once, for CLOSE_GRACE seconds at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from forwarder.config import Settings
from forwarder.cycle import Forwarder
from forwarder.factory import build_forwarder
from forwarder.mailbox import Mailbox, SmtpEndpoint
from forwarder.mailbox_leases import MailboxLeases
from forwarder.metrics import Metrics
from forwarder.smtp_pool import SmtpPool
from forwarder.state import StateStore
from forwarder.worker import MailboxWorker, WorkerEvents, WorkerOptions

log = structlog.get_logger("forwarder.daemon")
STOP_GRACE = 8.0  # seconds to finish the deliveries in flight (the unit's TimeoutStopSec=15)
CLOSE_GRACE = 2.0  # then seconds to log out and QUIT, all connections at once
CYCLE_SLOTS = 32  # cycles at once


class SharedPool(SmtpPool):
    """The pool of one SMTP endpoint, shared by its mailboxes. Each mailbox's cycle asks
    for a connection at its start (`connect`): here one at a time, through a connection
    taken from the pool, so that two mailboxes never open one relay twice (the second
    connection would be lost, open, until the process ends)."""

    def __init__(self, endpoint: SmtpEndpoint, ca_file: Path | None) -> None:
        super().__init__(endpoint, ca_file)
        self._connecting = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connecting:
            if self.connected:
                return
            async with self.session() as relay:
                if not relay.connected:
                    await relay.connect()


class Fleet:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        owner: str,
        options: WorkerOptions,
        events: WorkerEvents,
        *,
        metrics: Metrics | None,
        ended: Callable[[MailboxWorker, asyncio.Task[None]], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.options = options
        self.events = events
        self.metrics = metrics
        self.ended = ended
        mailboxes = settings.mailboxes()
        self.configured = {m.name: m for m in mailboxes}
        self.leases = MailboxLeases(
            store, owner, list(self.configured), settings.takeover_after, self._gained
        )
        self.slots = asyncio.Semaphore(CYCLE_SLOTS)
        self.scheduler = AsyncIOScheduler()
        self.workers: dict[str, MailboxWorker] = {}
        self.pools: dict[SmtpEndpoint, SharedPool] = {}
        self.stopping = False
        self._letting_go: set[asyncio.Task[None]] = set()
        self._elsewhere: set[str] = set()  # configured, held by another instance

    async def start(self) -> None:
        self.scheduler.start()
        await self.leases.start()
        self.reconcile()

    def build(self, mailbox: Mailbox) -> Forwarder:
        pool = self.pools.get(mailbox.smtp)
        if pool is None:
            pool = self.pools[mailbox.smtp] = SharedPool(mailbox.smtp, self.settings.tls_ca_file)
        forwarder = build_forwarder(self.settings, mailbox, self.store, owner=self.owner, smtp=pool)
        if self.metrics is not None:
            forwarder.reporter.observer = self.metrics.observer(mailbox.name)
        return forwarder

    def _gained(self, names: set[str]) -> None:
        self.reconcile()

    def reconcile(self) -> None:
        """Work the mailboxes configured and held, no other."""
        if self.stopping:
            return
        for name, mailbox in self.configured.items():
            if not self.leases.holds(name):
                if name not in self._elsewhere:  # once, until it is held again
                    self._elsewhere.add(name)
                    log.info("mailbox_held_elsewhere", mailbox=name)
                continue
            self._elsewhere.discard(name)
            if name not in self.workers:
                self.start_worker(mailbox)
        for name in list(self.workers):
            if name not in self.configured or not self.leases.holds(name):
                task = asyncio.create_task(self.stop_worker(name))
                self._letting_go.add(task)
                task.add_done_callback(self._letting_go.discard)

    async def settled(self) -> None:
        """Until the workers being stopped have stopped."""
        if self._letting_go:
            await asyncio.wait(set(self._letting_go))

    def start_worker(self, mailbox: Mailbox) -> None:
        worker = MailboxWorker(self.build(mailbox), self.options, self.slots, self.events)
        self.workers[worker.name] = worker
        worker.start().add_done_callback(functools.partial(self.ended, worker))
        self.schedule(worker)

    def schedule(self, worker: MailboxWorker) -> None:
        interval = self.options.poll_interval
        spread = interval * zlib.crc32(worker.name.encode()) / 2**32
        self.scheduler.add_job(
            worker.poll,
            "interval",
            seconds=interval,
            id=f"poll {worker.name}",
            next_run_time=datetime.now(UTC) + timedelta(seconds=spread),
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    async def stop_worker(self, name: str) -> None:
        """A mailbox no longer worked here: its cycle finishes, then its connections close."""
        worker = self.workers.pop(name)
        with contextlib.suppress(LookupError):
            self.scheduler.remove_job(f"poll {name}")
        worker.stop()
        if worker.task is not None:
            await asyncio.wait({worker.task})
        await self.close([worker])
        if self.metrics is not None:
            self.metrics.forget(name)
        log.info("mailbox_stopped", mailbox=name)

    async def stop(self) -> None:
        """Every worker, within STOP_GRACE + CLOSE_GRACE; then the mailboxes are given back."""
        self.stopping = True
        self.scheduler.shutdown(wait=False)
        workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        if self._letting_go:
            await asyncio.wait(set(self._letting_go), timeout=STOP_GRACE)
        tasks = {w.task: w for w in workers if w.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
            if pending:  # deliveries still unfinished: looked at again at the next start
                log.warning(
                    "stop_timeout",
                    grace_seconds=STOP_GRACE,
                    mailboxes=sorted(tasks[t].name for t in pending),
                )
                for task in pending:
                    tasks[task].cut()
                    task.cancel()
                await asyncio.wait(pending, timeout=CLOSE_GRACE)
        await asyncio.gather(self.close(workers), self.close_pools(list(self.pools)))
        await self.leases.stop()  # given back: the other instances take them at once

    async def close_pools(self, endpoints: list[SmtpEndpoint]) -> None:
        """QUIT on every connection of these pools at once, for at most CLOSE_GRACE."""
        pools = [self.pools.pop(e) for e in endpoints if e in self.pools]
        closing = [asyncio.create_task(p.close()) for p in pools]
        if not closing:
            return
        _, pending = await asyncio.wait(closing, timeout=CLOSE_GRACE)
        for task in pending:
            task.cancel()
        for pool in pools:
            for relay in pool.relays:
                relay.drop()

    async def unused_pools(self) -> None:
        """Close the pools no mailbox uses any more (after a reload)."""
        used = {w.forwarder.mailbox.smtp for w in self.workers.values()}
        used |= {w.pending_smtp for w in self.workers.values() if w.pending_smtp is not None}
        await self.close_pools([e for e in self.pools if e not in used])

    async def close(self, workers: list[MailboxWorker]) -> None:
        """Log out everywhere at once, for at most CLOSE_GRACE; then cut."""
        if not workers:
            return
        closing = {asyncio.create_task(w.close()): w for w in workers}
        _, pending = await asyncio.wait(closing, timeout=CLOSE_GRACE)
        for task in pending:
            closing[task].cut()
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for task in closing:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.debug("close_failed", mailbox=closing[task].name, error=str(task.exception()))
