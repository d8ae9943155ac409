"""Configuration: `FORWARDER_*` variables (a `.env` file, systemd credentials, and for many
catch-alls a mailboxes file), validated up front.

Two loaders, two levels:

* `load_process_settings()` -> `ProcessSettings`: what the process needs whatever it
  does (the state store, logs, timing) and the mailboxes' names. It needs no password
  and no list: `status`, `config` and `history` run with only these.
* `load_settings()` -> `Settings`: the same plus every mailbox, validated in full
  (passwords read, lists expanded): `Settings.mailboxes()`. Without a mailboxes file
  there is one, `default`, from the `FORWARDER_*` variables.

Both raise `ConfigError` with one line naming the variable (or the file, mailbox and
key) and what is wrong, never a secret. Where each value came from is kept for
`forwarder config` (`sources()`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticUndefined

from forwarder.config_sources import DEFAULT, Raw, Source, env_name, read_sources
from forwarder.errors import ConfigError
from forwarder.mailbox import DEFAULT_MAILBOX, Mailbox
from forwarder.mailbox_config import Duration, Endpoints, MailboxConfig, describe, load_mailbox
from forwarder.mailboxes_file import (
    MailboxesFile,
    label_for,
    mailbox_values,
    read_mailboxes_file,
)
from forwarder.setting_values import parse_duration
from forwarder.state_location import current_default

_PG_SCHEMES = ("postgresql://", "postgres://")
SHOWN_NAMES = 20  # an unknown --mailbox lists at most this many known names


def parse_address(text: str) -> tuple[str, int]:
    """A listening address, `host:port` or `[v6]:port` -> (host, port); ValueError if not."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:9464)")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


class ProcessSettings(BaseModel):
    """Process-wide settings. Pass them explicitly; never a global."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True, extra="forbid")

    state_db: Path
    state_url: SecretStr | None = None  # postgresql://user@host:port/db: shared by instances
    state_password: SecretStr | None = None  # its password, when not in the URL or libpq's files
    takeover_after: Duration = 60.0  # mailbox and claim leases (PostgreSQL)
    poll_interval: Duration = 60.0
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls_ca_file: Path | None = None
    fetch_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    fetch_batch_messages: int = Field(default=200, ge=1)
    retry_for: Duration = 5 * 24 * 3600.0
    state_retention: Duration = 90 * 24 * 3600.0
    mailboxes_file: Path | None = None
    imap_connections: int = Field(default=2, ge=1, le=2)  # `run`: 1 = IDLE on the cycle's
    metrics_address: str | None = None  # `run`: HOST:PORT of the Prometheus metrics

    _sources: ConfigSources | None = PrivateAttr(default=None)
    _state_db_default: bool = PrivateAttr(default=False)

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("tls_ca_file", "mailboxes_file", "metrics_address", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)  # its ValueError says what is expected
        return value

    @field_validator("state_url", "state_password", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        empty = value == "" or (isinstance(value, SecretStr) and not value.get_secret_value())
        return None if empty else value

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(_PG_SCHEMES):
            raise ValueError("must be a postgresql://user@host:port/database URL")
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("state_retention")
    @classmethod
    def _longer_than_retries(cls, value: float, info: Any) -> float:
        retry_for = info.data.get("retry_for")
        if retry_for is not None and value <= retry_for:
            raise ValueError(
                f"must be longer than {env_name('retry_for')} ({retry_for:g} s), or a message "
                "still being retried could be sent again"
            )
        return value

    @property
    def state_db_is_default(self) -> bool:
        """True when FORWARDER_STATE_DB is not set: the store may create its directory."""
        return self._state_db_default

    def sources(self) -> ConfigSources:
        """Every value as given and where it came from (`forwarder config`)."""
        assert self._sources is not None, "built by load_process_settings / load_settings"
        return self._sources

    def secrets(self) -> tuple[SecretStr, ...]:
        """The passwords set in the variables and credential files, even if not used."""
        values = self.sources().values.values()
        return tuple({raw.value for raw in values if isinstance(raw.value, SecretStr)})

    def mailbox_names(self) -> tuple[str, ...]:
        file = self.sources().mailboxes
        return file.names() if file is not None else (DEFAULT_MAILBOX,)

    def check_mailbox_name(self, name: str | None) -> None:
        """ConfigError unless `name` (a --mailbox argument) is None or a configured mailbox."""
        names = self.mailbox_names()
        if name is None or name in names:
            return
        shown = ", ".join(names[:SHOWN_NAMES])
        more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        raise ConfigError(f"--mailbox {name}: no such mailbox; configured: {shown}{more}")


class Settings(ProcessSettings):
    """Process-wide settings and every mailbox, validated in full."""

    _mailboxes: tuple[Mailbox, ...] = PrivateAttr(default=())

    def mailboxes(self, name: str | None = None) -> tuple[Mailbox, ...]:
        """The catch-alls this process serves, or only the one called `name`."""
        if name is None:
            return self._mailboxes
        self.check_mailbox_name(name)
        return tuple(mailbox for mailbox in self._mailboxes if mailbox.name == name)

    def secrets(self) -> tuple[SecretStr, ...]:
        """Every password known to this process, once each (for the logs' masking): those
        of the variables and credential files, and those read from password files."""
        mailboxes = (box for mailbox in self._mailboxes for box in (mailbox.imap, mailbox.smtp))
        found = {box.password for box in mailboxes if box.password is not None}
        return tuple(found | set(super().secrets()))


@dataclass(frozen=True)
class ConfigSources:
    """The raw configuration: every FORWARDER_* value set (by field) and the mailboxes file."""

    values: dict[str, Raw]
    mailboxes: MailboxesFile | None

    def mailbox_level(self) -> dict[str, Raw]:
        return {f: r for f, r in self.values.items() if f in MailboxConfig.model_fields}


S = TypeVar("S", bound=ProcessSettings)
PROCESS_FIELDS = frozenset(ProcessSettings.model_fields)
KNOWN_FIELDS = PROCESS_FIELDS | frozenset(MailboxConfig.model_fields)


def field_default(field: str) -> Any:
    """A setting's default value (None when it has none: required, or derived)."""
    info = MailboxConfig.model_fields.get(field) or ProcessSettings.model_fields[field]
    return None if info.default is PydanticUndefined else info.default


def is_duration(field: str) -> bool:
    """Whether a setting is a duration (`90s`, `10m` ...)."""
    info = MailboxConfig.model_fields.get(field) or ProcessSettings.model_fields[field]
    return any(getattr(item, "func", None) is parse_duration for item in info.metadata)


def load_process_settings(**overrides: Any) -> ProcessSettings:
    """The process-wide settings only: no password, no list needed."""
    return _load(ProcessSettings, overrides)


def load_settings(**overrides: Any) -> Settings:
    """Everything, every mailbox included, or ConfigError (one line, no secret)."""
    settings = _load(Settings, overrides)
    sources = settings.sources()
    environment = sources.mailbox_level()
    endpoints = Endpoints()
    if sources.mailboxes is None:
        mailboxes: tuple[Mailbox, ...] = (
            load_mailbox(DEFAULT_MAILBOX, environment, env_name, endpoints),
        )
    else:
        file = sources.mailboxes
        mailboxes = tuple(
            load_mailbox(
                table.name,
                mailbox_values(file, table, environment),
                label_for(file, table, environment),
                endpoints,
            )
            for table in file.tables
        )
    settings._mailboxes = mailboxes
    return settings


def _load(cls: type[S], overrides: Mapping[str, Any]) -> S:
    values = dict(overrides)
    env_file = values.pop("_env_file", Path(".env"))
    raw = read_sources(KNOWN_FIELDS, os.environ, env_file, values)
    if "state_db" in raw and not str(raw["state_db"].value).strip():
        del raw["state_db"]  # FORWARDER_STATE_DB= (a drop-in clearing the unit's): unset
    process = {field: r.value for field, r in raw.items() if field in PROCESS_FIELDS}
    is_default = "state_db" not in process
    if not is_default and process.get("state_url") not in (None, ""):
        raise ConfigError(
            f"{env_name('state_db')} and {env_name('state_url')} are both set; keep one"
        )
    if is_default:
        path, why = current_default()
        raw["state_db"] = Raw(path, Source(DEFAULT.kind, why))
        process["state_db"] = path
    try:
        settings = cls.model_validate(process)
    except ValidationError as exc:
        raise ConfigError(describe(exc, env_name)) from None
    mailboxes = None
    if settings.mailboxes_file is not None:
        mailboxes = read_mailboxes_file(settings.mailboxes_file)
    settings._sources = ConfigSources(raw, mailboxes)
    settings._state_db_default = is_default
    return settings
