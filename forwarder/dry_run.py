"""`forwarder once --dry-run` and `forwarder explain`: who would receive what, and why.

The dry run reads what a real cycle would read: the messages above the folder's
UID watermark plus the open ones that are due (on a folder never seen, what the
first cycle would examine), fetched with BODY.PEEK[] as the cycle fetches them,
routed by the cycle's own `plan.prepare`, and judged against the state store
opened read-only (`forwarder.preview`). It sends nothing, writes nothing to the
store and sets no flag, so it is safe next to a running service. `explain` does
the same for one message file, from the lists configuration alone.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from forwarder.config import Settings
from forwarder.errors import EXIT_OK, ForwarderError
from forwarder.factory import open_store
from forwarder.imap_source import FORWARD_FAILED, FORWARDED, ImapSource
from forwarder.logs import escape_controls, print_error, printable_json
from forwarder.mailbox import Mailbox
from forwarder.plan import fetch_batches, seen_before
from forwarder.preview import (
    ELSEWHERE,
    QUARANTINE,
    MessagePlan,
    count,
    render,
    render_summary,
    routed,
    summary,
    with_deliveries,
)
from forwarder.reporting import iso
from forwarder.service import in_folder, report, select_mailboxes
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import DeliveryQuery, DeliveryRow, StateStore, UidRecord


@dataclass
class FolderPlan:
    mailbox: str
    server: str
    folder: str
    uidvalidity: int
    watermark: int | None  # None: the folder was never seen
    new: int  # messages above the watermark (first sight: to examine)
    due: int  # open messages whose time has come
    messages: list[MessagePlan] = field(default_factory=list)
    waiting: list[dict[str, Any]] = field(default_factory=list)  # open, not due: {uid, due}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": summary(self.messages)}


@contextmanager
def reading(settings: Settings) -> Iterator[StateStore]:
    """The state store, read-only; an empty one when the SQLite file does not exist yet
    (a first run: nothing was delivered)."""
    if settings.state_url is None and not settings.state_db.exists():
        with tempfile.TemporaryDirectory(prefix="forwarder-dry-run-") as tmp:
            empty = SqliteStateStore(Path(tmp) / "empty.db", exclusive=False)
            try:
                yield empty
            finally:
                empty.close()
        return
    store = open_store(settings, readonly=True)
    try:
        yield store
    finally:
        store.close()


def survey(
    source: ImapSource, store: StateStore, mailbox: Mailbox, settings: Settings, now: float
) -> FolderPlan:
    """What the next cycle would do on `mailbox`, read-only. Blocking: run it in a thread."""
    name = mailbox.name
    uidvalidity = source.uidvalidity
    folder = store.folder(name, uidvalidity)
    elsewhere: set[int] = set()
    waiting: list[UidRecord] = []
    if folder is None:  # as FolderProgress._first_sight decides, without recording
        # The cycle takes every UID where the folder keeps no keyword: there, no message
        # can carry $Forwarded, so this search finds them all (and EXAMINE hides
        # PERMANENTFLAGS).
        todo = source.unforwarded_uids()
        previous = store.last_folder(name)
        if previous is not None and previous.complete_through is not None and todo:
            info = source.message_info(todo, dates=True)
            received = {u: i.internaldate for u, i in info.found.items()}
            old = seen_before(received, previous.complete_through)
            todo = [u for u in todo if u not in old]
        new, due = todo, []
    else:
        new = source.uids_above(folder.watermark)
        due = store.open_uids(name, uidvalidity, now)
        later = sorted(set(store.open_uids(name, uidvalidity, math.inf)) - set(due))
        if later:  # not fetched by the next cycle: a member waits for its retry
            waiting = store.uid_records(name, uidvalidity, uids=later)
    plan = FolderPlan(
        name,
        source.server,
        mailbox.imap.folder,
        uidvalidity,
        folder.watermark if folder else None,
        len(new),
        len(due),
        waiting=[{"uid": r.uid, "due": iso(r.due)} for r in waiting],
    )
    candidates = sorted(set(new) | set(due))
    if not candidates:
        return plan
    info = source.message_info(candidates)
    if folder is not None:
        marked = {FORWARDED, FORWARD_FAILED}
        elsewhere = {u for u in new if u in info.found and marked & info.found[u].flags}
    plans: dict[int, MessagePlan] = {}
    for uid in sorted(elsewhere):
        reason = "already flagged $Forwarded (another forwarder with another state store?)"
        plans[uid] = MessagePlan(uid, None, None, info.found[uid].size, ELSEWHERE, reason)
    for uid, error in info.unreadable.items():
        plans[uid] = MessagePlan(uid, None, None, 0, QUARANTINE, str(error))
    sizes = {u: i.size for u, i in info.found.items() if u not in elsewhere}
    first_uid: dict[str, int] = {}  # message key -> the UID the cycle sends it for
    batches = fetch_batches(
        candidates, sizes, settings.fetch_batch_bytes, settings.fetch_batch_messages
    )
    for batch in batches:
        fetched = source.fetch(batch, sizes)
        for uid, error in fetched.unreadable.items():
            plans[uid] = MessagePlan(uid, None, None, sizes.get(uid, 0), QUARANTINE, str(error))
        routed_plans = [
            (uid, *routed(uid, fetched.found[uid], mailbox.lists))
            for uid in batch
            if uid in fetched.found
        ]
        keys = tuple({m.key for _, _, m in routed_plans if m is not None})
        rows = _rows(store, name, keys)
        for uid, message_plan, message in routed_plans:
            if message is not None:
                copy_of = first_uid.setdefault(message.key, uid)
                message_plan = with_deliveries(
                    message_plan,
                    rows.get(message.key, {}),
                    now,
                    copy_of if copy_of != uid else None,
                )
            plans[uid] = message_plan
    plan.messages = [plans[uid] for uid in sorted(plans)]
    return plan


def _rows(
    store: StateStore, mailbox: str, keys: tuple[str, ...]
) -> dict[str, dict[str, DeliveryRow]]:
    found: dict[str, dict[str, DeliveryRow]] = {}
    if keys:
        for row in store.deliveries(mailbox, DeliveryQuery(message_keys=keys)):
            found.setdefault(row.message_key, {})[row.member] = row
    return found


def render_folder(plan: FolderPlan) -> str:
    lines = [
        f"dry run: mailbox {plan.mailbox}, {plan.server}, folder {plan.folder!r} "
        f"(UIDVALIDITY {plan.uidvalidity})"
    ]
    if plan.watermark is None:
        lines.append(
            f"  never seen before: the first cycle examines {count(plan.new, 'message')}; "
            "to start from now without sending old mail, run `forwarder baseline` first"
        )
    else:
        lines.append(
            f"  {count(plan.new, 'new message')} above UID {plan.watermark}, "
            f"{plan.due} open and due"
        )
    for message in plan.messages:
        lines += render(message)
    for w in plan.waiting:
        lines.append(f"uid {w['uid']}  not due: a member waits for a retry, next at {w['due']}")
    lines.append(
        f"summary: {render_summary(summary(plan.messages))}; nothing was sent, recorded or flagged"
    )
    return "\n".join(lines) + "\n"


async def dry_run(
    settings: Settings,
    *,
    as_json: bool = False,
    mailbox: str | None = None,
    out: TextIO = sys.stdout,
    clock: Callable[[], float] = time.time,
) -> int:
    """Print what the next cycle would do, for every (or the named) mailbox."""
    try:
        boxes = select_mailboxes(settings, mailbox)
        with reading(settings) as store:
            plans = [
                await in_folder(
                    settings,
                    box,
                    partial(survey, store=store, mailbox=box, settings=settings, now=clock()),
                    readonly=True,
                )
                for box in boxes
            ]
    except ForwarderError as exc:
        return report(exc, "dry_run_failed")
    if as_json:
        out.write(printable_json({"mailboxes": [p.as_dict() for p in plans]}) + "\n")
    else:
        out.write(escape_controls("".join(render_folder(p) for p in plans), keep="\n"))
    return EXIT_OK


async def explain(
    settings: Settings,
    *,
    path: str,
    as_json: bool = False,
    mailbox: str | None = None,
    out: TextIO = sys.stdout,
    stdin: BinaryIO | None = None,
) -> int:
    """Route one message file (`-`: standard input) against the configured lists."""
    try:
        boxes = select_mailboxes(settings, mailbox)
        raw = _read_message(path, stdin)
    except ForwarderError as exc:
        print_error(f"forwarder: {exc}")
        return exc.exit_status
    plans = {box.name: routed(None, raw, box.lists)[0] for box in boxes}
    if as_json:
        out.write(printable_json({name: p.as_dict() for name, p in plans.items()}) + "\n")
        return EXIT_OK
    for name, plan in plans.items():
        heading = f"{path} (mailbox {name}'s lists)" if len(plans) > 1 else path
        out.write(escape_controls(heading) + "\n")
        out.write(escape_controls("\n".join(render(plan)), keep="\n") + "\n")
    out.write(
        "(routing only: the state store is not read; `forwarder history MESSAGE-ID` "
        "shows who already received it)\n"
    )
    return EXIT_OK


def _read_message(path: str, stdin: BinaryIO | None) -> bytes:
    if path == "-":
        return (stdin or sys.stdin.buffer).read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ForwarderError(f"cannot read {path} ({exc.strerror})") from None
