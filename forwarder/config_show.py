"""`forwarder config`: every setting's effective value and where it comes from, as
`postconf` shows Postfix's, secrets masked.

    FORWARDER_IMAP_HOST = imap.example.org              # environment
    FORWARDER_IMAP_PASSWORD = ********                  # credential file /run/credentials/...
    FORWARDER_POLL_INTERVAL = 1m                        # default

then, with a mailboxes file, one `[mailbox NAME]` section per mailbox with its keys.
It needs no password and reads no secret file: it shows where a password would come
from, not the password.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from pydantic import SecretStr

from forwarder.config import ConfigSources, ProcessSettings, field_default, is_duration
from forwarder.config_sources import DEFAULT, Raw, Source, env_name
from forwarder.errors import EXIT_OK
from forwarder.mailbox import DEFAULT_IMAP_PORTS, DEFAULT_SMTP_PORTS
from forwarder.mailbox_config import MailboxConfig
from forwarder.mailboxes_file import KEYS, PASSWORD_FILES, MailboxTable, inherited
from forwarder.setting_values import format_duration

MASK = "********"
LONGEST = 300  # a longer value (a big FORWARDER_LISTS) is cut
COLUMN = 52
# What a left-out value means when the default depends on other settings.
DERIVED = {
    "imap_port": "imap_security",
    "smtp_port": "smtp_security",
    "member_domains": "the domains of the list addresses",
    "envelope_sender": "the SMTP username, else the IMAP username, if an address",
    "log_format": "console on a terminal, else json",
}
UNSET = Raw(None, Source("unset"))


async def show_config(
    settings: ProcessSettings, mailbox: str | None = None, out: TextIO = sys.stdout
) -> int:
    out.write("\n".join(render(settings, mailbox)) + "\n")
    return EXIT_OK


def render(settings: ProcessSettings, mailbox: str | None = None) -> list[str]:
    sources = settings.sources()
    lines = [f"# {line}" for line in _header(sources)]
    environment = sources.mailbox_level()
    fields = [*MailboxConfig.model_fields, *type(settings).model_fields]
    seen = set()
    for field in fields:
        if field in seen:
            continue
        seen.add(field)
        raw = sources.values.get(field) or _default(field)
        lines.append(_line(env_name(field), _value(field, raw, environment), raw.source))
    if sources.mailboxes is not None:
        for table in sources.mailboxes.tables:
            if mailbox is None or table.name == mailbox:
                lines += ["", f"[mailbox {table.name}]", *_mailbox(table, environment)]
    return lines


def _header(sources: ConfigSources) -> Iterator[str]:
    yield "forwarder config: effective settings; after each, where it comes from"
    if sources.mailboxes is not None:
        yield (
            f"mailboxes from {sources.mailboxes.path}; the FORWARDER_* values of mailbox "
            "settings are what a mailbox leaves out"
        )


def _mailbox(table: MailboxTable, environment: Mapping[str, Raw]) -> Iterator[str]:
    taken = inherited(table, environment)
    effective = {**taken, **{KEYS[key]: raw for key, raw in table.values.items()}}
    for key, field in KEYS.items():
        if key in table.values:
            raw = table.values[key]
            value = str(raw.value) if key in PASSWORD_FILES else _value(field, raw, effective)
            yield _line(key, value, raw.source.kind)
        elif field in taken:
            raw = taken[field]
            name = key.removesuffix("_file") if key in PASSWORD_FILES else key
            where = f"{raw.source} ({env_name(field)})"
            yield _line(name, _value(field, raw, effective), where)
        else:
            raw = _default(field)
            yield _line(key, _value(field, raw, effective), raw.source)


def _default(field: str) -> Raw:
    default = field_default(field)
    if default is None or default == ():
        return Raw(None, DEFAULT) if field in DERIVED else UNSET
    return Raw(default, DEFAULT)


def _value(field: str, raw: Raw, values: Mapping[str, Raw]) -> str:
    value = raw.value
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if value is None:
        return _derived(field, values)
    if is_duration(field) and isinstance(value, int | float):
        return format_duration(float(value))
    if isinstance(value, dict | list | tuple):
        value = (
            json.dumps(value, ensure_ascii=False)
            if isinstance(value, dict)
            else ", ".join(str(v) for v in value)
        )
    return _printable(str(value))


def _derived(field: str, values: Mapping[str, Raw]) -> str:
    if field not in DERIVED:
        return ""
    if field in ("imap_port", "smtp_port"):
        ports = DEFAULT_IMAP_PORTS if field == "imap_port" else DEFAULT_SMTP_PORTS
        security_field = DERIVED[field]
        security = values.get(security_field)
        default = MailboxConfig.model_fields[security_field].default
        mode = str(security.value).strip().lower() if security else default
        return f"{ports[mode]} (for {mode})" if mode in ports else ""
    return f"({DERIVED[field]})"


def _printable(text: str) -> str:
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) > LONGEST:
        return f"{text[:LONGEST]}... ({len(text)} characters)"
    return text


def _line(name: str, value: str, source: Any) -> str:
    return f"{f'{name} = {value}':<{COLUMN}} # {source}"
