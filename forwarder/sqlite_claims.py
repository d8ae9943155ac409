"""Claims and results in the SQLite store, inside the caller's transaction.

The rules of the contract (`forwarder.state`): a member with no row, deferred and
due, or pending under a claim that ended is won (the last, as an attempt cut off);
a result lands only on a row still pending, so writing it twice changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from forwarder.state import Claim, ClaimRequest, MemberState, MessageResult, Status

_CHUNK = 500  # host parameters per IN (...) list


def claim(
    db: sqlite3.Connection,
    mailbox: str,
    requests: Sequence[ClaimRequest],
    owner: str,
    now: float,
    lease: float,
) -> list[Claim]:
    keys = list(dict.fromkeys(r.message_key for r in requests))
    until = now + lease
    rows = _member_rows(db, mailbox, keys)
    inserts: list[tuple[object, ...]] = []
    updates: list[tuple[object, ...]] = []
    claims: list[Claim] = []
    for request in requests:
        known = rows.setdefault(request.message_key, {})
        states: dict[str, MemberState] = {}
        won: set[str] = set()
        interrupted: set[str] = set()
        lists = ",".join(request.lists)
        for member, address in request.members:
            row = known.get(member)
            if row is None:
                state = MemberState(Status.PENDING, 0, now, None)
                inserts.append(
                    (
                        mailbox,
                        request.message_key,
                        member,
                        address,
                        now,
                        now,
                        lists,
                        request.message_id,
                        request.sender,
                        owner,
                        until,
                    )
                )
            else:
                state, claim_until = row
                if state.status is Status.DEFERRED and (state.next_try or 0) <= now:
                    pass
                elif state.status is Status.PENDING and (claim_until or 0) < now:
                    interrupted.add(member)
                    state = MemberState(Status.PENDING, state.attempts + 1, state.first_try, None)
                else:
                    states[member] = state
                    continue
                state = MemberState(Status.PENDING, state.attempts, state.first_try, state.next_try)
                updates.append(
                    (
                        state.attempts,
                        now,
                        owner,
                        until,
                        mailbox,
                        request.message_key,
                        member,
                    )
                )
            known[member] = (state, until)
            states[member] = state
            won.add(member)
        claims.append(Claim(states, frozenset(won), frozenset(interrupted)))
    db.executemany(
        "INSERT INTO deliveries (mailbox, message_key, member, address, status, "
        "attempts, first_try, updated, lists, message_id, sender, claim_owner, "
        "claim_until) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?, ?, ?, ?)",
        inserts,
    )
    db.executemany(
        "UPDATE deliveries SET status = 'pending', attempts = ?, updated = ?, "
        "claim_owner = ?, claim_until = ? "
        "WHERE mailbox = ? AND message_key = ? AND member = ?",
        updates,
    )
    return claims


def record_results(
    db: sqlite3.Connection, mailbox: str, results: Sequence[MessageResult], now: float
) -> None:
    """The servers' replies, in one transaction (a group commit). Idempotent."""
    db.executemany(
        "UPDATE deliveries SET status = ?, code = ?, reply = ?, attempts = attempts + 1, "
        "next_try = ?, updated = ?, claim_owner = NULL, claim_until = NULL "
        "WHERE mailbox = ? AND message_key = ? AND member = ? AND status = 'pending'",
        [
            (
                d.status.value,
                d.code,
                d.reply[:1000],
                d.next_try,
                now,
                mailbox,
                r.message_key,
                d.member,
            )
            for r in results
            for d in r.deliveries
        ],
    )


def _member_rows(
    db: sqlite3.Connection, mailbox: str, keys: Sequence[str]
) -> dict[str, dict[str, tuple[MemberState, float | None]]]:
    found: dict[str, dict[str, tuple[MemberState, float | None]]] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        for key, member, status, attempts, first_try, next_try, claim_until in db.execute(
            "SELECT message_key, member, status, attempts, first_try, next_try, claim_until "
            f"FROM deliveries WHERE mailbox = ? AND message_key IN ({','.join('?' * len(chunk))})",
            [mailbox, *chunk],
        ):
            state = MemberState(Status(status), attempts, first_try, next_try)
            found.setdefault(key, {})[member] = (state, claim_until)
    return found
