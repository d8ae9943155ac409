"""The one-shot commands: `once` (one poll cycle, or a dry run) and `check`
(configuration and logins: IMAP and SMTP each tried and reported on its own)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TextIO, TypeVar

import structlog

from forwarder.config import Settings
from forwarder.cycle import Forwarder
from forwarder.errors import EXIT_OK, EXIT_RUNTIME, ConfigError, ForwarderError
from forwarder.factory import build_forwarder, open_store, store_label
from forwarder.imap_source import ImapSource
from forwarder.logs import print_error
from forwarder.mailbox import Mailbox
from forwarder.state import StateStore

log = structlog.get_logger("forwarder")
T = TypeVar("T")
# How long `once` keeps trying to write replies a failed commit left in memory before it
# exits without them (those deliveries are then sent again by the next run).
SAVE_PATIENCE = 60.0


def report(exc: ForwarderError, event: str) -> int:
    """Log a failure, print its one line for a human, return its exit status."""
    log.error(event, error=str(exc), error_type=type(exc).__name__)
    print_error(f"forwarder: {exc}")
    return exc.exit_status


def select_mailboxes(settings: Settings, name: str | None) -> tuple[Mailbox, ...]:
    """The configured mailboxes, or the one named (ConfigError if there is none)."""
    return settings.mailboxes(name)


async def in_folder(
    settings: Settings,
    mailbox: Mailbox,
    work: Callable[[ImapSource], T],
    *,
    readonly: bool = False,
) -> T:
    """Log in to the mailbox's folder (EXAMINE when `readonly`), run the blocking `work`
    with that session in a thread, log out."""
    source = ImapSource(mailbox.imap, settings.tls_ca_file)
    source.readonly = readonly
    try:
        await asyncio.to_thread(source.connect)
        return await asyncio.to_thread(work, source)
    finally:
        await asyncio.to_thread(source.close)


async def run_once(
    settings: Settings, *, dry_run: bool = False, as_json: bool = False, mailbox: str | None = None
) -> int:
    """One cycle of every mailbox; with `dry_run`, what it would do (`forwarder.dry_run`)."""
    if dry_run:
        from forwarder.dry_run import dry_run as preview  # imports this module

        return await preview(settings, as_json=as_json, mailbox=mailbox)
    if as_json:
        return report(ConfigError("--json goes with --dry-run only"), "once_failed")
    try:
        boxes = select_mailboxes(settings, mailbox)
        store = open_store(settings)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    try:
        status = EXIT_OK
        for box in boxes:
            forwarder = build_forwarder(settings, box, store)
            try:
                await forwarder.run_cycle()
            except ForwarderError as exc:
                status = max(status, report(exc, "cycle_failed"))
            finally:
                try:  # no exit with replies only in memory while they may still be written
                    await forwarder.save_results(SAVE_PATIENCE)
                except ForwarderError as exc:
                    status = max(status, report(exc, "replies_lost"))
                await forwarder.close()
        return status
    finally:
        store.close()


async def check(settings: Settings, out: TextIO = sys.stdout, mailbox: str | None = None) -> int:
    try:
        store = open_store(settings, exclusive=False)  # a daemon may be running
    except ForwarderError as exc:
        return report(exc, "check_failed")
    try:
        status = EXIT_OK
        for box in settings.mailboxes(mailbox):
            status = max(status, await _check_mailbox(settings, box, store, out))
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
        imap = await _check_imap(forwarder, mailbox, out)
        smtp = await _check_smtp(forwarder, mailbox, out)
        return max(imap, smtp)
    finally:
        await forwarder.close()


async def _check_imap(forwarder: Forwarder, mailbox: Mailbox, out: TextIO) -> int:
    try:
        await asyncio.to_thread(forwarder.source.connect)
    except ForwarderError as exc:
        return report(exc, "check_failed")
    caps = forwarder.source.describe_capabilities()
    print(
        f"{forwarder.source.server}: login ok, folder {mailbox.imap.folder!r} selected, "
        f"keywords {'yes' if caps['keywords'] else 'no'}, "
        f"IDLE {'yes' if caps['idle'] else 'no'}, "
        f"MOVE {'yes' if caps['move'] else 'no'}",
        file=out,
    )
    return EXIT_OK


async def _check_smtp(forwarder: Forwarder, mailbox: Mailbox, out: TextIO) -> int:
    try:
        await forwarder.smtp.connect()
    except ForwarderError as exc:
        return report(exc, "check_failed")
    smtp = forwarder.smtp.describe_capabilities()
    print(
        f"{forwarder.smtp.server}: {'login' if mailbox.smtp.username else 'connection'} "
        f"ok, size limit {smtp.get('size_limit') or 'none'}, "
        f"8BITMIME {'yes' if smtp.get('8bitmime') else 'no (8-bit messages fail)'}, "
        f"EHLO {smtp.get('ehlo_name')}",
        file=out,
    )
    try:  # the path for real: MAIL FROM the envelope sender, RCPT TO a member per domain
        replies = await forwarder.smtp.probe(mailbox.envelope_sender, mailbox.lists)
    except ForwarderError as exc:
        return report(exc, "check_failed")
    for rcpt, reply in replies.items():
        said = "ok" if reply.accepted else f"refused ({reply.code} {reply.text})"
        print(f"  MAIL FROM {mailbox.envelope_sender}, RCPT TO {rcpt}: {said}", file=out)
    return EXIT_OK if all(reply.accepted for reply in replies.values()) else EXIT_RUNTIME
