"""One catch-all's settings validated into a `Mailbox`: endpoints, lists, envelope sender.

The same model checks the single mailbox of the `FORWARDER_*` variables and each
`[[mailbox]]` of a mailboxes file (whose left-out values come from those variables).
Every error names the setting through a `Label` (field -> "FORWARDER_IMAP_HOST", or
"/etc/forwarder/mailboxes.toml: mailbox acme: imap_host"): the model checks one value
at a time, `build_mailbox` what involves several.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from forwarder.addresses import is_valid_address
from forwarder.config_sources import Raw, Source, env_name, read_text_file
from forwarder.errors import ConfigError
from forwarder.esmtp import check_helo_name
from forwarder.lists import (
    allowed_domains,
    expand_lists,
    outside_domains,
    validate_lists_shape,
)
from forwarder.lists_text import ListsText, parse_json, parse_lists_text
from forwarder.mailbox import (
    DEFAULT_IMAP_PORTS,
    DEFAULT_SMTP_PORTS,
    ImapEndpoint,
    Mailbox,
    Security,
    SmtpEndpoint,
)
from forwarder.setting_values import check_host, parse_duration

E = TypeVar("E", ImapEndpoint, SmtpEndpoint)
Label = Callable[[str], str]  # field name -> how an error names that setting
Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class MailboxConfig(BaseModel):
    """The settings of one catch-all, each value checked on its own."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True, extra="forbid")

    imap_host: str = Field(min_length=1)
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_security: Security = "tls"
    imap_username: str = Field(min_length=1)
    imap_password: SecretStr
    imap_folder: str = Field(default="INBOX", min_length=1)
    imap_timeout: Duration = 120.0

    smtp_host: str = Field(min_length=1)
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_security: Security = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_helo_name: str | None = None  # EHLO name; unset: the FQDN, else an address literal
    smtp_timeout: Duration = 600.0
    smtp_connections: int = Field(default=4, ge=1, le=32)

    lists: dict[str, tuple[str, ...]]
    lists_file: Path | None = None  # JSON or aliases(5) text: read by the loader into `lists`
    member_domains: tuple[str, ...] = ()
    envelope_sender: str | None = None

    @field_validator("imap_security", "smtp_security", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "smtp_username", "envelope_sender", "lists_file", "smtp_helo_name", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("smtp_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        empty = value == "" or (isinstance(value, SecretStr) and not value.get_secret_value())
        return None if empty else value

    @field_validator("smtp_helo_name")
    @classmethod
    def _helo_name(cls, value: str | None) -> str | None:
        return None if value is None else check_helo_name(value)

    @field_validator("imap_host", "smtp_host")
    @classmethod
    def _host_alone(cls, value: str, info: ValidationInfo) -> str:
        label: Label = (info.context or {}).get("label", env_name)
        port = info.field_name.replace("host", "port") if info.field_name else "port"
        return check_host(value, label(port))

    @field_validator("lists", mode="before")
    @classmethod
    def _parse_lists(cls, value: Any) -> Any:
        if isinstance(value, ListsText):
            return validate_lists_shape(value.lists, value.lines)
        if isinstance(value, str):
            if not value.lstrip().startswith("{"):
                raise ValueError(
                    "is not a JSON object (the aliases syntax, 'list@domain: member, ...', "
                    "is read from a lists file)"
                )
            value = parse_json(value).lists
        return validate_lists_shape(value)

    @field_validator("member_domains", mode="before")
    @classmethod
    def _parse_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split(",")) if part]
        if not isinstance(value, list | tuple):
            raise ValueError("must be a comma-separated list of domains, or *")
        domains = tuple(str(d).strip().lower().lstrip("@") for d in value)
        for domain in domains:
            if domain != "*" and not re.fullmatch(r"[a-z0-9.-]+\.?[a-z0-9-]*", domain):
                raise ValueError(f"{domain!r} is not a domain name")
        return domains

    @property
    def sender_address(self) -> str | None:
        for candidate in (self.envelope_sender, self.smtp_username, self.imap_username):
            if candidate and is_valid_address(candidate):
                return candidate.strip()
        return None


def load_mailbox(
    name: str, values: Mapping[str, Raw], label: Label, endpoints: Endpoints
) -> Mailbox:
    """One mailbox from its raw values (its lists file read here), or ConfigError."""
    values, label = read_lists_file(values, label)
    return build_mailbox(name, validate_config(values, label), label, endpoints)


def read_lists_file(values: Mapping[str, Raw], label: Label) -> tuple[dict[str, Raw], Label]:
    """`lists_file` read and parsed into `lists`; errors about the lists then name the file."""
    out = dict(values)
    raw = out.get("lists_file")
    if raw is None or raw.value is None or not str(raw.value).strip():
        return out, label
    if "lists" in out:
        raise ConfigError(f"{label('lists')} and {label('lists_file')} are both set; keep one")
    path = Path(raw.value)
    text = read_text_file(path, label("lists_file"))
    try:
        parsed = parse_lists_text(text)
    except ValueError as exc:
        raise ConfigError(f"{label('lists_file')}: {path}: {exc}") from None
    out["lists"] = Raw(parsed, Source("lists file", str(path)))
    in_file = f"{label('lists_file')}: {path}"
    return out, lambda field: in_file if field == "lists" else label(field)


def validate_config(values: Mapping[str, Raw], label: Label) -> MailboxConfig:
    """The model from raw values, or ConfigError naming the first wrong setting."""
    try:
        return MailboxConfig.model_validate(
            {field: raw.value for field, raw in values.items()}, context={"label": label}
        )
    except ValidationError as exc:
        raise ConfigError(describe(exc, label)) from None


def describe(error: ValidationError, label: Label) -> str:
    """The first error of `error` as one line naming the setting."""
    first = error.errors(include_input=False, include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required but not set"
    if not loc:
        return message
    return f"{label(loc[0])}: {message}"


class Endpoints:
    """Identical endpoints built once: 1,000 mailboxes on one relay share one SmtpEndpoint."""

    def __init__(self) -> None:
        self._seen: dict[object, object] = {}

    def share(self, endpoint: E) -> E:
        return self._seen.setdefault(endpoint, endpoint)  # type: ignore[return-value]


def build_mailbox(name: str, config: MailboxConfig, label: Label, endpoints: Endpoints) -> Mailbox:
    """Check what involves several settings, then build the mailbox (ConfigError if wrong)."""
    if not config.imap_password.get_secret_value():
        raise ConfigError(f"{label('imap_password')}: is empty")
    if config.smtp_username and config.smtp_password is None:
        raise ConfigError(
            f"{label('smtp_password')}: is required when {label('smtp_username')} is set "
            "(unset the username if the server takes no login)"
        )
    if config.smtp_password is not None and not config.smtp_username:
        raise ConfigError(
            f"{label('smtp_username')}: is required when {label('smtp_password')} is set "
            "(a password without a login is never used)"
        )
    domains = allowed_domains(config.lists, config.member_domains)
    if outside := outside_domains(config.lists, domains):
        key, member = outside
        raise ConfigError(
            f"{label('lists')}: member {member} of list {key} is outside "
            f"{label('member_domains')} ({', '.join(sorted(domains))}); "
            "add its domain there, or * to allow any domain"
        )
    try:
        expanded = expand_lists(config.lists)
    except ValueError as exc:
        raise ConfigError(f"{label('lists')}: {exc}") from None
    if config.envelope_sender is not None and not is_valid_address(config.envelope_sender):
        raise ConfigError(
            f"{label('envelope_sender')}: {config.envelope_sender!r} is not an address"
        )
    sender = config.sender_address
    if sender is None:
        raise ConfigError(
            f"{label('envelope_sender')}: neither the SMTP nor the IMAP username is an "
            "address; set it to the list administrator's address"
        )
    imap = ImapEndpoint(
        host=config.imap_host.strip(),
        port=config.imap_port or DEFAULT_IMAP_PORTS[config.imap_security],
        security=config.imap_security,
        username=config.imap_username,
        password=config.imap_password,
        folder=config.imap_folder,
        timeout=config.imap_timeout,
    )
    smtp = SmtpEndpoint(
        host=config.smtp_host.strip(),
        port=config.smtp_port or DEFAULT_SMTP_PORTS[config.smtp_security],
        security=config.smtp_security,
        username=config.smtp_username,
        password=config.smtp_password,
        timeout=config.smtp_timeout,
        connections=config.smtp_connections,
        helo_name=config.smtp_helo_name,
    )
    return Mailbox(
        name=name,
        imap=endpoints.share(imap),
        smtp=endpoints.share(smtp),
        lists=expanded,
        envelope_sender=sender,
    )
