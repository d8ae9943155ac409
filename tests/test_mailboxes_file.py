"""FORWARDER_MAILBOXES_FILE: many catch-alls from one TOML file (issue 10.3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.config import Settings, load_process_settings, load_settings
from forwarder.errors import EXIT_CONFIG, ConfigError
from forwarder.mailbox import Mailbox

CANARY = "canary-Mb0x-Pa55"
# What a provider sets once for every mailbox: the shared SMTP relay and its login.
SHARED: dict[str, object] = {
    "smtp_host": "relay.example.net",
    "smtp_username": "relay@example.net",
    "smtp_password": CANARY,
    "imap_host": "imap.example.net",
}


def mailbox_table(name: str, domain: str, **extra: str) -> str:
    values = {
        "name": f'"{name}"',
        "imap_username": f'"catchall@{domain}"',
        "imap_password_file": f'"{name}.imap"',
        "lists": f'{{ "contact@{domain}" = ["alice@{domain}", "bob@{domain}"] }}',
        **extra,
    }
    return "[[mailbox]]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()) + "\n"


def write(tmp_path: Path, text: str, passwords: tuple[str, ...] = ("acme", "globex")) -> Path:
    for name in passwords:
        (tmp_path / f"{name}.imap").write_text(f"{name}-imap-secret\n")
    path = tmp_path / "mailboxes.toml"
    path.write_text(text)
    return path


def two_mailboxes(tmp_path: Path, **acme_extra: str) -> Path:
    return write(
        tmp_path,
        mailbox_table("acme", "acme.example", **acme_extra)
        + mailbox_table("globex", "globex.example"),
    )


def load(path: Path, **overrides: object) -> Settings:
    return load_settings(_env_file=None, **{**SHARED, "mailboxes_file": str(path), **overrides})


def load_error(path: Path, **overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, **overrides)
    assert caught.value.exit_status == EXIT_CONFIG
    message = str(caught.value)
    assert "\n" not in message and CANARY not in message
    return message


def by_name(settings: Settings) -> dict[str, Mailbox]:
    return {mailbox.name: mailbox for mailbox in settings.mailboxes()}


# Loading -----------------------------------------------------------------------------


def test_every_mailbox_of_the_file_is_loaded_in_order(tmp_path):
    settings = load(two_mailboxes(tmp_path))
    assert [m.name for m in settings.mailboxes()] == ["acme", "globex"]
    acme = by_name(settings)["acme"]
    assert acme.imap.username == "catchall@acme.example"
    assert acme.imap.password.get_secret_value() == "acme-imap-secret"
    assert acme.lists == {"contact@acme.example": ("alice@acme.example", "bob@acme.example")}
    assert acme.envelope_sender == "relay@example.net"


def test_a_value_left_out_comes_from_the_forwarder_variable(tmp_path):
    acme, globex = load(two_mailboxes(tmp_path), imap_folder="Lists").mailboxes()
    for mailbox in (acme, globex):
        assert (mailbox.smtp.host, mailbox.smtp.username) == (
            "relay.example.net",
            SHARED["smtp_username"],
        )
        assert mailbox.imap.host == "imap.example.net"
        assert mailbox.imap.folder == "Lists"


def test_a_value_in_the_file_wins_over_the_variable(tmp_path):
    path = two_mailboxes(
        tmp_path, folder='"Catchall"', imap_port="1143", imap_security='"starttls"'
    )
    acme, globex = load(path, imap_folder="Lists").mailboxes()
    assert (acme.imap.folder, acme.imap.port, acme.imap.security) == ("Catchall", 1143, "starttls")
    assert (globex.imap.folder, globex.imap.port) == ("Lists", 993)


def test_identical_endpoints_are_one_object(tmp_path):
    acme, globex = load(two_mailboxes(tmp_path)).mailboxes()
    assert acme.smtp is globex.smtp
    assert acme.imap is not globex.imap


def test_one_thousand_mailboxes_share_one_smtp_endpoint_and_stay_light(tmp_path):
    names = [f"customer-{n:04d}" for n in range(1000)]
    text = "".join(mailbox_table(name, f"c{n}.example") for n, name in enumerate(names))
    settings = load(write(tmp_path, text, passwords=tuple(names)))
    mailboxes = settings.mailboxes()
    assert [m.name for m in mailboxes] == names
    assert len({id(m.smtp) for m in mailboxes}) == 1
    assert not hasattr(mailboxes[0], "__dict__")  # slots: no per-instance dict
    assert not hasattr(mailboxes[0].imap, "__dict__")


def test_a_mailbox_with_its_own_smtp_server_does_not_inherit_the_relay_login(tmp_path):
    path = two_mailboxes(tmp_path, smtp_host='"smtp.acme.example"')
    acme, globex = load(path).mailboxes()
    assert (acme.smtp.host, acme.smtp.username, acme.smtp.password) == (
        "smtp.acme.example",
        None,
        None,
    )
    assert globex.smtp.username == SHARED["smtp_username"]


def test_a_mailbox_with_its_own_imap_server_needs_its_own_password(tmp_path):
    path = write(
        tmp_path,
        '[[mailbox]]\nname = "acme"\nimap_host = "imap.acme.example"\n'
        'imap_username = "catchall@acme.example"\n'
        'lists = { "contact@acme.example" = ["alice@acme.example"] }\n',
    )
    message = load_error(path, imap_username="shared@example.net", imap_password=CANARY)
    assert message == f"{path}: mailbox acme: imap_password_file: is required but not set"


def test_a_missing_value_names_the_key_and_the_variable(tmp_path):
    path = two_mailboxes(tmp_path)
    shared = {k: v for k, v in SHARED.items() if k != "imap_host"}
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, **shared, mailboxes_file=str(path))
    message = str(caught.value)
    assert message == (
        f"{path}: mailbox acme: imap_host (or FORWARDER_IMAP_HOST): is required but not set"
    )


def test_a_username_in_the_file_does_not_take_the_password_of_the_variable(tmp_path):
    path = write(
        tmp_path,
        '[[mailbox]]\nname = "acme"\nsmtp_username = "acme@relay.example.net"\n'
        'imap_username = "catchall@acme.example"\nimap_password_file = "acme.imap"\n'
        'lists = { "contact@acme.example" = ["alice@acme.example"] }\n',
    )
    message = load_error(path)
    assert message.startswith(f"{path}: mailbox acme: smtp_password_file: is required when ")


def test_lists_from_a_lists_file_next_to_the_mailboxes_file(tmp_path):
    (tmp_path / "acme.lists").write_text("contact@acme.example: alice@acme.example\n")
    path = write(
        tmp_path,
        '[[mailbox]]\nname = "acme"\nimap_username = "catchall@acme.example"\n'
        'imap_password_file = "acme.imap"\nlists_file = "acme.lists"\n',
        passwords=("acme",),
    )
    [acme] = load(path, lists='{"x@example.net": ["y@example.net"]}').mailboxes()
    assert acme.lists == {"contact@acme.example": ("alice@acme.example",)}


def test_an_error_in_a_mailbox_lists_file_names_the_mailbox_file_and_line(tmp_path):
    (tmp_path / "acme.lists").write_text("contact@acme.example: alice@acme.example\nops: bob\n")
    path = write(
        tmp_path,
        '[[mailbox]]\nname = "acme"\nimap_username = "catchall@acme.example"\n'
        'imap_password_file = "acme.imap"\nlists_file = "acme.lists"\n',
        passwords=("acme",),
    )
    assert load_error(path) == (
        f"{path}: mailbox acme: lists_file: {tmp_path / 'acme.lists'}: line 2: "
        "list address 'ops' is not an address"
    )


def test_without_a_mailboxes_file_there_is_one_mailbox_named_default():
    settings = load_settings(
        _env_file=None,
        **SHARED,
        imap_username="catchall@example.org",
        imap_password="pw",
        lists='{"contact@example.org": ["a@example.org"]}',
    )
    assert [m.name for m in settings.mailboxes()] == ["default"]


# Errors name the file, the mailbox and the key ---------------------------------------


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        pytest.param({"imap_port": "0"}, "mailbox acme: imap_port: ", id="bad-port"),
        pytest.param(
            {"imap_security": '"ssl"'}, "mailbox acme: imap_security: ", id="bad-security"
        ),
        pytest.param(
            {"imap_host": '"imap.acme.example:993"'},
            "mailbox acme: imap_host: 'imap.acme.example:993' includes a port; set the host to "
            "imap.acme.example and the port (993) in",
            id="host-with-port",
        ),
        pytest.param(
            {"envelope_sender": '"not an address"'},
            "mailbox acme: envelope_sender: ",
            id="bad-sender",
        ),
        pytest.param(
            {"member_domains": '["bad domain"]'}, "mailbox acme: member_domains: ", id="bad-domain"
        ),
        pytest.param(
            {"folder": '"INBOX\\r\\nZ1 DELETE Victim"'},
            "mailbox acme: folder: contains CR and LF",
            id="crlf-in-folder",
        ),
        pytest.param(
            {"imap_username": '"x\\r\\nZ1 DELETE Victim"'},
            "mailbox acme: imap_username: contains CR and LF",
            id="crlf-in-username",
        ),
        pytest.param(
            {"imap_password": '"hunter2"'},
            "mailbox acme: imap_password: a password is not written in this file; put it alone "
            "in a file",
            id="inline-password",
        ),
        pytest.param(
            {"imap_hots": '"x"'},
            "mailbox acme: imap_hots: is not a mailbox setting; did you mean imap_host?",
            id="misspelt-key",
        ),
        pytest.param(
            {"lists_file": '"acme.lists"'}, "mailbox acme: lists and ", id="lists-and-lists-file"
        ),
    ],
)
def test_a_wrong_value_names_the_file_the_mailbox_and_the_key(tmp_path, extra, said):
    (tmp_path / "acme.lists").write_text("contact@acme.example: alice@acme.example\n")
    path = two_mailboxes(tmp_path, **extra)
    message = load_error(path)
    assert message.startswith(f"{path}: {said}"), message


def test_a_wrong_inherited_value_names_the_variable(tmp_path):
    message = load_error(two_mailboxes(tmp_path), smtp_port="0")
    assert message.startswith("FORWARDER_SMTP_PORT: ")


def test_an_unreadable_password_file_is_one_line(tmp_path):
    path = two_mailboxes(tmp_path)
    (tmp_path / "acme.imap").unlink()
    (tmp_path / "acme.imap").mkdir()
    assert load_error(path).startswith(
        f"{path}: mailbox acme: imap_password_file: cannot read the password file "
        f"{tmp_path / 'acme.imap'} ("
    )


def test_a_password_file_with_a_line_break_inside_is_refused(tmp_path):
    path = two_mailboxes(tmp_path)
    (tmp_path / "acme.imap").write_text(CANARY + "\r\nZ1 DELETE Victim\n")
    assert load_error(path).startswith(f"{path}: mailbox acme: imap_password_file: contains ")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        pytest.param("[[mailbox]\n", "not valid TOML (", id="toml-syntax"),
        pytest.param("", "defines no mailbox", id="empty"),
        pytest.param('title = "x"\n', "unknown key 'title'", id="top-level-key"),
        pytest.param(
            '[[mailbox]]\nimap_username = "a@b.example"\n',
            "mailbox #1: name: is required",
            id="no-name",
        ),
        pytest.param(
            '[[mailbox]]\nname = "acme corp"\n',
            "mailbox #1: name: 'acme corp' is not a mailbox name",
            id="unsafe-name",
        ),
        pytest.param(
            '[[mailbox]]\nname = "a"\n[[mailbox]]\nname = "a"\n',
            "mailbox #2: name: 'a' is already the name of mailbox #1",
            id="duplicate-name",
        ),
    ],
)
def test_a_malformed_file_is_named(tmp_path, text, said):
    path = write(tmp_path, text)
    assert said in load_error(path)
    assert str(path) in load_error(path)


def test_a_missing_mailboxes_file_is_named(tmp_path):
    message = load_error(tmp_path / "nowhere.toml")
    assert message.startswith(f"FORWARDER_MAILBOXES_FILE: cannot read {tmp_path / 'nowhere.toml'}")


# The process-wide settings need no mailbox secret -------------------------------------


def test_process_settings_read_the_names_but_no_password_file(tmp_path):
    path = two_mailboxes(tmp_path)
    (tmp_path / "acme.imap").unlink()
    settings = load_process_settings(_env_file=None, mailboxes_file=str(path))
    assert settings.mailbox_names() == ("acme", "globex")
    with pytest.raises(ConfigError):
        load(path)


def test_an_unknown_mailbox_name_lists_the_configured_ones(tmp_path):
    settings = load_process_settings(_env_file=None, mailboxes_file=str(two_mailboxes(tmp_path)))
    settings.check_mailbox_name("acme")
    with pytest.raises(ConfigError) as caught:
        settings.check_mailbox_name("initech")
    assert str(caught.value) == "--mailbox initech: no such mailbox; configured: acme, globex"


def test_mailboxes_selects_one_by_name(tmp_path):
    settings = load(two_mailboxes(tmp_path))
    assert [m.name for m in settings.mailboxes("globex")] == ["globex"]
