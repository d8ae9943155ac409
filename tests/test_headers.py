"""Unit tests for forwarder.headers: splitting, lenient parsing, message identity. Pure."""

from __future__ import annotations

import pytest

from forwarder.headers import Headers, message_id, message_key, parse_headers, split_message


def _key(raw: bytes) -> str:
    header_block, body = split_message(raw)
    return message_key(header_block, parse_headers(header_block), body)


def _fields(block: bytes) -> list[tuple[str, str]]:
    return list(parse_headers(block).fields)


# split_message -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "header_block", "body"),
    [
        pytest.param(
            b"To: a\r\nFrom: b\r\n\r\nbody\r\n", b"To: a\r\nFrom: b", b"body\r\n", id="crlf"
        ),
        pytest.param(b"To: a\nFrom: b\n\nbody\n", b"To: a\nFrom: b", b"body\n", id="lf-only"),
        pytest.param(b"To: a\r\n\nbody", b"To: a", b"body", id="mixed-line-endings"),
        pytest.param(b"To: a\r\nFrom: b", b"To: a\r\nFrom: b", b"", id="no-blank-line"),
        pytest.param(b"To: a\r\n\r\n", b"To: a", b"", id="empty-body"),
        pytest.param(b"", b"", b"", id="empty-message"),
        pytest.param(b"\r\nbody", b"", b"body", id="no-headers-crlf"),
        pytest.param(b"\nbody", b"", b"body", id="no-headers-lf"),
        pytest.param(
            b"To: a\r\n\r\npara 1\r\n\r\npara 2\r\n",
            b"To: a",
            b"para 1\r\n\r\npara 2\r\n",
            id="later-blank-lines-stay-in-body",
        ),
    ],
)
def test_split_message_separates_at_the_first_blank_line(raw, header_block, body):
    assert split_message(raw) == (header_block, body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"caf\xe9 \xff\xfe\r\n", id="8-bit"),
        pytest.param(b"line\r\n.\r\n..dot\r\n", id="dots"),
        pytest.param(b"trailing spaces   \r\n\r\n\r\n", id="trailing-blank-lines"),
        pytest.param(b"\x00\x01binary", id="binary"),
    ],
)
def test_split_message_keeps_the_body_byte_exact(body):
    assert split_message(b"Subject: x\r\n\r\n" + body)[1] == body


# parse_headers -----------------------------------------------------------------------


def test_parse_headers_lower_cases_names_and_keeps_order():
    block = b"To: a@example.org\r\nFROM: b@example.org\r\nX-Custom: v"
    assert _fields(block) == [
        ("to", "a@example.org"),
        ("from", "b@example.org"),
        ("x-custom", "v"),
    ]


def test_parse_headers_keeps_repeated_fields_in_order():
    headers = parse_headers(b"Received: one\r\nTo: a\r\nReceived: two\r\nreceived: three")
    assert headers.get_all("Received") == ["one", "two", "three"]
    assert headers.first("RECEIVED") == "one"
    assert headers.count("received") == 3


def test_parse_headers_lookup_of_an_absent_field_is_empty():
    headers = parse_headers(b"To: a")
    assert headers.get_all("cc") == []
    assert headers.first("cc") is None
    assert headers.count("cc") == 0


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(b"Subject: a: b: c", [("subject", "a: b: c")], id="colons-in-value"),
        pytest.param(b"Subject:no-space", [("subject", "no-space")], id="no-space-after-colon"),
        pytest.param(b"Subject:   padded   ", [("subject", "padded")], id="value-stripped"),
        pytest.param(b"Subject:", [("subject", "")], id="empty-value"),
        pytest.param(
            b"Subject: folded\r\n across\r\n\tlines",
            [("subject", "folded across lines")],
            id="folded-crlf",
        ),
        pytest.param(
            b"Subject: folded\n across\n\tlines",
            [("subject", "folded across lines")],
            id="folded-lf",
        ),
        pytest.param(
            b"To: a@example.org,\r\n    b@example.org\r\nCc: c@example.org",
            [("to", "a@example.org, b@example.org"), ("cc", "c@example.org")],
            id="folded-then-next-field",
        ),
        pytest.param(
            b"To: a\r\n\r\nCc: b", [("to", "a"), ("cc", "b")], id="blank-lines-inside-are-skipped"
        ),
    ],
)
def test_parse_headers_reads_field_values(block, expected):
    assert _fields(block) == expected


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(b"no colon here\r\nTo: a", [("to", "a")], id="line-without-colon"),
        pytest.param(b": no name\r\nTo: a", [("to", "a")], id="empty-name"),
        pytest.param(b"Not A Header: x\r\nTo: a", [("to", "a")], id="space-in-name"),
        pytest.param(b" leading continuation\r\nTo: a", [("to", "a")], id="orphan-continuation"),
        pytest.param(b"From someone Mon Jan 1\r\nTo: a", [("to", "a")], id="mbox-from-line"),
    ],
)
def test_parse_headers_ignores_lines_that_are_not_fields(block, expected):
    assert _fields(block) == expected


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"", id="no-headers"),
        pytest.param(b"\r\n\r\n\r\n", id="only-blank-lines"),
        pytest.param(b"To: a@example.org\r\nSubject: no blank line", id="no-blank-line"),
        pytest.param(b"Subject: caf\xe9 \xff\xfe\xfd", id="latin-1-8-bit"),
        pytest.param(b"Subject: \xc3\x28 \xed\xa0\x80 \xf0\x28\x8c\x28", id="invalid-utf-8"),
        pytest.param(b"Subj\xffect: x\r\n\xfe\xfe: y", id="8-bit-in-names"),
        pytest.param(b"X-Long: " + b"a" * 100_000, id="100k-line"),
        pytest.param(b"To: " + b"a@example.org, " * 7_000, id="100k-address-line"),
        pytest.param(b"X: x\r\n" + b" folded\r\n" * 12_000, id="100k-folded-lines"),
        pytest.param(b"\x00\x01\x02: \x03\r\n\x7f", id="control-bytes"),
        pytest.param(b"\r\r\r:\n\n::\r\n", id="stray-carriage-returns"),
        pytest.param(b"line without colon\nanother", id="no-colons"),
    ],
)
def test_parse_headers_never_raises(block):
    assert isinstance(parse_headers(block), Headers)


def test_parse_headers_decodes_utf_8_values():
    assert parse_headers("Subject: Grüße".encode()).first("subject") == "Grüße"


def test_parse_headers_replaces_invalid_utf_8_instead_of_dropping_the_field():
    assert parse_headers(b"Subject: caf\xe9").first("subject") == "caf\ufffd"


def test_parse_headers_keeps_a_100k_line_whole():
    assert parse_headers(b"X-Long: " + b"a" * 100_000).first("x-long") == "a" * 100_000


def test_parse_headers_handles_lf_only_line_endings_like_crlf():
    crlf = b"To: a@example.org\r\nCc: b@example.org,\r\n c@example.org\r\nSubject: s"
    assert parse_headers(crlf.replace(b"\r\n", b"\n")) == parse_headers(crlf)


# message_id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(b"Message-ID: <abc@example.org>", "abc@example.org", id="plain"),
        pytest.param(b"Message-Id: <ABC@Example.ORG>", "abc@example.org", id="lower-cased"),
        pytest.param(b"Message-ID:   < abc@example.org >  ", "abc@example.org", id="spaces"),
        pytest.param(
            b"Message-ID: (comment) <abc@example.org> (more)", "abc@example.org", id="comments"
        ),
        pytest.param(b"Message-ID:\r\n <abc@example.org>", "abc@example.org", id="folded"),
        pytest.param(b"Message-ID: abc@example.org", "abc@example.org", id="no-brackets"),
        pytest.param(
            b"Message-ID: <first@x>\r\nMessage-ID: <second@x>", "first@x", id="first-of-two"
        ),
        pytest.param(b"Message-ID:", None, id="empty"),
        pytest.param(b"Message-ID:    ", None, id="blank"),
        pytest.param(b"Subject: no id", None, id="absent"),
    ],
)
def test_message_id_is_normalised(block, expected):
    assert message_id(parse_headers(block)) == expected


# message_key -------------------------------------------------------------------------

_BODY = b"Hello list,\r\n\r\nsee you.\r\n"
_WITH_ID = b"Message-ID: <m1@example.org>\r\nFrom: a@example.org\r\nTo: team@example.org\r\n"
_WITHOUT_ID = b"From: a@example.org\r\nTo: team@example.org\r\nSubject: hi\r\n"


@pytest.mark.parametrize(
    "trace",
    [
        pytest.param(b"Received: from mx by mail; Mon, 1 Jan 2024\r\n", id="received"),
        pytest.param(
            b"Received: from mx\r\n\tby mail for <team@example.org>;\r\n Mon, 1 Jan 2024\r\n",
            id="folded-received",
        ),
        pytest.param(b"Return-Path: <bounce@example.net>\r\n", id="return-path"),
        pytest.param(b"Delivered-To: team@example.org\r\n", id="delivered-to"),
        pytest.param(b"X-Original-To: ops@example.org\r\n", id="x-original-to"),
        pytest.param(b"Envelope-To: team@example.org\r\n", id="envelope-to"),
        pytest.param(b"X-Envelope-To: team@example.org\r\n", id="x-envelope-to"),
        pytest.param(b"DELIVERED-TO: team@example.org\r\n", id="upper-case-name"),
        pytest.param(
            b"Received: a\r\nReceived: b\r\nDelivered-To: x@example.org\r\n", id="several"
        ),
    ],
)
@pytest.mark.parametrize("block", [_WITH_ID, _WITHOUT_ID], ids=["with-id", "without-id"])
def test_message_key_ignores_added_trace_headers(block, trace):
    plain = block + b"\r\n" + _BODY
    traced = trace + block + b"\r\n" + _BODY
    assert _key(traced) == _key(plain)


@pytest.mark.parametrize("block", [_WITH_ID, _WITHOUT_ID], ids=["with-id", "without-id"])
def test_message_key_is_shared_by_copies_delivered_for_two_lists(block):
    copy_a = b"Return-Path: <s@x>\r\nDelivered-To: team@example.org\r\n" + block + b"\r\n" + _BODY
    copy_b = b"Return-Path: <s@x>\r\nDelivered-To: ops@example.org\r\n" + block + b"\r\n" + _BODY
    assert _key(copy_a) == _key(copy_b)


def test_message_key_is_shared_between_a_copy_with_only_trace_headers_and_one_with_none():
    assert _key(b"Received: by mx\r\nDelivered-To: t@x\r\n\r\n" + _BODY) == _key(b"\r\n" + _BODY)


@pytest.mark.parametrize("block", [_WITH_ID, _WITHOUT_ID], ids=["with-id", "without-id"])
def test_message_key_differs_for_different_bodies(block):
    assert _key(block + b"\r\n" + _BODY) != _key(block + b"\r\n" + _BODY + b"P.S.\r\n")


def test_message_key_of_a_reused_message_id_differs_by_body():
    first = b"Message-ID: <same@example.org>\r\nSubject: one\r\n\r\nfirst body\r\n"
    second = b"Message-ID: <same@example.org>\r\nSubject: two\r\n\r\nsecond body\r\n"
    assert _key(first) != _key(second)


def test_message_key_matches_message_ids_that_differ_only_in_case():
    first = b"Message-ID: <ABC@Example.org>\r\n\r\n" + _BODY
    second = b"Message-ID: <abc@example.org>\r\n\r\n" + _BODY
    assert _key(first) == _key(second)


def test_message_key_differs_for_different_message_ids_with_one_body():
    first = b"Message-ID: <one@example.org>\r\n\r\n" + _BODY
    second = b"Message-ID: <two@example.org>\r\n\r\n" + _BODY
    assert _key(first) != _key(second)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(_WITHOUT_ID.replace(b"hi", b"ho"), id="subject"),
        pytest.param(_WITHOUT_ID.replace(b"a@example.org", b"z@example.org"), id="from"),
        pytest.param(_WITHOUT_ID + b"Cc: c@example.org\r\n", id="added-cc"),
        pytest.param(b"X-Loop: team@example.org\r\n" + _WITHOUT_ID, id="added-x-loop"),
    ],
)
def test_message_key_without_message_id_depends_on_non_trace_headers(changed):
    assert _key(changed + b"\r\n" + _BODY) != _key(_WITHOUT_ID + b"\r\n" + _BODY)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"no headers at all", id="no-colon"),
        pytest.param(b"Message-ID: <\xff\xfe@x>\r\n\r\n\xff", id="8-bit-id"),
        pytest.param(b"Message-ID: <>\r\n\r\nbody", id="empty-brackets"),
        pytest.param(b"\xff\xfe: \x00\r\n\r\n", id="8-bit-name"),
    ],
)
def test_message_key_never_raises(raw):
    assert _key(raw)
