"""The forwarder on a catch-all served by Courier-IMAP (docs/deployments.md, "Courier-IMAP")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from forwarder.idle import IdleWatcher
from tests.conftest import forward_once, settings_for
from tests.mail import build_message
from tests.servers.courier import CourierServer
from tests.servers.sink import SmtpSink


def rcpts(sink: SmtpSink) -> list[str]:
    return sorted(r for t in sink.received for r in t.rcpt_tos)


async def test_each_message_goes_out_once_and_is_flagged(
    courier: CourierServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    courier.deliver(build_message(to="someone@remote.example"), ["contact@example.org"])
    settings = settings_for(courier, smtp_sink, tmp_path / "s.db")
    await forward_once(settings)
    await forward_once(settings)
    assert rcpts(smtp_sink) == ["alice@example.org", "bob@example.org"]
    [(_, flags, _)] = courier.messages()
    assert {b"$Forwarded", b"\\Seen"} <= flags


async def test_without_keywords_each_message_goes_out_once_and_is_marked_seen(
    courier_without_keywords: CourierServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """IMAP_KEYWORDS=0: the state store alone keeps it from going out twice."""
    courier_without_keywords.deliver(build_message(), ["contact@example.org"])
    settings = settings_for(courier_without_keywords, smtp_sink, tmp_path / "s.db")
    await forward_once(settings)
    courier_without_keywords.deliver(build_message(subject="later"), ["compta@example.org"])
    await forward_once(settings)
    await forward_once(settings)
    assert rcpts(smtp_sink) == [
        "alice@example.org", "bob@example.org", "bob@example.org", "carol@example.org"
    ]
    assert [flags for _, flags, _ in courier_without_keywords.messages()] == [
        {b"\\Seen"}, {b"\\Seen"}
    ]


async def test_with_enhanced_idle_new_mail_wakes_the_idle_watcher(
    courier: CourierServer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """The latency itself (about a second; a minute without IMAP_ENHANCEDIDLE) is measured
    by bench/courier_idle.py, not asserted here."""
    woken, idling = asyncio.Event(), asyncio.Event()

    def seen(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
        if event.get("event") == "idle_started":
            idling.set()
        return event

    endpoint = settings_for(courier, smtp_sink, tmp_path / "s.db").mailboxes()[0].imap
    watcher = IdleWatcher(endpoint, woken.set)
    with capture_logs(processors=[seen]):
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(idling.wait(), 20)
            woken.clear()  # the watcher wakes the cycle once as it connects, before idling
            courier.deliver(build_message(), ["contact@example.org"])
            await asyncio.wait_for(woken.wait(), 50)
        finally:
            watcher.stop()
            await task
