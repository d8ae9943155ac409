"""FORWARDER_MAILBOXES_FILE: many catch-alls in one process, one `[[mailbox]]` table each.

    [[mailbox]]
    name = "acme"                          # required, unique: it keys the state store
    imap_host = "imap.example.net"
    imap_username = "catchall@acme.example"
    imap_password_file = "acme.imap"       # relative paths: to this file's directory
    lists = { "contact@acme.example" = ["alice@acme.example", "bob@acme.example"] }

A value left out comes from the matching `FORWARDER_*` variable (a provider writes its
shared SMTP relay once), with one exception: a login (username and password) is only
inherited whole, and only by a mailbox that also inherits the server it is for, so a
password never goes to a server it was not configured for. Likewise `lists` and
`lists_file` are inherited together or not at all.

`read_mailboxes_file` checks the file's shape, keys and names (no secret is read: the
commands that only read the state store need this much); `mailbox_values` gives one
mailbox's raw values with its password files read. Every error names the file, the
mailbox and the key.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.config_sources import Raw, Source, check_raw, env_name, read_secret_file
from forwarder.errors import ConfigError
from forwarder.mailbox import MAILBOX_NAME
from forwarder.mailbox_config import Label

FILE_SETTING = "FORWARDER_MAILBOXES_FILE"
# key in a [[mailbox]] table -> the setting it gives (and the FORWARDER_* variable it overrides)
KEYS: dict[str, str] = {
    "imap_host": "imap_host",
    "imap_port": "imap_port",
    "imap_security": "imap_security",
    "imap_username": "imap_username",
    "imap_password_file": "imap_password",
    "folder": "imap_folder",
    "smtp_host": "smtp_host",
    "smtp_port": "smtp_port",
    "smtp_security": "smtp_security",
    "smtp_username": "smtp_username",
    "smtp_password_file": "smtp_password",
    "smtp_helo_name": "smtp_helo_name",
    "envelope_sender": "envelope_sender",
    "member_domains": "member_domains",
    "lists": "lists",
    "lists_file": "lists_file",
}
FIELD_KEYS = {field: key for key, field in KEYS.items()}
PASSWORD_FILES = frozenset({"imap_password_file", "smtp_password_file"})
PATHS = PASSWORD_FILES | {"lists_file"}
_LOGINS = {
    "imap": frozenset({"imap_username", "imap_password"}),
    "smtp": frozenset({"smtp_username", "smtp_password"}),
}
# a mailbox setting one of these fields inherits none of the fields after it
_NOT_INHERITED_WITH: dict[str, frozenset[str]] = {
    **{f: _LOGINS["imap"] for f in ("imap_host", *_LOGINS["imap"])},
    **{f: _LOGINS["smtp"] for f in ("smtp_host", *_LOGINS["smtp"])},
    "lists": frozenset({"lists_file"}),
    "lists_file": frozenset({"lists"}),
}


@dataclass(frozen=True, slots=True)
class MailboxTable:
    """One `[[mailbox]]` as written: TOML key -> value (paths made absolute)."""

    name: str
    values: dict[str, Raw]


@dataclass(frozen=True, slots=True)
class MailboxesFile:
    path: Path
    tables: tuple[MailboxTable, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(table.name for table in self.tables)


def read_mailboxes_file(path: Path) -> MailboxesFile:
    """The file's mailboxes, shape checked, no secret read. ConfigError names what is wrong."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{FILE_SETTING}: cannot read {path} ({reason})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{FILE_SETTING}: {path}: not valid TOML ({exc})") from None
    for key in document:
        if key != "mailbox":
            raise ConfigError(
                f"{FILE_SETTING}: {path}: unknown key {key!r}; the file holds [[mailbox]] tables"
            )
    tables = document.get("mailbox")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{FILE_SETTING}: {path}: defines no mailbox (add [[mailbox]] tables)")
    seen: dict[str, int] = {}
    read = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: mailbox #{number} is not a table; write [[mailbox]]")
        name = _name(path, number, table)
        if name in seen:
            raise ConfigError(
                f"{path}: mailbox #{number}: name: {name!r} is already the name of mailbox "
                f"#{seen[name]}; each name keys its own state and must be unique"
            )
        seen[name] = number
        read.append(_table(path, name, table))
    return MailboxesFile(path, tuple(read))


def _name(path: Path, number: int, table: Mapping[str, Any]) -> str:
    name = table.get("name")
    if name is None:
        raise ConfigError(f"{path}: mailbox #{number}: name: is required but not set")
    if not isinstance(name, str) or not MAILBOX_NAME.fullmatch(name):
        raise ConfigError(
            f"{path}: mailbox #{number}: name: {name!r} is not a mailbox name (1 to 64 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit)"
        )
    return name


def _table(path: Path, name: str, table: Mapping[str, Any]) -> MailboxTable:
    where = f"{path}: mailbox {name}"
    values: dict[str, Raw] = {}
    source = Source("mailboxes file", f"{path}, mailbox {name}")
    for key, value in table.items():
        if key == "name":
            continue
        if key in ("imap_password", "smtp_password"):
            raise ConfigError(
                f"{where}: {key}: a password is not written in this file; put it alone in a "
                f"file readable only by the forwarder and give its path as {key}_file"
            )
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{where}: {key}: is not a mailbox setting{hint}")
        if key in PATHS:
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {key}: must be a file's path")
            value = path.parent / value.strip()
        raw = Raw(value, source)
        check_raw(key, raw, f"{where}: {key}")
        values[key] = raw
    return MailboxTable(name, values)


def inherited(table: MailboxTable, environment: Mapping[str, Raw]) -> dict[str, Raw]:
    """The environment's mailbox values that this mailbox takes (see the module's docstring)."""
    excluded = _excluded(table)
    return {
        field: raw
        for field, raw in environment.items()
        if field not in excluded and FIELD_KEYS.get(field) not in table.values
    }


def mailbox_values(
    file: MailboxesFile, table: MailboxTable, environment: Mapping[str, Raw]
) -> dict[str, Raw]:
    """The mailbox's settings by field, inherited ones included, its password files read."""
    values = inherited(table, environment)
    where = f"{file.path}: mailbox {table.name}"
    for key, raw in table.values.items():
        field = KEYS[key]
        if key in PASSWORD_FILES:
            secret = read_secret_file(raw.value, f"{where}: {key}", "password file")
            raw = Raw(secret, Source("password file", str(raw.value)))
            check_raw(field, raw, f"{where}: {key}")
        values[field] = raw
    return values


def label_for(file: MailboxesFile, table: MailboxTable, environment: Mapping[str, Raw]) -> Label:
    """field -> how an error names it: the key in this file, or the variable it came from."""
    taken = inherited(table, environment)
    where = f"{file.path}: mailbox {table.name}"

    def label(field: str) -> str:
        key = FIELD_KEYS.get(field, field)
        if key in table.values:
            return f"{where}: {key}"
        if field in taken:
            return env_name(field)
        if field in FIELD_KEYS and field not in _excluded(table):
            return f"{where}: {key} (or {env_name(field)})"
        return f"{where}: {key}"

    return label


def _excluded(table: MailboxTable) -> set[str]:
    excluded: set[str] = set()
    for key in table.values:
        excluded |= _NOT_INHERITED_WITH.get(KEYS[key], frozenset())
    return excluded
