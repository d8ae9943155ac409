"""`forwarder baseline`: start from now on an old catch-all, without sending its past.

Every message now in the folder is recorded as handled (`UidState.BASELINE`) and the
folder's watermark set to its highest UID, in one write to the state store; then,
where the folder keeps keywords, `$Forwarded` is set on them (after the record, as
the cycle marks after recording; no `\\Seen`: a person may not have read them). The
next cycle forwards only what arrives after. Nothing is sent.

The store is held meanwhile (`forwarder.exclusive`): the service must be stopped.
A mailbox the forwarder has already worked on is refused unless `force`: there,
messages not yet forwarded would be marked too, and never sent. With `force`,
what the next cycle would examine (above the watermark, and the open messages) is
marked; final records are kept as they are.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TextIO

from forwarder.config import Settings
from forwarder.errors import EXIT_OK, ForwarderError, StateError
from forwarder.exclusive import exclusive
from forwarder.imap_source import FORWARDED, ImapSource
from forwarder.mailbox import Mailbox
from forwarder.preview import count
from forwarder.service import in_folder, report, select_mailboxes
from forwarder.state import StateStore, UidRecord, UidState

REASON = "forwarder baseline"


@dataclass(frozen=True)
class Baselined:
    mailbox: str
    server: str
    folder: str
    uidvalidity: int
    marked: int  # messages recorded as handled
    watermark: int  # the highest UID now handled
    keywords: bool  # $Forwarded set on them too
    not_kept: int = 0  # messages whose keyword the server did not keep


def mark_baseline(
    source: ImapSource, store: StateStore, mailbox: Mailbox, force: bool, now: float
) -> Baselined:
    """Record (then flag) every message of the folder not yet handled. Blocking."""
    name = mailbox.name
    uidvalidity = source.uidvalidity
    last = store.last_folder(name)
    if last is not None and last.watermark > 0 and not force:
        raise StateError(
            f"mailbox {name} already has progress in the state store (UIDVALIDITY "
            f"{last.uidvalidity}, every message up to UID {last.watermark} examined): a "
            "baseline now would mark mail not yet forwarded as handled, and it would never "
            "be sent",
            advice="`forwarder once --dry-run` shows what is waiting; add --force to mark "
            "it anyway",
        )
    every = source.all_uids()
    folder = store.folder(name, uidvalidity)
    if folder is None:
        todo = every
    else:  # --force: what the next cycle would examine; final records stay as they are
        todo = sorted(
            set(source.uids_above(folder.watermark))
            | set(store.open_uids(name, uidvalidity, math.inf))
        )
    top = max(every, default=0)
    records = [UidRecord(uid, UidState.BASELINE, reason=REASON) for uid in todo]
    store.record_uids(name, uidvalidity, records, now, watermark=top)
    not_kept: list[int] = []
    if source.keywords and todo:
        not_kept = source.mark(todo, [FORWARDED])
    return Baselined(
        name,
        source.server,
        mailbox.imap.folder,
        uidvalidity,
        len(todo),
        top,
        source.keywords,
        len(not_kept),
    )


def render(done: Baselined) -> str:
    where = f"mailbox {done.mailbox}, {done.server}, folder {done.folder!r}"
    line = (
        f"{where}: {count(done.marked, 'message')} marked as handled without sending (UIDVALIDITY "
        f"{done.uidvalidity}, up to UID {done.watermark}), "
    )
    if not done.keywords:
        line += "in the state store only (the folder keeps no keywords)"
    elif done.not_kept:
        line += f"$Forwarded set ({done.not_kept} not kept by the server)"
    else:
        line += "$Forwarded set on them"
    return line + "; mail arriving from now on will be forwarded\n"


async def baseline(
    settings: Settings,
    *,
    force: bool = False,
    mailbox: str | None = None,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.time,
) -> int:
    try:
        boxes = select_mailboxes(settings, mailbox)
        with exclusive(settings, boxes) as store:
            for box in boxes:
                work = partial(mark_baseline, store=store, mailbox=box, force=force, now=clock())
                done = await in_folder(settings, box, work)
                out.write(render(done))
    except ForwarderError as exc:
        return report(exc, "baseline_failed")
    return EXIT_OK
