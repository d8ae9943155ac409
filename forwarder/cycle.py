"""The poll cycle: fetch what is not yet forwarded, route it, send it, record it, mark it.

Order of durability: a member's result is committed to the state store right
after the server's reply; the source message gets `$Forwarded` only once every
member's result is final (delivered or failed), and only after the commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import structlog

from forwarder.addresses import normalize
from forwarder.config import Settings
from forwarder.errors import ForwarderError
from forwarder.headers import message_id, message_key, parse_headers, split_message
from forwarder.imap_source import FORWARD_FAILED, FORWARDED, SEEN, ImapSource
from forwarder.retry import classify
from forwarder.routing import Route, route
from forwarder.smtp_relay import SmtpRelay
from forwarder.state import CycleRecord, MemberState, StateStore, Status

log = structlog.get_logger("forwarder.cycle")


@dataclass
class CycleSummary:
    messages: int = 0  # messages looked at in full
    forwarded: int = 0  # source messages marked $Forwarded
    delivered: int = 0  # (message, member) deliveries accepted in this cycle
    deferred: int = 0
    failed: int = 0
    skipped: int = 0  # unmatched, loops, too many hops
    errors: int = 0  # messages left in place because of an unexpected error
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "started"}


@dataclass
class _Marks:
    forwarded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


class Forwarder:
    """Owns the IMAP source, the SMTP relay and the state store for a run."""

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
        self.relay = SmtpRelay(settings)
        self.hostname = socket.gethostname()
        self.stopping = False  # set by the daemon: finish the message in flight, then stop

    async def connect(self) -> None:
        """Log in to both servers (or check that the existing sessions are alive)."""
        if self.source.connected:
            try:
                await asyncio.to_thread(self.source.noop)
            except ForwarderError:
                self.source.drop()
        if not self.source.connected:
            await asyncio.to_thread(self.source.connect)
        if not self.relay.connected:
            await self.relay.connect()

    async def close(self) -> None:
        await self.relay.close()
        await asyncio.to_thread(self.source.close)

    async def run_cycle(self) -> CycleSummary:
        """One poll cycle. Raises ForwarderError if a server or the store fails mid-way."""
        summary = CycleSummary()
        error: str | None = None
        try:
            await self.connect()
            await self._cycle(summary)
        except ForwarderError as exc:
            error = str(exc)
            raise
        finally:
            outcome = "error" if error else "ok"
            duration = time.time() - summary.started
            log.info(
                "cycle_finished",
                outcome=outcome,
                duration_ms=round(duration * 1000),
                error=error,
                **summary.as_dict(),
            )
            try:
                self.store.record_cycle(
                    CycleRecord(
                        summary.started,
                        time.time(),
                        outcome,
                        summary.messages,
                        summary.forwarded,
                        summary.delivered,
                        summary.deferred,
                        summary.failed,
                        summary.skipped,
                        error,
                    )
                )
            except ForwarderError as exc:
                log.error("state_store_error", error=str(exc))
        return summary

    async def _cycle(self, summary: CycleSummary) -> None:
        uids = await asyncio.to_thread(self.source.unforwarded_uids)
        mailbox = self.source.mailbox_id
        known = self.store.skipped_uids(mailbox, self.fingerprint)
        candidates = [uid for uid in uids if uid not in known]
        if not candidates:
            return
        sizes = await asyncio.to_thread(self.source.sizes, candidates)
        for batch in _batches(
            candidates, sizes, self.settings.fetch_batch_bytes, self.settings.fetch_batch_messages
        ):
            fetched = await asyncio.to_thread(self.source.fetch, batch)
            marks = _Marks()
            try:
                for uid in batch:
                    if self.stopping:
                        break
                    raw = fetched.get(uid)
                    if raw is not None:  # None: expunged since the search
                        await self._process(uid, raw, mailbox, summary, marks)
            finally:
                await self._mark(marks)
            summary.forwarded += len(marks.forwarded) + len(marks.failed)
            if self.stopping:
                return

    async def _mark(self, marks: _Marks) -> None:
        if marks.forwarded:
            await asyncio.to_thread(self.source.mark, marks.forwarded, [FORWARDED, SEEN])
        if marks.failed:
            await asyncio.to_thread(
                self.source.mark, marks.failed, [FORWARDED, FORWARD_FAILED, SEEN]
            )

    async def _process(
        self, uid: int, raw: bytes, mailbox: str, summary: CycleSummary, marks: _Marks
    ) -> None:
        started = time.monotonic()
        summary.messages += 1
        header_block, body = split_message(raw)
        headers = parse_headers(header_block)
        ident = message_id(headers)
        # Bound on the logger for our own events, and as context for any library log line.
        mlog = log.bind(uid=uid, message_id=ident)
        with structlog.contextvars.bound_contextvars(uid=uid, message_id=ident):
            decision = route(headers, self.lists)
            if decision.skip is not None:
                self.store.record_skipped(mailbox, self.fingerprint, uid, decision.skip, ident)
                summary.skipped += 1
                mlog.info("message_skipped", reason=decision.skip.value, size=len(raw))
                return
            key = message_key(header_block, headers, body)
            states = self.store.member_states(key)
            sent = await self._deliver(decision, key, ident, raw, states, summary, mlog)
            pending = [
                m
                for m in decision.recipients
                if not (s := states.get(normalize(m))) or not s.status.final
            ]
            failed = [
                m
                for m in decision.recipients
                if (s := states.get(normalize(m))) and s.status is Status.FAILED
            ]
            outcome = "deferred" if pending else ("failed" if failed else "forwarded")
            if not pending:
                (marks.failed if failed else marks.forwarded).append(uid)
            mlog.info(
                "message_" + outcome,
                lists=list(decision.lists),
                matched_by=decision.matched_by,
                recipients=len(decision.recipients),
                sent=sent,
                deferred=len(pending),
                failed=len(failed),
                duplicate=sent == 0 and bool(decision.recipients),
                size=len(raw),
                duration_ms=round((time.monotonic() - started) * 1000),
            )

    async def _deliver(
        self,
        decision: Route,
        key: str,
        ident: str | None,
        raw: bytes,
        states: dict[str, MemberState],
        summary: CycleSummary,
        mlog: Any,
    ) -> int:
        """Send to the members still due; commit their results; update `states` in place."""
        now = self.clock()
        due = [m for m in decision.recipients if _due(states.get(normalize(m)), now)]
        if not due:
            return 0
        replies = await self.relay.send(
            self.settings.envelope_from, due, self._trace(decision) + raw
        )
        deliveries = [
            classify(
                normalize(m), m, replies[m], states.get(normalize(m)), now, self.settings.retry_for
            )
            for m in due
        ]
        self.store.record_deliveries(key, ident, decision.lists, deliveries)
        for d in deliveries:
            previous = states.get(d.member)
            states[d.member] = MemberState(
                d.status,
                (previous.attempts if previous else 0) + 1,
                previous.first_try if previous else now,
                d.next_try,
            )
            if d.status is Status.DELIVERED:
                summary.delivered += 1
            elif d.status is Status.DEFERRED:
                summary.deferred += 1
                log.warning(
                    "delivery_deferred",
                    member=d.address,
                    code=d.code,
                    reply=d.reply,
                    next_try=d.next_try,
                )
            else:
                summary.failed += 1
                mlog.error("delivery_failed", member=d.address, code=d.code, reply=d.reply)
        return sum(d.status is Status.DELIVERED for d in deliveries)

    def _trace(self, decision: Route) -> bytes:
        """The only bytes added to a message: trace and loop lines on top."""
        lines = [f"Received: by {self.hostname} (forwarder); {formatdate(self.clock())}\r\n"]
        lines += [f"X-Loop: {address}\r\n" for address in decision.lists]
        return "".join(lines).encode("ascii", "replace")


def _due(state: MemberState | None, now: float) -> bool:
    if state is None:
        return True
    return state.status is Status.DEFERRED and (state.next_try or 0) <= now


def _batches(
    uids: Sequence[int], sizes: dict[int, int], max_bytes: int, max_count: int
) -> Iterator[list[int]]:
    """Consecutive groups of UIDs bounded in total size and count (a large message goes alone)."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid)
        if size is None:
            continue  # expunged since the search
        if batch and (total + size > max_bytes or len(batch) >= max_count):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch
