"""The `folder` phase: a cycle costs the same in a small folder and in a huge one.

Two private Dovecots in sdbox format (tests.servers.MailServer on tmpfs), one
filled with 100,000 messages, a third of which name no list
(tests.servers.dovecot_bulk.fill), the other with 100 of the same. The forwarder
first works through each folder as a real deployment would have: `forwarder once`
over the whole backlog, so that its state store knows every message (forwarded,
or skipped for naming no list, left without keywords). Then, alternating between
the two folders, 10 new messages are delivered by LMTP and `forwarder once`
forwards them; the figure is the median `duration_ms` of its `cycle_finished`
line, and the ratio full / small (issue 11: within 20 %).

Also measured: the wall time and CPU of the process, the IMAP commands of one
more cycle through a recording proxy (tests.faults.FaultProxy), and Dovecot
alone: the bench's own IMAP session doing what a cycle must (LOGIN, SELECT, UID
SEARCH above the last UID, UID FETCH of the 10 new messages, LOGOUT).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from imapclient import IMAPClient

from bench import harness as h
from bench.report import Row, target_row
from tests.faults import FaultProxy
from tests.servers import MailServer
from tests.servers.dovecot_bulk import FAST_DIR, fill

if TYPE_CHECKING:
    from bench.run import Bench

TARGET_FOLDER = 1.20  # cycle time in the full folder / in the small one
SMALL = 100
_COMMAND = re.compile(rb"^[A-Za-z0-9]+ ((?:UID )?[A-Za-z]+)")


def log(text: str) -> None:
    from bench.run import log as bench_log

    bench_log(text)


@dataclass
class Folder:
    """One Dovecot, its state store and what was measured on it."""

    kind: str  # "small" or "full"
    size: int
    mail: MailServer
    state: Path
    unmatched: int = 0
    backlog: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    dovecot_ms: list[float] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def med(self, key: str) -> float:
        return float(median(run[key] for run in self.runs))


class FolderScale:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.opts = bench.opts
        self.workdir = bench.workdir
        self.sink = bench.sink

    def env(self, folder: Folder, imap_port: int | None = None) -> dict[str, str]:
        from bench.run import LISTS

        env = h.forwarder_env(folder.mail, self.sink.port, LISTS, folder.state)
        if imap_port is not None:
            env["FORWARDER_IMAP_PORT"] = str(imap_port)
        return env

    def __call__(self) -> None:
        big = self.opts.folder_messages
        with (
            MailServer(mail_format="sdbox", parent=FAST_DIR) as small_mail,
            MailServer(mail_format="sdbox", parent=FAST_DIR) as big_mail,
        ):
            folders = [
                Folder("small", SMALL, small_mail, self.workdir / "folder-small.db"),
                Folder("full", big, big_mail, self.workdir / "folder-full.db"),
            ]
            for folder in folders:
                self._backlog(folder)
            for r in range(self.opts.folder_runs):
                for folder in folders if r % 2 == 0 else reversed(folders):
                    self._cycle(folder, r)
            for folder in folders:
                self._count_commands(folder)
        self._report(*folders)

    def _backlog(self, folder: Folder) -> None:
        """Fill the folder and let the forwarder work through it (a real backlog)."""
        log(f"folder: filling an sdbox folder with {folder.size:,} messages")
        filled = fill(folder.mail, folder.size)
        folder.unmatched = len(filled.unmatched)
        matched = filled.count - folder.unmatched
        self.sink.clear()
        result = h.forwarder_once(
            self.env(folder), self.workdir, f"folder-{folder.kind}-backlog", timeout=3600
        )
        got = self.sink.count()
        self.bench.check(
            got == matched,
            f"folder {folder.kind}: the backlog run forwarded {got} of {matched} messages",
        )
        self.sink.clear()
        folder.backlog = {
            "messages": filled.count,
            "naming_no_list": folder.unmatched,
            "write_s": filled.write_seconds,
            "index_s": filled.index_seconds,
            "wall_s": result.child.wall,
            "cycle_s": result.cycle_seconds,
            "cpu_s": result.child.cpu,
            "state_mb": folder.state.stat().st_size / 1024 / 1024,
        }
        log(
            f"folder: {folder.kind}: {filled.count:,} messages written in "
            f"{filled.write_seconds:.1f} s, indexed in {filled.index_seconds:.1f} s; "
            f"forwarded by forwarder once in {result.child.wall:.1f} s"
        )

    def _deliver(self, folder: Folder, tag: str) -> None:
        from bench.run import backlog

        h.fill(folder.mail, backlog(tag, self.opts.folder_new))

    def _cycle(self, folder: Folder, r: int) -> None:
        new = self.opts.folder_new
        self._deliver(folder, f"fo{r}{folder.kind}")
        result = h.forwarder_once(self.env(folder), self.workdir, f"folder-{folder.kind}-{r}")
        got = self.sink.count()
        self.bench.check(
            got == new, f"folder {folder.kind} run {r + 1}: {got} of {new} messages forwarded"
        )
        self.sink.clear()
        folder.runs.append(
            {
                "cycle_ms": result.cycle.get("duration_ms"),
                "wall_s": result.child.wall,
                "cpu_s": result.child.cpu,
            }
        )
        folder.dovecot_ms.append(self._dovecot_alone(folder, new))
        log(
            f"folder: {folder.kind} ({folder.size:,}), run {r + 1}/{self.opts.folder_runs}: "
            f"cycle {result.cycle.get('duration_ms')} ms, wall {result.child.wall:.2f} s, "
            f"Dovecot alone {folder.dovecot_ms[-1]:.1f} ms"
        )

    def _dovecot_alone(self, folder: Folder, new: int) -> float:
        """What any client must ask Dovecot in such a cycle, timed from the bench."""
        mail = folder.mail
        started = time.perf_counter()
        client = IMAPClient(mail.host, port=mail.imap_port, ssl=False, timeout=30)
        client.login(mail.username, mail.password)
        info = client.select_folder("INBOX")
        top = int(info[b"UIDNEXT"]) - 1
        uids = client.search(["UID", f"{top - new + 1}:*"])
        fetched = client.fetch(uids, ["BODY.PEEK[]"])
        client.logout()
        elapsed = (time.perf_counter() - started) * 1000
        self.bench.check(len(fetched) == new, f"Dovecot alone fetched {len(fetched)} of {new}")
        return elapsed

    def _count_commands(self, folder: Folder) -> None:
        """One more cycle, through a recording proxy: the IMAP commands it sends."""
        with FaultProxy(folder.mail.host, folder.mail.imap_port, record=True) as proxy:
            self._deliver(folder, f"focmd{folder.kind}")
            h.forwarder_once(
                self.env(folder, proxy.port), self.workdir, f"folder-{folder.kind}-commands"
            )
            sent = proxy.recorded("client")
        self.sink.clear()
        folder.commands = list(_commands(sent))

    def _report(self, small: Folder, full: Folder) -> None:
        ratio = full.med("cycle_ms") / small.med("cycle_ms")
        wall_ratio = full.med("wall_s") / small.med("wall_s")
        self.bench.results["folder"] = {
            "format": "sdbox",
            "new_per_cycle": self.opts.folder_new,
            "runs": self.opts.folder_runs,
            "ratio": ratio,
            "wall_ratio": wall_ratio,
            "folders": {
                f.kind: {
                    "size": f.size,
                    "backlog": f.backlog,
                    "runs": f.runs,
                    "dovecot_alone_ms": f.dovecot_ms,
                    "imap_commands": f.commands,
                    "median": {
                        "cycle_ms": f.med("cycle_ms"),
                        "wall_s": f.med("wall_s"),
                        "cpu_s": f.med("cpu_s"),
                        "dovecot_alone_ms": median(f.dovecot_ms),
                    },
                }
                for f in (small, full)
            },
        }
        new, runs = self.opts.folder_new, self.opts.folder_runs
        sec = "folder"

        def note(f: Folder) -> str:
            return (
                f"wall {f.med('wall_s'):.2f} s, CPU {f.med('cpu_s'):.2f} s; "
                f"{len(f.commands)} IMAP commands"
            )

        self.bench.rows += [
            Row(
                sec,
                f"forwarder once, {new} new msgs, folder of {small.size:,} (sdbox): cycle, "
                f"median of {runs}",
                small.med("cycle_ms"),
                "ms",
                note=note(small),
            ),
            Row(
                sec,
                f"  same, folder of {full.size:,} already handled ({full.unmatched:,} naming "
                "no list)",
                full.med("cycle_ms"),
                "ms",
                note=note(full),
            ),
            target_row(
                sec,
                "  ratio full / small (cycle time)",
                ratio,
                "x",
                f"<= {TARGET_FOLDER:.2f}x",
                lambda v: v <= TARGET_FOLDER,
                note=f"wall ratio {wall_ratio:.2f}x",
            ),
            Row(
                sec,
                f"  Dovecot alone: LOGIN, SELECT, UID SEARCH, FETCH {new}, LOGOUT, small folder",
                median(small.dovecot_ms),
                "ms",
                note=f"full folder {median(full.dovecot_ms):.1f} ms",
            ),
        ]
        log(
            f"folder: cycle {small.med('cycle_ms'):.0f} ms ({small.size:,}) vs "
            f"{full.med('cycle_ms'):.0f} ms ({full.size:,}): ratio {ratio:.2f}; IMAP commands "
            f"{dict(Counter(small.commands))} / {dict(Counter(full.commands))}"
        )


def _commands(client_bytes: bytes) -> Iterator[str]:
    """The command names (never their arguments: LOGIN carries the password)."""
    for line in client_bytes.split(b"\r\n"):
        if match := _COMMAND.match(line):
            yield match.group(1).decode().upper()
