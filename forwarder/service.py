"""The one-shot commands: `once` (one poll cycle) and `check` (configuration and logins)."""

from __future__ import annotations

import sys
from typing import TextIO

import structlog

from forwarder.config import Settings
from forwarder.errors import EXIT_OK, ForwarderError
from forwarder.factory import build_forwarder, open_store, store_label
from forwarder.mailbox import Mailbox
from forwarder.state import StateStore

log = structlog.get_logger("forwarder")


def report(exc: ForwarderError, event: str) -> int:
    """Log a failure, print its one line for a human, return its exit status."""
    log.error(event, error=str(exc), error_type=type(exc).__name__)
    print(f"forwarder: {exc}", file=sys.stderr)
    return exc.exit_status


async def run_once(settings: Settings) -> int:
    try:
        store = open_store(settings)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    try:
        status = EXIT_OK
        for mailbox in settings.mailboxes():
            forwarder = build_forwarder(settings, mailbox, store)
            try:
                await forwarder.run_cycle()
            except ForwarderError as exc:
                status = max(status, report(exc, "cycle_failed"))
            finally:
                await forwarder.close()
        return status
    finally:
        store.close()


async def check(settings: Settings, out: TextIO = sys.stdout) -> int:
    try:
        store = open_store(settings, exclusive=False)  # a daemon may be running
    except ForwarderError as exc:
        return report(exc, "check_failed")
    try:
        status = EXIT_OK
        for mailbox in settings.mailboxes():
            status = max(status, await _check_mailbox(settings, mailbox, store, out))
        if status == EXIT_OK:
            print(f"state store {store_label(settings)}: ok", file=out)
        return status
    finally:
        store.close()


async def _check_mailbox(
    settings: Settings, mailbox: Mailbox, store: StateStore, out: TextIO
) -> int:
    lists = mailbox.lists
    print(f"configuration: ok ({len(lists)} lists)", file=out)
    for address, members in sorted(lists.items()):
        print(f"  {address} -> {', '.join(members)}", file=out)
    print(f"envelope sender: {mailbox.envelope_sender}", file=out)
    forwarder = build_forwarder(settings, mailbox, store)
    try:
        await forwarder.connect()
        caps = forwarder.source.describe_capabilities()
        print(
            f"{forwarder.source.server}: login ok, folder {mailbox.imap.folder!r} selected, "
            f"keywords {'yes' if caps['keywords'] else 'no'}, "
            f"IDLE {'yes' if caps['idle'] else 'no'}, "
            f"MOVE {'yes' if caps['move'] else 'no'}",
            file=out,
        )
        smtp = forwarder.smtp.describe_capabilities()
        print(
            f"{forwarder.smtp.server}: {'login' if mailbox.smtp.username else 'connection'} "
            f"ok, size limit {smtp.get('size_limit') or 'none'}",
            file=out,
        )
        return EXIT_OK
    except ForwarderError as exc:
        return report(exc, "check_failed")
    finally:
        await forwarder.close()
