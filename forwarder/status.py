"""`forwarder status`: what the state store says, read-only, for a human or a script.

The SQLite file is opened with `mode=ro`: this command never creates, migrates or
locks it for writing, so it is safe to run next to the daemon. Statuses are
grouped generically, so a status added later is counted without a change here.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from forwarder.config import Settings, env_name
from forwarder.errors import EXIT_OK, StateError

FAILED_SHOWN = 50


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the second."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


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
    forwarded_per_list: dict[str, int]  # list -> messages with a delivered copy
    skipped: dict[str, int]  # reason -> messages
    deferred: list[Deferred] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_lists(joined: str) -> list[str]:
    return [part for part in joined.split(",") if part]


def read_status(path: Path, configured_lists: tuple[str, ...] = ()) -> StatusReport:
    """Read the state store at `path` without writing to it; StateError if impossible."""
    if not path.is_file():
        raise StateError(
            f"state store {path} does not exist (set {env_name('state_db')} to the file "
            "the daemon uses)"
        )
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StateError(f"state store {path}: cannot open read-only ({exc})") from None
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        return _read(db, path, configured_lists)
    except sqlite3.Error as exc:
        raise StateError(
            f"state store {path}: cannot read ({exc}); is it the forwarder's state file? "
            f"(set {env_name('state_db')})"
        ) from None
    finally:
        db.close()


def _read(db: sqlite3.Connection, path: Path, configured_lists: tuple[str, ...]) -> StatusReport:
    db.execute("BEGIN")  # one consistent snapshot, even while the daemon writes
    row = db.execute(
        "SELECT started, finished, outcome, messages, forwarded, delivered, deferred, failed, "
        "skipped, error FROM cycles ORDER BY id DESC LIMIT 1"
    ).fetchone()
    last = None
    if row is not None:
        started, finished, *rest = row
        last = LastCycle(iso(started), iso(finished), *rest)
    (cycles,) = db.execute("SELECT COUNT(*) FROM cycles").fetchone()

    deliveries = dict(
        db.execute(
            "SELECT status, COUNT(*) FROM deliveries GROUP BY status ORDER BY status"
        ).fetchall()
    )

    forwarded: dict[str, set[str]] = {address: set() for address in configured_lists}
    for key, lists in db.execute(
        "SELECT DISTINCT message_key, lists FROM deliveries WHERE status = 'delivered'"
    ):
        for address in _split_lists(lists):
            forwarded.setdefault(address, set()).add(key)

    skipped = dict(
        db.execute("SELECT reason, COUNT(*) FROM skipped GROUP BY reason ORDER BY reason")
    )

    deferred = [
        Deferred(member, message_id, attempts, iso(next_try), code, reply, _split_lists(lists))
        for member, message_id, attempts, next_try, code, reply, lists in db.execute(
            "SELECT member, message_id, attempts, next_try, code, reply, lists FROM deliveries "
            "WHERE status = 'deferred' ORDER BY next_try, message_key, member"
        )
    ]
    failed = [
        Failed(member, message_id, code, reply, iso(updated), _split_lists(lists))
        for member, message_id, code, reply, updated, lists in db.execute(
            "SELECT member, message_id, code, reply, updated, lists FROM deliveries "
            "WHERE status = 'failed' ORDER BY updated DESC, message_key, member LIMIT ?",
            (FAILED_SHOWN,),
        )
    ]
    db.execute("COMMIT")
    return StatusReport(
        state_db=str(path),
        last_cycle=last,
        cycles=cycles,
        deliveries=deliveries,
        forwarded_per_list={address: len(keys) for address, keys in sorted(forwarded.items())},
        skipped=skipped,
        deferred=deferred,
        failed=failed,
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
            f"skipped {cycle.skipped}"
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


async def show_status(settings: Settings, as_json: bool = False, out: TextIO = sys.stdout) -> int:
    """Print the state store's summary (text, or one JSON object with `as_json`)."""
    try:
        report = read_status(settings.state_db, tuple(settings.lists))
    except StateError as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return exc.exit_status
    if as_json:
        out.write(json.dumps(report.as_dict(), ensure_ascii=False) + "\n")
    else:
        out.write(render_text(report))
    return EXIT_OK
