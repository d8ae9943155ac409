"""Mailbox leases on PostgreSQL: which instance works which mailbox.

Every instance calls `acquire` as its heartbeat. Under one transaction-level
advisory lock (acquisitions are short and rare, so serialising them costs
nothing and rules out every race between two instances), it:

1. records the instance as alive until the database clock + ttl;
2. counts the live instances, and so its fair share: ceil(mailboxes / instances);
3. renews the leases it holds (expired ones too, if nobody took them meanwhile) that
   have less than 2/3 of the ttl left: with a beat every few seconds, a thousand
   mailboxes are not rewritten at every beat (the caller trusts a lease for 2/3 of
   the ttl after a beat, so never past its end);
4. gives back those above its share (a newcomer takes them at its next call), or
   takes free and expired ones up to its share.

So two instances on 10 mailboxes hold 5 each after at most two heartbeats each,
and the mailboxes of an instance that stopped calling are taken over by the
others at their first heartbeat after its leases end (ttl after its last one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from forwarder.pg_connect import Connection

# pg_advisory_xact_lock key of the mailbox leases: 'fwd' 'lease' in ASCII.
LEASE_LOCK = 0x667764_6C65617365
_UNTIL = "clock_timestamp() + %(ttl)s * interval '1 second'"
_RENEW_BELOW = "clock_timestamp() + %(ttl)s * interval '0.6667 second'"


def acquire(conn: Connection, owner: str, names: Sequence[str], now: float, ttl: float) -> set[str]:
    """The mailboxes among `names` that `owner` holds now, for ttl seconds (see above)."""
    args = {"owner": owner, "names": list(names), "now": now, "ttl": ttl}
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LEASE_LOCK,))
    conn.execute(
        "INSERT INTO forwarder.instances (owner, started, until) "
        f"VALUES (%(owner)s, %(now)s, {_UNTIL}) "
        "ON CONFLICT (owner) DO UPDATE SET until = excluded.until",
        args,
    )
    conn.execute("DELETE FROM forwarder.instances WHERE until < clock_timestamp()")
    conn.execute(
        "DELETE FROM forwarder.mailbox_leases WHERE until < clock_timestamp() "
        "AND owner <> %(owner)s",
        args,
    )
    row = conn.execute("SELECT count(*) FROM forwarder.instances").fetchone()
    live = max(int(row[0]) if row else 1, 1)
    held: dict[str, str] = dict(
        conn.execute(
            "SELECT mailbox, owner FROM forwarder.mailbox_leases WHERE mailbox = ANY(%(names)s)",
            args,
        ).fetchall()
    )
    mine = sorted(name for name in names if held.get(name) == owner)
    free = [name for name in names if name not in held]
    share = math.ceil(len(names) / live)
    keep = (mine + free)[:share] if len(mine) < share else mine[:share]
    if surplus := [name for name in mine if name not in keep]:
        conn.execute(
            "DELETE FROM forwarder.mailbox_leases WHERE owner = %(owner)s "
            "AND mailbox = ANY(%(surplus)s)",
            {**args, "surplus": surplus},
        )
    if keep:
        conn.execute(
            "INSERT INTO forwarder.mailbox_leases AS l (mailbox, owner, since, until) "
            f"SELECT unnest(%(keep)s::text[]), %(owner)s, %(now)s, {_UNTIL} "
            "ON CONFLICT (mailbox) DO UPDATE SET owner = excluded.owner, "
            "until = excluded.until, "
            "since = CASE WHEN l.owner = excluded.owner THEN l.since ELSE excluded.since END "
            # a lease with more than 2/3 of its time left is not rewritten at every beat
            f"WHERE l.owner <> excluded.owner OR l.until < {_RENEW_BELOW}",
            {**args, "keep": keep},
        )
    return set(keep)


def release(conn: Connection, owner: str) -> None:
    """A clean stop: the others take this owner's mailboxes at their next heartbeat."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LEASE_LOCK,))
    conn.execute("DELETE FROM forwarder.mailbox_leases WHERE owner = %s", (owner,))
    conn.execute("DELETE FROM forwarder.instances WHERE owner = %s", (owner,))
