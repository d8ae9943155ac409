"""`forwarder status`: what the state store says, read-only, for a human or a script.

The SQLite file is opened with `mode=ro` (PostgreSQL in read-only transactions): this
command never creates, migrates or locks the store for writing, so it is safe to run
next to the daemon. Statuses are
grouped generically, so a status added later is counted without a change here.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from forwarder.config import ProcessSettings
from forwarder.errors import EXIT_OK, ForwarderError
from forwarder.factory import open_store, store_label
from forwarder.logs import escape_controls, print_error, printable_json
from forwarder.reporting import iso
from forwarder.state import StateStore

FAILED_SHOWN = 50


@dataclass(frozen=True)
class LastCycle:
    started: str | None
    finished: str | None
    outcome: str
    messages: int
    forwarded: int
    delivered: int
    deferred: int
    failed: int
    skipped: int
    quarantined: int
    error: str | None


@dataclass(frozen=True)
class Deferred:
    member: str
    message_id: str | None
    attempts: int
    next_try: str | None
    code: int | None
    reply: str
    lists: list[str]


@dataclass(frozen=True)
class Failed:
    member: str
    message_id: str | None
    code: int | None
    reply: str
    updated: str | None
    lists: list[str]


@dataclass(frozen=True)
class StatusReport:
    state_db: str
    last_cycle: LastCycle | None
    cycles: int
    deliveries: dict[str, int]  # status -> (message, member) rows
    forwarded_per_list: dict[str, int]  # list -> messages whose every delivery is final
    skipped: dict[str, int]  # reason -> messages
    messages: dict[str, int] = field(default_factory=dict)  # message state -> messages
    deferred: list[Deferred] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_status(
    store: StateStore,
    where: str,
    configured_lists: tuple[str, ...] = (),
    mailbox: str | None = None,
) -> StatusReport:
    """What `store` says, for people; StateError if it cannot be read."""
    r = store.report(mailbox, FAILED_SHOWN)
    last = None
    if (c := r.last_cycle) is not None:
        last = LastCycle(
            iso(c.started),
            iso(c.finished),
            c.outcome,
            c.messages,
            c.forwarded,
            c.delivered,
            c.deferred,
            c.failed,
            c.skipped,
            c.quarantined,
            c.error,
        )
    named = {address for row in (*r.deferred, *r.failed) for address in row.lists}
    forwarded = dict.fromkeys((*configured_lists, *named), 0) | r.forwarded_per_list
    return StatusReport(
        state_db=where,
        last_cycle=last,
        cycles=r.cycles,
        deliveries=r.deliveries,
        forwarded_per_list=dict(sorted(forwarded.items())),
        skipped=r.skipped,
        messages=r.uids,
        deferred=[
            Deferred(
                d.member,
                d.message_id,
                d.attempts,
                iso(d.next_try),
                d.code,
                d.reply,
                list(d.lists),
            )
            for d in r.deferred
        ],
        failed=[
            Failed(d.member, d.message_id, d.code, d.reply, iso(d.updated), list(d.lists))
            for d in r.failed
        ],
    )


def _reply(code: int | None, reply: str) -> str:
    text = " ".join(reply.split())
    return f"{code} {text}".strip() if code is not None else (text or "(no reply)")


def render_text(report: StatusReport) -> str:
    lines = [f"state store: {report.state_db}"]
    cycle = report.last_cycle
    if cycle is None:
        lines.append("last cycle: none recorded yet")
    else:
        lines.append(f"last cycle: {cycle.finished} ({cycle.outcome}), started {cycle.started}")
        lines.append(
            f"  messages {cycle.messages}, forwarded {cycle.forwarded}, "
            f"delivered {cycle.delivered}, deferred {cycle.deferred}, failed {cycle.failed}, "
            f"skipped {cycle.skipped}, quarantined {cycle.quarantined}"
        )
        if cycle.error:
            lines.append(f"  error: {cycle.error}")
    counts = ", ".join(f"{status} {n}" for status, n in report.deliveries.items())
    lines.append(f"deliveries: {counts or 'none'}")
    lines.append("messages forwarded per list:")
    lines += [f"  {address}: {n}" for address, n in report.forwarded_per_list.items()] or ["  none"]
    if report.skipped:
        lines.append(
            "skipped: " + ", ".join(f"{reason} {n}" for reason, n in report.skipped.items())
        )
    lines.append(f"deferred deliveries: {len(report.deferred)}")
    for d in report.deferred:
        lines.append(
            f"  {d.member}  {d.message_id or '(no Message-ID)'}  attempts {d.attempts}  "
            f"next try {d.next_try or '-'}  last reply: {_reply(d.code, d.reply)}"
        )
    total_failed = report.deliveries.get("failed", 0)
    shown = f" (the {len(report.failed)} most recent)" if total_failed > len(report.failed) else ""
    lines.append(f"failed deliveries: {total_failed}{shown}")
    for f in report.failed:
        lines.append(
            f"  {f.member}  {f.message_id or '(no Message-ID)'}  {f.updated}  "
            f"{_reply(f.code, f.reply)}"
        )
    return "\n".join(lines) + "\n"


async def show_status(
    settings: ProcessSettings,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    mailbox: str | None = None,
) -> int:
    """Print the state store's summary (text, or one JSON object with `as_json`)."""
    try:
        store = open_store(settings, readonly=True)
        try:
            report = read_status(store, store_label(settings), mailbox=mailbox)
        finally:
            store.close()
    except ForwarderError as exc:  # StateError, or a ConfigError (psycopg missing)
        print_error(f"forwarder: {exc}")
        return exc.exit_status
    if as_json:
        out.write(printable_json(report.as_dict()) + "\n")
    else:  # Message-IDs and server replies may carry terminal escape sequences
        out.write(escape_controls(render_text(report), keep="\n"))
    return EXIT_OK
