"""Whether `forwarder run` is healthy, for the systemd watchdog: no cycle stuck, and the
state file still the one it opened. Also the open-files limit a thousand mailboxes need.

A cycle is stuck when it has completed no blocking call (IMAP command, state-store call,
and so no SMTP transaction either, each being committed) for longer than any single
operation may take: the larger of FORWARDER_IMAP_TIMEOUT and FORWARDER_SMTP_TIMEOUT, plus
a minute. Slow is not stuck; stuck is what no timeout bounds any more (a bug, a disk
that hangs): the watchdog pings stop and systemd restarts the service.

A state file deleted or replaced under the running service (its path no longer leads to
the inode opened) would take every result written since with it: the service stops
with status 1, so that systemd restarts it on the file now at that path.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from pathlib import Path

import structlog

from forwarder.errors import StateError
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import StateStore
from forwarder.worker import MailboxWorker

log = structlog.get_logger("forwarder.daemon")
STUCK_MARGIN = 60.0


class Health:
    def __init__(self, store: StateStore, stuck_after: float) -> None:
        self.stuck_after = stuck_after
        self._stuck: set[str] = set()
        self._file: tuple[Path, tuple[int, int]] | None = None
        if isinstance(store, SqliteStateStore):
            st = os.stat(store.path)
            self._file = store.path, (st.st_dev, st.st_ino)

    def stuck(self, workers: Iterable[MailboxWorker], now: float) -> list[str]:
        """The mailboxes whose cycle is stuck; each logged once (`cycle_stuck`)."""
        found: list[str] = []
        for worker in workers:
            seconds = worker.stuck_for(now)
            if seconds <= self.stuck_after:
                self._stuck.discard(worker.name)
                continue
            found.append(worker.name)
            if worker.name not in self._stuck:
                self._stuck.add(worker.name)
                log.error(
                    "cycle_stuck",
                    mailbox=worker.name,
                    seconds=round(seconds),
                    hint="no IMAP command, state-store call or SMTP transaction completed "
                    "for longer than any may take; the systemd watchdog is no longer pinged",
                )
        return found

    def state_file_gone(self) -> StateError | None:
        """The error to stop with when the state file was deleted or replaced."""
        if self._file is None:
            return None
        path, identity = self._file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            now = None
        else:
            now = (st.st_dev, st.st_ino)
        if now == identity:
            return None
        return StateError(
            f"state store {path} was {'deleted' if now is None else 'replaced'} while the "
            "service was running",
            advice="stopping, so that the service restarts on the file now at that path "
            "(what was recorded in the old file since is lost with it)",
            settings=("FORWARDER_STATE_DB",),
        )


def raise_file_limit(mailboxes: int) -> None:
    """Each mailbox holds up to two IMAP and some SMTP connections: raise the soft limit on
    open files to the hard one when there are many."""
    need = 64 + 4 * mailboxes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open_files_limit", error=str(exc), limit=soft, needed=need)
        return
    if hard < need:
        log.warning(
            "open_files_limit",
            limit=hard,
            needed=need,
            hint="raise LimitNOFILE= in the unit (or ulimit -n)",
        )
