"""Planning a batch: what to claim, what became of each message, how to batch the
fetches. Pure: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from forwarder.addresses import normalize
from forwarder.routing import Route
from forwarder.state import ClaimRequest, MemberState, Status, UidRecord, UidState


@dataclass
class Message:
    """One fetched message, routed."""

    uid: int
    raw: bytes
    ident: str | None
    route: Route
    key: str
    sender: str | None = None
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    interrupted: int = 0
    delivered_to: list[str] = field(default_factory=list)  # members accepted in this cycle


def claim_request(copies: Sequence[Message]) -> ClaimRequest:
    """Every member any copy of one message (one key) is for, each once."""
    first = copies[0]
    members: dict[str, str] = {}
    lists: dict[str, None] = {}
    for message in copies:
        lists.update(dict.fromkeys(message.route.lists))
        for address in message.route.recipients:
            members.setdefault(normalize(address), address)
    return ClaimRequest(first.key, first.ident, first.sender, tuple(lists), tuple(members.items()))


def outcome(
    message: Message, states: dict[str, MemberState], now: float, lease: float
) -> tuple[UidRecord, list[str], list[str]]:
    """What became of `message`: its record, and its members still in play and failed."""
    waiting: list[str] = []
    failed: list[str] = []
    due: float | None = None
    for address in message.route.recipients:
        state = states.get(normalize(address))
        if state is None or not state.status.final:
            waiting.append(address)
            if state is not None and state.status is Status.DEFERRED and state.next_try:
                when = state.next_try
            else:  # pending: claimed by another sender, or given back for the next cycle
                when = now if state is None or state.status is Status.DEFERRED else now + lease
            due = when if due is None else min(due, when)
        elif state.status is Status.FAILED:
            failed.append(address)
    final = UidState.OPEN if waiting else UidState.FAILED if failed else UidState.DONE
    record = UidRecord(message.uid, final, message.key, message.ident, due=due)
    return record, waiting, failed


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


def group_by_key(messages: Iterable[Message]) -> dict[str, list[Message]]:
    groups: dict[str, list[Message]] = {}
    for message in messages:
        groups.setdefault(message.key, []).append(message)
    return groups
