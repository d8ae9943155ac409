"""How long Courier-IMAP takes to report new mail to the forwarder's IDLE connection.

``make bench-courier-idle``: for Debian's default settings (``IMAP_ENHANCEDIDLE=0``)
and for docs/deployments.md's (``IMAP_ENHANCEDIDLE=1``), a private Courier
(tests/servers/courier.py, from the unpacked package) and the forwarder's own
:class:`~forwarder.idle.IdleWatcher`; each sample delivers one message into the
catch-all's Maildir once the watcher idles and times it until the watcher wakes.
Not a test: it prints the figures (and writes them as JSON with ``--output``).
Without ENHANCEDIDLE a sample can last up to ``IMAP_IDLE_TIMEOUT`` (60 s).
Runs as root, after ``bash .ci/system-deps servers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr
from structlog.testing import capture_logs

from forwarder.idle import FIRST_PERIOD, IdleWatcher
from forwarder.mailbox import ImapEndpoint
from tests.mail import build_message
from tests.servers.courier import RECIPE_IMAPD, CourierServer
from tests.servers.sandbox import unavailable


async def sample(server: CourierServer, timeout: float) -> float:
    """Seconds from a delivery to the watcher's wake-up (``timeout`` if it never woke)."""
    woken, idling = asyncio.Event(), asyncio.Event()

    def seen(_logger: object, _method: str, event: dict[str, object]) -> dict[str, object]:
        if event.get("event") == "idle_started":
            idling.set()
        return event

    endpoint = ImapEndpoint(
        server.host, server.imap_port, "none", server.username, SecretStr(server.password)
    )
    watcher = IdleWatcher(endpoint, woken.set)
    with capture_logs(processors=[seen]):
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(idling.wait(), 20)
            # The watcher ends its first IDLE after FIRST_PERIOD and starts it again: past
            # that, the figure is the server's alone.
            await asyncio.sleep(FIRST_PERIOD + 0.5)
            woken.clear()  # the watcher wakes the cycle once as it connects
            started = time.monotonic()
            server.deliver(build_message(), ["contact@example.org"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout)
            return time.monotonic() - started
        finally:
            watcher.stop()
            await task


def measure(settings: dict[str, str], samples: int, timeout: float) -> list[float]:
    with CourierServer(settings) as server:
        return [asyncio.run(sample(server, timeout)) for _ in range(samples)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=5, help="with ENHANCEDIDLE (default 5)")
    parser.add_argument("--plain-samples", type=int, default=2,
                        help="without it, up to 60 s each (default 2)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    opts = parser.parse_args(argv)
    reason = unavailable("/usr/sbin/couriertcpd")
    if reason:
        print(f"PROBLEM: {reason}", file=sys.stderr)
        return 1
    results = {}
    for name, settings, samples in (
        ("IMAP_ENHANCEDIDLE=1", dict(RECIPE_IMAPD), opts.samples),
        ("IMAP_ENHANCEDIDLE=0 (Debian's default)", {}, opts.plain_samples),
    ):
        figures = measure(settings, samples, timeout=90.0)
        results[name] = figures
        print(
            f"{name:40} median {statistics.median(figures):6.2f} s   "
            f"min {min(figures):6.2f}   max {max(figures):6.2f}   ({len(figures)} samples)"
        )
    if opts.output:
        opts.output.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
