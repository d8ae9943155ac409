"""Group commit: every SMTP reply is committed before its message goes on, and replies
that arrive while one commit is being written to disk share the next one.

One fsync then covers many transactions, so durability does not cap throughput.
A failed commit (disk full, unwritable file) keeps the results in memory and
raises `failed`: the cycle sends nothing more until `flush_unsaved` has written
them, which is tried first thing on the next cycle. A process about to exit
with results in memory (`once`) calls `save` instead: it tries again for a while,
since what it cannot write is lost, and those deliveries would be sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from forwarder.errors import StateError
from forwarder.state import MessageResult, StateStore

log = structlog.get_logger("forwarder.cycle")
FIRST_WAIT = 0.5  # seconds before the first new try of `save`, doubled up to MAX_WAIT
MAX_WAIT = 8.0


class GroupCommitter:
    def __init__(
        self, store: StateStore, mailbox: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.mailbox = mailbox
        self.clock = clock
        self.unsaved: list[MessageResult] = []
        self._queue: list[tuple[MessageResult, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def failed(self) -> bool:
        """A commit failed and its results are not written yet: send nothing more."""
        return bool(self.unsaved)

    @property
    def unsaved_replies(self) -> int:
        """(message, member) replies held in memory only."""
        return sum(len(result.deliveries) for result in self.unsaved)

    async def commit(self, result: MessageResult) -> None:
        """Return once `result` is durable; raise StateError if it could not be written."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((result, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await future

    async def _write(self) -> None:
        while self._queue:
            items, self._queue = self._queue, []
            results = [result for result, _ in items]
            try:
                if self.unsaved:  # never write newer results over unwritten older ones
                    raise StateError("an earlier commit failed; its results come first")
                await asyncio.to_thread(
                    self.store.record_results, self.mailbox, results, self.clock()
                )
            except StateError as exc:
                self.unsaved.extend(results)
                for _, future in items:
                    if not future.done():  # a cancelled waiter no longer listens
                        future.set_exception(exc)
                continue
            for _, future in items:
                if not future.done():
                    future.set_result(None)

    async def flush_unsaved(self) -> int:
        """Write results a failed commit left in memory; return how many replies. Raises
        StateError if still impossible."""
        if not self.unsaved:
            return 0
        pending = list(self.unsaved)
        await asyncio.to_thread(self.store.record_results, self.mailbox, pending, self.clock())
        del self.unsaved[: len(pending)]
        return sum(len(result.deliveries) for result in pending)

    async def save(self, patience: float) -> int:
        """Write the results held in memory, trying again with back-off (0.5 s, 1, 2 ... 8 s)
        for `patience` seconds: space may come back on a full disk. Returns the replies
        written; raises StateError, saying how many are lost, if it still cannot."""
        replies = self.unsaved_replies
        if not replies:
            return 0
        deadline = time.monotonic() + patience
        wait = FIRST_WAIT
        said = False
        while True:
            try:
                await self.flush_unsaved()
            except StateError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StateError(
                        f"{replies} replies of the SMTP server could not be written to the "
                        f"state store in {patience:g} s: they are lost, and those deliveries "
                        "will be sent again by the next run",
                        advice="free space where the state store is, or fix its permissions",
                    ) from None
                if not said:
                    said = True
                    log.warning(
                        "state_store_unwritable",
                        replies=replies,
                        retry_for=patience,
                        error=str(exc),
                    )
                await asyncio.sleep(min(wait, left))
                wait = min(wait * 2, MAX_WAIT)
                continue
            log.info("state_store_recovered", results_written=replies)
            return replies
