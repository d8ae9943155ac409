"""The test servers themselves behave as the rest of the suite expects."""

from __future__ import annotations

import email
import smtplib
import ssl

import pytest
from imapclient import IMAPClient

from tests.servers import MailServer, SmtpSink, free_port

RAW = b"From: a@remote.example\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def test_lmtp_delivery_is_in_inbox_with_received_for(mailbox: MailServer) -> None:
    mailbox.deliver(RAW, ["bob@example.org"])

    [(uid, flags, raw)] = mailbox.messages()
    assert uid > 0
    assert b"\\Seen" not in flags
    assert raw.endswith(RAW)
    message = email.message_from_bytes(raw)
    assert message["Return-Path"] == "<sender@remote.example>"
    assert "for <bob@example.org>" in message["Received"]


def test_two_recipients_make_two_copies_without_for(mailbox: MailServer) -> None:
    mailbox.deliver(RAW, ["bob@example.org", "carol@example.org"])

    copies = mailbox.messages()
    assert len(copies) == 2
    for _uid, _flags, raw in copies:
        message = email.message_from_bytes(raw)
        assert " for <" not in message["Received"]
        assert message["Delivered-To"] is None


def test_clear_empties_and_uids_keep_increasing(mailbox: MailServer) -> None:
    mailbox.deliver(RAW, ["bob@example.org"])
    [(first_uid, _, _)] = mailbox.messages()
    with mailbox.imap() as client:
        client.create_folder("Archive")
        client.logout()

    mailbox.clear()

    assert mailbox.messages() == []
    with mailbox.imap() as client:
        assert [name for _, _, name in client.list_folders()] == ["INBOX"]
        client.logout()
    mailbox.deliver(RAW, ["bob@example.org"])
    [(second_uid, _, _)] = mailbox.messages()
    assert second_uid > first_uid


def test_restart_keeps_ports_and_mail(mailbox: MailServer) -> None:
    mailbox.deliver(RAW, ["bob@example.org"])
    ports = (mailbox.imap_port, mailbox.lmtp_port)

    mailbox.restart()

    assert (mailbox.imap_port, mailbox.lmtp_port) == ports
    assert len(mailbox.messages()) == 1


def test_recreate_inbox_changes_uidvalidity(mailbox: MailServer) -> None:
    mailbox.deliver(RAW, ["bob@example.org"])
    before = mailbox.uidvalidity()

    mailbox.recreate_inbox()

    assert mailbox.messages() == []
    assert mailbox.uidvalidity() > before
    mailbox.deliver(RAW, ["bob@example.org"])
    assert [uid for uid, _, _ in mailbox.messages()] == [1]


def test_tls_server_verifies_with_its_ca_file(tls_mailbox: MailServer) -> None:
    assert tls_mailbox.ca_file is not None and tls_mailbox.imaps_port is not None
    context = ssl.create_default_context(cafile=str(tls_mailbox.ca_file))
    tls_mailbox.deliver(RAW, ["bob@example.org"])

    with IMAPClient("localhost", port=tls_mailbox.imaps_port, ssl_context=context) as client:
        client.login(tls_mailbox.username, tls_mailbox.password)
        assert client.select_folder("INBOX")[b"EXISTS"] == 1
        client.logout()
    with IMAPClient(tls_mailbox.host, port=tls_mailbox.imap_port, ssl=False) as client:
        client.starttls(context)
        client.login(tls_mailbox.username, tls_mailbox.password)
        client.logout()


def test_sink_records_exact_bytes(smtp_sink: SmtpSink) -> None:
    raw = (
        b"From: a@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n"
        b".leading dot\r\n..two dots\r\n.\r\nGr\xc3\xbc\xc3\x9fe \xe2\x82\xac\r\n"
    )
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port) as client:
        client.ehlo()
        assert client.has_extn("8bitmime") and client.has_extn("smtputf8")
        client.sendmail("a@example.org", ["bob@example.org"], raw, mail_options=["BODY=8BITMIME"])

    [received] = smtp_sink.wait_for(1)
    assert received.mail_from == "a@example.org"
    assert received.rcpt_tos == ["bob@example.org"]
    assert received.data == raw
    assert "BODY=8BITMIME" in received.mail_options


def test_sink_data_without_final_crlf_gets_one_from_smtplib(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port) as client:
        client.sendmail("a@example.org", ["bob@example.org"], b"Subject: x\r\n\r\nbare\nlf")

    assert smtp_sink.wait_for(1)[0].data == b"Subject: x\r\n\r\nbare\nlf\r\n"


def test_sink_rcpt_override_refuses_that_recipient(smtp_sink: SmtpSink) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "550 5.1.1 no such user"
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port) as client:
        refused = client.sendmail("a@example.org", ["bob@example.org", "carol@example.org"], RAW)

    assert refused == {"bob@example.org": (550, b"5.1.1 no such user")}
    [received] = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ["carol@example.org"]


def test_sink_data_override_and_wait_for_timeout(smtp_sink: SmtpSink) -> None:
    smtp_sink.data_response = "451 4.3.0 try later"
    with (
        smtplib.SMTP(smtp_sink.host, smtp_sink.port) as client,
        pytest.raises(smtplib.SMTPDataError) as error,
    ):
        client.sendmail("a@example.org", ["bob@example.org"], RAW)
    assert error.value.smtp_code == 451

    with pytest.raises(TimeoutError):
        smtp_sink.wait_for(1, timeout=0.1)


def test_sink_auth_and_restart_on_same_port() -> None:
    with SmtpSink(auth=("user", "pass")) as sink:
        with (
            smtplib.SMTP(sink.host, sink.port) as client,
            pytest.raises(smtplib.SMTPSenderRefused),
        ):
            client.sendmail("a@example.org", ["bob@example.org"], RAW)
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.login("user", "pass")
            client.sendmail("a@example.org", ["bob@example.org"], RAW)
        assert sink.wait_for(1)[0].auth_login == "user"

        port = sink.port
        sink.stop()
        with pytest.raises(OSError):
            smtplib.SMTP(sink.host, port, timeout=1)
        sink.start()
        assert sink.port == port
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.login("user", "pass")
            client.sendmail("a@example.org", ["bob@example.org"], RAW)
        assert len(sink.wait_for(2)) == 2


def test_free_port_is_bindable() -> None:
    assert 0 < free_port() < 65536
