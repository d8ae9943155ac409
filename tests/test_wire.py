"""The DATA payload built piece by piece equals the whole-message transformation."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.wire import data_pieces


def reference(prefix: bytes, raw: bytes) -> bytes:
    """What aiosmtplib would send for prefix + raw, computed on the whole message at once."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", prefix + raw)
    data = re.sub(rb"(?m)^\.", b"..", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def payload(prefix: bytes, raw: bytes, piece: int = 64 * 1024) -> bytes:
    return b"".join(data_pieces(prefix, raw, piece))


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        pytest.param(b"A: b\r\n\r\nbody\r\n", b"A: b\r\n\r\nbody\r\n.\r\n", id="clean"),
        pytest.param(b"A: b\n\nbody\n", b"A: b\r\n\r\nbody\r\n.\r\n", id="bare-lf"),
        pytest.param(b"A: b\r\n\r\nx\ry\r\n", b"A: b\r\n\r\nx\r\ny\r\n.\r\n", id="bare-cr"),
        pytest.param(b"A: b\r\n\r\n.x\r\n..\r\n", b"A: b\r\n\r\n..x\r\n...\r\n.\r\n", id="dots"),
        pytest.param(
            b"A: b\r\n\r\nno final newline",
            b"A: b\r\n\r\nno final newline\r\n.\r\n",
            id="no-final-crlf",
        ),
        pytest.param(b"", b".\r\n", id="empty"),
    ],
)
def test_payload_is_crlf_dot_stuffed_and_terminated(raw: bytes, sent: bytes) -> None:
    assert payload(b"", raw) == sent


def test_prefix_lines_come_first_unchanged() -> None:
    assert payload(b"X-Loop: l@example.org\r\n", b"A: b\r\n\r\nc\r\n").startswith(
        b"X-Loop: l@example.org\r\nA: b\r\n"
    )


def test_a_message_is_sent_in_bounded_pieces() -> None:
    raw = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 50_000
    pieces = list(data_pieces(b"", raw, piece=64 * 1024))
    assert len(pieces) > 50
    assert max(len(p) for p in pieces) < 70 * 1024


def test_a_very_long_line_is_cut_without_separating_cr_from_lf() -> None:
    raw = b"A: b\r\n\r\n" + b"z" * (64 * 1024 - 9) + b"\r\n" + b"w" * 300_000 + b"\r\n"
    assert payload(b"", raw, piece=64 * 1024) == reference(b"", raw)


@settings(max_examples=500, deadline=None, database=None)
@given(
    prefix=st.sampled_from([b"", b"Received: by h; now\r\nX-Loop: l@example.org\r\n"]),
    raw=st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\xe9"]), max_size=200
    ).map(b"".join),
    piece=st.integers(min_value=1, max_value=16),
)
def test_pieces_of_any_size_equal_the_whole_message_transformation(
    prefix: bytes, raw: bytes, piece: int
) -> None:
    assert payload(prefix, raw, piece) == reference(prefix, raw)
