"""The one-shot commands: `once` (one poll cycle) and `check` (configuration and logins)."""

from __future__ import annotations

import sys
from typing import TextIO

import structlog

from forwarder.config import Settings
from forwarder.cycle import Forwarder
from forwarder.errors import EXIT_OK, ForwarderError
from forwarder.state import SqliteStateStore

log = structlog.get_logger("forwarder")


def report(exc: ForwarderError, event: str) -> int:
    """Log a failure, print its one line for a human, return its exit status."""
    log.error(event, error=str(exc), error_type=type(exc).__name__)
    print(f"forwarder: {exc}", file=sys.stderr)
    return exc.exit_status


async def run_once(settings: Settings) -> int:
    try:
        store = SqliteStateStore(settings.state_db)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    forwarder = Forwarder(settings, store)
    try:
        await forwarder.run_cycle()
        return EXIT_OK
    except ForwarderError as exc:
        return report(exc, "cycle_failed")
    finally:
        await forwarder.close()
        store.close()


async def check(settings: Settings, out: TextIO = sys.stdout) -> int:
    lists = settings.expanded_lists()
    print(f"configuration: ok ({len(lists)} lists)", file=out)
    for address, members in sorted(lists.items()):
        print(f"  {address} -> {', '.join(members)}", file=out)
    print(f"envelope sender: {settings.envelope_from}", file=out)
    try:
        store = SqliteStateStore(settings.state_db, exclusive=False)  # a daemon may be running
    except ForwarderError as exc:
        return report(exc, "check_failed")
    forwarder = Forwarder(settings, store)
    try:
        await forwarder.connect()
        caps = forwarder.source.describe_capabilities()
        print(
            f"{forwarder.source.server}: login ok, folder {settings.imap_folder!r} selected, "
            f"keywords {'yes' if caps['keywords'] else 'no'}, "
            f"IDLE {'yes' if caps['idle'] else 'no'}, "
            f"MOVE {'yes' if caps['move'] else 'no'}",
            file=out,
        )
        smtp = forwarder.smtp.describe_capabilities()
        print(
            f"{forwarder.smtp.server}: {'login' if settings.smtp_username else 'connection'} "
            f"ok, size limit {smtp.get('size_limit') or 'none'}",
            file=out,
        )
        print(f"state store {settings.state_db}: ok", file=out)
        return EXIT_OK
    except ForwarderError as exc:
        return report(exc, "check_failed")
    finally:
        await forwarder.close()
        store.close()
