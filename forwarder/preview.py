"""What a cycle would do with a message, and why, for `once --dry-run` and `explain`. Pure.

A message is parsed and routed by the cycle's own `plan.prepare`; each member of
the matched lists is then given an action (`send` or `skip`) and a reason: left
out by routing (the sender, named in To/Cc), or by what the state store already
knows of that (message, member) delivery, judged as `StateStore.claim` judges it
(new, deferred and due: sent; delivered, failed, deferred until later, pending:
not). Nothing here sends, records or flags anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from forwarder.addresses import normalize
from forwarder.headers import parse_headers, split_message
from forwarder.plan import Message, prepare
from forwarder.reporting import iso
from forwarder.routing import Left, Skip, sources
from forwarder.state import DeliveryRow, Status

SEND = "send"
SKIP = "skip"

# Message actions.
FORWARD = "forward"  # routed to lists: the members' actions say who receives it
NOT_FORWARDED = "skip"  # names no list, a loop, too many hops: left for a person, unread
QUARANTINE = "quarantine"  # cannot be sent as it is: left for a person, flagged
ELSEWHERE = "elsewhere"  # already $Forwarded by someone else: not sent

HEADER_NAMES = {
    "delivered-to": "Delivered-To",
    "x-original-to": "X-Original-To",
    "envelope-to": "Envelope-To",
    "x-envelope-to": "X-Envelope-To",
    "received": "Received (for)",
    "to/cc": "To/Cc",
}
SKIP_TEXT = {
    Skip.UNMATCHED.value: "names no configured list",
    Skip.LOOP.value: "carries an X-Loop: header naming a list (a copy we sent, come back)",
    Skip.TOO_MANY_HOPS.value: "has more than 50 Received: headers (a mail loop)",
}


@dataclass(frozen=True)
class MemberPlan:
    address: str  # as configured
    action: str  # SEND or SKIP
    reason: str  # new, retry | sender, to/cc, delivered, failed, deferred, pending, copy
    detail: str = ""  # for people
    until: str | None = None  # deferred: the next attempt (ISO 8601 UTC)


@dataclass(frozen=True)
class MessagePlan:
    uid: int | None
    message_id: str | None
    sender: str | None
    size: int
    action: str  # FORWARD, NOT_FORWARDED, QUARANTINE, ELSEWHERE
    reason: str | None = None  # why not forwarded, quarantined ...
    matched_by: str = ""
    lists: list[str] = field(default_factory=list)
    members: list[MemberPlan] = field(default_factory=list)
    looked_at: list[dict[str, Any]] = field(default_factory=list)  # {header, addresses}

    @property
    def sends(self) -> int:
        return sum(1 for m in self.members if m.action == SEND)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def routed(
    uid: int | None, raw: bytes, lists: Mapping[str, tuple[str, ...]]
) -> tuple[MessagePlan, Message | None]:
    """Route one message as the cycle does. The plan's members are those routing decides;
    `with_deliveries` then applies what the store knows. Message is None if not forwarded."""
    try:
        message = prepare(uid or 0, raw, lists)
    except Exception as exc:  # the cycle quarantines it: so do we
        reason = str(exc) or type(exc).__name__
        return MessagePlan(uid, None, None, len(raw), QUARANTINE, reason), None
    r = message.route
    looked_at = [
        {"header": HEADER_NAMES[name], "addresses": addresses}
        for name, addresses in sources(parse_headers(split_message(raw)[0]))
    ]
    if r.skip is not None:
        plan = MessagePlan(
            uid,
            message.ident,
            message.sender,
            len(raw),
            NOT_FORWARDED,
            r.skip.value,
            looked_at=looked_at,
        )
        return plan, None
    members = [MemberPlan(a, SEND, "new") for a in r.recipients]
    members += [MemberPlan(a, SKIP, why.value, _left_text(why)) for a, why in r.left_out]
    plan = MessagePlan(
        uid,
        message.ident,
        message.sender,
        len(raw),
        FORWARD,
        matched_by=r.matched_by,
        lists=list(r.lists),
        members=members,
        looked_at=looked_at,
    )
    return plan, message


def _left_text(why: Left) -> str:
    if why is Left.SENDER:
        return "the sender (From:)"
    return "named in To/Cc: received the original directly"


def with_deliveries(
    plan: MessagePlan,
    rows: Mapping[str, DeliveryRow],
    now: float,
    copy_of: int | None = None,
) -> MessagePlan:
    """The members to send to, judged by what the store knows (`rows`: normalised member ->
    its delivery of this message). `copy_of`: an earlier UID of the same message, which
    the cycle sends first (each member receives one copy)."""
    members: list[MemberPlan] = []
    for m in plan.members:
        if m.action != SEND:
            members.append(m)
        elif copy_of is not None:
            text = f"same message as uid {copy_of}: each member receives one copy"
            members.append(MemberPlan(m.address, SKIP, "copy", text))
        else:
            members.append(_judge(m.address, rows.get(normalize(m.address)), now))
    return replace(plan, members=members)


def _judge(address: str, row: DeliveryRow | None, now: float) -> MemberPlan:
    """As `StateStore.claim` decides: new, or deferred and due, is sent."""
    if row is None:
        return MemberPlan(address, SEND, "new")
    last = reply_text(row.code, row.reply)
    when = iso(row.updated)
    if row.status is Status.DELIVERED:
        return MemberPlan(address, SKIP, "delivered", f"already delivered {when} ({last})")
    if row.status is Status.FAILED:
        text = f"failed {when} ({last}); `forwarder retry` puts it back in play"
        return MemberPlan(address, SKIP, "failed", text)
    if row.status is Status.DEFERRED:
        attempt = f"attempt {row.attempts + 1}, last reply {last}"
        if (row.next_try or 0) <= now:
            return MemberPlan(address, SEND, "retry", f"retry ({attempt})")
        until = iso(row.next_try)
        return MemberPlan(address, SKIP, "deferred", f"deferred until {until} ({attempt})", until)
    text = (
        f"pending since {when}: being sent by a running forwarder, or cut off (sent again "
        "once its claim expires)"
    )
    return MemberPlan(address, SKIP, "pending", text)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 message`, `3 messages`."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def reply_text(code: int | None, reply: str) -> str:
    """A server reply on one line."""
    text = " ".join(reply.split())
    return f"{code} {text}".strip() if code is not None else (text or "no reply")


def render(plan: MessagePlan) -> list[str]:
    """The text lines of one message's plan."""
    where = f"uid {plan.uid}" if plan.uid is not None else "message"
    ident = f"<{plan.message_id}>" if plan.message_id else "(no Message-ID)"
    lines = [f"{where}  {ident}  from {plan.sender or '(no From)'}  ({plan.size} bytes)"]
    if plan.action == QUARANTINE:
        lines.append(f"  quarantined, not sent: {plan.reason}")
    elif plan.action == ELSEWHERE:
        lines.append(f"  not sent: {plan.reason}")
    elif plan.action == NOT_FORWARDED:
        lines.append(f"  not forwarded: it {SKIP_TEXT.get(plan.reason or '', plan.reason)}")
        if plan.reason == Skip.UNMATCHED.value:
            lines.append("  looked at, in order:")
            lines += [
                f"    {h['header']}: {', '.join(h['addresses']) or '(none)'}"
                for h in plan.looked_at
            ]
    else:
        lines.append(f"  lists: {', '.join(plan.lists)} (matched by {plan.matched_by})")
        for m in plan.members:
            tail = f"  {m.detail}" if m.detail else ""
            lines.append(f"  {m.action:<4}  {m.address}{tail}")
        if not plan.members:
            lines.append("  no member left to send to")
    return lines


def summary(plans: Sequence[MessagePlan]) -> dict[str, int]:
    """messages; to_send (messages with a delivery to make) and deliveries; nothing_to_send
    (routed, but every member is left out or already has a result); skipped, quarantined,
    elsewhere."""
    counts = dict.fromkeys(
        ("messages", "to_send", "deliveries", "nothing_to_send", "skipped", "quarantined"), 0
    )
    counts["elsewhere"] = 0
    counts["messages"] = len(plans)
    for p in plans:
        if p.action == FORWARD:
            counts["to_send" if p.sends else "nothing_to_send"] += 1
            counts["deliveries"] += p.sends
        else:
            counts[
                {NOT_FORWARDED: "skipped", QUARANTINE: "quarantined"}.get(p.action, p.action)
            ] += 1
    return counts


def render_summary(counts: Mapping[str, int]) -> str:
    c = counts
    return (
        f"{count(c['messages'], 'message')}: {c['to_send']} to send "
        f"({count(c['deliveries'], 'delivery', 'deliveries')}), "
        f"{c['nothing_to_send']} with nothing to send, {c['skipped']} not forwarded, "
        f"{c['quarantined']} quarantined, {c['elsewhere']} already $Forwarded elsewhere"
    )
