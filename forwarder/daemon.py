"""`forwarder run`: an APScheduler poll job, one cycle at a time, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from forwarder.config import Settings
from forwarder.cycle import CycleSummary, Forwarder
from forwarder.errors import EXIT_OK, AuthError, ForwarderError, KeywordsNotSupported
from forwarder.service import report
from forwarder.state import SqliteStateStore

log = structlog.get_logger("forwarder.daemon")


async def run_daemon(settings: Settings) -> int:
    try:
        store = SqliteStateStore(settings.state_db)
    except ForwarderError as exc:
        return report(exc, "state_store_error")
    forwarder = Forwarder(settings, store)
    stop = asyncio.Event()
    busy = asyncio.Lock()
    totals = CycleSummary()
    fatal: list[ForwarderError] = []

    def request_stop(signame: str) -> None:
        log.info("stop_requested", signal=signame)
        forwarder.stopping = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)

    async def poll() -> None:
        if busy.locked() or stop.is_set():
            return
        async with busy:
            try:
                summary = await forwarder.run_cycle()
            except (AuthError, KeywordsNotSupported) as exc:
                fatal.append(exc)  # does not heal by waiting
                stop.set()
                return
            except ForwarderError as exc:
                log.error("cycle_failed", error=str(exc), retry_in=settings.poll_interval)
                return
            for name, value in summary.as_dict().items():
                setattr(totals, name, getattr(totals, name) + value)

    scheduler = AsyncIOScheduler(event_loop=loop)
    scheduler.add_job(
        poll,
        "interval",
        seconds=settings.poll_interval,
        id="poll",
        next_run_time=datetime.now(UTC),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    scheduler.start()
    log.info("started", lists=len(forwarder.lists), poll_interval=settings.poll_interval)
    try:
        await stop.wait()
    finally:
        scheduler.shutdown(wait=False)
        async with busy:  # the message in flight is finished and committed
            await forwarder.close()
            store.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped", **totals.as_dict())
    if fatal:
        return report(fatal[0], "fatal_error")
    return EXIT_OK
