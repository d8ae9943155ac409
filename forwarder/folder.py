"""What the state store knows of one mailbox's folder, and the marks a person sees there.

`FolderProgress` seeds a folder seen for the first time (or renumbered: a new
UIDVALIDITY), records what became of each message with the watermark, closes
messages that need no sending (already forwarded elsewhere, expunged) and sets
the keywords, writing down which were set. The cycle (`forwarder.cycle`) calls it;
it sends nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

import structlog

from forwarder.imap_source import FORWARD_FAILED, FORWARDED, QUARANTINE, SEEN, ImapSource
from forwarder.plan import seen_before
from forwarder.state import FolderState, StateStore, UidRecord, UidState

log = structlog.get_logger("forwarder.cycle")
T = TypeVar("T")
COMPLETE_EVERY = 600.0  # complete_through may lag this much: only fewer messages count as seen
ImapRunner = Callable[..., Awaitable[Any]]  # runs a blocking ImapSource call, one at a time


class FolderProgress:
    def __init__(
        self,
        mailbox: str,
        store: StateStore,
        source: ImapSource,
        imap: ImapRunner,
        clock: Callable[[], float],
    ) -> None:
        self.mailbox = mailbox
        self.store = store
        self.source = source
        self._imap = imap
        self.clock = clock
        self._marked: list[int] = []  # keywords set, not yet written down
        self._completed = 0.0  # when complete_through was last written

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The store may block (a disk, a database server): never on the event loop."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def state(self, uidvalidity: int) -> FolderState:
        """The folder's progress, seeding it if never seen; marks left unset are set."""
        folder = await self._store(self.store.folder, self.mailbox, uidvalidity)
        if folder is None:
            folder = await self._first_sight(uidvalidity)
        if unmarked := await self._store(self.store.unmarked_uids, self.mailbox, uidvalidity):
            await self.mark(unmarked)  # a run that ended between recording and marking
        return folder

    async def record(
        self, uidvalidity: int, records: Sequence[UidRecord], watermark: int | None
    ) -> None:
        """What became of these messages, the watermark raised, and the marks set earlier."""
        marked, self._marked = self._marked, []
        await self._store(
            self.store.record_uids,
            self.mailbox,
            uidvalidity,
            list(records),
            self.clock(),
            watermark=watermark,
            marked=marked,
        )

    async def complete(
        self, uidvalidity: int, started: float, *, stopping: bool, watermark: int | None = None
    ) -> None:
        """Every message found by the cycle that started at `started` was examined:
        remember when (see `_first_sight`). An empty poll writes nothing."""
        marked, self._marked = self._marked, []
        complete = not stopping and started - self._completed >= COMPLETE_EVERY
        if marked or complete or watermark is not None:
            await self._store(
                self.store.record_uids,
                self.mailbox,
                uidvalidity,
                [],
                self.clock(),
                watermark=watermark,
                complete_through=started if complete else None,
                marked=marked,
            )
            if complete:
                self._completed = started

    async def forwarded_elsewhere(self, uidvalidity: int, uids: Sequence[int]) -> None:
        """New messages already marked $Forwarded: another forwarder, with another state
        store, works on this mailbox (or a person forwarded them by hand). Not sent."""
        log.error(
            "forwarded_elsewhere",
            uids=list(uids),
            reason="new messages already carry $Forwarded: another forwarder with another "
            "state store may be working on this mailbox; run one",
        )
        records = [UidRecord(u, UidState.ELSEWHERE, reason="already $Forwarded") for u in uids]
        await self._store(self.store.record_uids, self.mailbox, uidvalidity, records, self.clock())

    async def expunged(self, uidvalidity: int, uids: Sequence[int]) -> None:
        """Open messages expunged from the folder (by a person, or a server's expiry):
        closed, or they would be asked for at every cycle; their deliveries stay as they
        are (`forwarder history` shows them)."""
        log.warning("messages_expunged", uids=list(uids), reason="expunged while still open")
        records = [UidRecord(u, UidState.GONE, reason="expunged") for u in uids]
        await self._store(self.store.record_uids, self.mailbox, uidvalidity, records, self.clock())

    async def _first_sight(self, uidvalidity: int) -> FolderState:
        """A folder (or UIDVALIDITY) never seen: record which of its messages are to examine.

        Where keywords are kept, the messages without `$Forwarded` (and not quarantined);
        elsewhere, all of them. After a UIDVALIDITY change, messages the old folder's last
        complete cycle had already seen are recorded as handled instead (the store still
        deduplicates the others by message key).
        """
        previous = await self._store(self.store.last_folder, self.mailbox)
        every = await self._imap(self.source.all_uids)
        todo = await self._imap(self.source.unforwarded_uids) if self.source.keywords else every
        records = [UidRecord(u, UidState.OPEN) for u in todo]
        if previous is not None and previous.complete_through is not None and todo:
            info = await self._imap(partial(self.source.message_info, dates=True), todo)
            received = {u: i.internaldate for u, i in info.found.items()}
            old = seen_before(received, previous.complete_through)
            records = [
                UidRecord(u, UidState.BASELINE, reason="seen before the UIDVALIDITY change")
                if u in old
                else UidRecord(u, UidState.OPEN)
                for u in todo
            ]
            log.warning(
                "uidvalidity_changed",
                old=previous.uidvalidity,
                new=uidvalidity,
                messages=len(every),
                examined_again=len(todo) - len(old),
                not_sent_again=len(old),
            )
        await self._store(
            self.store.record_uids,
            self.mailbox,
            uidvalidity,
            records,
            self.clock(),
            watermark=max(every, default=0),
        )
        folder = await self._store(self.store.folder, self.mailbox, uidvalidity)
        assert folder is not None
        return folder

    async def mark(self, records: Iterable[UidRecord]) -> None:
        """Keywords for people, where the folder keeps them; written down with the next
        record (a crash before that only costs setting them again)."""
        done: list[int] = []
        failed: list[int] = []
        quarantined: list[int] = []
        for r in records:
            if r.state is UidState.DONE:
                done.append(r.uid)
            elif r.state is UidState.FAILED:
                failed.append(r.uid)
            elif r.state is UidState.QUARANTINED:
                quarantined.append(r.uid)
        source = self.source
        if not source.keywords:
            if done or failed:
                await self._imap(source.mark, done + failed, [SEEN])
        else:
            if done:
                await self._imap(source.mark, done, [FORWARDED, SEEN])
            if failed:
                await self._imap(source.mark, failed, [FORWARDED, FORWARD_FAILED, SEEN])
            if quarantined:
                await self._imap(source.mark, quarantined, [QUARANTINE])
        self._marked += done + failed + quarantined
