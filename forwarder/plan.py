"""Planning a batch: which members are due, what to commit as pending, how to batch
the fetches. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from forwarder.addresses import normalize
from forwarder.routing import Route
from forwarder.state import Delivery, MemberState, MessageResult, Status


@dataclass
class Message:
    """One fetched message, routed."""

    uid: int
    raw: bytes
    ident: str | None
    route: Route
    key: str
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    interrupted: int = 0


def due(state: MemberState | None, now: float) -> bool:
    if state is None or state.status is Status.PENDING:
        return True
    return state.status is Status.DEFERRED and (state.next_try or 0) <= now


def pending_deliveries(
    copies: list[Message], states: dict[str, dict[str, MemberState]], now: float
) -> MessageResult | None:
    """The deliveries about to be attempted for one message key, to commit before sending."""
    first = copies[0]
    wanted: dict[str, str] = {}
    for message in copies:
        for address in message.route.recipients:
            if due(states[first.key].get(normalize(address)), now):
                wanted.setdefault(normalize(address), address)
    if not wanted:
        return None
    deliveries = tuple(Delivery(m, a, Status.PENDING) for m, a in wanted.items())
    return MessageResult(first.key, first.ident, first.route.lists, deliveries)


def fetch_batches(
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
