"""Configuration: environment variables (and a `.env` file), validated up front.

`load_settings()` returns a `Settings` object or raises `ConfigError` with one
line that names the variable and what is wrong, never a secret. The lists are
validated and expanded here (nested lists resolved, cycles refused) so that the
rest of the program only sees plain, normalised data.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from forwarder.addresses import is_valid_address
from forwarder.errors import ConfigError
from forwarder.esmtp import check_helo_name
from forwarder.lists import (
    allowed_domains,
    expand_lists,
    outside_domains,
    validate_lists_shape,
)
from forwarder.mailbox import (
    DEFAULT_IMAP_PORTS,
    DEFAULT_MAILBOX,
    DEFAULT_SMTP_PORTS,
    ImapEndpoint,
    Mailbox,
    Security,
    SmtpEndpoint,
)

PREFIX = "FORWARDER_"
_PG_SCHEMES = ("postgresql://", "postgres://")
_CREDENTIAL_FILES = {"imap_password": "imap_password", "smtp_password": "smtp_password"}
# Read when present; the provided unit does not load it (PostgreSQL only: a drop-in does).
_OPTIONAL_CREDENTIAL_FILES = {"state_password": "state_password"}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


class Settings(BaseSettings):
    """Every setting of the forwarder. Pass it explicitly; never a global."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    _expanded: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)

    imap_host: str = Field(min_length=1)
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    imap_security: Security = "tls"
    imap_username: str = Field(min_length=1)
    imap_password: SecretStr
    imap_folder: str = Field(default="INBOX", min_length=1)

    smtp_host: str = Field(min_length=1)
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_security: Security = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_helo_name: str | None = None  # EHLO name; unset: the FQDN, else an address literal

    lists: Annotated[dict[str, tuple[str, ...]], NoDecode]
    lists_file: Path | None = None  # the same JSON in a file: for more than a few hundred lists
    member_domains: Annotated[tuple[str, ...], NoDecode] = ()
    envelope_sender: str | None = None

    state_db: Path = Path("./forwarder-state.db")
    state_url: SecretStr | None = None  # postgresql://user@host:port/db: shared by instances
    state_password: SecretStr | None = None  # its password, when not in the URL or libpq's files
    takeover_after: float = Field(default=60.0, gt=0)  # mailbox and claim leases (PostgreSQL)
    poll_interval: float = Field(default=60.0, gt=0)
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls_ca_file: Path | None = None
    fetch_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    fetch_batch_messages: int = Field(default=200, ge=1)
    retry_for: float = Field(default=5 * 24 * 3600.0, gt=0)
    state_retention: float = Field(default=90 * 24 * 3600.0, gt=0)
    smtp_connections: int = Field(default=4, ge=1, le=32)
    smtp_timeout: float = Field(default=600.0, gt=0)
    imap_timeout: float = Field(default=120.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _read_lists_file(cls, data: Any) -> Any:
        """FORWARDER_LISTS_FILE: the lists as a JSON file (an environment variable is limited
        to 128 KiB by Linux, a few hundred lists)."""
        if not isinstance(data, dict) or not data.get("lists_file"):
            return data
        if data.get("lists"):
            raise ValueError(
                f"{env_name('lists')} and {env_name('lists_file')} are both set; keep one"
            )
        path = Path(data["lists_file"])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ValueError(f"{env_name('lists_file')}: cannot read {path} ({reason})") from None
        return {**data, "lists": text}

    @model_validator(mode="before")
    @classmethod
    def _empty_state_db_is_unset(cls, data: Any) -> Any:
        """`FORWARDER_STATE_DB=` (empty: a drop-in clearing the unit's) leaves it unset."""
        if isinstance(data, dict) and str(data.get("state_db", "x")).strip() == "":
            return {k: v for k, v in data.items() if k != "state_db"}
        return data

    @field_validator("log_format", "log_level", "imap_security", "smtp_security", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "smtp_username", "envelope_sender", "tls_ca_file", "smtp_helo_name", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(_PG_SCHEMES):
            raise ValueError("must be a postgresql://user@host:port/database URL")
        return value

    @field_validator("smtp_password", "state_url", "state_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("lists", mode="before")
    @classmethod
    def _parse_lists(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
        return validate_lists_shape(value)

    @field_validator("member_domains", mode="before")
    @classmethod
    def _parse_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split(",")) if part]
        if not isinstance(value, list | tuple):
            raise ValueError("must be a comma-separated list of domains, or *")
        domains = tuple(d.strip().lower().lstrip("@") for d in value)
        for domain in domains:
            if domain != "*" and not re.fullmatch(r"[a-z0-9.-]+\.?[a-z0-9-]*", domain):
                raise ValueError(f"{domain!r} is not a domain name")
        return domains

    @field_validator("smtp_helo_name")
    @classmethod
    def _helo_name(cls, value: str | None) -> str | None:
        return None if value is None else check_helo_name(value)

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @model_validator(mode="after")
    def _check_lists(self) -> Settings:
        if outside := outside_domains(self.lists, self.allowed_domains):
            key, member = outside
            raise ValueError(
                f"{env_name('lists')}: member {member} of list {key} is outside "
                f"{env_name('member_domains')} ({', '.join(sorted(self.allowed_domains))}); "
                "add its domain there, or * to allow any domain"
            )
        try:
            self._expanded = expand_lists(self.lists)
        except ValueError as exc:
            raise ValueError(f"{env_name('lists')}: {exc}") from None
        if self.envelope_sender is not None and not is_valid_address(self.envelope_sender):
            raise ValueError(
                f"{env_name('envelope_sender')}: {self.envelope_sender!r} is not an address"
            )
        if self.state_url is not None and "state_db" in self.model_fields_set:
            raise ValueError(
                f"{env_name('state_db')} and {env_name('state_url')} are both set; keep one"
            )
        if self.state_retention <= self.retry_for:
            raise ValueError(
                f"{env_name('state_retention')}: must be longer than {env_name('retry_for')} "
                f"({self.retry_for:g} s), or a message still being retried could be sent again"
            )
        if self.sender_address is None:
            raise ValueError(
                f"{env_name('envelope_sender')}: neither the SMTP nor the IMAP username is an "
                "address; set it to the list administrator's address"
            )
        return self

    # Derived values -----------------------------------------------------------------

    @property
    def imap_port_effective(self) -> int:
        return self.imap_port or DEFAULT_IMAP_PORTS[self.imap_security]

    @property
    def smtp_port_effective(self) -> int:
        return self.smtp_port or DEFAULT_SMTP_PORTS[self.smtp_security]

    @property
    def allowed_domains(self) -> frozenset[str]:
        return allowed_domains(self.lists, self.member_domains)

    @property
    def sender_address(self) -> str | None:
        for candidate in (self.envelope_sender, self.smtp_username, self.imap_username):
            if candidate and is_valid_address(candidate):
                return candidate.strip()
        return None

    @property
    def envelope_from(self) -> str:
        sender = self.sender_address
        assert sender is not None  # guaranteed by _check_lists
        return sender

    def expanded_lists(self) -> dict[str, tuple[str, ...]]:
        """Each list address -> its member accounts, nested lists resolved (computed once)."""
        return self._expanded

    @property
    def imap_endpoint(self) -> ImapEndpoint:
        return ImapEndpoint(
            host=self.imap_host,
            port=self.imap_port_effective,
            security=self.imap_security,
            username=self.imap_username,
            password=self.imap_password,
            folder=self.imap_folder,
            timeout=self.imap_timeout,
        )

    @property
    def smtp_endpoint(self) -> SmtpEndpoint:
        return SmtpEndpoint(
            host=self.smtp_host,
            port=self.smtp_port_effective,
            security=self.smtp_security,
            username=self.smtp_username,
            password=self.smtp_password,
            timeout=self.smtp_timeout,
            connections=self.smtp_connections,
            helo_name=self.smtp_helo_name,
        )

    def mailboxes(self) -> tuple[Mailbox, ...]:
        """The catch-alls this process serves: one, from the FORWARDER_* variables."""
        return (
            Mailbox(
                name=DEFAULT_MAILBOX,
                imap=self.imap_endpoint,
                smtp=self.smtp_endpoint,
                lists=self._expanded,
                envelope_sender=self.envelope_from,
            ),
        )


def _credentials() -> dict[str, str]:
    """Passwords from systemd's LoadCredential= ($CREDENTIALS_DIRECTORY), when set."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    found: dict[str, str] = {}
    if not directory:
        return found
    for field, filename in {**_CREDENTIAL_FILES, **_OPTIONAL_CREDENTIAL_FILES}.items():
        path = Path(directory) / filename
        if path.is_file():
            found[field] = path.read_text(encoding="utf-8").rstrip("\r\n")
    return found


def _describe(error: ValidationError) -> str:
    first = error.errors(include_input=False, include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else ""
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "is required but not set"
    if message.startswith(PREFIX):
        return message
    name = env_name(field) if field else "configuration"
    return f"{name}: {message}"


def _check_names(environ: Mapping[str, str]) -> None:
    """A misspelt optional variable would be ignored silently: refuse it instead."""
    known = {env_name(field) for field in Settings.model_fields}
    for name in sorted(environ):
        if name.upper().startswith(PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{name} is not a forwarder setting{hint}")


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the configuration, or raise ConfigError (one line, no secret)."""
    _check_names(os.environ)
    values = {**_credentials(), **overrides}
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        raise ConfigError(f"configuration: {exc}") from None
