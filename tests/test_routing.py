"""Unit tests for forwarder.routing: which lists a message reached and who receives it. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.headers import Headers, parse_headers
from forwarder.routing import MAX_RECEIVED, Left, Route, Skip, route, sources

# Normalised list address -> members as configured (nested lists already expanded).
LISTS: dict[str, tuple[str, ...]] = {
    "team@example.org": ("alice@example.org", "Bob@Example.org", "carol@example.org"),
    "ops@example.org": ("carol@example.org", "dave@example.org"),
    "board@example.org": ("erin@example.org",),
}
ALL_MEMBERS = frozenset(m for members in LISTS.values() for m in members)
TEAM = LISTS["team@example.org"]
OPS = LISTS["ops@example.org"]
BOARD = LISTS["board@example.org"]

CATCH_ALL = "catchall@example.org"
OUTSIDER = "zed@elsewhere.net"


def headers(*fields: tuple[str, str]) -> Headers:
    """A parsed header block made of (name, value) fields, in order."""
    block = "\r\n".join(f"{name}: {value}" for name, value in fields)
    return parse_headers(block.encode("utf-8"))


def received_for(address: str) -> tuple[str, str]:
    return ("Received", f"from mx.example.net by mail.example.org for <{address}>; Mon, 1 Jan")


# Which lists: the envelope sources ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "matched_by"),
    [
        pytest.param(("Delivered-To", "team@example.org"), "delivered-to", id="delivered-to"),
        pytest.param(("X-Original-To", "team@example.org"), "x-original-to", id="x-original-to"),
        pytest.param(("Envelope-To", "team@example.org"), "envelope-to", id="envelope-to"),
        pytest.param(("X-Envelope-To", "team@example.org"), "x-envelope-to", id="x-envelope-to"),
        pytest.param(received_for("team@example.org"), "received", id="received-for"),
        pytest.param(("To", "team@example.org"), "to/cc", id="to"),
        pytest.param(("Cc", "team@example.org"), "to/cc", id="cc"),
    ],
)
def test_route_finds_a_list_named_by_each_source(field, matched_by):
    result = route(headers(("From", OUTSIDER), field), LISTS)
    assert result.skip is None
    assert result.lists == ("team@example.org",)
    assert result.matched_by == matched_by


@pytest.mark.parametrize(
    ("earlier", "later", "matched_by"),
    [
        pytest.param(
            ("Delivered-To", "team@example.org"),
            ("X-Original-To", "ops@example.org"),
            "delivered-to",
            id="delivered-to-before-x-original-to",
        ),
        pytest.param(
            ("X-Original-To", "team@example.org"),
            ("Envelope-To", "ops@example.org"),
            "x-original-to",
            id="x-original-to-before-envelope-to",
        ),
        pytest.param(
            ("Envelope-To", "team@example.org"),
            ("X-Envelope-To", "ops@example.org"),
            "envelope-to",
            id="envelope-to-before-x-envelope-to",
        ),
        pytest.param(
            ("X-Envelope-To", "team@example.org"),
            received_for("ops@example.org"),
            "x-envelope-to",
            id="x-envelope-to-before-received",
        ),
        pytest.param(
            received_for("team@example.org"),
            ("To", "ops@example.org"),
            "received",
            id="received-before-to",
        ),
        pytest.param(
            ("Delivered-To", "team@example.org"),
            ("Cc", "ops@example.org"),
            "delivered-to",
            id="delivered-to-before-cc",
        ),
    ],
)
def test_route_takes_the_first_source_naming_a_list(earlier, later, matched_by):
    # The field order in the message is irrelevant: the later source is written first.
    result = route(headers(later, earlier), LISTS)
    assert result.lists == ("team@example.org",)
    assert result.matched_by == matched_by


@pytest.mark.parametrize(
    ("fields", "matched_by"),
    [
        pytest.param(
            [("Delivered-To", CATCH_ALL), ("X-Original-To", "team@example.org")],
            "x-original-to",
            id="delivered-to-names-the-catch-all",
        ),
        pytest.param(
            [("Delivered-To", "garbage"), ("Envelope-To", "team@example.org")],
            "envelope-to",
            id="delivered-to-is-not-an-address",
        ),
        pytest.param(
            [("Delivered-To", ""), received_for("team@example.org")],
            "received",
            id="delivered-to-is-empty",
        ),
        pytest.param(
            [received_for(CATCH_ALL), ("To", "team@example.org")],
            "to/cc",
            id="received-names-the-catch-all",
        ),
    ],
)
def test_route_passes_over_sources_that_name_no_list(fields, matched_by):
    result = route(headers(*fields), LISTS)
    assert result.lists == ("team@example.org",)
    assert result.matched_by == matched_by


def test_route_trusts_only_the_topmost_of_a_repeated_envelope_header():
    # The lower one was in the message before final delivery: a sender may have written it.
    fields = [("Delivered-To", CATCH_ALL), ("Delivered-To", "team@example.org")]
    assert route(headers(*fields), LISTS).skip is Skip.UNMATCHED


def test_route_ignores_envelope_headers_below_the_second_received_header():
    fields = [
        ("Received", "by mx.example.org; Mon, 1 Jan"),
        ("Received", "by submission.example.net; Mon, 1 Jan"),
        ("X-Original-To", "ops@example.org"),
        ("To", "team@example.org"),
    ]
    assert route(headers(*fields), LISTS).lists == ("team@example.org",)


def test_route_reads_only_the_topmost_received_header():
    fields = [
        ("Received", "from a by mail.example.org; Mon, 1 Jan"),
        received_for("ops@example.org"),
        ("To", "team@example.org"),
    ]
    result = route(headers(*fields), LISTS)
    assert result.lists == ("team@example.org",)
    assert result.matched_by == "to/cc"


def test_route_prefers_the_envelope_over_visible_list_addresses():
    # Sent To: team, Cc: ops; this copy was delivered for ops only.
    fields = [
        ("Delivered-To", "ops@example.org"),
        ("To", "team@example.org"),
        ("Cc", "ops@example.org"),
    ]
    result = route(headers(*fields), LISTS)
    assert result.lists == ("ops@example.org",)
    assert result.matched_by == "delivered-to"


def test_route_finds_a_list_reached_only_through_bcc():
    fields = [
        ("From", OUTSIDER),
        ("To", "friend@elsewhere.net"),
        ("X-Original-To", "ops@example.org"),
    ]
    result = route(headers(*fields), LISTS)
    assert result.lists == ("ops@example.org",)
    assert result.recipients == OPS


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param("Team@Example.ORG", id="case"),
        pytest.param("team+urgent@example.org", id="plus-detail"),
        pytest.param("Team+Urgent@EXAMPLE.org", id="case-and-detail"),
        pytest.param("<team@example.org>", id="brackets"),
        pytest.param('"The Team" <team@example.org>', id="display-name"),
    ],
)
@pytest.mark.parametrize("name", ["Delivered-To", "To"])
def test_route_matches_list_addresses_case_insensitively_and_without_detail(name, spelling):
    assert route(headers((name, spelling)), LISTS).lists == ("team@example.org",)


def test_route_matches_several_lists_named_by_one_source():
    fields = [("To", "team@example.org, ops@example.org"), ("Cc", "Team@example.org")]
    assert route(headers(*fields), LISTS).lists == ("team@example.org", "ops@example.org")


# Skips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([], id="no-headers"),
        pytest.param([("From", OUTSIDER), ("Subject", "hi")], id="no-recipient-headers"),
        pytest.param([("To", OUTSIDER), ("Delivered-To", CATCH_ALL)], id="only-other-addresses"),
        pytest.param([("To", "team@example.com")], id="list-local-part-other-domain"),
        pytest.param([("To", "teams@example.org")], id="similar-local-part"),
        pytest.param([("Bcc", "team@example.org")], id="bcc-header-is-not-a-source"),
        pytest.param([("Reply-To", "team@example.org")], id="reply-to-is-not-a-source"),
        pytest.param([("From", "team@example.org")], id="from-is-not-a-source"),
    ],
)
def test_route_skips_a_message_naming_no_list(fields):
    assert route(headers(*fields), LISTS) == Route(skip=Skip.UNMATCHED)


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param("team@example.org", id="bare"),
        pytest.param("<team@example.org>", id="brackets"),
        pytest.param("TEAM@Example.org", id="case"),
        pytest.param("team+x@example.org", id="plus-detail"),
        pytest.param("board@example.org", id="another-of-our-lists"),
    ],
)
def test_route_skips_a_message_carrying_our_x_loop(loop):
    fields = [("X-Loop", loop), ("Delivered-To", "team@example.org"), ("To", "team@example.org")]
    assert route(headers(*fields), LISTS) == Route(skip=Skip.LOOP)


def test_route_skips_a_loop_when_one_of_several_x_loop_headers_is_ours():
    fields = [
        ("X-Loop", "other-list@elsewhere.net"),
        ("X-Loop", "ops@example.org"),
        ("Delivered-To", "team@example.org"),
    ]
    assert route(headers(*fields), LISTS).skip is Skip.LOOP


@pytest.mark.parametrize(
    "loop",
    [
        pytest.param("other-list@elsewhere.net", id="foreign-list"),
        pytest.param("", id="empty"),
        pytest.param("yes", id="not-an-address"),
    ],
)
def test_route_forwards_despite_a_foreign_x_loop(loop):
    fields = [("X-Loop", loop), ("Delivered-To", "team@example.org")]
    result = route(headers(*fields), LISTS)
    assert result.skip is None
    assert result.lists == ("team@example.org",)


@pytest.mark.parametrize(
    ("hops", "skip"),
    [
        pytest.param(0, None, id="none"),
        pytest.param(1, None, id="one"),
        pytest.param(MAX_RECEIVED - 1, None, id="49"),
        pytest.param(MAX_RECEIVED, None, id="exactly-50"),
        pytest.param(MAX_RECEIVED + 1, Skip.TOO_MANY_HOPS, id="51"),
        pytest.param(200, Skip.TOO_MANY_HOPS, id="200"),
    ],
)
def test_route_limits_the_number_of_received_headers(hops, skip):
    fields = [("Received", f"from hop{i} by hop{i + 1}; Mon") for i in range(hops)]
    result = route(headers(*fields, ("To", "team@example.org")), LISTS)
    assert result.skip is skip


def test_max_received_is_fifty():
    assert MAX_RECEIVED == 50


@pytest.mark.parametrize(
    ("fields", "skip"),
    [
        pytest.param(
            [("X-Loop", "team@example.org"), ("To", "team@example.org")], Skip.LOOP, id="loop"
        ),
        pytest.param(
            [*[("Received", "by hop; Mon")] * 51, ("To", "team@example.org")],
            Skip.TOO_MANY_HOPS,
            id="too-many-hops",
        ),
        pytest.param([("To", OUTSIDER)], Skip.UNMATCHED, id="unmatched"),
    ],
)
def test_route_of_a_skipped_message_names_no_list_and_no_recipient(fields, skip):
    result = route(headers(*fields), LISTS)
    assert result == Route(skip=skip)
    assert result.lists == ()
    assert result.recipients == ()


# Who receives it ---------------------------------------------------------------------


def test_route_sends_to_every_member_of_the_list():
    result = route(headers(("From", OUTSIDER), ("To", "team@example.org")), LISTS)
    assert result.recipients == TEAM


def test_route_keeps_member_addresses_as_configured():
    result = route(headers(("From", OUTSIDER), ("To", "team@example.org")), LISTS)
    assert "Bob@Example.org" in result.recipients
    assert "bob@example.org" not in result.recipients


def test_route_sends_the_union_of_several_lists():
    fields = [("From", OUTSIDER), ("To", "team@example.org"), ("Cc", "board@example.org")]
    result = route(headers(*fields), LISTS)
    assert set(result.recipients) == set(TEAM) | set(BOARD)


def test_route_sends_one_copy_to_a_member_of_two_matched_lists():
    fields = [("From", OUTSIDER), ("To", "team@example.org, ops@example.org")]
    result = route(headers(*fields), LISTS)
    assert result.recipients.count("carol@example.org") == 1
    assert sorted(result.recipients) == sorted(set(TEAM) | set(OPS))


def test_route_sends_one_copy_to_a_member_spelled_differently_in_two_lists():
    lists = {"a@example.org": ("Member@Example.org",), "b@example.org": ("member+b@example.org",)}
    result = route(headers(("To", "a@example.org, b@example.org")), lists)
    assert result.recipients == ("Member@Example.org",)


@pytest.mark.parametrize(
    ("field", "left_out"),
    [
        pytest.param(("To", "alice@example.org"), "alice@example.org", id="to"),
        pytest.param(("Cc", "alice@example.org"), "alice@example.org", id="cc"),
        pytest.param(("Cc", "BOB+home@example.org"), "Bob@Example.org", id="cc-case-and-detail"),
        pytest.param(("To", '"Carol" <carol@example.org>'), "carol@example.org", id="display-name"),
        pytest.param(("From", "alice@example.org"), "alice@example.org", id="from-sender"),
        pytest.param(("From", "Bob <bob@EXAMPLE.org>"), "Bob@Example.org", id="from-normalised"),
    ],
)
def test_route_leaves_out_visible_recipients_and_the_sender(field, left_out):
    fields = [("Delivered-To", "team@example.org"), ("To", "team@example.org"), field]
    result = route(headers(*fields), LISTS)
    assert left_out not in result.recipients
    assert set(result.recipients) == set(TEAM) - {left_out}


@pytest.mark.parametrize(
    ("field", "why"),
    [
        pytest.param(("Cc", "BOB+home@example.org"), Left.TO_CC, id="to/cc"),
        pytest.param(("From", "Bob <bob@EXAMPLE.org>"), Left.SENDER, id="sender"),
    ],
)
def test_route_says_which_members_it_left_out_and_why(field, why):
    fields = [("Delivered-To", "team@example.org"), field]
    assert route(headers(*fields), LISTS).left_out == (("Bob@Example.org", why),)


def test_route_names_the_sender_first_when_also_in_to():
    fields = [
        ("Delivered-To", "team@example.org"),
        ("From", "alice@example.org"),
        ("To", "alice@example.org"),
    ]
    assert route(headers(*fields), LISTS).left_out == (("alice@example.org", Left.SENDER),)


def test_sources_lists_every_header_routing_looks_at_in_order():
    fields = [
        ("Received", "from a by b for <nobody@example.org>; Mon, 1 Jan"),
        ("X-Original-To", "Nobody+x@Example.org"),
        ("To", "someone@example.org"),
    ]
    assert sources(headers(*fields)) == [
        ("delivered-to", []),
        ("x-original-to", ["nobody@example.org"]),
        ("envelope-to", []),
        ("x-envelope-to", []),
        ("received", ["nobody@example.org"]),
        ("to/cc", ["someone@example.org"]),
    ]


def test_route_keeps_members_named_only_in_bcc_or_reply_to():
    fields = [
        ("Delivered-To", "team@example.org"),
        ("Bcc", "alice@example.org"),
        ("Reply-To", "carol@example.org"),
    ]
    assert route(headers(*fields), LISTS).recipients == TEAM


def test_route_may_leave_no_recipient_without_skipping():
    fields = [
        ("From", "alice@example.org"),
        ("To", "team@example.org, bob@example.org"),
        ("Cc", "carol@example.org"),
    ]
    result = route(headers(*fields), LISTS)
    assert result.skip is None
    assert result.lists == ("team@example.org",)
    assert result.recipients == ()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([("To", f"team@example.org, {OUTSIDER}")], id="outsider-in-to"),
        pytest.param([("Delivered-To", f"team@example.org, {OUTSIDER}")], id="outsider-envelope"),
        pytest.param([received_for("team@example.org"), ("Cc", OUTSIDER)], id="outsider-in-cc"),
        pytest.param([("To", "team@example.org"), ("Bcc", OUTSIDER)], id="outsider-in-bcc"),
    ],
)
def test_route_sends_only_to_configured_members(fields):
    result = route(headers(*fields), LISTS)
    assert result.recipients
    assert set(result.recipients) <= set(TEAM)


# Property: never raises, never invents a recipient -------------------------------------

_NAMES = ["To", "Cc", "From", "Delivered-To", "X-Original-To", "Received", "X-Loop"]
_KNOWN = [*LISTS, *ALL_MEMBERS, CATCH_ALL, OUTSIDER, "Team+X@EXAMPLE.ORG", "BOB@example.org"]
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_address = st.one_of(
    st.sampled_from(_KNOWN),
    st.builds(
        "{}@{}".format,
        st.text(alphabet="abtemXY+.-_", min_size=1, max_size=10),
        st.sampled_from(["example.org", "EXAMPLE.org", "elsewhere.net", "x"]),
    ),
    st.sampled_from(_KNOWN).map(lambda a: f"Someone <{a}>"),
    st.sampled_from(_KNOWN).map(lambda a: f"from x by y for <{a}>; Mon"),
)
# "\r\n " folds the value, a bare "\r\n" starts a line that may or may not be a field.
_joiner = st.sampled_from([", ", " ", "; ", "", "\r\n ", "\r\n", "\n"])
_value = st.builds(
    lambda parts, joiner: joiner.join(parts),
    st.lists(st.one_of(_address, _text), max_size=4),
    _joiner,
)
_block = st.lists(st.tuples(st.sampled_from(_NAMES), _value), max_size=60).map(
    lambda fields: "".join(f"{name}: {value}\r\n" for name, value in fields).encode("utf-8")
)


def _check_route(block: bytes) -> None:
    result = route(parse_headers(block), LISTS)
    assert set(result.recipients) <= ALL_MEMBERS
    if result.skip is not None:
        assert result.recipients == ()


# Random bytes, with pieces of real fields mixed in so that some blocks reach a list.
_byte_block = st.lists(
    st.one_of(
        st.binary(max_size=60),
        st.sampled_from(
            [
                b"To: team@example.org",
                b"Cc: Ops+x@EXAMPLE.org, ",
                b"Delivered-To: board@example.org",
                b"From: carol@example.org",
                b"Received: by mx for <team@example.org>;",
                b"X-Loop: ",
                b"\r\n",
                b"\n",
                b" ",
                b"\xff\xfe",
            ]
        ),
    ),
    max_size=40,
).map(b"".join)

_FAST = settings(max_examples=200, deadline=None, database=None)


@_FAST
@given(block=_block)
def test_route_of_any_header_block_never_raises_and_only_names_members(block):
    _check_route(block)


@_FAST
@given(block=_byte_block)
def test_route_of_any_bytes_never_raises_and_only_names_members(block):
    _check_route(block)
