"""Who gets what: from a message's headers and the configured lists to a route. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from forwarder.addresses import addresses_in, normalize, received_for
from forwarder.headers import Headers

MAX_RECEIVED = 50

# Where the addresses a message was delivered for are looked up, in this order.
ENVELOPE_HEADERS = ("delivered-to", "x-original-to", "envelope-to", "x-envelope-to")


class Left(StrEnum):
    """Why a member of a matched list does not receive the message."""

    SENDER = "sender"  # the member wrote it (From:)
    TO_CC = "to/cc"  # named in To: or Cc:: received the original directly


class Skip(StrEnum):
    """Why a message is not forwarded."""

    UNMATCHED = "unmatched"  # names no configured list
    LOOP = "loop"  # carries our X-Loop marker
    TOO_MANY_HOPS = "too-many-hops"  # more than MAX_RECEIVED Received headers


@dataclass(frozen=True)
class Route:
    lists: tuple[str, ...] = ()  # matched list addresses, normalised
    recipients: tuple[str, ...] = ()  # member addresses, as configured
    matched_by: str = ""  # the header that named the lists
    skip: Skip | None = None
    left_out: tuple[tuple[str, Left], ...] = ()  # (member as configured, why), each once


def envelope_sources(headers: Headers) -> list[tuple[str, list[str]]]:
    """The envelope headers an MTA wrote at final delivery, in order of trust.

    Only the topmost occurrence of each counts, and only above the second
    `Received:` header: anything lower was already in the message in transit, so
    a sender could have written it to reach lists it was not sent to.
    """
    topmost: dict[str, str] = {}
    received: list[str] = []
    for name, value in headers.fields:
        if name == "received":
            received.append(value)
            if len(received) == 2:
                break
        elif name in ENVELOPE_HEADERS:
            topmost.setdefault(name, value)
    sources = [
        (name, addresses_in([topmost[name]]) if name in topmost else [])
        for name in ENVELOPE_HEADERS
    ]
    found = received_for(received[0]) if received else None
    sources.append(("received", [found] if found else []))
    return sources


def sources(headers: Headers) -> list[tuple[str, list[str]]]:
    """Every source routing looks at, in order, with the addresses it names (normalised):
    the envelope headers (`envelope_sources`), then To/Cc (`to/cc`)."""
    visible = addresses_in(headers.get_all("to") + headers.get_all("cc"))
    return [*envelope_sources(headers), ("to/cc", visible)]


def _matched_lists(headers: Headers, lists: Mapping[str, object]) -> tuple[tuple[str, ...], str]:
    for name, addresses in envelope_sources(headers):
        matched = tuple(dict.fromkeys(a for a in addresses if a in lists))
        if matched:
            return matched, name
    visible = addresses_in(headers.get_all("to") + headers.get_all("cc"))
    matched = tuple(dict.fromkeys(a for a in visible if a in lists))
    return matched, ("to/cc" if matched else "")


def route(headers: Headers, lists: Mapping[str, tuple[str, ...]]) -> Route:
    """Decide which lists a message was sent to and which members must receive it.

    `lists` maps each normalised list address to its member accounts (nested lists
    already expanded). RCPT TO addresses only ever come from these members.
    """
    loops = {normalize(v) for v in headers.get_all("x-loop")}
    if loops & lists.keys():
        return Route(skip=Skip.LOOP)
    if headers.count("received") > MAX_RECEIVED:
        return Route(skip=Skip.TOO_MANY_HOPS)

    matched, matched_by = _matched_lists(headers, lists)
    if not matched:
        return Route(skip=Skip.UNMATCHED)

    senders = set(addresses_in(headers.get_all("from")))
    visible = set(addresses_in(headers.get_all("to") + headers.get_all("cc")))
    recipients: dict[str, str] = {}
    left_out: dict[str, tuple[str, Left]] = {}
    for list_address in matched:
        for member in lists[list_address]:
            key = normalize(member)
            if key in senders:
                left_out.setdefault(key, (member, Left.SENDER))
            elif key in visible:
                left_out.setdefault(key, (member, Left.TO_CC))
            else:
                recipients.setdefault(key, member)
    return Route(
        lists=matched,
        recipients=tuple(recipients.values()),
        matched_by=matched_by,
        left_out=tuple(left_out.values()),
    )
