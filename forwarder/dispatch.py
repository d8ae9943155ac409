"""Claim, send, commit: the deliveries of one batch of routed messages.

The members of each message are claimed in the state store first, and only the
claims won are sent: with several instances on one store, each (message, member)
goes out once. Copies of one message (same key) are sent in turn, so that a
member two copies are for receives one; different messages go out concurrently
over the SMTP pool. Every reply is committed (group commit) before the message
goes on. After a failed commit nothing more is sent, not even a transaction
that was waiting for a connection of the pool; claims never used are given back,
so those members are due again at once (after a failed commit, once the results
are written: `release_leftovers`).

A send cut off after its final dot has no reply (`replies.no_reply`): it counts as
an attempt, deferred with the back-off and deadline of a 4xx. A send cut off
before it delivered nothing: the relay raises, the cycle stops, and the claims
are given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from email.utils import formatdate

import structlog

from forwarder.addresses import normalize
from forwarder.committer import GroupCommitter
from forwarder.errors import ForwarderError, StateError
from forwarder.esmtp import ehlo_name
from forwarder.mailbox import Mailbox
from forwarder.plan import Message, claim_request, group_by_key
from forwarder.replies import Reply, no_reply
from forwarder.reporting import CycleSummary, Reporter
from forwarder.retry import classify
from forwarder.routing import Route
from forwarder.smtp_pool import SmtpPool
from forwarder.smtp_session import machine_fqdn
from forwarder.state import Claim, MemberState, MessageResult, StateStore, Status

log = structlog.get_logger("forwarder.cycle")
# What a send cut off by the end of the process leaves behind, when found past the deadline.
UNKNOWN = no_reply("the forwarder stopped (killed, or the host went down)")
MAX_RCPT = 100  # recipients per SMTP transaction (RFC 5321 4.5.3.1.8 minimum a server accepts)


class Dispatcher:
    def __init__(
        self,
        mailbox: Mailbox,
        store: StateStore,
        smtp: SmtpPool,
        committer: GroupCommitter,
        reporter: Reporter,
        *,
        owner: str,
        lease: float,
        retry_for: float,
        clock: Callable[[], float],
    ) -> None:
        self.mailbox = mailbox
        self.store = store
        self.smtp = smtp
        self.committer = committer
        self.reporter = reporter
        self.owner = owner
        self.lease = lease
        self.retry_for = retry_for
        self.clock = clock
        self.stopping = False  # set by the daemon: finish the transactions in flight only
        self.leftovers: set[tuple[str, str]] = set()  # claims not given back (a failed commit)

    async def dispatch(
        self, messages: list[Message], summary: CycleSummary
    ) -> tuple[dict[str, dict[str, MemberState]], dict[int, Exception]]:
        """Send `messages`; return every key's member states and the messages that could
        not be sent as they are (to quarantine). Raises on a server or store failure,
        after giving back the claims it did not use."""
        groups = group_by_key(messages)
        requests = [claim_request(copies) for copies in groups.values()]
        now = self.clock()
        claims: list[Claim] = await asyncio.to_thread(
            self.store.claim, self.mailbox.name, requests, self.owner, now, self.lease
        )
        states = {key: dict(c.states) for key, c in zip(groups, claims, strict=True)}
        unused = {(key, m) for key, c in zip(groups, claims, strict=True) for m in c.won}
        broken: dict[int, Exception] = {}
        interrupted = {key: c.interrupted for key, c in zip(groups, claims, strict=True)}
        for copies, claim in zip(groups.values(), claims, strict=True):
            for message in copies:
                message.interrupted = sum(
                    1 for a in message.route.recipients if normalize(a) in claim.interrupted
                )
        renewing = asyncio.create_task(self._renew_claims())
        try:
            outcomes = await asyncio.gather(
                *(
                    self._send_copies(
                        copies, states[key], interrupted[key], unused, now, summary, broken
                    )
                    for key, copies in groups.items()
                ),
                return_exceptions=True,
            )
        finally:
            renewing.cancel()
            if self.committer.failed:  # given back once the results are written
                self.leftovers |= unused
            elif unused:
                try:
                    await asyncio.to_thread(
                        self.store.release, self.mailbox.name, sorted(unused), self.owner
                    )
                except StateError as exc:
                    log.warning("claims_not_released", error=str(exc), count=len(unused))
                else:  # due again at once, not when the claim would have ended
                    for key, member in unused:
                        was = states[key][member]
                        states[key][member] = MemberState(
                            Status.DEFERRED, was.attempts, was.first_try, None
                        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return states, broken

    async def _renew_claims(self) -> None:
        """While the batch is being sent, keep its claims from ending: a send may outlast
        the lease (a large message, a slow server), and another instance must not take a
        claim that is still being used. Stops with the batch, so claims kept after a failed
        commit end on time."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await asyncio.to_thread(self.store.renew, self.owner, self.clock(), self.lease)
            except StateError as exc:  # the commit of the replies will say it too
                log.warning("claims_not_renewed", error=str(exc))

    async def release_leftovers(self) -> None:
        """Give back the claims a failed commit kept (the store is writable again), so that
        those members are due at once rather than counted as cut off."""
        if self.leftovers:
            leftovers, self.leftovers = sorted(self.leftovers), set()
            await asyncio.to_thread(self.store.release, self.mailbox.name, leftovers, self.owner)

    async def _send_copies(
        self,
        copies: list[Message],
        states: dict[str, MemberState],
        interrupted: frozenset[str],
        unused: set[tuple[str, str]],
        now: float,
        summary: CycleSummary,
        broken: dict[int, Exception],
    ) -> None:
        for message in copies:
            with structlog.contextvars.bound_contextvars(uid=message.uid, message_id=message.ident):
                try:
                    await self._send(message, states, interrupted, unused, now, summary)
                except ForwarderError:
                    raise
                except Exception as exc:  # this message cannot be sent as it is
                    broken[message.uid] = exc

    async def _send(
        self,
        message: Message,
        states: dict[str, MemberState],
        interrupted: frozenset[str],
        unused: set[tuple[str, str]],
        now: float,
        summary: CycleSummary,
    ) -> None:
        wanted = [a for a in message.route.recipients if (message.key, normalize(a)) in unused]
        expired = [
            a
            for a in wanted
            if normalize(a) in interrupted and self._gave_up(states.get(normalize(a)), now)
        ]
        if expired:
            # Sends cut off again and again (crashes) until the retry deadline: give up.
            wanted = [a for a in wanted if a not in expired]
            await self._record(message, expired, {}, states, unused, now, summary)
        prefix = self._trace(message.route)
        for start in range(0, len(wanted), MAX_RCPT):
            chunk = wanted[start : start + MAX_RCPT]
            async with self.smtp.session() as relay:
                # Checked once a connection is ours: many messages wait for one, and a
                # commit may fail (or a stop come) while they wait.
                if self.committer.failed:
                    raise StateError("a commit failed: nothing more is sent until it is written")
                if self.stopping:
                    return
                replies = await relay.send(self.mailbox.envelope_sender, chunk, prefix, message.raw)
            await self._record(message, chunk, replies, states, unused, now, summary)

    def _gave_up(self, state: MemberState | None, now: float) -> bool:
        """A member whose send was cut off (its claim expired) past the retry deadline.

        A deferred member (a 4xx, no reply) due past the deadline is tried once more
        instead, and fails on that attempt's refusal (`retry.classify`).
        """
        return (
            state is not None
            and state.status is Status.PENDING
            and state.attempts > 0
            and now - state.first_try >= self.retry_for
        )

    async def _record(
        self,
        message: Message,
        addresses: list[str],
        replies: dict[str, Reply],
        states: dict[str, MemberState],
        unused: set[tuple[str, str]],
        now: float,
        summary: CycleSummary,
    ) -> None:
        for a in addresses:
            unused.discard((message.key, normalize(a)))
        deliveries = tuple(
            classify(
                normalize(a),
                a,
                replies.get(a, UNKNOWN),
                states.get(normalize(a)),
                now,
                self.retry_for,
            )
            for a in addresses
        )
        await self.committer.commit(
            MessageResult(message.key, message.ident, message.route.lists, deliveries)
        )
        for d in deliveries:
            previous = states.get(d.member)
            states[d.member] = MemberState(
                d.status,
                (previous.attempts if previous else 0) + 1,
                previous.first_try if previous else now,
                d.next_try,
            )
            if d.status is Status.DELIVERED:
                message.delivered_to.append(d.address)
            self.reporter.delivery(d, message, summary)

    def _trace(self, decision: Route) -> bytes:
        """The only bytes added to a message: trace and loop lines on top."""
        # This host named as in EHLO (FORWARDER_SMTP_HELO_NAME, else the FQDN, which the
        # relay looked up, in a thread, when it connected).
        host = ehlo_name(self.mailbox.smtp.helo_name, machine_fqdn(), None)
        lines = [f"Received: by {host} (forwarder); {formatdate(self.clock())}\r\n"]
        lines += [f"X-Loop: {address}\r\n" for address in decision.lists]
        return "".join(lines).encode("ascii", "replace")
