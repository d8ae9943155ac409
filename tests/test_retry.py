"""Unit tests for forwarder.retry: what an SMTP reply means for one member. Pure."""

from __future__ import annotations

import pytest

from forwarder.replies import Reply
from forwarder.retry import FIRST_RETRY, MAX_BACKOFF, backoff, classify
from forwarder.state import Delivery, MemberState, Status

MEMBER = "bob@example.org"
ADDRESS = "Bob@Example.org"
NOW = 1_700_000_000.0
DAY = 24 * 3600.0
RETRY_FOR = 5 * DAY


def outcome(
    code: int,
    previous: MemberState | None = None,
    now: float = NOW,
    retry_for: float = RETRY_FOR,
    text: str = "reply text",
) -> Delivery:
    return classify(MEMBER, ADDRESS, Reply(code, text), previous, now, retry_for)


def deferred(attempts: int, first_try: float) -> MemberState:
    return MemberState(Status.DEFERRED, attempts, first_try, first_try + 60.0)


# Reply classes -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [200, 250, 251, 252, 299])
def test_2xx_is_delivered(code):
    result = outcome(code, text="2.0.0 Ok: queued")
    assert result == Delivery(MEMBER, ADDRESS, Status.DELIVERED, code, "2.0.0 Ok: queued")
    assert result.next_try is None


@pytest.mark.parametrize("code", [500, 550, 552, 553, 554, 599])
def test_5xx_is_failed_at_once(code):
    result = outcome(code, text="5.1.1 no such user")
    assert result == Delivery(MEMBER, ADDRESS, Status.FAILED, code, "5.1.1 no such user")
    assert result.next_try is None


@pytest.mark.parametrize("code", [400, 421, 450, 451, 452, 499])
def test_4xx_is_deferred(code):
    result = outcome(code, text="4.2.0 try later")
    assert result.status is Status.DEFERRED
    assert (result.code, result.reply) == (code, "4.2.0 try later")
    assert result.next_try is not None
    assert result.next_try > NOW


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param(250, Status.DELIVERED, id="delivered"),
        pytest.param(451, Status.DEFERRED, id="deferred"),
        pytest.param(550, Status.FAILED, id="failed"),
    ],
)
def test_delivery_names_the_member_and_the_rcpt_address(code, status):
    result = outcome(code)
    assert (result.member, result.address, result.status) == (MEMBER, ADDRESS, status)


@pytest.mark.parametrize(
    ("status", "final"),
    [
        pytest.param(Status.DELIVERED, True, id="delivered"),
        pytest.param(Status.FAILED, True, id="failed"),
        pytest.param(Status.DEFERRED, False, id="deferred"),
    ],
)
def test_only_deferred_is_not_final(status, final):
    assert status.final is final


# Backoff -----------------------------------------------------------------------------


def test_first_deferral_retries_after_60_seconds():
    assert outcome(451).next_try == NOW + 60.0


@pytest.mark.parametrize(
    ("attempts_so_far", "wait"),
    [
        pytest.param(0, 60.0, id="first-failure"),
        pytest.param(1, 120.0, id="second-failure"),
        pytest.param(2, 240.0, id="third-failure"),
        pytest.param(3, 480.0, id="fourth-failure"),
        pytest.param(7, 7680.0, id="eighth-failure"),
        pytest.param(8, 4 * 3600.0, id="ninth-failure-capped"),
        pytest.param(1_000, 4 * 3600.0, id="thousandth-failure-capped"),
        pytest.param(5_000, 4 * 3600.0, id="years-of-failures-capped"),
    ],
)
def test_deferral_waits_longer_after_each_failure(attempts_so_far, wait):
    previous = deferred(attempts_so_far, NOW - 60.0) if attempts_so_far else None
    assert outcome(451, previous).next_try == NOW + wait


def test_backoff_never_shrinks():
    waits = [backoff(n) for n in range(1, 40)]
    assert waits == sorted(waits)
    assert waits[0] == FIRST_RETRY == 60.0
    assert waits[-1] == MAX_BACKOFF


@pytest.mark.parametrize(
    ("attempts", "wait"),
    [
        pytest.param(0, 60.0, id="zero"),
        pytest.param(1, 60.0, id="one"),
        pytest.param(2, 120.0, id="two"),
        pytest.param(5, 960.0, id="five"),
        pytest.param(10_000, MAX_BACKOFF, id="huge"),
    ],
)
def test_backoff_doubles_from_one_minute_up_to_a_cap(attempts, wait):
    assert backoff(attempts) == wait


# Retry deadline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since_first_try", "status"),
    [
        pytest.param(0.0, Status.DEFERRED, id="at-first-try"),
        pytest.param(DAY, Status.DEFERRED, id="one-day"),
        pytest.param(RETRY_FOR - 1.0, Status.DEFERRED, id="just-before-deadline"),
        pytest.param(RETRY_FOR + 1.0, Status.FAILED, id="just-after-deadline"),
        pytest.param(30 * DAY, Status.FAILED, id="long-after-deadline"),
    ],
)
def test_4xx_fails_once_the_retry_deadline_has_passed(since_first_try, status):
    previous = deferred(3, NOW - since_first_try)
    assert outcome(451, previous).status is status


def test_deadline_counts_from_the_first_try_not_the_last():
    # The last try was a minute ago, but the first one was longer ago than retry_for.
    previous = MemberState(Status.DEFERRED, 9, NOW - RETRY_FOR - 60.0, NOW - 60.0)
    assert outcome(451, previous).status is Status.FAILED


def test_deadline_follows_retry_for():
    previous = deferred(1, NOW - 3600.0)
    assert outcome(451, previous, retry_for=3000.0).status is Status.FAILED
    assert outcome(451, previous, retry_for=4000.0).status is Status.DEFERRED


def test_giving_up_keeps_the_code_and_says_why():
    previous = deferred(4, NOW - RETRY_FOR - 1.0)
    result = outcome(452, previous, text="4.2.2 mailbox full")
    assert result.status is Status.FAILED
    assert result.code == 452
    assert "4.2.2 mailbox full" in result.reply
    assert "5 attempts" in result.reply
    assert result.next_try is None


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param(250, Status.DELIVERED, id="2xx-delivered"),
        pytest.param(550, Status.FAILED, id="5xx-failed"),
    ],
)
def test_a_final_reply_after_deferrals_ends_retrying(code, status):
    previous = deferred(3, NOW - DAY)
    result = outcome(code, previous)
    assert result.status is status
    assert result.next_try is None


def test_a_2xx_after_the_deadline_is_still_delivered():
    previous = deferred(20, NOW - 10 * DAY)
    assert outcome(250, previous).status is Status.DELIVERED


# Refusals about the forwarder itself ------------------------------------------------


def test_a_5xx_about_our_sender_is_retried_like_a_4xx() -> None:
    text = "5.7.1 <lists@example.org>: Sender address rejected: not owned by user"
    result = outcome(553, text=text)
    assert result.status is Status.DEFERRED
    assert result.next_try == NOW + FIRST_RETRY


def test_a_5xx_about_relaying_fails_only_after_the_retry_window() -> None:
    first = NOW - RETRY_FOR
    result = outcome(554, deferred(7, first), text="5.7.1 <x@other.example>: Relay access denied")
    assert result.status is Status.FAILED
    assert result.reply.startswith("gave up after 8 attempts")


def test_a_5xx_about_the_member_still_fails_at_once() -> None:
    text = "5.1.1 <bob@example.org>: Recipient address rejected: User unknown"
    assert outcome(550, text=text).status is Status.FAILED
