"""Unit tests for forwarder.addresses: validation, normalisation, extraction. Pure, no I/O."""

from __future__ import annotations

import time

import pytest

from forwarder.addresses import addresses_in, is_valid_address, normalize, received_for

# A hostile header value must be handled in linear time; the bound is far above what a
# linear scan of a few hundred kilobytes needs and far below a quadratic regex blow-up.
LINEAR_TIME_BOUND = 5.0


def _elapsed(fn, *args):
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# normalize ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("contact@example.org", "contact@example.org", id="already-normal"),
        pytest.param("Contact+Urgent@Example.ORG", "contact@example.org", id="spec-example"),
        pytest.param("CONTACT@EXAMPLE.ORG", "contact@example.org", id="upper-case"),
        pytest.param("contact+@example.org", "contact@example.org", id="empty-detail"),
        pytest.param("contact+a+b@example.org", "contact@example.org", id="detail-with-plus"),
        pytest.param("<contact@example.org>", "contact@example.org", id="angle-brackets"),
        pytest.param("  contact@example.org \r\n", "contact@example.org", id="surrounding-space"),
        pytest.param("contact@example.org.", "contact@example.org", id="trailing-root-dot"),
        pytest.param("Contact@Example.org+x", "contact@example.org+x", id="plus-in-domain-kept"),
    ],
)
def test_normalize_gives_the_compare_form(raw, expected):
    assert normalize(raw) == expected


def test_normalize_keeps_a_local_part_that_is_only_a_detail():
    # "+x@example.org" has no base part to fall back to; it must not become "@example.org".
    assert normalize("+X@Example.org") == "+x@example.org"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param("Contact+Urgent@Example.ORG", "contact@example.org", id="case-and-detail"),
        pytest.param("contact+one@example.org", "contact+two@example.org", id="two-details"),
        pytest.param("<Contact@EXAMPLE.org>", "contact@example.org", id="brackets-and-case"),
    ],
)
def test_normalize_makes_equivalent_addresses_equal(a, b):
    assert normalize(a) == normalize(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param("contact@example.org", "contact@example.com", id="other-domain"),
        pytest.param("contact@example.org", "contacts@example.org", id="other-local"),
        pytest.param("con.tact@example.org", "contact@example.org", id="dots-matter"),
    ],
)
def test_normalize_keeps_different_addresses_apart(a, b):
    assert normalize(a) != normalize(b)


# is_valid_address --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a@b.org", id="minimal"),
        pytest.param("first.last@example.org", id="dotted-local"),
        pytest.param("contact+urgent@example.org", id="plus-detail"),
        pytest.param("o'brien@example.org", id="apostrophe"),
        pytest.param("UPPER@EXAMPLE.ORG", id="upper-case"),
        pytest.param("x@sub-domain.example.co.uk", id="hyphen-and-subdomains"),
        pytest.param("root@localhost", id="single-label-domain"),
    ],
)
def test_is_valid_address_accepts_plain_addresses(value):
    assert is_valid_address(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("example.org", id="no-at"),
        pytest.param("@example.org", id="no-local-part"),
        pytest.param("contact@", id="no-domain"),
        pytest.param("a@b@example.org", id="two-ats"),
        pytest.param("a b@example.org", id="space-in-local"),
        pytest.param("a@exa mple.org", id="space-in-domain"),
        pytest.param("a@b.org\r\nRCPT TO:<x@y>", id="crlf-smtp-injection"),
        pytest.param("a@b.org\nX-Injected: 1", id="lf-header-injection"),
        pytest.param("a@b.org\x00", id="nul-byte"),
        pytest.param("Contact <contact@example.org>", id="display-name"),
        pytest.param("<contact@example.org>", id="angle-brackets"),
        pytest.param(".a@example.org", id="leading-dot-local"),
        pytest.param("a.@example.org", id="trailing-dot-local"),
        pytest.param("a..b@example.org", id="double-dot-local"),
        pytest.param("a@-example.org", id="label-starts-with-hyphen"),
        pytest.param("a@example-.org", id="label-ends-with-hyphen"),
        pytest.param("a@example..org", id="empty-label"),
        pytest.param('"quoted"@example.org', id="quoted-local-part"),
        pytest.param("a@[192.0.2.1]", id="address-literal"),
        pytest.param("a" * 250 + "@b.org", id="longer-than-254"),
        pytest.param("a@" + "b" * 64 + ".org", id="label-longer-than-63"),
    ],
)
def test_is_valid_address_refuses_anything_else(value):
    assert not is_valid_address(value)


# addresses_in ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(["list@example.org"], ["list@example.org"], id="bare"),
        pytest.param(["<List@Example.org>"], ["list@example.org"], id="bracketed-normalised"),
        pytest.param(
            ['"Smith, Jo" <Jo+x@Example.org>, b@example.com'],
            ["jo@example.org", "b@example.com"],
            id="quoted-comma-in-display-name",
        ),
        pytest.param(
            ["a@example.org", "b@example.org, c@example.org"],
            ["a@example.org", "b@example.org", "c@example.org"],
            id="several-values-in-order",
        ),
        pytest.param(
            ["Team: a@example.org, b@example.org;"],
            ["a@example.org", "b@example.org"],
            id="group-syntax",
        ),
        pytest.param(
            ["a@example.org (Alice), Bob <b@example.org>"],
            ["a@example.org", "b@example.org"],
            id="comment-and-display-name",
        ),
        pytest.param(
            ["=?utf-8?q?J=C3=B6rg?= <jorg@example.org>"],
            ["jorg@example.org"],
            id="encoded-word-display-name",
        ),
        pytest.param(["undisclosed-recipients:;"], [], id="empty-group"),
        pytest.param(["no address here"], [], id="plain-text"),
        pytest.param(["Name <not-an-address>"], [], id="invalid-address-dropped"),
        pytest.param([""], [], id="empty-value"),
        pytest.param([], [], id="no-values"),
        pytest.param(
            ["garbage <<< a@example.org >>> ((("],
            ["a@example.org"],
            id="garbage-around-an-address",
        ),
    ],
)
def test_addresses_in_extracts_normalised_addresses(values, expected):
    assert addresses_in(values) == expected


def test_addresses_in_never_returns_invalid_addresses():
    found = addresses_in(["a@b.org\r\nRCPT TO:<x@y>, <c d@e.org>, f@g.org"])
    assert found
    assert all(is_valid_address(a) for a in found)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a" * 100_000, id="100k-atom-run"),
        pytest.param("a." * 50_000, id="100k-dotted-run"),
        pytest.param("a@" * 50_000, id="100k-alternating-at"),
        pytest.param("<" * 100_000, id="100k-angle-brackets"),
        pytest.param('"' * 100_000, id="100k-quotes"),
        pytest.param("(" * 100_000, id="100k-open-comments"),
        pytest.param(", ".join(["a@example.org"] * 10_000), id="10k-addresses"),
    ],
)
def test_addresses_in_handles_a_hostile_100k_value_in_linear_time(value):
    assert _elapsed(addresses_in, [value]) < LINEAR_TIME_BOUND


# received_for ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            "from mx.example.net by mail.example.org with ESMTP id 1 "
            "for <List@Example.org>; Mon, 1 Jan 2024 00:00:00 +0000",
            "list@example.org",
            id="bracketed-then-semicolon",
        ),
        pytest.param(
            "by mail.example.org for list+tag@example.org; Mon, 1 Jan 2024",
            "list@example.org",
            id="bare-with-detail",
        ),
        pytest.param(
            "by mail.example.org for < list@example.org >; Mon", "list@example.org", id="spaces"
        ),
        pytest.param(
            "by mail.example.org for list@example.org", "list@example.org", id="at-end-of-value"
        ),
        pytest.param(
            "by mail.example.org FOR <list@example.org> (one recipient); Mon",
            "list@example.org",
            id="upper-case-keyword",
        ),
        pytest.param("from a by b; Mon, 1 Jan 2024", None, id="no-for-clause"),
        pytest.param("by b for <not-an-address>; Mon", None, id="for-without-address"),
        pytest.param("by b for <a b@example.org>; Mon", None, id="for-invalid-address"),
        pytest.param("by b.example.org; therefor <x@y.org>", None, id="for-inside-a-word"),
        pytest.param("", None, id="empty"),
    ],
)
def test_received_for_reads_the_for_clause(value, expected):
    assert received_for(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("for " + "a@" * 50_000 + "a>x", id="100k-alternating-at"),
        pytest.param("for" + " " * 100_000 + "x", id="100k-spaces-after-for"),
        pytest.param("for " + "a" * 100_000, id="100k-atom-run"),
        pytest.param("for <" + "a" * 100_000, id="100k-unclosed-bracket"),
        pytest.param("for " * 25_000, id="100k-repeated-for"),
    ],
)
def test_received_for_handles_a_hostile_100k_value_in_linear_time(value):
    assert _elapsed(received_for, value) < LINEAR_TIME_BOUND
