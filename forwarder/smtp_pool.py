"""A few reused SMTP connections (`SmtpRelay`), so that several transactions are in flight
at once; `check`'s probe of the sending path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from forwarder.mailbox import SmtpEndpoint
from forwarder.replies import Reply
from forwarder.smtp_relay import SmtpRelay

__all__ = ["SmtpPool", "probe_recipients"]


class SmtpPool:
    """A few reused connections, so that several transactions are in flight at once."""

    def __init__(self, endpoint: SmtpEndpoint, ca_file: Path | None = None) -> None:
        self.relays = [SmtpRelay(endpoint, ca_file) for _ in range(endpoint.connections)]
        self.server = self.relays[0].server
        self._idle: asyncio.Queue[SmtpRelay] = asyncio.Queue()
        for relay in self.relays:
            self._idle.put_nowait(relay)

    @property
    def connected(self) -> bool:
        return any(relay.connected for relay in self.relays)

    async def connect(self) -> None:
        """Open one connection (login checked); the others open when first needed."""
        if not self.connected:
            await self.relays[0].connect()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[SmtpRelay]:
        relay = await self._idle.get()
        try:
            yield relay
        finally:
            self._idle.put_nowait(relay)

    async def probe(self, mail_from: str, lists: Mapping[str, Sequence[str]]) -> dict[str, Reply]:
        """`SmtpRelay.probe` with the first member of each member domain (`check`)."""
        async with self.session() as relay:
            return await relay.probe(mail_from, probe_recipients(lists))

    async def close(self) -> None:
        for relay in self.relays:
            await relay.close()

    def describe_capabilities(self) -> dict[str, object]:
        return self.relays[0].describe_capabilities()


def probe_recipients(lists: Mapping[str, Sequence[str]]) -> list[str]:
    """The first member (lists in address order) of each distinct member domain."""
    first: dict[str, str] = {}
    for _, members in sorted(lists.items()):
        for member in members:
            first.setdefault(member.rpartition("@")[2].lower(), member)
    return list(first.values())
