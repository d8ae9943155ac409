"""`forwarder retry`: put failed or deferred deliveries back in play, and re-examine a
message with the current lists; the next cycle does the sending, this command none.

Deliveries are chosen by `--message-id`, `--member`, `--failed` (failed only; by
default failed and deferred), `--uid` (the message at that UID), combined: every
option given must match. Each becomes deferred and due at once, in a new retry
window, its attempts and last reply kept; the UID records of its message are
reopened so that the next cycle fetches it again (`StateStore.requeue`). A
delivery whose message has no record in the folder any more (expunged and pruned)
cannot be fetched again: it is reported and left as it is. `--uid N` also reopens
that message even without a delivery: a skipped or quarantined message is routed
again with the lists as they are now (list changes otherwise apply to new mail only).

The store is held meanwhile (`forwarder.exclusive`): the service must be stopped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from forwarder.addresses import normalize
from forwarder.config import Settings
from forwarder.errors import EXIT_OK, ConfigError, ForwarderError, StateError
from forwarder.exclusive import exclusive
from forwarder.history import normalize_message_id
from forwarder.logs import escape_controls
from forwarder.preview import count, reply_text
from forwarder.reporting import iso
from forwarder.service import report, select_mailboxes
from forwarder.state import DeliveryQuery, DeliveryRow, StateStore, Status


def requeue_mailbox(
    store: StateStore,
    name: str,
    query: DeliveryQuery,
    uid: int | None,
    now: float,
) -> list[str]:
    """Re-queue in one mailbox; the lines that say what was done."""
    folder = store.last_folder(name)
    if folder is None:
        return [f"mailbox {name}: nothing recorded yet"]
    uidvalidity = folder.uidvalidity
    if uid is not None:
        records = store.uid_records(name, uidvalidity, uids=[uid])
        if not records:
            raise StateError(
                f"mailbox {name}: no record of UID {uid} in the folder (UIDVALIDITY "
                f"{uidvalidity}, examined up to UID {folder.watermark})",
                advice="above that UID the next cycle examines it anyway; below, the message "
                "was expunged or its record pruned",
            )
        key = records[0].message_key
        query = replace(query, message_keys=(key,) if key else ("",))  # no key: no delivery
    rows = store.deliveries(name, query)
    keys = tuple(dict.fromkeys(r.message_key for r in rows))
    present = {r.message_key for r in store.uid_records(name, uidvalidity, message_keys=keys)}
    wanted = [r for r in rows if r.message_key in present]
    gone = [r for r in rows if r.message_key not in present]
    done = store.requeue(
        name,
        uidvalidity,
        [(r.message_key, r.member) for r in wanted],
        [uid] if uid is not None else [],
        now,
    )
    requeued = set(done.deliveries)
    if not requeued and not done.reopened:
        lines = [f"mailbox {name}: nothing to re-queue (no failed or deferred delivery matches)"]
    else:
        lines = [
            f"mailbox {name}: {count(len(requeued), 'delivery', 'deliveries')} re-queued, due "
            f"now; {count(len(done.reopened), 'message')} reopened: the next cycle fetches "
            "them again"
        ]
    lines += [_delivery(r) for r in wanted if (r.message_key, r.member) in requeued]
    for record in done.reopened:
        reason = f": {record.reason}" if record.reason else ""
        lines.append(f"  uid {record.uid} reopened (was {record.state.value}{reason})")
    if gone:
        lines.append(
            f"  not re-queued: {count(len(gone), 'delivery', 'deliveries')} whose message is "
            "no longer in the folder's records (expunged, or its record pruned)"
        )
        lines += [_delivery(r) for r in gone]
    return lines


def _delivery(row: DeliveryRow) -> str:
    ident = f"<{row.message_id}>" if row.message_id else "(no Message-ID)"
    return (
        f"  {row.address}  {ident}  was {row.status.value} {iso(row.updated)} "
        f"({reply_text(row.code, row.reply)}), attempts {row.attempts}"
    )


async def retry(
    settings: Settings,
    *,
    message_id: str | None = None,
    member: str | None = None,
    failed: bool = False,
    uid: int | None = None,
    mailbox: str | None = None,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.time,
) -> int:
    try:
        if message_id is None and member is None and not failed and uid is None:
            raise ConfigError(
                "retry: say which deliveries: --message-id, --member, --failed, --uid"
            )
        statuses = (Status.FAILED,) if failed else (Status.FAILED, Status.DEFERRED)
        query = DeliveryQuery(
            message_id=normalize_message_id(message_id) if message_id else None,
            member=normalize(member) if member else None,
            statuses=statuses,
        )
        boxes = select_mailboxes(settings, mailbox)
        with exclusive(settings, boxes) as store:
            for box in boxes:
                lines = requeue_mailbox(store, box.name, query, uid, clock())
                out.write(escape_controls("\n".join(lines), keep="\n") + "\n")
    except ForwarderError as exc:
        return report(exc, "retry_failed")
    return EXIT_OK
