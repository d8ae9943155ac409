"""What a reload (SIGHUP) changes, worked out from the old and new settings (`compare`,
pure), and the log events that say it (`log_changes`). The daemon applies it.

Per mailbox: lists added and removed, and the members added and removed of each list
(after nested lists are expanded: who receives what), the servers or envelope sender
changed. Process-wide settings that only a restart can apply are named, not applied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import structlog

from forwarder.config import Settings
from forwarder.config_sources import env_name
from forwarder.factory import cycle_options
from forwarder.mailbox import Mailbox

log = structlog.get_logger("forwarder.daemon")
# Read once at start: a reload names them in `reload_needs_restart` and keeps the old value
# (`keep_restart_only`). The CA file is one: the SMTP connections of a shared relay outlive
# a reload; the lease: the mailbox leases and the delivery claims must agree.
RESTART_ONLY = (
    "state_db",
    "state_url",
    "log_format",
    "log_level",
    "metrics_address",
    "imap_connections",
    "tls_ca_file",
    "takeover_after",
)


@dataclass
class MailboxChanges:
    name: str
    lists_added: list[str] = field(default_factory=list)
    lists_removed: list[str] = field(default_factory=list)
    members_added: dict[str, list[str]] = field(default_factory=dict)
    members_removed: dict[str, list[str]] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # imap, smtp, envelope_sender

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if k != "name" and v}


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    mailboxes: list[MailboxChanges] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)  # variable names
    cycle_options: bool = False  # retries, retention, batches, CA file: every mailbox anew
    poll_interval: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.mailboxes
            or self.restart_needed
            or self.cycle_options
            or self.poll_interval
        )


def compare(old: Settings, new: Settings) -> Changes:
    before = {m.name: m for m in old.mailboxes()}
    after = {m.name: m for m in new.mailboxes()}
    changes = Changes(
        added=sorted(after.keys() - before.keys()),
        removed=sorted(before.keys() - after.keys()),
        restart_needed=[
            env_name(name)
            for name in RESTART_ONLY
            if getattr(old, name, None) != getattr(new, name, None)
        ],
        cycle_options=cycle_options(old) != cycle_options(keep_restart_only(old, new)),
        poll_interval=old.poll_interval != new.poll_interval,
    )
    for name in sorted(before.keys() & after.keys()):
        if before[name] != after[name]:
            changes.mailboxes.append(mailbox_changes(before[name], after[name]))
    return changes


def mailbox_changes(old: Mailbox, new: Mailbox) -> MailboxChanges:
    result = MailboxChanges(
        old.name,
        lists_added=sorted(new.lists.keys() - old.lists.keys()),
        lists_removed=sorted(old.lists.keys() - new.lists.keys()),
        changed=[
            part
            for part in ("imap", "smtp", "envelope_sender")
            if getattr(old, part) != getattr(new, part)
        ],
    )
    for address in sorted(old.lists.keys() & new.lists.keys()):
        was, now = set(old.lists[address]), set(new.lists[address])
        if added := sorted(now - was):
            result.members_added[address] = added
        if removed := sorted(was - now):
            result.members_removed[address] = removed
    return result


def keep_restart_only(old: Settings, new: Settings) -> Settings:
    """`new`, with the values of the settings a reload cannot apply taken from `old`."""
    return new.model_copy(update={name: getattr(old, name) for name in RESTART_ONLY})


def log_changes(changes: Changes) -> None:
    log.info(
        "config_reloaded",
        changed=not changes.empty,
        mailboxes_added=changes.added,
        mailboxes_removed=changes.removed,
        mailboxes_changed=[c.name for c in changes.mailboxes],
    )
    for change in changes.mailboxes:
        log.info("lists_changed", mailbox=change.name, **change.as_dict())
    if changes.restart_needed:
        log.warning("reload_needs_restart", settings=changes.restart_needed)
    if changes.empty and "FORWARDER_LISTS" in os.environ:
        log.warning(
            "reload_found_no_change",
            hint="FORWARDER_LISTS comes from the process environment, which a reload cannot "
            "read again (systemd reads EnvironmentFile= at start only): keep the lists in "
            "FORWARDER_LISTS_FILE to change them by reload, or restart",
        )
