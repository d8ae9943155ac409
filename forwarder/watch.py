"""How one mailbox notices new mail besides its poll (`forwarder.idle` does the IDLE).

After the mailbox's first successful cycle, a second connection idles (`IdleWatcher`).
When the server refuses that second login for now (`ImapBusyError`: a connection
limit), or when a cycle is refused while it is open, or FORWARDER_IMAP_CONNECTIONS=1,
the worker idles on the cycle's own connection instead, between cycles
(`idle_on_cycle_connection`): the folder is selected again first (its UIDNEXT tells
whether mail came since the last IDLE, announced perhaps at the end of one of the
cycle's commands, where nobody saw it), then IDLE; the first IDLE after a cycle lasts
FIRST_PERIOD only, as what the server announced with its "+ idling" is seen at DONE
(`IdleSession.done`); DONE before the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from forwarder.idle import FIRST_PERIOD, IdleSession, IdleWatcher

if TYPE_CHECKING:
    from forwarder.worker import MailboxWorker

log = structlog.get_logger("forwarder.daemon")
IDLE_RETRY = (1.0, 60.0)


class Watch:
    def __init__(self, worker: MailboxWorker) -> None:
        self.worker = worker
        self.single = worker.options.single_connection
        self.watcher: IdleWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._here: IdleSession | None = None  # IDLE on the cycle's connection
        self._uidnext: int | None = None  # before the last IDLE on the cycle's connection
        self._idled = False  # idled since the last cycle (the first IDLE after one is short)

    @property
    def how(self) -> str | None:
        """`idle`, `idle-same-connection`, or None (the poll alone finds new mail now)."""
        if self.single:
            return "idle-same-connection" if self._here is not None else None
        if self.watcher is not None and self.watcher.watching:
            return "idle"
        return None

    def cycle_succeeded(self) -> None:
        """Start the second connection if it is not running (and may run)."""
        self._idled = False
        w = self.worker
        if self.single or w.stopping:
            return
        if self._task is not None and not self._task.done():
            return
        watcher = self.watcher
        if watcher is not None and watcher.busy is not None:
            self.go_single(watcher.busy)
            return
        if watcher is not None and self._task is not None:
            return  # ended for good (no IDLE, refused credentials): poll only
        self.watcher = IdleWatcher(
            w.forwarder.mailbox.imap,
            w.wake.set,
            ca_file=w.options.ca_file,
            renew=w.options.idle_renew,
            on_error=lambda: w.events.idle_error(w),
        )
        self._task = asyncio.create_task(self.watcher.run(), name=f"idle {w.name}")

    def go_single(self, error: BaseException) -> None:
        if self.single:
            return
        self.stop()
        self.single = True
        log.warning(
            "idle_on_cycle_connection",
            reason=str(error),
            hint="one IMAP connection for this mailbox: IDLE between cycles",
        )

    def reset(self) -> None:
        """A new IMAP server (reload): a second connection may be allowed there."""
        self.stop()
        self.watcher = None
        self._task = None
        self.single = self.worker.options.single_connection

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()

    async def stopped(self) -> None:
        """Stop, and wait until the second connection is closed (a second at most)."""
        self.stop()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=1.0)

    def cut(self) -> None:
        self.stop()
        if self._here is not None:
            self._here.cut()

    async def wait(self) -> None:
        """Until the worker is woken; in single-connection mode, idling meanwhile."""
        w = self.worker
        retry = IDLE_RETRY[0]
        while not w.wake.is_set():
            watcher = self.watcher
            if watcher is not None and watcher.busy is not None:
                self.go_single(watcher.busy)
            source = w.forwarder.source
            if not (self.single and source.connected and b"IDLE" in source.capabilities):
                await w.wake.wait()
                return
            if await self._idle_here():
                retry = IDLE_RETRY[0]
                continue
            with contextlib.suppress(TimeoutError):  # the connection broke: retry later
                await asyncio.wait_for(w.wake.wait(), retry)
            retry = min(retry * 2, IDLE_RETRY[1])
            w.wake.set()

    async def _idle_here(self) -> bool:
        """One IDLE on the cycle's connection (see the module docstring). False when the
        connection failed: it is dropped, and the next cycle reconnects."""
        w = self.worker
        source = w.forwarder.source
        client = source.client
        assert client is not None
        try:
            info = await asyncio.to_thread(client.select_folder, source.endpoint.folder)
        except Exception as exc:
            self._failed(exc)
            return False
        if int(info.get(b"UIDVALIDITY", 0)) != source.uidvalidity:
            source.drop()  # the cycle reconnects and handles the change
            w.wake.set()
            return True
        uidnext = info.get(b"UIDNEXT")
        if uidnext is not None and uidnext != self._uidnext:
            self._uidnext = uidnext
            w.wake.set()  # mail came since the last IDLE: a cycle first
            return True
        session = IdleSession(client, w.wake.set)
        try:
            await session.start()
        except Exception as exc:
            self._failed(exc)
            return False
        self._here = session
        woken = asyncio.ensure_future(w.wake.wait())
        waits: list[asyncio.Future[Any]] = [session.ended, woken]
        try:
            period = w.options.idle_renew if self._idled else FIRST_PERIOD
            self._idled = True
            await asyncio.wait(waits, timeout=period, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            self._here = None
        if w.stopping:
            session.cut()
            return True
        try:
            await session.done()
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: Exception) -> None:
        w = self.worker
        w.forwarder.source.drop()
        w.events.idle_error(w)
        log.warning(
            "idle_interrupted",
            error=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            connection="cycle",
        )
