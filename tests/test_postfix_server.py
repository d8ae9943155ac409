"""The private Postfix + Dovecot domain (tests/servers/postfix.py) does what the tests assume,
and docs/deployments.md's "Behind Postfix" recipe is the one it uses."""

from __future__ import annotations

import re
import smtplib
import ssl
from pathlib import Path

import pytest

from tests.mail import build_message
from tests.servers.postfix import (
    ADMIN,
    RECIPE_DOMAIN_USERDB,
    RECIPE_MAIN,
    RECIPE_SUBMISSION,
    PostfixServer,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployments.md"
CATCHALL = "catchall@example.org"


def header(raw: bytes, name: str) -> list[bytes]:
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]  # Maildir files end lines with LF
    return re.findall(rb"^" + name.encode() + rb": ?([^\r\n]*)", head, re.M | re.I)


def submit(postfix: PostfixServer, raw: bytes, rcpts: list[str], sender: str = ADMIN) -> None:
    postfix.submit(raw, rcpts, sender, CATCHALL, postfix.dovecot.password)


def test_mail_to_a_list_address_lands_in_the_catch_all_naming_it_in_delivered_to(
    postfix: PostfixServer,
) -> None:
    to = "Contact+Urgent@Example.org"
    postfix.send_to_mx(build_message(to=to), [to])
    postfix.wait_idle()
    [(_, _, raw)] = postfix.dovecot.messages()
    assert header(raw, "Delivered-To") == [b"Contact+Urgent@Example.org"]


def test_mail_to_a_person_lands_in_their_own_mailbox(postfix: PostfixServer) -> None:
    postfix.send_to_mx(build_message(to="alice@example.org"), ["alice@example.org"])
    postfix.wait_idle()
    [raw] = postfix.dovecot.mailbox("alice@example.org")
    assert header(raw, "Delivered-To") == [b"alice@example.org"]
    assert postfix.dovecot.messages() == []


def test_submission_needs_starttls_before_anything(postfix: PostfixServer) -> None:
    with smtplib.SMTP(postfix.host, postfix.submission_port) as smtp:
        code, _ = smtp.mail(ADMIN)
    assert code == 530


def test_submission_refuses_a_sender_the_login_does_not_own_at_rcpt(
    postfix: PostfixServer,
) -> None:
    context = ssl.create_default_context(cafile=str(postfix.ca_file))
    with smtplib.SMTP(postfix.host, postfix.submission_port) as smtp:
        smtp.starttls(context=context)
        smtp.login(CATCHALL, postfix.dovecot.password)
        assert smtp.mail("someone-else@example.org")[0] == 250  # Postfix waits for RCPT
        code, text = smtp.rcpt("alice@example.org")
    assert code == 553
    assert b"5.7.1 <someone-else@example.org>: Sender address rejected: not owned by user" in text


def test_a_new_sender_map_applies_to_the_next_connection_without_reload(
    postfix: PostfixServer,
) -> None:
    raw = build_message(to="alice@example.org")
    postfix.set_sender_logins({})
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        submit(postfix, raw, ["alice@example.org"])
    postfix.set_sender_logins({ADMIN: CATCHALL})
    submit(postfix, raw, ["alice@example.org"])
    postfix.wait_idle()
    assert len(postfix.dovecot.mailbox("alice@example.org")) == 1
    assert "reload" not in postfix.log()


def test_submission_adds_no_message_id_or_date_and_cleanup_drops_return_path(
    postfix: PostfixServer,
) -> None:
    raw = b"From: customer@remote.example\r\nReturn-Path: <customer@remote.example>\r\n" \
        b"Subject: no id, no date\r\n\r\nbody\r\n"
    submit(postfix, raw, ["alice@example.org"])
    postfix.wait_idle()
    [received] = postfix.dovecot.mailbox("alice@example.org")
    assert header(received, "Message-Id") == [] and header(received, "Date") == []
    assert header(received, "Return-Path") == [f"<{ADMIN}>".encode()]  # Dovecot's, not ours


def test_a_copy_sent_with_smtputf8_and_a_utf8_subject_is_lost_with_its_bounce(
    postfix: PostfixServer,
) -> None:
    """Why the relay must not ask for SMTPUTF8 for raw UTF-8 in the header."""
    raw = build_message(to="alice@example.org", subject="Réunion", body="é\r\n".encode())
    context = ssl.create_default_context(cafile=str(postfix.ca_file))
    with smtplib.SMTP(postfix.host, postfix.submission_port) as smtp:
        smtp.starttls(context=context)
        smtp.login(CATCHALL, postfix.dovecot.password)
        smtp.sendmail(ADMIN, ["alice@example.org"], raw, ["BODY=8BITMIME", "SMTPUTF8"])
    postfix.wait_idle()
    assert postfix.dovecot.mailbox("alice@example.org") == []
    assert postfix.dovecot.mailbox(ADMIN) == []  # the bounce bounced the same way
    assert "dsn=5.6.7" in postfix.log()


def test_a_refusal_after_acceptance_bounces_to_the_envelope_sender(
    postfix: PostfixServer,
) -> None:
    submit(postfix, build_message(to="ghost@example.net"), ["ghost@example.net"])
    postfix.wait_idle()
    [bounce] = postfix.dovecot.mailbox(ADMIN)
    assert header(bounce, "Return-Path") == [b"<>"]
    assert b"ghost@example.net" in bounce and b"5.1.1" in bounce


# --------------------------------------------------------------------------- the documented recipe


def doc_block(anchor: str) -> str:
    """The fenced block of docs/deployments.md's "Behind Postfix" section that contains
    `anchor`."""
    text = DOC.read_text()
    section = text[text.index("\n## Behind Postfix\n") + 1 :]
    section = section[: section.index("\n## ", 1)]
    blocks = section.split("```")[1::2]
    [block] = [b for b in blocks if anchor in b]
    return block


def test_documented_main_cf_recipe_is_the_fixtures() -> None:
    lines = [line for line in doc_block("virtual_transport").splitlines() if "=" in line]
    recipe = dict(line.split(" = ", 1) for line in lines)
    for name, value in RECIPE_MAIN.items():
        assert recipe.get(name) == value, name
    assert set(recipe) - set(RECIPE_MAIN) <= {"virtual_transport", "smtpd_sasl_path"}


def test_documented_submission_recipe_is_the_fixtures() -> None:
    block = doc_block("submission inet")
    options = dict(m.split("=", 1) for m in re.findall(r"-o (\S+=\S*)", block))
    options.pop("syslog_name", None)
    assert options == RECIPE_SUBMISSION


def test_documented_dovecot_recipe_is_the_fixtures() -> None:
    block = doc_block("userdb {")
    assert RECIPE_DOMAIN_USERDB in block
    assert "@example.org::" in block and "user=catchall@example.org" in block
