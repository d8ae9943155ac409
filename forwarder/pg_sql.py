"""The SQL the PostgreSQL store runs for claims, results and message records.

Deliveries are addressed by (mailbox, message key, member) pairs passed as two
arrays (`PAIRS`); lease ends are judged by the database clock (`LEASE`).
"""

from __future__ import annotations

LEASE = "clock_timestamp() + %(lease)s * interval '1 second'"
PAIRS = "unnest(%(keys)s::text[], %(members)s::text[]) AS r(k, m)"
INSERT_NEW = f"""
INSERT INTO forwarder.deliveries AS d (mailbox, message_key, member, address, status, attempts,
    first_try, updated, lists, message_id, sender, claim_owner, claim_until)
SELECT %(mailbox)s, r.k, r.m, r.a, 'pending', 0, %(now)s, %(now)s, r.l, r.i, r.s, %(owner)s,
    {LEASE}
FROM unnest(%(keys)s::text[], %(members)s::text[], %(addresses)s::text[], %(lists)s::text[],
    %(ids)s::text[], %(senders)s::text[]) WITH ORDINALITY AS r(k, m, a, l, i, s, n)
ORDER BY r.n
ON CONFLICT DO NOTHING
RETURNING d.message_key, d.member, 'new'
"""
# Each (message, member) is looked up by its primary key in a LATERAL subquery (LIMIT 1
# keeps the planner from turning it into a join that scans the mailbox's rows: it would,
# on a young table whose statistics say it is small), and updated by its row address.
# Deferred and due, or pending under an expired claim: locked, or skipped if another
# instance is claiming it right now.
TAKE_DUE = f"""
WITH due AS (
    SELECT t.ctid AS row, t.status AS was FROM {PAIRS}
    CROSS JOIN LATERAL (
        SELECT d.ctid, d.status FROM forwarder.deliveries d
        WHERE d.mailbox = %(mailbox)s AND d.message_key = r.k AND d.member = r.m
        AND ((d.status = 'deferred' AND coalesce(d.next_try, 0) <= %(now)s)
            OR (d.status = 'pending'
                AND coalesce(d.claim_until, '-infinity') < clock_timestamp()))
        LIMIT 1 FOR UPDATE SKIP LOCKED
    ) AS t
)
UPDATE forwarder.deliveries d SET status = 'pending', updated = %(now)s,
    attempts = d.attempts + (due.was = 'pending')::int, claim_owner = %(owner)s,
    claim_until = {LEASE}
FROM due WHERE d.ctid = due.row
RETURNING d.message_key, d.member, due.was
"""
STATES = f"""
SELECT r.k, r.m, t.status, t.attempts, t.first_try, t.next_try FROM {PAIRS}
CROSS JOIN LATERAL (
    SELECT d.status, d.attempts, d.first_try, d.next_try FROM forwarder.deliveries d
    WHERE d.mailbox = %(mailbox)s AND d.message_key = r.k AND d.member = r.m LIMIT 1
) AS t
"""
# Locked first (in key order), so that the row address is the current version's.
RESULTS = """
WITH r AS (
    SELECT t.ctid AS row, r.status, r.code, r.reply, r.next_try
    FROM unnest(%(keys)s::text[], %(members)s::text[], %(statuses)s::text[],
        %(codes)s::int[], %(replies)s::text[], %(next_tries)s::float8[])
        AS r(k, m, status, code, reply, next_try)
    CROSS JOIN LATERAL (
        SELECT d.ctid FROM forwarder.deliveries d
        WHERE d.mailbox = %(mailbox)s AND d.message_key = r.k AND d.member = r.m
        AND d.status = 'pending' LIMIT 1 FOR UPDATE
    ) AS t
)
UPDATE forwarder.deliveries d SET status = r.status, code = r.code, reply = r.reply,
    attempts = d.attempts + 1, next_try = r.next_try, updated = %(now)s,
    claim_owner = NULL, claim_until = NULL
FROM r WHERE d.ctid = r.row
"""
UIDS = """
INSERT INTO forwarder.uids AS u (mailbox, uidvalidity, uid, state, message_key, message_id,
    reason, due, updated, marked)
SELECT %(mailbox)s, %(uidvalidity)s, r.uid, r.state, r.k, r.i, r.reason, r.due, %(now)s, false
FROM unnest(%(uids)s::bigint[], %(states)s::text[], %(keys)s::text[], %(ids)s::text[],
    %(reasons)s::text[], %(dues)s::float8[]) AS r(uid, state, k, i, reason, due)
ON CONFLICT (mailbox, uidvalidity, uid) DO UPDATE SET state = excluded.state,
    message_key = excluded.message_key, message_id = excluded.message_id,
    reason = excluded.reason, due = excluded.due, updated = excluded.updated, marked = false
"""
