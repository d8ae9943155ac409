"""The poll cycle: fetch what is not yet forwarded, route it, send it, record it, mark it.

Durability comes first: the deliveries about to be attempted are committed as
`pending` before anything is sent; each server reply is committed (group commit)
before its message goes on; the source message gets `$Forwarded` only once every
member's result is final, and only after that commit. Speed comes from batched
fetches, several SMTP transactions in flight and shared commits, never from
skipping a step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, TypeVar

import structlog

from forwarder.addresses import normalize
from forwarder.committer import GroupCommitter
from forwarder.config import Settings
from forwarder.errors import ForwarderError, KeywordsNotSupported, UnreadableMessage
from forwarder.headers import message_id, message_key, parse_headers, split_message
from forwarder.imap_source import (
    FORWARD_FAILED,
    FORWARDED,
    QUARANTINE,
    SEEN,
    Fetched,
    ImapSource,
)
from forwarder.plan import Message, due, fetch_batches, pending_deliveries
from forwarder.retry import classify
from forwarder.routing import Route, route
from forwarder.smtp_relay import SmtpPool
from forwarder.state import (
    CycleRecord,
    Delivery,
    MemberState,
    MessageResult,
    Skipped,
    StateStore,
    Status,
)

log = structlog.get_logger("forwarder.cycle")
_BARE_CR = re.compile(rb"\r(?!\n)")
T = TypeVar("T")
MAX_RCPT = 100  # recipients per SMTP transaction (RFC 5321 4.5.3.1.8 minimum a server accepts)
PRUNE_EVERY = 24 * 3600.0


@dataclass
class CycleSummary:
    messages: int = 0  # messages looked at in full
    forwarded: int = 0  # source messages marked $Forwarded
    delivered: int = 0  # (message, member) deliveries accepted in this cycle
    deferred: int = 0
    failed: int = 0
    skipped: int = 0  # unmatched, loops, too many hops
    quarantined: int = 0  # left in place with $ForwarderQuarantine
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "started"}


@dataclass
class _Marks:
    forwarded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)


class Forwarder:
    """Owns the IMAP source, the SMTP connections and the state store for a run."""

    def __init__(
        self, settings: Settings, store: StateStore, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.lists = settings.expanded_lists()
        self.fingerprint = hashlib.sha256(
            json.dumps(sorted(self.lists.items())).encode()
        ).hexdigest()[:16]
        self.source = ImapSource(settings)
        self.smtp = SmtpPool(settings, settings.smtp_connections)
        self.committer = GroupCommitter(store)
        self.hostname = socket.gethostname()
        self.stopping = False  # set by the daemon: finish the messages in flight, then stop
        self._imap_lock = asyncio.Lock()
        self._last_prune = 0.0

    async def _imap(self, call: Callable[..., T], *args: Any) -> T:
        """imapclient blocks: run it in a thread, one command at a time."""
        async with self._imap_lock:
            return await asyncio.to_thread(call, *args)

    async def connect(self) -> None:
        """Log in to both servers (or check that the existing sessions are alive)."""
        if self.source.connected:
            try:
                await self._imap(self.source.noop)
            except ForwarderError:
                self.source.drop()
        if not self.source.connected:
            await self._imap(self.source.connect)
            self._require_keywords()
        await self.smtp.connect()

    def _require_keywords(self) -> None:
        """The cycle finds new mail by `UNKEYWORD $Forwarded` until the state store records
        every UID it has examined: a folder that cannot keep the keyword is refused."""
        if not self.source.keywords:
            source = self.source
            permanent = " ".join(sorted(f.decode() for f in source.permanent_flags)) or "none"
            raise KeywordsNotSupported(
                f"folder {self.settings.imap_folder!r} does not keep the keyword $Forwarded "
                f"(PERMANENTFLAGS: {permanent})",
                server=source.server,
                advice="the forwarder needs user keywords to remember what it forwarded",
            )

    async def close(self) -> None:
        await self.smtp.close()
        await self._imap(self.source.close)

    async def run_cycle(self) -> CycleSummary:
        """One poll cycle. Raises ForwarderError if a server or the store fails mid-way."""
        summary = CycleSummary()
        error: str | None = None
        try:
            if saved := await self.committer.flush_unsaved():
                log.info("state_store_recovered", results_written=saved)
            await self.connect()
            await self._cycle(summary)
            self._prune()
        except Exception as exc:
            error = str(exc) or repr(exc)
            raise
        finally:
            self._record(summary, error)
        return summary

    def _record(self, summary: CycleSummary, error: str | None) -> None:
        outcome = "error" if error else "ok"
        finished = time.time()
        log.info(
            "cycle_finished",
            outcome=outcome,
            duration_ms=round((finished - summary.started) * 1000),
            error=error,
            peak_rss_mb=_peak_rss_mb(),
            **summary.as_dict(),
        )
        s = summary
        record = CycleRecord(
            s.started,
            finished,
            outcome,
            s.messages,
            s.forwarded,
            s.delivered,
            s.deferred,
            s.failed,
            s.skipped,
            error,
        )
        try:
            self.store.record_cycle(record)
        except ForwarderError as exc:
            log.error("state_store_error", error=str(exc))

    def _prune(self) -> None:
        now = self.clock()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            if removed := self.store.prune(now - self.settings.state_retention):
                log.info("state_pruned", deliveries_removed=removed)

    async def _cycle(self, summary: CycleSummary) -> None:
        uids = await self._imap(self.source.unforwarded_uids)
        mailbox = self.source.mailbox_id
        known = self.store.skipped_uids(mailbox, self.fingerprint)
        candidates = [uid for uid in uids if uid not in known]
        if not candidates:
            return
        sizes = await self._imap(self.source.sizes, candidates)
        s = self.settings
        batches = list(
            fetch_batches(candidates, sizes, s.fetch_batch_bytes, s.fetch_batch_messages)
        )
        if not batches:
            return
        # The next batch is fetched while this one is being sent.
        fetch: asyncio.Task[Fetched[bytes]] | None = asyncio.create_task(
            self._imap(self.source.fetch, batches[0], sizes)
        )
        try:
            for index, batch in enumerate(batches):
                assert fetch is not None
                fetched, fetch = await fetch, None
                if index + 1 < len(batches) and not self.stopping:
                    fetch = asyncio.create_task(
                        self._imap(self.source.fetch, batches[index + 1], sizes)
                    )
                items = [(uid, fetched.found[uid]) for uid in batch if uid in fetched.found]
                await self._batch(items, mailbox, summary, fetched.unreadable)
                if self.stopping:
                    return
        finally:
            if fetch is not None:
                with suppress(ForwarderError):
                    await fetch

    async def _batch(
        self,
        items: list[tuple[int, bytes]],
        mailbox: str,
        summary: CycleSummary,
        unreadable: dict[int, UnreadableMessage],
    ) -> None:
        marks = _Marks()
        for uid, error in unreadable.items():  # the server cannot give it: the others go on
            summary.messages += 1
            self._quarantine(uid, b"", error, marks)
        messages: list[Message] = []
        skipped: list[Skipped] = []
        for uid, raw in items:
            summary.messages += 1
            try:
                message = self._prepare(uid, raw)
            except Exception as exc:  # hostile input never stops the cycle
                self._quarantine(uid, raw, exc, marks)
                continue
            if message.route.skip is not None:
                reason = message.route.skip.value
                skipped.append(Skipped(mailbox, self.fingerprint, uid, reason, message.ident))
                log.info(
                    "message_skipped",
                    uid=uid,
                    message_id=message.ident,
                    reason=reason,
                    size=len(raw),
                )
                continue
            messages.append(message)
        summary.skipped += len(skipped)
        try:
            if skipped:
                self.store.record_skipped(skipped)
            if messages:
                await self._send_all(messages, summary, marks)
        finally:
            await self._mark(marks)
            summary.forwarded += len(marks.forwarded) + len(marks.failed)
            summary.quarantined += len(marks.quarantined)

    def _prepare(self, uid: int, raw: bytes) -> Message:
        if not raw or raw.isspace():
            raise ValueError("empty message")
        header_block, body = split_message(raw)
        if _BARE_CR.search(header_block):
            # SMTP carries only CRLF lines: the CR would become a line break and split one
            # header field in two at the members' servers (header smuggling).
            raise ValueError("bare CR in the header block: it cannot be sent unchanged")
        headers = parse_headers(header_block)
        decision = route(headers, self.lists)
        key = message_key(header_block, headers, body) if decision.skip is None else ""
        return Message(uid, raw, message_id(headers), decision, key)

    async def _send_all(
        self, messages: list[Message], summary: CycleSummary, marks: _Marks
    ) -> None:
        """Send a batch: copies of one message in turn, different messages concurrently."""
        groups: dict[str, list[Message]] = {}
        for message in messages:
            groups.setdefault(message.key, []).append(message)
        states = self.store.member_states(list(groups))
        now = self.clock()
        pending = [
            r for copies in groups.values() if (r := pending_deliveries(copies, states, now))
        ]
        if pending:
            await asyncio.to_thread(self.store.record_pending, pending)
        outcomes = await asyncio.gather(
            *(
                self._send_copies(copies, states[key], now, summary, marks)
                for key, copies in groups.items()
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _send_copies(
        self,
        copies: list[Message],
        states: dict[str, MemberState],
        now: float,
        summary: CycleSummary,
        marks: _Marks,
    ) -> None:
        for message in copies:
            with structlog.contextvars.bound_contextvars(uid=message.uid, message_id=message.ident):
                try:
                    await self._send(message, states, now, summary)
                except ForwarderError:
                    raise
                except Exception as exc:
                    self._quarantine(message.uid, message.raw, exc, marks)
                    continue
                self._finish(message, states, marks)

    async def _send(
        self,
        message: Message,
        states: dict[str, MemberState],
        now: float,
        summary: CycleSummary,
    ) -> None:
        wanted = [a for a in message.route.recipients if due(states.get(normalize(a)), now)]
        message.interrupted = sum(
            1 for a in wanted if (s := states.get(normalize(a))) and s.status is Status.PENDING
        )
        prefix = self._trace(message.route)
        for start in range(0, len(wanted), MAX_RCPT):
            chunk = wanted[start : start + MAX_RCPT]
            async with self.smtp.session() as relay:
                replies = await relay.send(self.settings.envelope_from, chunk, prefix, message.raw)
            deliveries = tuple(
                classify(
                    normalize(a),
                    a,
                    replies[a],
                    states.get(normalize(a)),
                    now,
                    self.settings.retry_for,
                )
                for a in chunk
            )
            await self.committer.commit(
                MessageResult(message.key, message.ident, message.route.lists, deliveries)
            )
            for d in deliveries:
                previous = states.get(d.member)
                states[d.member] = MemberState(
                    d.status,
                    (previous.attempts if previous else 0) + 1,
                    previous.first_try if previous else now,
                    d.next_try,
                )
                self._count(d, message, summary)

    def _count(self, d: Delivery, message: Message, summary: CycleSummary) -> None:
        if d.status is Status.DELIVERED:
            summary.delivered += 1
            message.sent += 1
        elif d.status is Status.DEFERRED:
            summary.deferred += 1
            log.warning(
                "delivery_deferred",
                uid=message.uid,
                message_id=message.ident,
                member=d.address,
                code=d.code,
                reply=d.reply,
                next_try=d.next_try,
            )
        else:
            summary.failed += 1
            log.error(
                "delivery_failed",
                uid=message.uid,
                message_id=message.ident,
                member=d.address,
                code=d.code,
                reply=d.reply,
            )

    def _finish(self, message: Message, states: dict[str, MemberState], marks: _Marks) -> None:
        recipients = message.route.recipients
        pending = [
            a for a in recipients if not (s := states.get(normalize(a))) or not s.status.final
        ]
        failed = [
            a for a in recipients if (s := states.get(normalize(a))) and s.status is Status.FAILED
        ]
        outcome = "deferred" if pending else ("failed" if failed else "forwarded")
        if not pending:
            (marks.failed if failed else marks.forwarded).append(message.uid)
        log.info(
            "message_" + outcome,
            uid=message.uid,
            message_id=message.ident,
            lists=list(message.route.lists),
            matched_by=message.route.matched_by,
            recipients=len(recipients),
            sent=message.sent,
            deferred=len(pending),
            failed=len(failed),
            duplicate=message.sent == 0 and bool(recipients),
            interrupted=message.interrupted,
            size=len(message.raw),
            duration_ms=round((time.monotonic() - message.started) * 1000),
        )

    def _quarantine(self, uid: int, raw: bytes, exc: Exception, marks: _Marks) -> None:
        marks.quarantined.append(uid)
        log.error(
            "message_quarantined",
            uid=uid,
            reason=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            size=len(raw),
            exc_info=not isinstance(exc, ValueError | UnreadableMessage),
        )

    async def _mark(self, marks: _Marks) -> None:
        if marks.forwarded:
            await self._imap(self.source.mark, marks.forwarded, [FORWARDED, SEEN])
        if marks.failed:
            await self._imap(self.source.mark, marks.failed, [FORWARDED, FORWARD_FAILED, SEEN])
        if marks.quarantined:
            await self._imap(self.source.mark, marks.quarantined, [QUARANTINE])

    def _trace(self, decision: Route) -> bytes:
        """The only bytes added to a message: trace and loop lines on top."""
        lines = [f"Received: by {self.hostname} (forwarder); {formatdate(self.clock())}\r\n"]
        lines += [f"X-Loop: {address}\r\n" for address in decision.lists]
        return "".join(lines).encode("ascii", "replace")


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux VmHWM; getrusage would also count the
    memory of the parent that spawned us, before exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None
