"""What an SMTP reply means for one member: delivered, deferred until when, or failed. Pure.

A permanent refusal fails the member at once, unless it is about the forwarder
itself (its envelope sender, login or relay permission: `forwarder.replies`).
Given to every recipient of a transaction such a refusal stops the cycle
(`SubmissionRefused`); given to some only, it is retried like a 4xx, since the
fix is a configuration change, not the member's.
"""

from __future__ import annotations

from forwarder.replies import Reply
from forwarder.state import Delivery, MemberState, Status

FIRST_RETRY = 60.0
MAX_BACKOFF = 4 * 3600.0


def backoff(attempts: int) -> float:
    """Seconds to wait after `attempts` failed tries: 1 min, 2, 4 ... capped at 4 hours."""
    exponent = min(max(attempts - 1, 0), 64)  # 2 ** 1024 would overflow a float
    return float(min(FIRST_RETRY * 2**exponent, MAX_BACKOFF))


def classify(
    member: str,
    address: str,
    reply: Reply,
    previous: MemberState | None,
    now: float,
    retry_for: float,
) -> Delivery:
    if reply.accepted:
        return Delivery(member, address, Status.DELIVERED, reply.code, reply.text)
    if not reply.transient and not reply.about.ours:
        return Delivery(member, address, Status.FAILED, reply.code, reply.text)
    attempts = (previous.attempts if previous else 0) + 1
    first_try = previous.first_try if previous else now
    if now - first_try >= retry_for:
        text = f"gave up after {attempts} attempts: {reply.text}"
        return Delivery(member, address, Status.FAILED, reply.code, text)
    return Delivery(
        member, address, Status.DEFERRED, reply.code, reply.text, next_try=now + backoff(attempts)
    )
