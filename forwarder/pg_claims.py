"""Claims on PostgreSQL: the (message, member) deliveries an instance is about to send,
won with the database's own tools (see `forwarder.pg_store`); the SQL is in `pg_sql`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forwarder import pg_sql
from forwarder.pg_connect import Connection, Pool, text
from forwarder.state import Claim, ClaimRequest, MemberState, Status


def claim(
    pool: Pool,
    mailbox: str,
    requests: Sequence[ClaimRequest],
    owner: str,
    now: float,
    lease: float,
) -> list[Claim]:
    """`StateStore.claim` on PostgreSQL: new rows inserted, due ones taken, in one
    transaction; a claim is won by the instance whose row or lock it is."""
    # Each (message, member) once, in key order: two instances claiming overlapping
    # sets take their row locks in the same order.
    pairs: dict[tuple[str, str], tuple[str, ClaimRequest]] = {}
    for request in requests:
        for member, address in request.members:
            pairs.setdefault((request.message_key, member), (address, request))
    ordered = sorted(pairs)
    keys = [text(k) for k, _ in ordered]
    members = [text(m) for _, m in ordered]
    params: dict[str, Any] = {
        "mailbox": mailbox,
        "now": now,
        "owner": owner,
        "lease": lease,
        "keys": keys,
        "members": members,
    }

    def body(conn: Connection) -> tuple[dict[tuple[str, str], str], dict[Any, MemberState]]:
        insert = {
            **params,
            "addresses": [text(pairs[p][0]) for p in ordered],
            "lists": [text(",".join(pairs[p][1].lists)) for p in ordered],
            "ids": [text(pairs[p][1].message_id) for p in ordered],
            "senders": [text(pairs[p][1].sender) for p in ordered],
        }
        # Sent together (pipeline), run in order: new rows, due rows, then every state.
        new, due, found = (
            conn.execute(pg_sql.INSERT_NEW, insert),
            conn.execute(pg_sql.TAKE_DUE, params),
            conn.execute(pg_sql.STATES, params),
        )
        won = {(k, m): was for k, m, was in [*new.fetchall(), *due.fetchall()]}
        states = {
            (k, m): MemberState(Status(status), attempts, first_try, next_try)
            for k, m, status, attempts, first_try, next_try in found.fetchall()
        }
        return won, states

    won, states = pool.run("claiming deliveries", body) if ordered else ({}, {})
    claims: list[Claim] = []
    given: set[tuple[str, str]] = set()
    for request in requests:
        mine: dict[str, MemberState] = {}
        taken: set[str] = set()
        interrupted: set[str] = set()
        for member, _ in request.members:
            pair = (text(request.message_key), text(member))
            state = states.get(pair)
            if state is None:
                continue  # forgotten (pruned) meanwhile: due again at the next cycle
            if pair in won and pair not in given:
                given.add(pair)
                taken.add(member)
                if won[pair] == Status.PENDING:
                    interrupted.add(member)
                    state = MemberState(state.status, state.attempts, state.first_try, None)
            mine[member] = state
        claims.append(Claim(mine, frozenset(taken), frozenset(interrupted)))
    return claims
