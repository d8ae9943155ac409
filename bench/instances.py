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

Throughput is N / wall time, from the spawn of the first process to the exit of the
last (`once`) or to the sink's last acceptance (`run`). The CPU seconds of the
forwarder(s), PostgreSQL, Dovecot and smtp-sink over the run say what limits it on
this machine. Every run checks that the sink got each message once.
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
        """`count` instances' settings on one new database."""
        url = self.database()
        return [self.env(f"i{i}", url, **extra) for i in range(count)]

    def reset(self) -> None:
        """The same backlog, unforwarded again, in every folder."""
        with self.bench.mail.imap() as client:
            for _flags, _delim, folder in client.list_folders():
                client.select_folder(folder)
                if uids := client.search("ALL"):
                    client.remove_flags(uids, h.FORWARDER_FLAGS, silent=True)
                client.unselect_folder()
            client.logout()
        self.bench.sink.clear()

    def spread(self) -> Path:
        """The INBOX backlog moved into BOXES folders, and a mailboxes file naming them."""
        lines = []
        with self.bench.mail.imap() as client:
            client.select_folder("INBOX")
            uids = sorted(client.search("ALL"))
            for box in range(BOXES):
                folder = f"box-{box}"
                client.create_folder(folder)
                client.move(uids[box::BOXES], folder)
                lines += ["[[mailbox]]", f'name = "{folder}"', f'folder = "{folder}"', ""]
            client.logout()
        path = self.bench.workdir / "mailboxes.toml"
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
            cpu = {k: after[k] - before[k] for k in before} | {"forwarder": forwarder_cpu}
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
        """`forwarder once` in each env, all at once: (wall, forwarder CPU, details)."""
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
        """`forwarder run` in each env until the sink has N messages."""
        daemons = []
        for i, env in enumerate(envs):
            cwd = self.bench.workdir / f"{name}-{i}"
            cwd.mkdir(exist_ok=True)
            daemons.append(h.ForwarderDaemon(env, cwd))
        started = time.time()
        try:
            for daemon in daemons:
                daemon.start()
            got = self.bench.sink.wait_for(self.n, 600)
            time.sleep(1.0)  # a duplicate would show up now
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
        cpu = sum(u.ru_utime + u.ru_stime for _, u in stopped)
        return last - started, cpu, {"deliveries_per_instance": worked}

    # ------------------------------------------------------------------ the phase

    def __call__(self) -> None:
        n, b = self.n, self.bench
        h_log(f"instances: filling the catch-all with {n} messages")
        b.refill("inst", n)
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
                note="wall to the last message accepted, start-up included; " + cpu_note(alone),
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
        toml = str(self.spread())
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
