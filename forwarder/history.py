"""`forwarder history QUERY`: what the state store knows of a message (its Message-ID), a
member, or a list: who received it, when, the server's replies, the attempts.

Read-only (the store is opened as `status` opens it): safe next to a running service.
Times are ISO 8601 in UTC. The store keeps no subject; it keeps the sender address,
so "did bob receive the message from the tax office on Monday?" is
`forwarder history bob@example.org --since 2024-05-06` and a look at the senders.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from forwarder.addresses import normalize
from forwarder.config import ProcessSettings
from forwarder.errors import EXIT_OK, ConfigError, ForwarderError
from forwarder.factory import open_store
from forwarder.headers import Headers, message_id
from forwarder.logs import escape_controls, print_error, printable_json
from forwarder.preview import count, reply_text
from forwarder.reporting import iso
from forwarder.state import DeliveryQuery, DeliveryRow, StateStore, UidRecord


@dataclass(frozen=True)
class DeliveryView:
    member: str  # the address as configured
    status: str
    code: int | None
    reply: str
    attempts: int
    first_try: str | None
    updated: str | None
    next_try: str | None


@dataclass(frozen=True)
class UidView:
    uid: int
    state: str
    reason: str | None
    updated: str | None


@dataclass
class MessageView:
    mailbox: str
    message_id: str | None
    sender: str | None
    lists: list[str]
    first_seen: str | None
    uids: list[UidView] = field(default_factory=list)
    deliveries: list[DeliveryView] = field(default_factory=list)


def normalize_message_id(text: str) -> str | None:
    """A Message-ID as the store keeps it (as the cycle normalises the header)."""
    return message_id(Headers((("message-id", text.strip()),)))


def parse_since(text: str | None) -> float | None:
    """ISO 8601 date or date and time; UTC when no offset is given."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since: {text!r} is not an ISO 8601 date or time (e.g. 2024-05-06 or "
            "2024-05-06T08:00:00Z)"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def find(
    store: StateStore,
    query: str,
    mailbox: str | None,
    configured: list[str],
    since: float | None,
) -> tuple[list[str], list[MessageView]]:
    """What matched (message-id, member, list) and the messages, oldest first: the
    deliveries of `mailbox` (None: of every mailbox in the store), and the UID records of
    the `configured` mailboxes' current folders."""
    ident = normalize_message_id(query)
    address = normalize(query)
    searches = {
        "message-id": DeliveryQuery(message_id=ident, since=since),
        "member": DeliveryQuery(member=address, since=since),
        "list": DeliveryQuery(list_address=address, since=since),
    }
    rows: dict[tuple[str, str, str], DeliveryRow] = {}
    matched: list[str] = []
    for kind, search in searches.items():
        found = store.deliveries(mailbox, search)
        if found:
            matched.append(kind)
        rows.update(((r.mailbox, r.message_key, r.member), r) for r in found)
    messages: dict[tuple[str, str], MessageView] = {}
    for (box, key, _), row in sorted(rows.items(), key=lambda i: (i[1].first_try, i[0])):
        view = messages.get((box, key))
        if view is None:
            view = MessageView(box, row.message_id, row.sender, list(row.lists), iso(row.first_try))
            messages[(box, key)] = view
        view.deliveries.append(
            DeliveryView(
                row.address,
                row.status.value,
                row.code,
                row.reply,
                row.attempts,
                iso(row.first_try),
                iso(row.updated),
                iso(row.next_try),
            )
        )
    _add_uids(store, messages, configured, ident, since)
    return matched, list(messages.values())


def _add_uids(
    store: StateStore,
    messages: dict[tuple[str, str], MessageView],
    configured: list[str],
    ident: str | None,
    since: float | None,
) -> None:
    """The UID records of the messages found, in each mailbox's current folder; and for a
    Message-ID, its messages that have no delivery (skipped, quarantined)."""
    names = set(configured) | {box for box, _ in messages}
    for name in sorted(names):
        folder = store.last_folder(name)
        if folder is None:
            continue
        keys = [key for box, key in messages if box == name]
        records = store.uid_records(name, folder.uidvalidity, message_keys=keys, message_id=ident)
        for record in records:
            view = messages.get((name, record.message_key or ""))
            if view is None:
                if record.message_key or (since is not None and (record.updated or 0) < since):
                    continue  # a copy with deliveries outside the window
                view = MessageView(name, record.message_id, None, [], iso(record.updated))
                messages[(name, f"uid:{record.uid}")] = view
            view.uids.append(_uid(record))


def _uid(record: UidRecord) -> UidView:
    return UidView(record.uid, record.state.value, record.reason, iso(record.updated))


def render(query: str, matched: list[str], messages: list[MessageView], since: str | None) -> str:
    window = f" since {since}" if since else ""
    kinds = f" ({', '.join(matched)})" if matched else ""
    lines = [f"history of {query}{kinds}{window}: {count(len(messages), 'message')}"]
    for m in messages:
        ident = f"<{m.message_id}>" if m.message_id else "(no Message-ID)"
        lists = f"  to {', '.join(m.lists)}" if m.lists else ""
        lines.append(f"{ident}  from {m.sender or '(unknown)'}{lists}  (mailbox {m.mailbox})")
        for u in m.uids:
            reason = f" ({u.reason})" if u.reason else ""
            lines.append(f"  uid {u.uid}: {u.state}{reason}, {u.updated}")
        width = max((len(d.member) for d in m.deliveries), default=0)
        for d in m.deliveries:
            when = f"next try {d.next_try}" if d.status == "deferred" else d.updated
            lines.append(
                f"  {d.member:<{width}}  {d.status:<9}  {when}  attempts {d.attempts}  "
                f"{reply_text(d.code, d.reply)}"
            )
        if not m.deliveries:
            lines.append("  no delivery recorded")
    return "\n".join(lines) + "\n"


async def history(
    settings: ProcessSettings,
    *,
    query: str,
    since: str | None = None,
    as_json: bool = False,
    mailbox: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    try:
        start = parse_since(since)
        settings.check_mailbox_name(mailbox)  # no password needed: the names only
        configured = [mailbox] if mailbox else list(settings.mailbox_names())
        store = open_store(settings, readonly=True)
        try:
            matched, messages = find(store, query, mailbox, configured, start)
        finally:
            store.close()
    except ForwarderError as exc:
        print_error(f"forwarder: {exc}")
        return exc.exit_status
    if as_json:
        payload: dict[str, Any] = {
            "query": query,
            "matched": matched,
            "since": iso(start),
            "messages": [asdict(m) for m in messages],
        }
        out.write(printable_json(payload) + "\n")
    else:
        out.write(escape_controls(render(query, matched, messages, iso(start)), keep="\n"))
    return EXIT_OK
