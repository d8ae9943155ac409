"""The forwarder behind a real Postfix (MX and submission) in front of Dovecot LMTP.

The message reaches the catch-all through Postfix's MX, the forwarder reads it
over IMAP and re-sends it through Postfix's submission service (STARTTLS, SASL,
smtpd_sender_login_maps), and each member's copy is read back from that
member's own mailbox: what a member really got.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import Settings, load_settings
from forwarder.errors import EXIT_OK, EXIT_RUNTIME, SubmissionRefused
from forwarder.factory import open_store
from forwarder.service import check
from forwarder.state import DeliveryQuery, Status
from tests.conftest import forward_once, make_forwarder
from tests.mail import build_message
from tests.servers.postfix import ADMIN, PostfixServer

CONTACT = "contact@example.org"
MEMBERS = ["alice@example.org", "bob@example.org"]

MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(postfix: PostfixServer, tmp_path: Path) -> MakeSettings:
    dovecot = postfix.dovecot

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "_env_file": None,
            "imap_host": dovecot.host,
            "imap_port": dovecot.imap_port,
            "imap_security": "none",
            "imap_username": dovecot.username,
            "imap_password": dovecot.password,
            "smtp_host": postfix.host,
            "smtp_port": postfix.submission_port,
            "smtp_security": "starttls",
            "smtp_username": dovecot.username,
            "smtp_password": dovecot.password,
            "tls_ca_file": postfix.ca_file,
            "lists": {CONTACT: MEMBERS},
            "envelope_sender": ADMIN,
            "state_db": tmp_path / "state.db",
        }
        values.update(overrides)
        return load_settings(**values)

    return make


def arrive(postfix: PostfixServer, raw: bytes, to: str = CONTACT) -> bytes:
    """Mail for a list, through the MX into the catch-all; returns it as stored there."""
    postfix.send_to_mx(raw, [to])
    postfix.wait_idle()
    [(_, _, stored)] = postfix.dovecot.messages()
    return stored


def lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def statuses(settings: Settings) -> set[Status]:
    store = open_store(settings, readonly=True)
    try:
        return {row.status for row in store.deliveries(None, DeliveryQuery())}
    finally:
        store.close()


async def test_raw_utf8_subject_and_8bit_body_reach_every_members_mailbox(
    postfix: PostfixServer, make_settings: MakeSettings
) -> None:
    raw = build_message(
        to=CONTACT,
        subject="Réunion à 14h — café ☕",
        body="Bonjour, voilà le compte-rendu: ÉÀÇ ✓\r\n".encode(),
    )
    stored = arrive(postfix, raw)
    await forward_once(make_settings())
    postfix.wait_idle()
    for member in MEMBERS:
        [copy] = postfix.dovecot.mailbox(member)
        # Everything the catch-all stored but its Return-Path (Postfix's cleanup drops it),
        # byte for byte, under the lines the servers and the forwarder added on top.
        original = lf(stored).split(b"\n", 1)
        assert original[0].startswith(b"Return-Path:")
        assert lf(copy).endswith(original[1])
        assert b"\nX-Loop: contact@example.org\n" in lf(copy)
    assert postfix.dovecot.mailbox(ADMIN) == []  # no bounce


async def test_sender_refused_at_rcpt_stops_the_cycle_then_goes_out_once_when_fixed(
    postfix: PostfixServer, make_settings: MakeSettings
) -> None:
    arrive(postfix, build_message(to=CONTACT, subject="for the list"))
    settings = make_settings()
    postfix.set_sender_logins({})  # the login may not use FORWARDER_ENVELOPE_SENDER
    with pytest.raises(SubmissionRefused) as error:
        await forward_once(settings)
    message = str(error.value)
    assert f"553 5.7.1 <{ADMIN}>: Sender address rejected: not owned by user" in message
    assert "FORWARDER_ENVELOPE_SENDER" in message and "\n" not in message
    postfix.wait_idle()
    assert all(postfix.dovecot.mailbox(m) == [] for m in MEMBERS)
    assert Status.FAILED not in statuses(settings)
    [(_, flags, _)] = postfix.dovecot.messages()
    assert flags == set()

    postfix.set_sender_logins({ADMIN: postfix.dovecot.username})  # postmap, no reload
    await forward_once(settings)
    await forward_once(settings)
    postfix.wait_idle()
    assert [len(postfix.dovecot.mailbox(m)) for m in MEMBERS] == [1, 1]
    assert statuses(settings) == {Status.DELIVERED}
    assert "reload" not in postfix.log()


async def test_a_running_forwarder_sends_at_the_first_cycle_after_the_map_is_fixed(
    postfix: PostfixServer, make_settings: MakeSettings
) -> None:
    """One Forwarder across cycles, as `forwarder run` keeps it: the refused session is not
    reused, since Postfix's smtpd reads a rebuilt map only for a new connection."""
    arrive(postfix, build_message(to=CONTACT, subject="while running"))
    settings = make_settings(smtp_connections=1)  # the same session, unless it is closed
    postfix.set_sender_logins({})
    store = open_store(settings)
    forwarder = make_forwarder(settings, store)
    try:
        with pytest.raises(SubmissionRefused):
            await forwarder.run_cycle()
        postfix.set_sender_logins({ADMIN: postfix.dovecot.username})
        await forwarder.run_cycle()
    finally:
        await forwarder.close()
        store.close()
    postfix.wait_idle()
    assert [len(postfix.dovecot.mailbox(m)) for m in MEMBERS] == [1, 1]


async def test_a_members_own_refusal_bounces_to_the_envelope_sender(
    postfix: PostfixServer, make_settings: MakeSettings
) -> None:
    arrive(postfix, build_message(to=CONTACT, subject="to a departed member"))
    settings = make_settings(
        lists={CONTACT: ["alice@example.org", "ghost@example.net"]},
        member_domains="example.org, example.net",
    )
    await forward_once(settings)
    postfix.wait_idle()
    assert len(postfix.dovecot.mailbox("alice@example.org")) == 1
    [bounce] = postfix.dovecot.mailbox(ADMIN)
    assert re.search(rb"^Return-Path: <>$", lf(bounce), re.M)
    assert b"ghost@example.net" in bounce and b"5.1.1" in bounce


async def test_check_probes_the_real_path_and_names_the_refused_sender(
    postfix: PostfixServer, make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    out = io.StringIO()
    assert await check(settings, out) == EXIT_OK
    assert "RCPT TO alice@example.org: ok" in out.getvalue()

    postfix.set_sender_logins({})
    assert await check(settings, io.StringIO()) == EXIT_RUNTIME
    error = capsys.readouterr().err
    assert "FORWARDER_ENVELOPE_SENDER" in error and "not owned by user" in error
    postfix.wait_idle()
    assert all(postfix.dovecot.mailbox(m) == [] for m in MEMBERS)  # nothing was sent
