"""The PostgreSQL state store's schema, versioned, and its migrations.

Everything lives in the `forwarder` schema of the database, so the forwarder can
share a database with other applications. The version is in `forwarder.meta`
(key `schema`). Migrations run in order, inside one transaction, under a
transaction-level advisory lock: two instances starting together do not both
migrate (the second waits, then finds the schema up to date), and a failed
migration leaves the database as it was.

Times the caller passes in (`now`) are epoch seconds (`double precision`); lease
ends are `timestamptz`, judged by the database clock (`clock_timestamp()`), so
that instances on machines whose clocks differ agree on when a lease ends.
"""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMA = "forwarder"
# pg_advisory_xact_lock key of the migrations: a fixed number, 'fwd' 'schema' in ASCII.
MIGRATION_LOCK = 0x667764_736368656D

_V1 = """
CREATE TABLE forwarder.deliveries (
    mailbox text NOT NULL,
    message_key text NOT NULL,
    member text NOT NULL,
    address text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'delivered', 'deferred', 'failed')),
    code integer,
    reply text NOT NULL DEFAULT '',
    attempts integer NOT NULL DEFAULT 0,
    first_try double precision NOT NULL,
    next_try double precision,
    updated double precision NOT NULL,
    lists text NOT NULL,
    message_id text,
    sender text,
    claim_owner text,
    claim_until timestamptz,
    PRIMARY KEY (mailbox, message_key, member)
);
-- Only rows still in play are indexed by state: delivered rows never enter these.
CREATE INDEX deliveries_due ON forwarder.deliveries (next_try)
    WHERE status IN ('pending', 'deferred');
CREATE INDEX deliveries_claims ON forwarder.deliveries (claim_owner) WHERE status = 'pending';
CREATE INDEX deliveries_updated ON forwarder.deliveries (updated);
CREATE INDEX deliveries_message_id ON forwarder.deliveries (message_id);
CREATE INDEX deliveries_member ON forwarder.deliveries (member);
CREATE TABLE forwarder.folders (
    mailbox text NOT NULL,
    uidvalidity bigint NOT NULL,
    watermark bigint NOT NULL,
    complete_through double precision,
    created double precision NOT NULL,
    updated double precision NOT NULL,
    PRIMARY KEY (mailbox, uidvalidity)
);
CREATE TABLE forwarder.uids (
    mailbox text NOT NULL,
    uidvalidity bigint NOT NULL,
    uid bigint NOT NULL,
    state text NOT NULL,
    message_key text,
    message_id text,
    reason text,
    due double precision,
    updated double precision NOT NULL,
    marked boolean NOT NULL DEFAULT false,
    PRIMARY KEY (mailbox, uidvalidity, uid)
);
CREATE INDEX uids_open ON forwarder.uids (mailbox, uidvalidity, due) WHERE state = 'open';
CREATE INDEX uids_unmarked ON forwarder.uids (mailbox, uidvalidity)
    WHERE NOT marked AND state IN ('done', 'failed', 'quarantined');
CREATE INDEX uids_updated ON forwarder.uids (updated);
CREATE TABLE forwarder.cycles (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox text NOT NULL,
    started double precision NOT NULL,
    finished double precision NOT NULL,
    outcome text NOT NULL,
    messages integer NOT NULL,
    forwarded integer NOT NULL,
    delivered integer NOT NULL,
    deferred integer NOT NULL,
    failed integer NOT NULL,
    skipped integer NOT NULL,
    quarantined integer NOT NULL DEFAULT 0,
    error text
);
CREATE INDEX cycles_mailbox ON forwarder.cycles (mailbox, id);
-- Instances alive (their last heartbeat) and who works which mailbox.
CREATE TABLE forwarder.instances (
    owner text PRIMARY KEY,
    started double precision NOT NULL,
    until timestamptz NOT NULL
);
CREATE TABLE forwarder.mailbox_leases (
    mailbox text PRIMARY KEY,
    owner text NOT NULL,
    since double precision NOT NULL,
    until timestamptz NOT NULL
);
CREATE INDEX mailbox_leases_owner ON forwarder.mailbox_leases (owner);
"""

# (version, DDL): applied in order to reach VERSION. Never edit a released one: add the next.
MIGRATIONS: tuple[tuple[int, str], ...] = ((1, _V1),)
VERSION = MIGRATIONS[-1][0]


class SchemaError(Exception):
    """The database holds a schema this forwarder cannot use."""


def version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the database (0: no forwarder schema yet)."""
    row = conn.execute("SELECT to_regclass('forwarder.meta') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT value FROM forwarder.meta WHERE key = 'schema'").fetchone()
    return int(found[0]) if found else 0


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the database to VERSION inside the caller's transaction; the version found.

    Raises SchemaError when the database is newer than this forwarder.
    """
    if version(conn) == VERSION:  # the usual case: no lock needed
        return VERSION
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    found = conn.execute("SELECT to_regnamespace('forwarder') IS NOT NULL").fetchone()
    if not found or not found[0]:  # a schema made by the DBA needs no CREATE on the database
        conn.execute("CREATE SCHEMA forwarder")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS forwarder.meta (key text PRIMARY KEY, value text NOT NULL)"
    )
    current = version(conn)  # again, under the lock: another instance may have migrated
    if current > VERSION:
        raise SchemaError(
            f"schema version {current} is newer than this forwarder's ({VERSION}); "
            "upgrade the forwarder"
        )
    for number, ddl in MIGRATIONS:
        if number > current:
            for statement in ddl.split(";"):
                if statement.strip():
                    conn.execute(statement)
    conn.execute(
        "INSERT INTO forwarder.meta (key, value) VALUES ('schema', %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(VERSION),),
    )
    return current
