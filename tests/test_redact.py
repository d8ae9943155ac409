"""Secret masking: every spelling of a secret (tests/spellings.py) is masked."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, SecretStr

from forwarder.config import load_settings
from forwarder.mailbox import ImapEndpoint, Mailbox, SmtpEndpoint
from forwarder.redact import MASK, Redactor, secret_values
from tests.leaks import ASCII_SECRET, SECRET, spellings


@pytest.mark.parametrize("name", list(spellings(SECRET)))
def test_every_spelling_of_a_non_ascii_secret_is_masked(name: str) -> None:
    redactor = Redactor()
    redactor.register(SECRET)
    spelt = spellings(SECRET)[name]
    text = f"before {spelt} after"
    scrubbed = redactor.scrub(text)
    assert MASK in scrubbed
    assert spelt not in scrubbed
    assert scrubbed.startswith("before ") and scrubbed.endswith(" after")


@pytest.mark.parametrize("name", list(spellings(ASCII_SECRET)))
def test_every_spelling_of_an_ascii_secret_is_masked(name: str) -> None:
    redactor = Redactor()
    redactor.register(ASCII_SECRET)
    spelt = spellings(ASCII_SECRET)[name]
    assert spelt not in redactor.scrub(f"<{spelt}>")


def test_text_without_the_secret_is_left_unchanged() -> None:
    redactor = Redactor()
    redactor.register(SECRET)
    text = "message_forwarded uid=12 message_id=<a@b> passé ssw€ AHJlbGF5QGV4YW1wbGUub3JnAA=="
    assert redactor.scrub(text) == text


def test_the_password_of_a_url_is_masked_alone_and_percent_encoded() -> None:
    redactor = Redactor()
    redactor.register(SecretStr("postgresql://forwarder:p%C3%A4ss%2Fw@db.example.org/mail"))
    assert redactor.scrub("password 'päss/w' refused") == f"password '{MASK}' refused"
    assert "p%C3%A4ss%2Fw" not in redactor.scrub("url p%C3%A4ss%2Fw")


def test_a_password_given_in_the_query_of_a_url_is_masked_alone() -> None:
    redactor = Redactor()
    redactor.register(SecretStr("postgresql://forwarder@db.example.org/mail?password=s3cr%C3%A9t"))
    assert redactor.scrub("password 's3crét' refused") == f"password '{MASK}' refused"


def test_secrets_are_found_in_nested_settings() -> None:
    class Endpoint(BaseModel):
        password: SecretStr

    class Settings(BaseModel):
        name: str
        imap: Endpoint
        smtp: list[Endpoint]
        token: SecretStr | None = None

    settings = Settings(
        name="x", imap=Endpoint(password=SecretStr("a")), smtp=[Endpoint(password=SecretStr("b"))]
    )
    assert sorted(secret_values(settings)) == ["a", "b"]


def test_secrets_are_found_in_the_mailboxes() -> None:
    imap = ImapEndpoint("imap.example.org", 993, "tls", "catchall", SecretStr("imap-pw"))
    smtp = SmtpEndpoint("smtp.example.org", 587, "starttls", "relay", SecretStr("smtp-pw"))
    mailbox = Mailbox("default", imap, smtp, {"a@example.org": ("b@example.org",)}, "c@x.org")
    assert sorted(secret_values((mailbox,))) == ["imap-pw", "smtp-pw"]


def test_every_secret_setting_is_registered_with_the_password_of_the_state_url() -> None:
    settings = load_settings(
        _env_file=None,
        imap_host="imap.example.org",
        imap_username="catchall@example.org",
        imap_password="imap-pässword",
        smtp_host="smtp.example.org",
        smtp_username="relay@example.org",
        smtp_password="smtp-pässword",
        lists={"contact@example.org": ["alice@example.org"]},
        state_url="postgresql://forwarder:url-p%C3%A4ss@db.example.org/mail",
        state_password="state-pässword",
    )
    redactor = Redactor()
    for secret in secret_values(settings.secrets()):  # what cli.main registers
        redactor.register(secret)
    for password in ("imap-pässword", "smtp-pässword", "url-päss", "state-pässword"):
        assert redactor.scrub(f"<{password}>") == f"<{MASK}>"
