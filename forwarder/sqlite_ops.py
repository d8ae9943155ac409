"""The SQLite side of the operator commands: deliveries and UID records by query
(dry run, history) and `requeue` (retry). Functions on an open connection; the
store (`sqlite_store`) supplies the transaction or the read lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from forwarder.sqlite_report import ROW_COLUMNS, delivery_row
from forwarder.state import DeliveryQuery, DeliveryRow, Requeued, UidRecord, UidState

_CHUNK = 500  # host parameters per IN (...) list


def _in(column: str, values: Sequence[object]) -> tuple[str, list[object]]:
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


def deliveries(
    db: sqlite3.Connection, mailbox: str | None, query: DeliveryQuery, limit: int | None
) -> list[DeliveryRow]:
    where: list[str] = []
    args: list[object] = []
    if mailbox is not None:
        where.append("mailbox = ?")
        args.append(mailbox)
    if query.message_id is not None:
        where.append("message_id = ?")
        args.append(query.message_id)
    if query.member is not None:
        where.append("member = ?")
        args.append(query.member)
    if query.list_address is not None:  # lists is "a@x,b@x": match one whole element
        where.append("instr(',' || lists || ',', ',' || ? || ',') > 0")
        args.append(query.list_address)
    if query.statuses:
        clause, values = _in("status", [s.value for s in query.statuses])
        where.append(clause)
        args += values
    if query.since is not None:
        where.append("updated >= ?")
        args.append(query.since)
    sql = f"SELECT {ROW_COLUMNS} FROM deliveries"
    order = " ORDER BY updated DESC, message_key, member"
    keys = list(dict.fromkeys(query.message_keys))
    rows: list[DeliveryRow] = []
    for start in range(0, max(len(keys), 1), _CHUNK):
        conditions, values = list(where), list(args)
        if query.message_keys:
            clause, chunk = _in("message_key", keys[start : start + _CHUNK])
            conditions.append(clause)
            values += chunk
        text = sql + (" WHERE " + " AND ".join(conditions) if conditions else "") + order
        if limit is not None:
            text += " LIMIT ?"
            values.append(limit)
        rows += [delivery_row(r) for r in db.execute(text, values)]
    if len(keys) > _CHUNK:  # several chunks: restore the one order, and the limit
        rows.sort(key=lambda r: (-r.updated, r.message_key, r.member))
        rows = rows[:limit] if limit is not None else rows
    return rows


def uid_records(
    db: sqlite3.Connection,
    mailbox: str,
    uidvalidity: int,
    uids: Sequence[int],
    message_keys: Sequence[str],
    message_id: str | None,
) -> list[UidRecord]:
    found: dict[int, UidRecord] = {}
    selectors: list[tuple[str, list[object]]] = []
    for start in range(0, len(uids), _CHUNK):
        selectors.append(_in("uid", list(uids[start : start + _CHUNK])))
    for start in range(0, len(message_keys), _CHUNK):
        selectors.append(_in("message_key", list(message_keys[start : start + _CHUNK])))
    if message_id is not None:
        selectors.append(("message_id = ?", [message_id]))
    for clause, values in selectors:
        for uid, state, key, ident, reason, due, updated in db.execute(
            "SELECT uid, state, message_key, message_id, reason, due, updated FROM uids "
            f"WHERE mailbox = ? AND uidvalidity = ? AND {clause}",
            [mailbox, uidvalidity, *values],
        ):
            found[uid] = UidRecord(uid, UidState(state), key, ident, reason, due, updated)
    return [found[uid] for uid in sorted(found)]


def requeue(
    db: sqlite3.Connection,
    mailbox: str,
    uidvalidity: int,
    wanted: Sequence[tuple[str, str]],
    uids: Sequence[int],
    now: float,
) -> Requeued:
    """Inside the caller's transaction (see `StateStore.requeue`)."""
    put_back: list[tuple[str, str]] = []
    for key, member in dict.fromkeys(wanted):
        changed = db.execute(
            "UPDATE deliveries SET status = 'deferred', next_try = ?, first_try = ?, "
            "updated = ?, claim_owner = NULL, claim_until = NULL WHERE mailbox = ? "
            "AND message_key = ? AND member = ? AND status IN ('failed', 'deferred')",
            (now, now, now, mailbox, key, member),
        ).rowcount
        if changed:
            put_back.append((key, member))
    keys = list(dict.fromkeys(key for key, _ in put_back))
    before = uid_records(db, mailbox, uidvalidity, list(uids), keys, None)
    db.executemany(
        "UPDATE uids SET state = 'open', due = NULL, reason = NULL, updated = ? "
        "WHERE mailbox = ? AND uidvalidity = ? AND uid = ?",
        [(now, mailbox, uidvalidity, r.uid) for r in before],
    )
    return Requeued(tuple(put_back), tuple(before))
