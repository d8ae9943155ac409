"""Unit tests for forwarder.config: validation, defaults, nested lists, secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forwarder.addresses import normalize
from forwarder.config import Settings, load_settings
from forwarder.errors import EXIT_CONFIG, ConfigError
from forwarder.mailbox import Mailbox

CANARY = "canary-Pa55w0rd-XYZ"

BASE: dict[str, object] = {
    "imap_host": "imap.example.org",
    "imap_username": "catchall@example.org",
    "imap_password": CANARY,
    "smtp_host": "smtp.example.org",
    "lists": json.dumps({"team@example.org": ["alice@example.org", "bob@example.org"]}),
}
REQUIRED = ["imap_host", "imap_username", "imap_password", "smtp_host", "lists"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Neither the developer's environment nor a stray .env may leak into a test."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith("FORWARDER_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def load(**overrides: object) -> Settings:
    return load_settings(_env_file=None, **{**BASE, **overrides})


def box(**overrides: object) -> Mailbox:
    """The one mailbox of a configuration from the FORWARDER_* variables."""
    [mailbox] = load(**overrides).mailboxes()
    return mailbox


def load_without(*names: str, **overrides: object) -> Settings:
    values = {k: v for k, v in {**BASE, **overrides}.items() if k not in names}
    return load_settings(_env_file=None, **values)


def config_error(**overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(**overrides)
    return caught.value


def lists(value: object) -> str:
    return json.dumps(value)


def assert_one_line_naming(error: ConfigError, variable: str) -> None:
    message = str(error)
    assert message.startswith(f"{variable}: "), message
    assert "\n" not in message
    assert "\r" not in message
    assert error.exit_status == EXIT_CONFIG == 2


# A valid configuration ---------------------------------------------------------------


def test_load_settings_accepts_a_minimal_configuration():
    mailbox = box()
    assert mailbox.name == "default"
    assert mailbox.imap.host == "imap.example.org"
    assert mailbox.imap.password.get_secret_value() == CANARY
    assert mailbox.lists == {"team@example.org": ("alice@example.org", "bob@example.org")}


def test_load_settings_normalises_list_addresses():
    assert list(box(lists=lists({"Team@Example.ORG": ["alice@example.org"]})).lists) == [
        "team@example.org"
    ]


def test_load_settings_keeps_member_spelling_and_drops_duplicate_members():
    value = lists(
        {"team@example.org": ["Alice@Example.org", "alice+x@example.org", "b@example.org"]}
    )
    assert box(lists=value).lists["team@example.org"] == ("Alice@Example.org", "b@example.org")


def test_load_settings_reads_forwarder_environment_variables(monkeypatch):
    monkeypatch.setenv("FORWARDER_IMAP_HOST", "imap.env.example.org")
    monkeypatch.setenv("FORWARDER_IMAP_USERNAME", "catchall@example.org")
    monkeypatch.setenv("FORWARDER_IMAP_PASSWORD", CANARY)
    monkeypatch.setenv("FORWARDER_SMTP_HOST", "smtp.env.example.org")
    monkeypatch.setenv("FORWARDER_SMTP_PORT", "2525")
    monkeypatch.setenv("FORWARDER_LISTS", lists({"team@example.org": ["x@elsewhere.net"]}))
    monkeypatch.setenv("FORWARDER_MEMBER_DOMAINS", "elsewhere.net, example.org")
    [mailbox] = load_settings(_env_file=None).mailboxes()
    assert mailbox.imap.host == "imap.env.example.org"
    assert mailbox.smtp.port == 2525
    assert mailbox.lists == {"team@example.org": ("x@elsewhere.net",)}


def test_load_settings_reads_a_dot_env_file_in_the_working_directory(tmp_path):
    env = {f"FORWARDER_{k.upper()}": v for k, v in BASE.items()}
    env["FORWARDER_SMTP_HOST"] = "smtp.dotenv.example.org"
    (tmp_path / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
    assert load_settings().mailboxes()[0].smtp.host == "smtp.dotenv.example.org"


def test_load_settings_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("FORWARDER_SMTP_HOST", "smtp.env.example.org")
    assert box(smtp_host="smtp.override.example.org").smtp.host == "smtp.override.example.org"


# FORWARDER_LISTS: refused values -----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("{", id="invalid-json"),
        pytest.param("team@example.org: alice@example.org", id="not-json-at-all"),
        pytest.param("", id="empty-string"),
        pytest.param(lists(["team@example.org"]), id="json-array"),
        pytest.param(lists("team@example.org"), id="json-string"),
        pytest.param(lists(3), id="json-number"),
        pytest.param(lists(None), id="json-null"),
        pytest.param(lists({}), id="empty-object"),
        pytest.param(lists({"team": ["a@example.org"]}), id="list-address-without-domain"),
        pytest.param(lists({"Team <team@example.org>": ["a@example.org"]}), id="list-display-name"),
        pytest.param(
            lists({"team@example.org\r\nRCPT TO:<x@y>": ["a@example.org"]}),
            id="list-address-crlf-injection",
        ),
        pytest.param(lists({"team+x@example.org": ["a@example.org"]}), id="list-address-detail"),
        pytest.param(
            '{"team@example.org": ["a@example.org"], "Team@Example.org": ["b@example.org"]}',
            id="list-defined-twice",
        ),
        pytest.param(lists({"team@example.org": []}), id="empty-member-list"),
        pytest.param(lists({"team@example.org": "a@example.org"}), id="members-not-an-array"),
        pytest.param(lists({"team@example.org": None}), id="members-null"),
        pytest.param(lists({"team@example.org": [42]}), id="member-not-a-string"),
        pytest.param(lists({"team@example.org": ["alice"]}), id="member-without-domain"),
        pytest.param(lists({"team@example.org": [""]}), id="member-empty"),
        pytest.param(lists({"team@example.org": ["a b@example.org"]}), id="member-with-space"),
        pytest.param(
            lists({"team@example.org": ["Alice <alice@example.org>"]}), id="member-display-name"
        ),
        pytest.param(
            lists({"team@example.org": ["a@example.org\r\nRCPT TO:<x@y>"]}),
            id="member-crlf-injection",
        ),
        pytest.param(
            lists({"team@example.org": ["a@example.org\nRCPT TO:<x@y>"]}),
            id="member-lf-injection",
        ),
        pytest.param(lists({"team@example.org": ["team@example.org"]}), id="own-address"),
        pytest.param(lists({"team@example.org": ["TEAM@Example.ORG"]}), id="own-address-case"),
        pytest.param(lists({"team@example.org": ["team+x@example.org"]}), id="own-address-detail"),
        pytest.param(
            lists({"team@example.org": ["a@example.org", "Team+Loop@EXAMPLE.org"]}),
            id="own-address-case-and-detail",
        ),
        pytest.param(lists({"team@example.org": ["a@elsewhere.net"]}), id="member-other-domain"),
        pytest.param(
            lists({"team@example.org": ["a@sub.example.org"]}), id="member-subdomain-not-allowed"
        ),
        pytest.param(
            lists({"a@example.org": ["b@example.org"], "b@example.org": ["a@example.org"]}),
            id="cycle-a-b-a",
        ),
        pytest.param(
            lists(
                {
                    "a@example.org": ["b@example.org"],
                    "b@example.org": ["c@example.org"],
                    "c@example.org": ["m@example.org", "a@example.org"],
                }
            ),
            id="cycle-a-b-c-a",
        ),
        pytest.param(
            lists({"a@example.org": ["b+x@example.org"], "b@example.org": ["A+y@Example.org"]}),
            id="cycle-through-detail-and-case",
        ),
    ],
)
def test_load_settings_refuses_bad_lists(value):
    assert_one_line_naming(config_error(lists=value), "FORWARDER_LISTS")


@pytest.mark.parametrize(
    ("value", "mentioned"),
    [
        pytest.param("{", "JSON", id="invalid-json"),
        pytest.param(lists({}), "no list", id="empty-object"),
        pytest.param(lists({"team@example.org": []}), "no members", id="empty-member-list"),
        pytest.param(
            lists({"team@example.org": ["team+x@example.org"]}), "own address", id="own-address"
        ),
        pytest.param(
            lists({"team@example.org": ["a@elsewhere.net"]}),
            "FORWARDER_MEMBER_DOMAINS",
            id="member-other-domain",
        ),
        pytest.param(
            lists({"a@example.org": ["b@example.org"], "b@example.org": ["a@example.org"]}),
            "a@example.org -> b@example.org -> a@example.org",
            id="cycle",
        ),
    ],
)
def test_load_settings_says_what_is_wrong_with_the_lists(value, mentioned):
    assert mentioned in str(config_error(lists=value))


def test_load_settings_quotes_an_injected_member_without_its_line_break():
    message = str(config_error(lists=lists({"team@example.org": ["a@b.org\r\nRCPT TO:<x@y>"]})))
    assert "RCPT TO" in message  # shown, escaped, so the administrator sees the culprit
    assert "\r" not in message
    assert "\n" not in message


# FORWARDER_MEMBER_DOMAINS ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "member_domains"),
    [
        pytest.param({"team@example.org": ["a@example.org"]}, None, id="default-list-domain"),
        pytest.param({"team@example.org": ["a@EXAMPLE.org"]}, None, id="default-domain-any-case"),
        pytest.param(
            {"team@example.org": ["a@example.org"], "ops@example.net": ["b@example.net"]},
            None,
            id="default-each-list-domain",
        ),
        pytest.param(
            {"team@example.org": ["a@example.net"], "ops@example.net": ["b@example.org"]},
            None,
            id="default-any-list-domain-for-any-list",
        ),
        pytest.param({"team@example.org": ["a@elsewhere.net"]}, "*", id="star-allows-any"),
        pytest.param(
            {"team@example.org": ["a@elsewhere.net", "b@example.org"]},
            "elsewhere.net, example.org",
            id="explicit-domains",
        ),
        pytest.param(
            {"team@example.org": ["a@elsewhere.net"]}, "ELSEWHERE.net", id="explicit-any-case"
        ),
        pytest.param(
            {"team@example.org": ["ops@example.net"], "ops@example.net": ["m@elsewhere.net"]},
            "elsewhere.net",
            id="nested-list-address-needs-no-domain",
        ),
    ],
)
def test_load_settings_accepts_members_in_allowed_domains(value, member_domains):
    overrides = {"lists": lists(value)}
    if member_domains is not None:
        overrides["member_domains"] = member_domains
    assert box(**overrides).lists


def test_load_settings_refuses_a_member_outside_explicit_member_domains():
    error = config_error(
        lists=lists({"team@example.org": ["a@example.org"]}), member_domains="elsewhere.net"
    )
    assert_one_line_naming(error, "FORWARDER_LISTS")
    assert "FORWARDER_MEMBER_DOMAINS" in str(error)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not a domain!", id="punctuation"),
        pytest.param("exa mple.org", id="space"),
    ],
)
def test_load_settings_refuses_a_bad_member_domain(value):
    assert_one_line_naming(config_error(member_domains=value), "FORWARDER_MEMBER_DOMAINS")


# Nested lists ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            {
                "all@example.org": ["ops@example.org", "m1@example.org"],
                "ops@example.org": ["m2@example.org"],
            },
            {
                "all@example.org": {"m1@example.org", "m2@example.org"},
                "ops@example.org": {"m2@example.org"},
            },
            id="one-level",
        ),
        pytest.param(
            {
                "a@example.org": ["b@example.org"],
                "b@example.org": ["c@example.org", "mb@example.org"],
                "c@example.org": ["mc@example.org"],
            },
            {
                "a@example.org": {"mb@example.org", "mc@example.org"},
                "b@example.org": {"mb@example.org", "mc@example.org"},
                "c@example.org": {"mc@example.org"},
            },
            id="two-levels",
        ),
        pytest.param(
            {"all@example.org": ["Ops+x@Example.org"], "ops@example.org": ["m@example.org"]},
            {"all@example.org": {"m@example.org"}, "ops@example.org": {"m@example.org"}},
            id="reference-with-case-and-detail",
        ),
        pytest.param(
            {
                "all@example.org": ["a@example.org", "b@example.org"],
                "a@example.org": ["m@example.org"],
                "b@example.org": ["m@example.org"],
            },
            {
                "all@example.org": {"m@example.org"},
                "a@example.org": {"m@example.org"},
                "b@example.org": {"m@example.org"},
            },
            id="diamond",
        ),
        pytest.param(
            {"team@example.org": ["m@example.org"]},
            {"team@example.org": {"m@example.org"}},
            id="not-nested",
        ),
    ],
)
def test_expanded_lists_resolves_nested_lists(value, expected):
    expanded = box(lists=lists(value)).lists
    assert {key: set(members) for key, members in expanded.items()} == expected


def test_expanded_lists_gives_a_member_reached_twice_one_entry():
    value = {
        "all@example.org": ["ops@example.org", "M@example.org"],
        "ops@example.org": ["m+ops@example.org", "n@example.org"],
    }
    members = box(lists=lists(value)).lists["all@example.org"]
    assert len(members) == 2
    assert {normalize(m) for m in members} == {"m@example.org", "n@example.org"}


def test_expanded_lists_never_contains_a_list_address():
    value = {
        "all@example.org": ["ops@example.org", "a@example.org"],
        "ops@example.org": ["b@example.org"],
    }
    expanded = box(lists=lists(value)).lists
    assert all(member not in expanded for members in expanded.values() for member in members)


# Required variables, security, ports -------------------------------------------------


@pytest.mark.parametrize("field", REQUIRED)
def test_load_settings_names_a_missing_required_variable(field):
    with pytest.raises(ConfigError) as caught:
        load_without(field)
    assert str(caught.value) == f"FORWARDER_{field.upper()}: is required but not set"
    assert caught.value.exit_status == EXIT_CONFIG


@pytest.mark.parametrize("field", ["imap_host", "imap_username", "smtp_host"])
def test_load_settings_refuses_an_empty_required_value(field):
    assert_one_line_naming(config_error(**{field: ""}), f"FORWARDER_{field.upper()}")


@pytest.mark.parametrize("field", ["imap_security", "smtp_security"])
@pytest.mark.parametrize("value", ["ssl", "", "tls1.2", "yes"])
def test_load_settings_refuses_a_bad_security_value(field, value):
    assert_one_line_naming(config_error(**{field: value}), f"FORWARDER_{field.upper()}")


@pytest.mark.parametrize("field", ["imap_port", "smtp_port"])
@pytest.mark.parametrize("value", [0, -1, 65536, "abc", "25x", 1.5])
def test_load_settings_refuses_a_bad_port(field, value):
    assert_one_line_naming(config_error(**{field: value}), f"FORWARDER_{field.upper()}")


@pytest.mark.parametrize(
    ("security", "port"),
    [
        pytest.param("tls", 993, id="tls"),
        pytest.param("starttls", 143, id="starttls"),
        pytest.param("TLS", 993, id="tls-upper-case"),
    ],
)
def test_imap_port_defaults_to_the_security_mode(security, port):
    assert box(imap_security=security).imap.port == port


@pytest.mark.parametrize(
    ("security", "port"),
    [
        pytest.param("starttls", 587, id="starttls"),
        pytest.param("tls", 465, id="tls"),
        pytest.param("none", 25, id="none"),
        pytest.param(" StartTLS ", 587, id="starttls-any-case"),
    ],
)
def test_smtp_port_defaults_to_the_security_mode(security, port):
    assert box(smtp_security=security).smtp.port == port


def test_default_security_is_imap_tls_and_smtp_starttls():
    mailbox = box()
    assert (mailbox.imap.port, mailbox.smtp.port) == (993, 587)


@pytest.mark.parametrize("field", ["imap_port", "smtp_port"])
def test_an_explicit_port_wins_over_the_default(field):
    mailbox = box(**{field: "2525"})
    assert getattr(mailbox, field.partition("_")[0]).port == 2525


# Envelope sender ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({}, "catchall@example.org", id="imap-username"),
        pytest.param(
            {"smtp_username": "relay@example.org", "smtp_password": "pw"},
            "relay@example.org",
            id="smtp-username",
        ),
        pytest.param(
            {"smtp_username": "relay", "smtp_password": "pw"},
            "catchall@example.org",
            id="smtp-username-no-address",
        ),
        pytest.param({"smtp_username": ""}, "catchall@example.org", id="smtp-username-empty"),
        pytest.param(
            {
                "smtp_username": "relay@example.org",
                "smtp_password": "pw",
                "envelope_sender": "admin@example.org",
            },
            "admin@example.org",
            id="explicit",
        ),
        pytest.param(
            {"imap_username": "catchall", "envelope_sender": "admin@example.org"},
            "admin@example.org",
            id="explicit-without-address-usernames",
        ),
        pytest.param({"envelope_sender": ""}, "catchall@example.org", id="explicit-empty"),
    ],
)
def test_envelope_sender_defaults_to_a_username_that_is_an_address(overrides, expected):
    assert box(**overrides).envelope_sender == expected


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"imap_username": "catchall"}, id="imap-username-only"),
        pytest.param(
            {"imap_username": "catchall", "smtp_username": "relay", "smtp_password": "pw"},
            id="both-usernames",
        ),
        pytest.param({"envelope_sender": "not an address"}, id="explicit-not-an-address"),
        pytest.param(
            {"envelope_sender": "admin@example.org\r\nRCPT TO:<x@y>"}, id="explicit-crlf-injection"
        ),
    ],
)
def test_load_settings_refuses_a_missing_or_bad_envelope_sender(overrides):
    assert_one_line_naming(config_error(**overrides), "FORWARDER_ENVELOPE_SENDER")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"envelope_sender": " admin@example.org\t"}, id="explicit"),
        pytest.param(
            {"smtp_username": " relay@example.org ", "smtp_password": "pw"}, id="smtp-username"
        ),
        pytest.param({"imap_username": "\tcatchall@example.org "}, id="imap-username"),
    ],
)
def test_envelope_sender_never_carries_surrounding_whitespace(overrides):
    sender = box(**overrides).envelope_sender
    assert sender == sender.strip()


# Secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"lists": "{"}, id="lists-invalid-json"),
        pytest.param({"lists": lists({})}, id="lists-empty"),
        pytest.param({"lists": lists({"t@example.org": ["a@elsewhere.net"]})}, id="lists-domain"),
        pytest.param(
            {
                "lists": lists(
                    {"a@example.org": ["b@example.org"], "b@example.org": ["a@example.org"]}
                )
            },
            id="lists-cycle",
        ),
        pytest.param({"imap_port": 0}, id="imap-port"),
        pytest.param({"smtp_port": "abc"}, id="smtp-port"),
        pytest.param({"imap_security": CANARY}, id="security-set-to-the-password"),
        pytest.param({"imap_username": "catchall"}, id="envelope-sender"),
        pytest.param({"envelope_sender": "nope"}, id="envelope-sender-invalid"),
        pytest.param({"smtp_host": ""}, id="smtp-host-empty"),
        pytest.param({"poll_interval": -1}, id="poll-interval"),
        pytest.param({"member_domains": "bad domain"}, id="member-domains"),
    ],
)
@pytest.mark.parametrize("password_field", ["imap_password", "smtp_password"])
def test_config_errors_never_contain_a_password(overrides, password_field):
    login = {"smtp_username": "relay"} if password_field == "smtp_password" else {}
    error = config_error(**{password_field: CANARY, **login, **overrides})
    assert CANARY not in str(error)
    assert CANARY not in repr(error)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_config_error_from_environment_never_contains_the_password(monkeypatch):
    monkeypatch.setenv("FORWARDER_IMAP_PASSWORD", CANARY)
    monkeypatch.setenv("FORWARDER_SMTP_PASSWORD", CANARY)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, imap_host="imap.example.org", smtp_port="x")
    assert CANARY not in str(caught.value)


def test_settings_repr_and_str_never_contain_a_password():
    settings = load(smtp_username="relay@example.org", smtp_password=CANARY)
    [mailbox] = settings.mailboxes()
    for text in (repr(settings), str(settings), repr(mailbox), str(mailbox)):
        assert CANARY not in text
    assert mailbox.smtp.password is not None
    assert mailbox.smtp.password.get_secret_value() == CANARY


# Passwords from $CREDENTIALS_DIRECTORY -----------------------------------------------


def test_passwords_are_read_from_the_credentials_directory(monkeypatch, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "imap_password").write_text("imap-secret\n")
    (credentials / "smtp_password").write_text("smtp-secret\r\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    [mailbox] = load_without("imap_password", smtp_username="relay").mailboxes()
    assert mailbox.imap.password.get_secret_value() == "imap-secret"
    assert mailbox.smtp.password is not None
    assert mailbox.smtp.password.get_secret_value() == "smtp-secret"


def test_a_missing_credential_file_leaves_the_password_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "smtp_password").write_text("smtp-secret")
    with pytest.raises(ConfigError) as caught:
        load_without("imap_password")
    assert str(caught.value) == "FORWARDER_IMAP_PASSWORD: is required but not set"


def test_without_credentials_directory_the_smtp_password_is_unset():
    assert box().smtp.password is None


def test_credential_file_contents_never_appear_in_errors(monkeypatch, tmp_path):
    (tmp_path / "imap_password").write_text(CANARY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_without("imap_password", lists="{")
    assert CANARY not in str(caught.value)


# The error itself --------------------------------------------------------------------


def test_config_error_is_a_value_error_with_exit_status_2():
    error = config_error(lists="{")
    assert isinstance(error, ValueError)
    assert error.exit_status == 2


def test_retention_shorter_than_the_retry_window_is_refused() -> None:
    error = config_error(state_retention=3600, retry_for=7200)
    assert str(error).startswith("FORWARDER_STATE_RETENTION:")


def test_misspelt_forwarder_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_SMTP_SECURTY", "tls")
    error = config_error()
    assert str(error) == (
        "FORWARDER_SMTP_SECURTY is not a forwarder setting; did you mean FORWARDER_SMTP_SECURITY?"
    )


def test_lists_can_come_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lists.json"
    path.write_text('{"team@example.org": ["Ann@example.org"]}', encoding="utf-8")
    [mailbox] = load_without("lists", lists_file=str(path)).mailboxes()
    assert mailbox.lists == {"team@example.org": ("Ann@example.org",)}


def test_lists_file_and_lists_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lists.json"
    path.write_text('{"team@example.org": ["ann@example.org"]}', encoding="utf-8")
    error = config_error(lists_file=str(path))
    assert "FORWARDER_LISTS and FORWARDER_LISTS_FILE are both set" in str(error)


def test_unreadable_lists_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_without("lists", lists_file=str(tmp_path / "missing.json"))
    error = caught.value
    assert str(error).startswith("FORWARDER_LISTS_FILE: cannot read")
    assert "No such file" in str(error)


# Settings hygiene: .env names, passwords, hosts, durations -----------------------------


def test_misspelt_variable_in_dot_env_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FORWARDER_SMTP_SECURTY=tls\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(**BASE)
    assert str(caught.value) == (
        "FORWARDER_SMTP_SECURTY (in .env) is not a forwarder setting; "
        "did you mean FORWARDER_SMTP_SECURITY?"
    )
    assert caught.value.exit_status == EXIT_CONFIG


def test_an_empty_imap_password_is_refused() -> None:
    assert str(config_error(imap_password="")) == "FORWARDER_IMAP_PASSWORD: is empty"


def test_an_empty_imap_password_from_a_credential_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "imap_password").write_text("\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_without("imap_password")
    assert str(caught.value) == "FORWARDER_IMAP_PASSWORD: is empty"


def test_an_smtp_username_without_a_password_is_refused() -> None:
    error = config_error(smtp_username="relay@example.org")
    assert_one_line_naming(error, "FORWARDER_SMTP_PASSWORD")
    assert "FORWARDER_SMTP_USERNAME is set" in str(error)


def test_an_smtp_password_without_a_username_is_refused() -> None:
    error = config_error(smtp_password=CANARY)
    assert_one_line_naming(error, "FORWARDER_SMTP_USERNAME")
    assert CANARY not in str(error)


def test_an_smtp_login_with_both_is_accepted() -> None:
    smtp = box(smtp_username="relay@example.org", smtp_password=CANARY).smtp
    assert smtp.username == "relay@example.org"
    assert smtp.password is not None and smtp.password.get_secret_value() == CANARY


@pytest.mark.parametrize("protocol", ["imap", "smtp"])
@pytest.mark.parametrize(
    ("host", "shown"),
    [
        pytest.param("mail.example.org:993", "mail.example.org", id="name"),
        pytest.param("[::1]:143", "::1", id="ipv6"),
    ],
)
def test_a_host_with_a_port_is_refused_naming_the_host_and_port_variables(protocol, host, shown):
    error = config_error(**{f"{protocol}_host": host})
    assert_one_line_naming(error, f"FORWARDER_{protocol.upper()}_HOST")
    assert f"set the host to {shown} and the port" in str(error)
    assert f"FORWARDER_{protocol.upper()}_PORT" in str(error)


DURATIONS = {
    "poll_interval": lambda s: s.poll_interval,
    "retry_for": lambda s: s.retry_for,
    "state_retention": lambda s: s.state_retention,
    "imap_timeout": lambda s: s.mailboxes()[0].imap.timeout,
    "smtp_timeout": lambda s: s.mailboxes()[0].smtp.timeout,
    "takeover_after": lambda s: s.takeover_after,
}


@pytest.mark.parametrize("field", sorted(DURATIONS))
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("5d", 432000.0)],
)
def test_every_duration_setting_accepts_units(field, text, seconds):
    others = {"state_retention": "1000d"} if field == "retry_for" else {"retry_for": "1s"}
    assert DURATIONS[field](load(**others, **{field: text})) == seconds


@pytest.mark.parametrize("field", sorted(DURATIONS))
def test_a_duration_that_is_not_one_is_refused(field):
    error = config_error(**{field: "5 days"})
    assert_one_line_naming(error, f"FORWARDER_{field.upper()}")
    assert "90s, 10m, 2h, 5d" in str(error)


# CR, LF and NUL in any setting that reaches a protocol line (issue 8.9) ---------------

INJECTION = "x\r\nZ1 DELETE Victim"
PROTOCOL_SETTINGS = {
    "imap_host": {},
    "imap_username": {},
    "imap_password": {},
    "imap_folder": {},
    "smtp_host": {},
    "smtp_username": {"smtp_password": "pw"},
    "smtp_password": {"smtp_username": "relay@example.org"},
    "envelope_sender": {},
}


@pytest.mark.parametrize("field", sorted(PROTOCOL_SETTINGS))
@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\0"], ids=["crlf", "lf", "cr", "nul"])
def test_a_line_break_or_nul_in_a_protocol_setting_is_refused(field, bad):
    value = INJECTION.replace("\r\n", bad)
    error = config_error(**PROTOCOL_SETTINGS[field], **{field: value})
    assert_one_line_naming(error, f"FORWARDER_{field.upper()}")
    assert "contains" in str(error)


@pytest.mark.parametrize("field", ["imap_password", "smtp_password"])
def test_a_refused_password_is_not_shown(field):
    error = config_error(**PROTOCOL_SETTINGS[field], **{field: CANARY + "\r\nZ1 DELETE x"})
    assert CANARY not in str(error) and "DELETE" not in str(error)


def test_a_line_break_in_a_variable_of_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("FORWARDER_IMAP_USERNAME", "catchall@example.org\r\nZ1 DELETE Victim")
    with pytest.raises(ConfigError) as caught:
        load_without("imap_username")
    assert_one_line_naming(caught.value, "FORWARDER_IMAP_USERNAME")


def test_a_line_break_in_a_credential_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "imap_password").write_text(CANARY + "\r\nZ1 DELETE Victim\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_without("imap_password")
    assert_one_line_naming(caught.value, "FORWARDER_IMAP_PASSWORD")
    assert CANARY not in str(caught.value)


def test_a_multi_line_json_lists_value_is_still_accepted():
    value = '{\n  "team@example.org": [\n    "alice@example.org"\n  ]\n}\n'
    assert box(lists=value).lists == {"team@example.org": ("alice@example.org",)}


# Unreadable credential files ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_an_unreadable_credential_file_is_a_one_line_configuration_error(
    monkeypatch, tmp_path, kind
):
    path = tmp_path / "imap_password"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe" + CANARY.encode())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_without("imap_password")
    assert_one_line_naming(caught.value, "FORWARDER_IMAP_PASSWORD")
    assert f"cannot read the credential file {path}" in str(caught.value)
    assert CANARY not in str(caught.value)


# Lists files: JSON or the aliases(5) syntax ------------------------------------------


def test_a_lists_file_in_the_aliases_syntax_is_read(tmp_path: Path) -> None:
    path = tmp_path / "lists"
    path.write_text(
        "# lists\nteam@example.org: alice@example.org,\n  bob@example.org\n"
        "all@example.org: team@example.org carol@example.org\n"
    )
    [mailbox] = load_without("lists", lists_file=str(path)).mailboxes()
    assert mailbox.lists == {
        "team@example.org": ("alice@example.org", "bob@example.org"),
        "all@example.org": ("alice@example.org", "bob@example.org", "carol@example.org"),
    }


def test_an_error_in_an_aliases_lists_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "lists"
    path.write_text("team@example.org: alice@example.org\n\nops@example.org: bob\n")
    with pytest.raises(ConfigError) as caught:
        load_without("lists", lists_file=str(path))
    assert str(caught.value) == (
        f"FORWARDER_LISTS_FILE: {path}: line 3: list ops@example.org: member 'bob' is not an "
        "address"
    )


def test_a_json_error_in_a_lists_file_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "lists.json"
    path.write_text('{\n  "team@example.org": ["alice@example.org"]\n  "ops@example.org": []\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_without("lists", lists_file=str(path))
    message = str(caught.value)
    assert message.startswith(f"FORWARDER_LISTS_FILE: {path}: line 3, column 3: not valid JSON")
    assert "character" not in message


def test_a_member_outside_the_domains_in_a_lists_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lists"
    path.write_text("team@example.org: alice@elsewhere.net\n")
    with pytest.raises(ConfigError) as caught:
        load_without("lists", lists_file=str(path))
    assert str(caught.value).startswith(f"FORWARDER_LISTS_FILE: {path}: member alice@elsewhere")


def test_the_aliases_syntax_in_the_variable_itself_points_to_the_lists_file() -> None:
    error = config_error(lists="team@example.org: alice@example.org")
    assert_one_line_naming(error, "FORWARDER_LISTS")
    assert "lists file" in str(error)


def test_secrets_lists_every_password_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_SMTP_PASSWORD", "smtp-secret")
    settings = load(smtp_username="relay@example.org")
    assert sorted(s.get_secret_value() for s in settings.secrets()) == [CANARY, "smtp-secret"]
