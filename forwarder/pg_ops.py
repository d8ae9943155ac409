"""The PostgreSQL side of the operator commands: deliveries and UID records by query
(dry run, history) and `requeue` (retry). Functions on a connection inside the
store's transaction; the contract is `StateStore.deliveries`, `uid_records`, `requeue`.
Text is ordered byte-wise (`COLLATE "C"`), as SQLite does, whatever the database's locale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forwarder.pg_connect import Connection, text
from forwarder.sqlite_report import ROW_COLUMNS, delivery_row
from forwarder.state import DeliveryQuery, DeliveryRow, Requeued, UidRecord, UidState

ORDER_RECENT = 'updated DESC, message_key COLLATE "C", member COLLATE "C"'


def deliveries(
    conn: Connection, mailbox: str | None, query: DeliveryQuery, limit: int | None
) -> list[DeliveryRow]:
    where: list[str] = []
    args: dict[str, Any] = {
        "mailbox": mailbox,
        "message_id": text(query.message_id),
        "member": text(query.member),
        "list": text(query.list_address),
        "statuses": [s.value for s in query.statuses],
        "since": query.since,
        "keys": [text(k) for k in dict.fromkeys(query.message_keys)],
        "limit": limit,
    }
    if mailbox is not None:
        where.append("mailbox = %(mailbox)s")
    if query.message_id is not None:
        where.append("message_id = %(message_id)s")
    if query.member is not None:
        where.append("member = %(member)s")
    if query.list_address is not None:  # lists is "a@x,b@x": match one whole element
        where.append("position(',' || %(list)s || ',' in ',' || lists || ',') > 0")
    if query.statuses:
        where.append("status = ANY(%(statuses)s::text[])")
    if query.since is not None:
        where.append("updated >= %(since)s")
    if query.message_keys:
        where.append("message_key = ANY(%(keys)s::text[])")
    sql = f"SELECT {ROW_COLUMNS} FROM forwarder.deliveries"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {ORDER_RECENT}"
    if limit is not None:
        sql += " LIMIT %(limit)s"
    return [delivery_row(r) for r in conn.execute(sql, args).fetchall()]


def uid_records(
    conn: Connection,
    mailbox: str,
    uidvalidity: int,
    uids: Sequence[int],
    message_keys: Sequence[str],
    message_id: str | None,
) -> list[UidRecord]:
    rows = conn.execute(
        "SELECT uid, state, message_key, message_id, reason, due, updated FROM forwarder.uids "
        "WHERE mailbox = %(mailbox)s AND uidvalidity = %(uidvalidity)s AND ("
        "uid = ANY(%(uids)s::bigint[]) OR message_key = ANY(%(keys)s::text[]) "
        "OR message_id = %(message_id)s) ORDER BY uid",
        {
            "mailbox": mailbox,
            "uidvalidity": uidvalidity,
            "uids": list(uids),
            "keys": [text(k) for k in message_keys],
            "message_id": text(message_id),
        },
    ).fetchall()
    return [
        UidRecord(uid, UidState(state), key, ident, reason, due, updated)
        for uid, state, key, ident, reason, due, updated in rows
    ]


def requeue(
    conn: Connection,
    mailbox: str,
    uidvalidity: int,
    wanted: Sequence[tuple[str, str]],
    uids: Sequence[int],
    now: float,
) -> Requeued:
    """Inside the caller's transaction (see `StateStore.requeue`)."""
    asked = list(dict.fromkeys((text(k), text(m)) for k, m in wanted))
    changed = {
        (k, m)
        for k, m in conn.execute(
            "UPDATE forwarder.deliveries d SET status = 'deferred', next_try = %(now)s, "
            "first_try = %(now)s, updated = %(now)s, claim_owner = NULL, claim_until = NULL "
            "FROM unnest(%(keys)s::text[], %(members)s::text[]) AS r(k, m) "
            "WHERE d.mailbox = %(mailbox)s AND d.message_key = r.k AND d.member = r.m "
            "AND d.status IN ('failed', 'deferred') RETURNING d.message_key, d.member",
            {
                "now": now,
                "mailbox": mailbox,
                "keys": [k for k, _ in sorted(asked)],
                "members": [m for _, m in sorted(asked)],
            },
        ).fetchall()
    }
    put_back = [pair for pair in asked if pair in changed]
    keys = list(dict.fromkeys(key for key, _ in put_back))
    before = uid_records(conn, mailbox, uidvalidity, list(uids), keys, None)
    conn.execute(
        "UPDATE forwarder.uids SET state = 'open', due = NULL, reason = NULL, "
        "updated = %(now)s WHERE mailbox = %(mailbox)s AND uidvalidity = %(uidvalidity)s "
        "AND uid = ANY(%(uids)s::bigint[])",
        {
            "now": now,
            "mailbox": mailbox,
            "uidvalidity": uidvalidity,
            "uids": [r.uid for r in before],
        },
    )
    return Requeued(tuple(put_back), tuple(before))
