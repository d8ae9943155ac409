"""The poll cycle of one mailbox: fetch what is new, route it, claim, send, commit, mark.

New mail is found by UID: every message above the folder's watermark, plus the
messages still open (a member deferred) whose time has come. So a cycle costs
the same in a folder of a hundred messages or a million, and needs no IMAP
keyword; where the folder keeps keywords, `$Forwarded` (and `$ForwardFailed`)
are set too, as marks for people. Durability comes first: each reply is
committed before its message is recorded as done, and a message is recorded
before it is marked. Speed comes from batched fetches, several SMTP
transactions in flight and shared commits, never from skipping a step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from forwarder.committer import GroupCommitter
from forwarder.dispatch import Dispatcher
from forwarder.errors import ForwarderError, ImapError, UnreadableMessage
from forwarder.folder import FolderProgress
from forwarder.imap_source import FORWARD_FAILED, FORWARDED, Fetched, ImapSource
from forwarder.mailbox import Mailbox
from forwarder.plan import Message, fetch_batches, outcome, prepare
from forwarder.reporting import CycleSummary, Reporter
from forwarder.smtp_pool import SmtpPool
from forwarder.state import StateStore, UidRecord, UidState

log = structlog.get_logger("forwarder.cycle")
T = TypeVar("T")


@dataclass(frozen=True)
class CycleOptions:
    """The process-wide settings a cycle uses."""

    fetch_batch_bytes: int = 4 * 1024 * 1024
    fetch_batch_messages: int = 200
    retry_for: float = 5 * 24 * 3600.0
    state_retention: float = 90 * 24 * 3600.0
    claim_lease: float = 60.0


class Forwarder:
    """The pipeline of one mailbox: its IMAP source, SMTP pool and the shared state store."""

    def __init__(
        self,
        mailbox: Mailbox,
        options: CycleOptions,
        store: StateStore,
        source: ImapSource,
        smtp: SmtpPool,
        *,
        owner: str,
        clock: Callable[[], float],
    ) -> None:
        self.mailbox = mailbox
        self.options = options
        self.store = store
        self.source = source
        self.smtp = smtp
        self.clock = clock
        self.lists = mailbox.lists
        self.committer = GroupCommitter(store, mailbox.name, clock)
        self.reporter = Reporter(store, mailbox.name, clock)
        self.dispatcher = Dispatcher(
            mailbox,
            store,
            smtp,
            self.committer,
            self.reporter,
            owner=owner,
            lease=options.claim_lease,
            retry_for=options.retry_for,
            clock=clock,
        )
        self._imap_lock = asyncio.Lock()
        self.folder = FolderProgress(mailbox.name, store, source, self._imap, clock)
        self._recording: asyncio.Task[None] | None = None  # the batches' records, in order

    @property
    def stopping(self) -> bool:
        return self.dispatcher.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.dispatcher.stopping = value

    async def _imap(self, call: Callable[..., T], *args: Any) -> T:
        """imapclient blocks: run it in a thread, one command at a time."""
        async with self._imap_lock:
            return await asyncio.to_thread(call, *args)

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The store may block (a disk, a database server): never on the event loop."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def connect(self) -> None:
        """Log in to both servers (or check that the existing sessions are alive)."""
        if self.source.connected:
            try:
                await self._imap(self.source.noop)
            except ForwarderError:
                self.source.drop()
        if not self.source.connected:
            await self._imap(self.source.connect)
        await self.smtp.connect()

    async def close(self) -> None:
        await self.smtp.close()
        await self._imap(self.source.close)

    async def run_cycle(self) -> CycleSummary:
        """One poll cycle. Raises ForwarderError if a server or the store fails mid-way."""
        summary = CycleSummary()
        error: str | None = None
        with structlog.contextvars.bound_contextvars(mailbox=self.mailbox.name):
            try:
                if saved := await self.committer.flush_unsaved():
                    log.info("state_store_recovered", results_written=saved)
                await self.dispatcher.release_leftovers()
                await self.connect()
                await self._cycle(summary)
                await self._store(self.reporter.prune, self.options.state_retention)
            except Exception as exc:
                error = str(exc) or type(exc).__name__
                raise
            finally:
                await self._store(self.reporter.cycle, summary, error)
        return summary

    async def save_results(self, patience: float) -> None:
        """Before the process exits: write the replies a failed commit left in memory, for
        up to `patience` seconds (`GroupCommitter.save`), then give back the claims it
        kept. Raises StateError, saying how many replies are lost, if it cannot."""
        if await self.committer.save(patience):
            await self.dispatcher.release_leftovers()

    async def _cycle(self, summary: CycleSummary) -> None:
        uidvalidity = self.source.uidvalidity
        progress = await self.folder.state(uidvalidity)
        new = await self._imap(self.source.uids_above, progress.watermark)
        due = await self._store(self.store.open_uids, self.mailbox.name, uidvalidity, self.clock())
        candidates = sorted(set(new) | set(due))
        if not candidates:
            await self.folder.complete(uidvalidity, summary.started, stopping=self.stopping)
            return
        info = await self._imap(self.source.message_info, candidates)
        fresh = set(new)
        elsewhere = {
            u for u in new if u in info.found and {FORWARDED, FORWARD_FAILED} & info.found[u].flags
        }
        if elsewhere:
            await self.folder.forwarded_elsewhere(uidvalidity, sorted(elsewhere))
        sizes = {u: i.size for u, i in info.found.items() if u not in elsewhere}
        if info.unreadable:  # the server cannot even say its size: quarantined
            await self._batch(uidvalidity, [], None, summary, info.unreadable)
            await self._recorded()
        if gone := [u for u in due if u not in info.found and u not in info.unreadable]:
            await self.folder.expunged(uidvalidity, gone)
        o = self.options
        batches = list(
            fetch_batches(candidates, sizes, o.fetch_batch_bytes, o.fetch_batch_messages)
        )
        # The next batch is fetched while this one is being sent, and the previous one is
        # recorded and marked meanwhile (`_recording`: one write and one STORE at a time,
        # in order, each after its batch's replies were committed).
        fetch: asyncio.Task[Fetched[bytes]] | None = None
        if batches:
            fetch = asyncio.create_task(self._imap(self.source.fetch, batches[0], sizes))
        try:
            for index, batch in enumerate(batches):
                assert fetch is not None
                fetched, fetch = await fetch, None
                if index + 1 < len(batches) and not self.stopping:
                    fetch = asyncio.create_task(
                        self._imap(self.source.fetch, batches[index + 1], sizes)
                    )
                items = [(uid, fetched.found[uid]) for uid in batch if uid in fetched.found]
                top = max((u for u in batch if u in fresh), default=None)
                await self._batch(uidvalidity, items, top, summary, fetched.unreadable)
                if self.stopping:
                    break
        except BaseException:
            with suppress(Exception):  # the error in flight is the one to tell
                await self._recorded()
            raise
        finally:
            if fetch is not None:
                with suppress(ForwarderError):
                    await fetch
        await self._recorded()
        if self.stopping:
            return
        # The batches raised the watermark to their highest new UID; new messages above it
        # that were in no batch (already $Forwarded, unreadable, expunged) have a record too.
        last = max(new, default=None)
        await self.folder.complete(
            uidvalidity,
            summary.started,
            stopping=self.stopping,
            watermark=None if last is None or last in sizes else last,
        )

    async def _recorded(self) -> None:
        """Until the batches sent so far are recorded and marked."""
        recording, self._recording = self._recording, None
        if recording is not None:
            await recording

    async def _record(
        self,
        after: asyncio.Task[None] | None,
        uidvalidity: int,
        records: list[UidRecord],
        top: int | None,
    ) -> None:
        if after is not None:
            await after  # in order: the watermark only goes up
        await self.folder.record(uidvalidity, records, top)
        await self.folder.mark(records)

    async def _batch(
        self,
        uidvalidity: int,
        items: list[tuple[int, bytes]],
        top: int | None,
        summary: CycleSummary,
        unreadable: dict[int, UnreadableMessage],
    ) -> None:
        records: dict[int, UidRecord] = {}
        for uid, error in unreadable.items():  # the server cannot give it: the others go on
            summary.messages += 1
            records[uid] = self._quarantine(uid, None, error, summary)
        messages: list[Message] = []
        for uid, raw in items:
            summary.messages += 1
            try:
                message = prepare(uid, raw, self.lists)
            except Exception as exc:  # hostile input never stops the cycle
                records[uid] = self._quarantine(uid, len(raw), exc, summary)
                continue
            if message.route.skip is not None:
                reason = message.route.skip.value
                records[uid] = UidRecord(uid, UidState.SKIPPED, None, message.ident, reason)
                summary.skipped += 1
                self.reporter.skipped(uid, message.ident, reason, len(raw))
                continue
            messages.append(message)
        try:
            if messages:
                states, broken = await self.dispatcher.dispatch(messages, summary)
                now = self.clock()
                for message in messages:
                    if message.uid in broken:
                        records[message.uid] = self._quarantine(
                            message.uid, len(message.raw), broken[message.uid], summary
                        )
                        continue
                    record, waiting, failed = outcome(
                        message, states[message.key], now, self.options.claim_lease
                    )
                    records[message.uid] = record
                    if record.state.final:
                        summary.forwarded += 1
                    self.reporter.message(message, waiting, failed)
        finally:
            # Messages not finished (an error, a stop) stay open: examined again next cycle.
            for uid, _ in items:
                records.setdefault(uid, UidRecord(uid, UidState.OPEN))
            self._recording = asyncio.create_task(
                self._record(self._recording, uidvalidity, list(records.values()), top)
            )

    def _quarantine(
        self, uid: int, size: int | None, exc: Exception, summary: CycleSummary
    ) -> UidRecord:
        summary.quarantined += 1
        reason = str(exc) or type(exc).__name__
        self.reporter.quarantined(uid, exc, size, expected=isinstance(exc, ValueError | ImapError))
        return UidRecord(uid, UidState.QUARANTINED, reason=reason)
