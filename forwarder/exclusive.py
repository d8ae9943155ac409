"""For the commands that change folder progress (`baseline`, `retry`): the state store
opened for writing, with every cycle of the mailboxes kept out meanwhile.

With SQLite, the file's lock (taken on opening) excludes `forwarder run` and `once`;
with PostgreSQL, the mailbox leases (`StateStore.acquire_mailboxes`) exclude the
instances working those mailboxes. Either way the command refuses, with one line
saying to stop the service first, rather than race a running cycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from forwarder.config import Settings
from forwarder.errors import StateError, StoreBusy
from forwarder.factory import open_store, owner_id
from forwarder.mailbox import Mailbox
from forwarder.state import StateStore

STOP_FIRST = "stop the service first (systemctl stop forwarder), then run this command again"


@contextmanager
def exclusive(settings: Settings, boxes: Sequence[Mailbox]) -> Iterator[StateStore]:
    """The store, while no cycle can run on `boxes`. StateError when one may."""
    try:
        store = open_store(settings)
    except StoreBusy as exc:
        raise StoreBusy(exc.detail, advice=STOP_FIRST) from None
    owner = owner_id()
    try:
        names = [box.name for box in boxes]
        held = store.acquire_mailboxes(owner, names, time.time(), settings.takeover_after)
        if busy := sorted(set(names) - held):
            raise StateError(
                f"mailbox {', '.join(busy)} is being worked by another forwarder instance",
                advice=STOP_FIRST,
            )
        yield store
    finally:
        try:
            store.release_mailboxes(owner)
        finally:
            store.close()
