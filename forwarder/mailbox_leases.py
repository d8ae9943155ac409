"""Which mailboxes this instance works: the heartbeat of `forwarder run` on a shared store.

`MailboxLeases` calls `StateStore.acquire_mailboxes` every FORWARDER_TAKEOVER_AFTER / 3
seconds (5 s at most, so that a new instance gets its share within seconds),
independently of the cycles (a cycle may last longer than a lease), and keeps the
answer. A worker runs a cycle on a mailbox only while `holds(name)`; when
a mailbox is gained (another instance stopped, or gave it back) `on_gain` is called,
so that its worker starts a cycle at once. What a beat returned is trusted for 2/3 of
the lease (a backend may leave a lease with more time than that unrenewed), so while
the store cannot be reached what was held is trusted until before its lease ends,
then nothing is held. `stop` gives every
mailbox back, so that the other instances take them at their next heartbeat.

With the SQLite store every mailbox is always held (one process per file).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import structlog

from forwarder.errors import StateError
from forwarder.state import StateStore

log = structlog.get_logger("forwarder.daemon")
BEATS_PER_LEASE = 3
MAX_BEAT = 5.0  # seconds between beats at most
TRUSTED = 2 / 3  # of the ttl after a beat


class MailboxLeases:
    def __init__(
        self,
        store: StateStore,
        owner: str,
        names: Sequence[str],
        ttl: float,
        on_gain: Callable[[set[str]], None] = lambda gained: None,
    ) -> None:
        self.store = store
        self.owner = owner
        self.names = list(names)
        self.ttl = ttl
        self.on_gain = on_gain
        self.held: set[str] = set()
        self._valid_until = 0.0  # time.monotonic() at which `held` can no longer be trusted
        self._task: asyncio.Task[None] | None = None

    def holds(self, name: str) -> bool:
        return name in self.held and time.monotonic() < self._valid_until

    async def beat(self) -> set[str]:
        """One heartbeat: renew, take, give back; what is held now."""
        started = time.monotonic()
        try:
            held = await asyncio.to_thread(
                self.store.acquire_mailboxes, self.owner, self.names, time.time(), self.ttl
            )
        except StateError as exc:
            if time.monotonic() >= self._valid_until and self.held:
                log.warning("mailboxes_lost", mailboxes=sorted(self.held), error=str(exc))
                self.held = set()
            else:
                log.warning("mailbox_leases_not_renewed", error=str(exc))
            return self.held
        gained, lost = held - self.held, self.held - held
        self.held, self._valid_until = held, started + self.ttl * TRUSTED
        if gained or lost:
            log.info(
                "mailboxes_acquired",
                held=sorted(held),
                gained=sorted(gained),
                lost=sorted(lost),
                owner=self.owner,
            )
        if gained:
            self.on_gain(gained)
        return held

    async def start(self) -> None:
        """The first heartbeat, then one every ttl / 3 (5 s at most) in the background."""
        await self.beat()
        self._task = asyncio.create_task(self._beating())

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(min(self.ttl / BEATS_PER_LEASE, MAX_BEAT))
            await self.beat()

    async def stop(self) -> None:
        """Stop beating and give every mailbox back."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.held = set()
        try:
            await asyncio.to_thread(self.store.release_mailboxes, self.owner)
        except StateError as exc:  # they end with their lease instead
            log.warning("mailboxes_not_released", error=str(exc))
