"""Planning a batch: each fetched message parsed and routed, what to claim, what became
of each message, how to batch the fetches. Pure: no I/O. The cycle and the operator
commands (dry run, explain) share it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from forwarder.addresses import addresses_in, normalize
from forwarder.headers import message_id, message_key, parse_headers, split_message
from forwarder.routing import Route, route
from forwarder.state import ClaimRequest, MemberState, Status, UidRecord, UidState

_BARE_CR = re.compile(rb"\r(?!\n)")
# After a UIDVALIDITY change, messages received this long before the last complete cycle
# of the old folder were seen by it: they are not sent again (clock skew margin).
UIDVALIDITY_MARGIN = 3600.0


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
    sent: int = 0  # members the server accepted in this cycle
    results: int = 0  # members with a new result in this cycle (accepted or not)
    interrupted: int = 0
    delivered_to: list[str] = field(default_factory=list)  # members accepted in this cycle


def prepare(uid: int, raw: bytes, lists: Mapping[str, tuple[str, ...]]) -> Message:
    """Parse and route one message as fetched. Raises (ValueError, or anything the
    parsing of hostile input raises) when it cannot be sent unchanged: quarantined."""
    if not raw or raw.isspace():
        raise ValueError("empty message")
    header_block, body = split_message(raw)
    if _BARE_CR.search(header_block):
        # SMTP carries only CRLF lines: the CR would become a line break and split one
        # header field in two at the members' servers (header smuggling).
        raise ValueError("bare CR in the header block: it cannot be sent unchanged")
    headers = parse_headers(header_block)
    decision = route(headers, lists)
    key = message_key(header_block, headers, body) if decision.skip is None else ""
    senders = addresses_in(headers.get_all("from"))
    sender = senders[0] if senders else None
    return Message(uid, raw, message_id(headers), decision, key, sender)


def seen_before(received: Mapping[int, datetime | None], complete_through: float) -> set[int]:
    """After a UIDVALIDITY change: the messages (UID -> INTERNALDATE) that the old folder's
    last complete cycle had already seen, so not to be sent again."""
    limit = complete_through - UIDVALIDITY_MARGIN
    return {u for u, when in received.items() if when is not None and when.timestamp() < limit}


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
