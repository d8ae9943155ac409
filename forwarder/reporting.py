"""What a cycle tells the world: its log events, the cycle records in the state store,
and the pruning of old records. The cycle's pipeline calls it; it sends nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog

from forwarder.errors import ForwarderError
from forwarder.plan import Message
from forwarder.state import CycleRecord, Delivery, StateStore, Status

log = structlog.get_logger("forwarder.cycle")
PRUNE_EVERY = 24 * 3600.0
IDLE_RECORD_EVERY = 600.0  # empty polls are recorded at most this often per mailbox


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the second."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@dataclass
class CycleSummary:
    messages: int = 0  # messages looked at in full
    forwarded: int = 0  # messages whose every result is final (forwarded or failed)
    delivered: int = 0  # (message, member) deliveries accepted in this cycle
    deferred: int = 0
    failed: int = 0
    skipped: int = 0  # unmatched, loops, too many hops
    quarantined: int = 0  # left for a person (unreadable, or unsendable as it is)
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "started"}

    def add(self, other: CycleSummary) -> None:
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def idle(self) -> bool:
        """Nothing was looked at: an empty poll."""
        return not any(self.as_dict().values())


class ReportObserver(Protocol):
    """Told each message's outcome and each delivery's status (the daemon's metrics)."""

    def message(self, outcome: str) -> None: ...

    def delivery(self, lists: Iterable[str], status: Status) -> None: ...


class Reporter:
    """Log events and cycle records of one mailbox (and its `observer`, if set)."""

    def __init__(
        self, store: StateStore, mailbox: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.mailbox = mailbox
        self.clock = clock
        self.observer: ReportObserver | None = None
        self._last_prune = 0.0
        self._recorded = 0.0  # when a cycle record was last written

    def delivery(self, d: Delivery, message: Message, summary: CycleSummary) -> None:
        fields = {
            "uid": message.uid,
            "message_id": message.ident,
            "sender": message.sender,
            "member": d.address,
            "code": d.code,
            "reply": d.reply,
        }
        message.results += 1
        if d.status is Status.DELIVERED:
            summary.delivered += 1
            message.sent += 1
            log.info("delivery_sent", **fields)
        elif d.status is Status.DEFERRED:
            summary.deferred += 1
            # no-reply: the whole message was sent, then no reply came: maybe delivered
            reason = "no-reply" if d.code is None else "reply"
            log.warning("delivery_deferred", **fields, reason=reason, next_try=iso(d.next_try))
        else:
            summary.failed += 1
            log.error("delivery_failed", **fields)
        if self.observer is not None:
            self.observer.delivery(message.route.lists, d.status)

    def message(self, message: Message, waiting: list[str], failed: list[str]) -> None:
        outcome = "deferred" if waiting else ("failed" if failed else "forwarded")
        if self.observer is not None:
            self.observer.message(outcome)
        recipients = message.route.recipients
        log.info(
            "message_" + outcome,
            uid=message.uid,
            message_id=message.ident,
            sender=message.sender,
            lists=list(message.route.lists),
            matched_by=message.route.matched_by,
            recipients=len(recipients),
            sent=message.sent,
            deferred=len(waiting),
            failed=len(failed),
            duplicate=message.results == 0 and bool(recipients),
            interrupted=message.interrupted,
            size=len(message.raw),
            duration_ms=round((time.monotonic() - message.started) * 1000),
        )

    def skipped(self, uid: int, message_id: str | None, reason: str, size: int) -> None:
        if self.observer is not None:
            self.observer.message("skipped")
        log.info("message_skipped", uid=uid, message_id=message_id, reason=reason, size=size)

    def quarantined(self, uid: int, exc: Exception, size: int | None, *, expected: bool) -> None:
        """A message left for a person; an unexpected error also logs its traceback."""
        if self.observer is not None:
            self.observer.message("quarantined")
        log.error(
            "message_quarantined",
            uid=uid,
            reason=str(exc) or type(exc).__name__,
            error_type=type(exc).__name__,
            size=size,
            exc_info=None if expected else exc,
        )

    def cycle(self, summary: CycleSummary, error: str | None) -> None:
        outcome = "error" if error else "ok"
        finished = time.time()
        level = "debug" if outcome == "ok" and summary.idle else "info"
        getattr(log, level)(
            "cycle_finished",
            outcome=outcome,
            duration_ms=round((finished - summary.started) * 1000),
            error=error,
            peak_rss_mb=peak_rss_mb(),
            **summary.as_dict(),
        )
        if outcome == "ok" and summary.idle and finished - self._recorded < IDLE_RECORD_EVERY:
            return  # an empty poll: no write (a thousand mailboxes poll every minute)
        self._recorded = finished
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
            s.quarantined,
        )
        try:
            self.store.record_cycle(self.mailbox, record)
        except ForwarderError as exc:
            log.error("state_store_error", error=str(exc))

    def prune(self, retention: float) -> None:
        now = self.clock()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            if removed := self.store.prune(now - retention):
                log.info("state_pruned", deliveries_removed=removed)


def peak_rss_mb() -> float | None:
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
