"""The `instances` phase: the forwarder on PostgreSQL, one instance and two.

A private PostgreSQL cluster (tests.servers.PostgresCluster, with fsync on, as in
production) and a fresh database per run. The same backlog of N messages is
forwarded by:

1. one `forwarder once`, SQLite, then PostgreSQL (the references);
2. one `forwarder run`, then two on one database, on one mailbox: the mailbox lease
   gives the whole mailbox to one of them (the other is there for availability);
3. the backlog spread over 10 mailboxes (10 folders of the catch-all, a
   FORWARDER_MAILBOXES_FILE): one `forwarder run`, then two, the leases dividing
   the mailboxes between them.

Throughput is N / wall time: for `once`, from the spawn of the first process to the
exit of the last; for `run`, from the moment the backlog is moved into the mailboxes'
folders (IMAP MOVE from staging folders), the instances running, ready and their
leases settled, to the sink's last acceptance. The CPU seconds of the forwarder(s),
PostgreSQL, Dovecot and smtp-sink over the same span say what limits it on this
machine. Every run checks that the sink got each message once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import harness as h
from bench.report import Row, target_row
from tests.servers import PostgresCluster

if TYPE_CHECKING:
    from bench.run import Bench

TARGET_SCALE = 1.5  # two instances together, times one instance (issue 10)
BOXES = 10
TICK = 100  # clock ticks per second in /proc/PID/stat (USER_HZ)


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid`, its reaped children and its live children."""

    def fields(p: int | str) -> list[str]:
        text = Path(f"/proc/{p}/stat").read_text()
        return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "

    own = fields(pid)
    total = sum(int(v) for v in own[11:15])  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                child = fields(entry.name)
            except (OSError, ValueError):
                continue
            if child[1] == str(pid):  # ppid
                total += int(child[11]) + int(child[12])
    return total / TICK


@dataclass
class Servers:
    """The CPU the servers used between two snapshots."""

    pids: dict[str, int]

    def snapshot(self) -> dict[str, float]:
        return {name: tree_cpu(pid) for name, pid in self.pids.items()}


class Instances:
    def __init__(self, bench: Bench, cluster: PostgresCluster) -> None:
        self.bench = bench
        self.cluster = cluster
        self.n = bench.opts.messages
        self.runs: dict[str, dict[str, Any]] = {}
        self.made = 0
        self.folders: list[tuple[str, str]] = []  # (a mailbox's folder, its staging folder)
        self.servers = Servers(
            {
                "postgresql": int((cluster.data_dir / "postmaster.pid").read_text().split()[0]),
                "dovecot": int((bench.mail.run_dir / "master.pid").read_text().strip()),
                "smtp-sink": bench.sink.pid,
            }
        )

    # ------------------------------------------------------------------ helpers

    def env(self, name: str, url: str | None, **extra: str) -> dict[str, str]:
        self.made += 1  # a new SQLite file each time, like a new database
        env = self.bench.env(self.bench.workdir / f"{name}-{self.made}.db", **extra)
        if url is not None:
            del env["FORWARDER_STATE_DB"]
            env["FORWARDER_STATE_URL"] = url
        return env

    def database(self) -> str:
        return self.cluster.create_database().url

    def envs(self, count: int, **extra: str) -> list[dict[str, str]]:
        """`count` instances' settings on one new database (a short poll interval: the
        first poll of each mailbox, which starts its IDLE, is spread over it)."""
        url = self.database()
        return [self.env(f"i{i}", url, POLL_INTERVAL="5", **extra) for i in range(count)]

    def reset(self) -> None:
        """The backlog back in its staging folders, unforwarded again; an empty sink."""
        with self.bench.mail.imap() as client:
            for target, staging in self.folders:
                client.select_folder(target)
                if uids := client.search("ALL"):
                    client.remove_flags(uids, h.FORWARDER_FLAGS, silent=True)
                    client.move(uids, staging)
                client.unselect_folder()
            client.logout()
        self.bench.sink.clear()

    def release(self) -> float:
        """Move the backlog into the mailboxes' folders (IMAP MOVE): when it appeared."""
        moved = time.time()
        with self.bench.mail.imap() as client:
            for target, staging in self.folders:
                client.select_folder(staging)
                if uids := client.search("ALL"):
                    client.move(uids, target)
                client.unselect_folder()
            client.logout()
        return moved

    def spread(self, boxes: int) -> Path:
        """The backlog split over `boxes` folders (staged), and a mailboxes file naming them;
        one mailbox: INBOX itself."""
        with self.bench.mail.imap() as client:
            for target, staging in self.folders:  # every message back in INBOX
                for folder in {target, staging} - {"INBOX"}:
                    client.select_folder(folder)
                    if uids := client.search("ALL"):
                        client.move(uids, "INBOX")
                    client.unselect_folder()
                    client.delete_folder(folder)
            client.select_folder("INBOX")
            uids = sorted(client.search("ALL"))
            client.unselect_folder()
            self.folders = (
                [(f"box-{n}", f"stage-{n}") for n in range(boxes)]
                if boxes > 1
                else [("INBOX", "stage")]
            )
            client.select_folder("INBOX")
            for n, (target, staging) in enumerate(self.folders):
                client.create_folder(staging)
                if target != "INBOX":
                    client.create_folder(target)
                client.move(uids[n::boxes], staging)
            client.logout()
        lines = []
        for target, _ in self.folders:
            lines += ["[[mailbox]]", f'name = "{target}"', f'folder = "{target}"', ""]
        path = self.bench.workdir / f"mailboxes-{boxes}.toml"
        path.write_text("\n".join(lines))
        return path

    def verify(self, name: str) -> tuple[int, int]:
        """(transactions, duplicated Message-IDs) the sink got; a PROBLEM if not N once each."""
        dumps = self.bench.sink.transactions(with_ids=True)
        ids = [d.message_id for d in dumps]
        duplicates = len(ids) - len(set(ids))
        self.bench.check(
            len(dumps) == self.n and duplicates == 0,
            f"instances {name}: smtp-sink got {len(dumps)} transactions for {self.n} messages, "
            f"{duplicates} Message-IDs more than once",
        )
        return len(dumps), duplicates

    def measure(self, name: str, run: Any) -> dict[str, Any]:
        """`run()` on the fresh backlog, --runs times; the run of median throughput."""
        runs = []
        for _ in range(self.bench.opts.runs):
            self.reset()
            before = self.servers.snapshot()
            wall, forwarder_cpu, extra = run()
            after = self.servers.snapshot()
            transactions, duplicates = self.verify(name)
            servers = extra.pop("server_cpu_s", None) or {k: after[k] - before[k] for k in before}
            cpu = servers | {"forwarder": forwarder_cpu}
            runs.append(
                {
                    "wall_s": wall,
                    "msgs_per_s": self.n / wall,
                    "cpu_s": cpu,
                    "cpu_total_s": sum(cpu.values()),
                    "transactions": transactions,
                    "duplicates": duplicates,
                    **extra,
                }
            )
            h_log(
                f"instances: {name}: {self.n / wall:,.0f} msg/s (wall {wall:.2f} s), CPU "
                + ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
            )
        chosen = sorted(runs, key=lambda r: r["msgs_per_s"])[len(runs) // 2]
        chosen = {**chosen, "duplicates": sum(r["duplicates"] for r in runs)}
        self.runs[name] = {"median": chosen, "runs": runs}
        return chosen

    def once(self, envs: list[dict[str, str]], name: str) -> tuple[float, float, dict[str, Any]]:
        """`forwarder once` in each env, all at once, on the backlog already in place:
        (wall, forwarder CPU, details)."""
        self.release()
        started = time.monotonic()
        children = [
            h.start_child([*h.forwarder_command(), "once"], env, self.bench.workdir, f"{name}-{i}")
            for i, env in enumerate(envs)
        ]
        done = [child.wait(900) for child in children]
        wall = time.monotonic() - started
        for i, child in enumerate(done):
            self.bench.check(
                child.returncode == 0,
                f"instances {name}-{i}: forwarder once exited with {child.returncode}: "
                f"{child.stderr_tail()}",
            )
        return wall, sum(c.cpu for c in done), {"processes": len(done)}

    def run(self, envs: list[dict[str, str]], name: str) -> tuple[float, float, dict[str, Any]]:
        """`forwarder run` in each env; once all are ready and their leases settled (a
        fair split), the backlog is moved in, and they run until the sink has N messages.
        The time and the CPU are those from the move on."""
        daemons = []
        for i, env in enumerate(envs):
            cwd = self.bench.workdir / f"{name}-{i}"
            cwd.mkdir(exist_ok=True)
            daemons.append(h.ForwarderDaemon(env, cwd))
        try:
            for daemon in daemons:
                daemon.start()
            for daemon in daemons:
                daemon.wait_event("ready", 120)
            self.settle(daemons)
            before, own = self.servers.snapshot(), [tree_cpu(d.pid) for d in daemons]
            moved = self.release()
            got = self.bench.sink.wait_for(self.n, 600)
            time.sleep(1.0)  # a duplicate would show up now
            after, spent = self.servers.snapshot(), [tree_cpu(d.pid) for d in daemons]
        except BaseException:
            for daemon in daemons:
                daemon.kill()
            raise
        stopped = [daemon.stop() for daemon in daemons]
        last = max((d.accepted_ns for d in self.bench.sink.transactions()), default=0) / 1e9
        worked = [
            sum(
                int(e.get("delivered", 0))
                for e in daemon.events
                if e.get("event") == "cycle_finished"
            )
            for daemon in daemons
        ]
        for i, (code, _usage) in enumerate(stopped):
            self.bench.check(code == 0, f"instances {name}-{i}: forwarder run exited with {code}")
        self.bench.check(got >= self.n, f"instances {name}: {got}/{self.n} forwarded")
        servers = {k: after[k] - before[k] for k in before}
        return (
            last - moved,
            sum(spent) - sum(own),
            {"deliveries_per_instance": worked, "server_cpu_s": servers},
        )

    def settle(self, daemons: list[h.ForwarderDaemon], timeout: float = 60) -> None:
        """Wait until the instances hold the mailboxes in a fair split (their last
        `mailboxes_acquired`): [5, 5] for 10 mailboxes and 2 instances, [1, 0] for 1;
        and each watches its mailboxes with IDLE (their first cycle done), so that the
        backlog wakes their workers at once rather than at their next poll."""
        names, k = len(self.folders), len(daemons)
        fair = sorted(names // k + (1 if i < names % k else 0) for i in range(k))
        deadline = time.monotonic() + timeout
        while True:
            held = [last_held(d) for d in daemons]
            watched = [
                {e.get("mailbox") for e in d.events if e.get("event") == "idle_started"} & mine
                for d, mine in zip(daemons, held, strict=True)
            ]
            if sorted(map(len, held)) == fair and watched == held:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not settled: held {held}, watched by IDLE {watched}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ the phase

    def __call__(self) -> None:
        n, b = self.n, self.bench
        h_log(f"instances: filling the catch-all with {n} messages")
        b.refill("inst", n)
        self.spread(1)
        sqlite = self.measure("sqlite-once", lambda: self.once([self.env("sq", None)], "sq"))
        pg = self.measure("pg-once", lambda: self.once([self.env("pg", self.database())], "pg"))
        alone = self.measure("pg-run", lambda: self.run(self.envs(1), "pg-run"))
        pair = self.measure("pg-run-x2", lambda: self.run(self.envs(2), "pg-run-x2"))
        rows = [
            Row(
                "instances",
                f"one instance, SQLite, 1 mailbox (forwarder once, {n:,} msgs, median of "
                f"{b.opts.runs})",
                sqlite["msgs_per_s"],
                "msg/s",
                note=cpu_note(sqlite),
            ),
            Row(
                "instances",
                "one instance, PostgreSQL, 1 mailbox (forwarder once)",
                pg["msgs_per_s"],
                "msg/s",
                note=cpu_note(pg),
            ),
            Row(
                "instances",
                "one instance, PostgreSQL, 1 mailbox (forwarder run)",
                alone["msgs_per_s"],
                "msg/s",
                note=cpu_note(alone),
            ),
            Row(
                "instances",
                "two instances, PostgreSQL, 1 mailbox (forwarder run x2)",
                pair["msgs_per_s"],
                "msg/s",
                note=f"deliveries per instance {pair['deliveries_per_instance']} (the lease "
                f"holder works, the other waits); {pair['duplicates']} duplicates; "
                + cpu_note(pair),
            ),
        ]
        rows += self.ten_mailboxes()
        b.rows += rows
        b.results["instances"] = {"messages": n, "mailboxes": BOXES, "runs": self.runs}

    def ten_mailboxes(self) -> list[Row]:
        self.reset()
        toml = str(self.spread(BOXES))
        one = self.measure(
            "pg-run-10", lambda: self.run(self.envs(1, MAILBOXES_FILE=toml), "pg-run-10")
        )
        two = self.measure(
            "pg-run-x2-10", lambda: self.run(self.envs(2, MAILBOXES_FILE=toml), "pg-run-x2-10")
        )
        ratio = two["msgs_per_s"] / one["msgs_per_s"]
        return [
            Row(
                "instances",
                f"one instance, PostgreSQL, {BOXES} mailboxes (forwarder run)",
                one["msgs_per_s"],
                "msg/s",
                note=cpu_note(one),
            ),
            Row(
                "instances",
                f"two instances, PostgreSQL, {BOXES} mailboxes (forwarder run x2)",
                two["msgs_per_s"],
                "msg/s",
                note=f"deliveries per instance {two['deliveries_per_instance']} (the leases "
                f"divide the mailboxes); {two['duplicates']} duplicates; " + cpu_note(two),
            ),
            target_row(
                "instances",
                "  two / one instance (forwarder run)",
                ratio,
                "x",
                f">= {TARGET_SCALE:g}x",
                lambda v: v >= TARGET_SCALE,
            ),
        ]


def last_held(daemon: h.ForwarderDaemon) -> set[str]:
    """The mailboxes an instance said it holds in its last `mailboxes_acquired`."""
    for event in reversed(daemon.events):
        if event.get("event") == "mailboxes_acquired":
            return set(event["held"])
    return set()


def cpu_note(run: dict[str, Any]) -> str:
    cpu = run["cpu_s"]
    busy = run["cpu_total_s"] / run["wall_s"]
    return (
        f"CPU s: forwarder {cpu['forwarder']:.1f}, PostgreSQL {cpu['postgresql']:.1f}, "
        f"Dovecot {cpu['dovecot']:.1f}, sink {cpu['smtp-sink']:.1f} ({busy:.2f} cores busy)"
    )


def h_log(text: str) -> None:
    from bench.run import log

    log(text)
