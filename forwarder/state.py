"""The state store contract: what was delivered to whom, which messages of a folder were
examined, how cycles went. The embedded SQLite backend is in `sqlite_store`.

Every key starts with the mailbox name, so deduplication and folder progress are
per catch-all. Times are passed in by the caller (`now`): a store never reads its
own clock for what it records (a backend may judge leases by its own clock).

Several writers (instances) may share one store. Sending a (message, member)
delivery is preceded by a claim: `claim` takes the deliveries that are due
(new, deferred and due, or `pending` under an expired claim) for `owner` with a
lease, and the caller sends only what it won. `record_results` is idempotent:
only a delivery still `pending` takes a result, so writing the same results twice
changes nothing.

Several instances also divide the mailboxes among themselves with mailbox leases
(`acquire_mailboxes`, below): one instance works a mailbox at a time, and the
mailboxes of an instance that died are taken over when its leases end. The
delivery claims stay the safety net: even when two instances work one mailbox
(a lease that ended in the middle of a cycle), each (message, member) is sent
once, apart from the ambiguous window (a send cut off before its reply).

Folder progress replaces IMAP keywords as the memory of what was examined:
every message examined gets a `UidRecord` (done, open, skipped, quarantined ...),
and the folder's watermark is the highest UID below which every message has one.
New mail is what lies above the watermark, plus the open records that are due.

The operator commands read deliveries and records (`deliveries`, `uid_records`:
dry run, history) and put deliveries back in play (`requeue`: retry); `baseline`
uses `record_uids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

CYCLES_KEPT = 1000  # cycle records a store keeps per mailbox (the most recent)


class Status(StrEnum):
    PENDING = "pending"  # claimed, about to be sent; under an expired claim = outcome unknown
    DELIVERED = "delivered"  # the server answered 2xx after DATA
    DEFERRED = "deferred"  # 4xx or no reply: tried again later, until the retry deadline
    FAILED = "failed"  # 5xx, or deferred past the deadline: final

    @property
    def final(self) -> bool:
        return self in (Status.DELIVERED, Status.FAILED)


class UidState(StrEnum):
    """What became of one message of the folder."""

    DONE = "done"  # every member's result is final, none failed
    FAILED = "failed"  # every result is final, at least one member failed
    OPEN = "open"  # some member is deferred (or claimed elsewhere): looked at again when due
    SKIPPED = "skipped"  # names no list, a loop, too many hops
    QUARANTINED = "quarantined"  # unreadable or unsendable as it is: left for a person
    BASELINE = "baseline"  # marked handled without sending (`baseline`, UIDVALIDITY change)
    ELSEWHERE = "elsewhere"  # already marked $Forwarded by someone else: not sent
    GONE = "gone"  # expunged from the folder while still open

    @property
    def final(self) -> bool:
        return self is not UidState.OPEN


@dataclass(frozen=True)
class Delivery:
    """The outcome of one (message, member) delivery attempt."""

    member: str  # normalised member address (the key)
    address: str  # the address given in RCPT TO
    status: Status
    code: int | None = None
    reply: str = ""
    next_try: float | None = None


@dataclass(frozen=True)
class MessageResult:
    """Every delivery of one SMTP transaction, committed together."""

    message_key: str
    message_id: str | None
    lists: tuple[str, ...]
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class MemberState:
    status: Status
    attempts: int
    first_try: float
    next_try: float | None


@dataclass(frozen=True)
class ClaimRequest:
    """One message and the members it is for: claim those that are due."""

    message_key: str
    message_id: str | None
    sender: str | None  # the message's sender address, for history
    lists: tuple[str, ...]
    members: tuple[tuple[str, str], ...]  # (normalised member, address as configured)


@dataclass(frozen=True)
class Claim:
    """The answer to one ClaimRequest."""

    states: dict[str, MemberState]  # every requested member's state after the claim
    won: frozenset[str] = frozenset()  # members this owner may send to now
    interrupted: frozenset[str] = frozenset()  # won members whose earlier send was cut off


@dataclass(frozen=True)
class UidRecord:
    uid: int
    state: UidState
    message_key: str | None = None
    message_id: str | None = None
    reason: str | None = None
    due: float | None = None  # OPEN: when to look at it again (None: at once)
    updated: float | None = None  # when it was last written (filled by `uid_records` only)


@dataclass(frozen=True)
class FolderState:
    uidvalidity: int
    watermark: int  # every UID <= watermark has a record (or was expunged)
    complete_through: float | None  # start of the last cycle that examined all it found


@dataclass(frozen=True)
class CycleRecord:
    started: float
    finished: float
    outcome: str
    messages: int = 0
    forwarded: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0
    error: str | None = None
    quarantined: int = 0


@dataclass(frozen=True)
class DeliveryRow:
    """One (message, member) delivery as the store keeps it, for status and history."""

    mailbox: str
    message_key: str
    message_id: str | None
    sender: str | None
    member: str
    address: str
    status: Status
    code: int | None
    reply: str
    attempts: int
    first_try: float
    next_try: float | None
    updated: float
    lists: tuple[str, ...]


@dataclass(frozen=True)
class DeliveryQuery:
    """Which deliveries `StateStore.deliveries` returns: every field given must match
    (an empty tuple or None matches anything)."""

    message_keys: tuple[str, ...] = ()  # the message key is one of these
    message_id: str | None = None  # normalised Message-ID (as `headers.message_id` gives)
    member: str | None = None  # normalised member address (`addresses.normalize`)
    list_address: str | None = None  # one of the lists the message was sent to
    statuses: tuple[Status, ...] = ()  # the status is one of these
    since: float | None = None  # last written (`DeliveryRow.updated`) at or after


@dataclass(frozen=True)
class Requeued:
    """What `StateStore.requeue` changed."""

    deliveries: tuple[tuple[str, str], ...]  # (message_key, member) put back in play
    reopened: tuple[UidRecord, ...]  # the UID records reopened, as they were before


@dataclass(frozen=True)
class StoreReport:
    """What `forwarder status` shows, read in one consistent snapshot."""

    last_cycle: CycleRecord | None
    cycles: int
    deliveries: dict[str, int]  # status -> (message, member) rows
    forwarded_per_list: dict[str, int]  # list -> messages every member of which has a result
    uids: dict[str, int]  # UidState -> messages (skipped, quarantined ... by reason below)
    skipped: dict[str, int]  # reason -> messages
    deferred: list[DeliveryRow] = field(default_factory=list)
    failed: list[DeliveryRow] = field(default_factory=list)
    failed_total: int = 0


class StateStore(Protocol):
    """What the cycle, `status` and the operator commands need from a state store.

    Every write is durable when it returns; a failed write raises StateError and
    changes nothing.
    """

    # Deliveries -------------------------------------------------------------------
    def claim(
        self,
        mailbox: str,
        requests: Sequence[ClaimRequest],
        owner: str,
        now: float,
        lease: float,
    ) -> list[Claim]: ...

    def renew(self, owner: str, now: float, lease: float) -> None: ...

    def release(self, mailbox: str, keys: Sequence[tuple[str, str]], owner: str) -> None: ...

    def record_results(
        self, mailbox: str, results: Sequence[MessageResult], now: float
    ) -> None: ...

    # Folder progress --------------------------------------------------------------
    def folder(self, mailbox: str, uidvalidity: int) -> FolderState | None: ...

    def last_folder(self, mailbox: str) -> FolderState | None: ...

    def open_uids(self, mailbox: str, uidvalidity: int, now: float) -> list[int]: ...

    def unmarked_uids(self, mailbox: str, uidvalidity: int) -> list[UidRecord]: ...

    def record_uids(
        self,
        mailbox: str,
        uidvalidity: int,
        records: Sequence[UidRecord],
        now: float,
        *,
        watermark: int | None = None,
        complete_through: float | None = None,
        marked: Sequence[int] = (),
    ) -> None: ...

    # Mailbox leases ----------------------------------------------------------------
    def acquire_mailboxes(
        self, owner: str, names: Sequence[str], now: float, ttl: float
    ) -> set[str]:
        """The mailboxes among `names` that `owner` may work now: the heartbeat of an instance.

        Renews the leases `owner` holds and takes free or expired ones, up to a fair
        share: with k live instances (those whose last call is less than `ttl` old),
        each holds at most ceil(len(names) / k), and an instance above its share gives
        the surplus back, so that k instances on n mailboxes settle on about n/k each
        within two calls of each. A lease lasts `ttl` seconds (FORWARDER_TAKEOVER_AFTER)
        from the call, judged by the backend's clock; an owner that stops calling loses
        its mailboxes to the others' next call after that.

        The caller works only the mailboxes returned; calls it at least every ttl/3
        (independently of how long a cycle lasts); stops starting cycles on a mailbox
        that is no longer returned (a cycle already running may finish: the claims
        keep its deliveries single). `now` is the caller's clock, for the record only.
        A store used by one process (SQLite) returns every name.
        """
        ...

    def release_mailboxes(self, owner: str) -> None:
        """A clean stop: give back every mailbox `owner` holds, so that the other instances
        take them at their next `acquire_mailboxes` instead of after the leases end."""
        ...

    # Reporting ----------------------------------------------------------------------
    def record_cycle(self, mailbox: str, cycle: CycleRecord) -> None: ...

    def prune(self, before: float) -> int: ...

    def report(self, mailbox: str | None, failed_limit: int) -> StoreReport: ...

    # Operator commands (dry run, history, retry) ---------------------------------------
    def deliveries(
        self, mailbox: str | None, query: DeliveryQuery, limit: int | None = None
    ) -> list[DeliveryRow]:
        """The deliveries matching `query` (of every mailbox when `mailbox` is None), most
        recently written first (`updated` descending, then message_key, member); at most
        `limit` rows. Read-only: works on a store opened `readonly`."""
        ...

    def uid_records(
        self,
        mailbox: str,
        uidvalidity: int,
        *,
        uids: Sequence[int] = (),
        message_keys: Sequence[str] = (),
        message_id: str | None = None,
    ) -> list[UidRecord]:
        """The records of folder (mailbox, uidvalidity) whose UID is in `uids`, OR whose
        message_key is in `message_keys`, OR whose message_id equals `message_id`; ordered
        by UID, each with `updated` filled in. Read-only."""
        ...

    def requeue(
        self,
        mailbox: str,
        uidvalidity: int,
        deliveries: Sequence[tuple[str, str]],
        uids: Sequence[int],
        now: float,
    ) -> Requeued:
        """Put deliveries back in play and reopen their messages, in one transaction.

        Each (message_key, member) of `deliveries` whose status is `failed` or `deferred`
        becomes `deferred` and due at once: next_try = first_try = updated = `now` (a new
        retry window), attempts, code and reply kept. Others (delivered, pending, unknown)
        are left as they are. Then every record of folder (mailbox, uidvalidity) whose
        message_key had a delivery put back, or whose UID is in `uids`, becomes OPEN with
        no due time and no reason, so that the next cycle fetches the message again.
        Returns what changed; the reopened records as they were before.
        """
        ...

    def deferred_counts(self) -> dict[str, int]:
        """Deliveries waiting for a retry now, per mailbox (mailboxes with none are left
        out). Cheap enough for every metrics scrape: only deliveries in play are read."""
        ...

    def close(self) -> None: ...
