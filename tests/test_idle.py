"""The IDLE watcher (`forwarder.idle`) against a real Dovecot, through a recording proxy:
what it sends to the server, and when it wakes the cycle."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping
from typing import Any

from structlog.testing import capture_logs

from forwarder.idle import IdleWatcher
from tests.conftest import MakeSettings
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer

CONTACT = "contact@example.org"


async def test_the_watcher_keeps_one_idle_while_mail_comes_and_wakes_at_each_message(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    """A watcher that ended its first IDLE after a second (to read what came with
    "+ idling") and started another missed the mail of that moment: Dovecot answers a new
    IDLE with its EXISTS in the same packet as "+ idling", hidden in imaplib's buffer
    until the next packet. Dovecot announces new mail 0-500 ms after it came, so three
    messages one after the other take at least 1.5 s: past that first second."""
    woken, idling = asyncio.Event(), asyncio.Event()

    def seen(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        if event.get("event") == "idle_started":
            idling.set()
        return event

    with FaultProxy(mailbox.host, mailbox.imap_port, record=True) as proxy:
        endpoint = make_settings(imap_port=proxy.port).mailboxes()[0].imap
        watcher = IdleWatcher(endpoint, woken.set)
        with capture_logs(processors=[seen]):
            task = asyncio.create_task(watcher.run())
            try:
                await asyncio.wait_for(idling.wait(), 20)
                await asyncio.wait_for(woken.wait(), 20)  # once, for what came before
                for n in range(3):
                    woken.clear()
                    mailbox.deliver(build_message(subject=f"n{n}"), [CONTACT])
                    await asyncio.wait_for(woken.wait(), 20)
            finally:
                watcher.stop()
                await task
        sent = proxy.recorded("client")
    assert sent.count(b" IDLE\r\n") == 1
    assert b"DONE\r\n" not in sent


async def test_the_watcher_wakes_the_cycle_once_its_idle_is_in_place(
    mailbox: MailServer, make_settings: MakeSettings
) -> None:
    """Mail that came while nobody listened (before the IDLE) is the cycle's to find: the
    wake comes after the server accepted the IDLE, so that the cycle it starts looks
    after anything the IDLE could have missed."""
    woken = asyncio.Event()
    order: list[str] = []

    def seen(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        if event.get("event") == "idle_started":
            order.append("idle_started")
        return event

    def wake() -> None:
        order.append("woken")
        woken.set()

    watcher = IdleWatcher(make_settings().mailboxes()[0].imap, wake)
    with capture_logs(processors=[seen]):
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(woken.wait(), 20)
        finally:
            watcher.stop()
            await task
    assert order[:2] == ["idle_started", "woken"]
