"""`make bench` (python -m bench.run): the forwarder measured against real servers.

Starts a private Dovecot (tests.servers.MailServer) and Postfix's smtp-sink on
loopback, fills the catch-all by LMTP and measures, in one run:

1. throughput: `forwarder once` over a backlog of N messages, then fetchmail
   (multidrop) over the same backlog (or a sample of it);
2. latency: `forwarder run` (IMAP IDLE), messages delivered at a steady rate,
   LMTP acceptance -> smtp-sink acceptance;
3. memory: `forwarder once` on one large message; steady RSS of `forwarder run`;
4. scale: loading 10,000 lists of 20 members; a cycle against a state store of
   1,000,000 deliveries versus an empty one;
5. instances: one and two instances on a private PostgreSQL, on one mailbox and on
   ten (bench/instances.py);
6. folder: a cycle with 10 new messages in a folder of 100,000 already handled
   versus one of 100 (bench/folder.py).

Prints one table and writes it, with the machine, as JSON. Never fails on timing;
exits 1 only when something did not work (a message not delivered exactly once,
a process failing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness as h
from bench.report import Row, machine, render, source, source_digest, target_row
from tests.servers import MailServer, PostgresCluster

LISTS: dict[str, list[str]] = {
    "contact@example.org": ["alice@example.org", "bob@example.org", "carol@example.org"],
    "compta@example.org": ["bob@example.org"],
    "direction@example.org": ["dave@example.org"],
}
LIST_ADDRESSES = list(LISTS)
PHASES = ("throughput", "latency", "memory", "scale", "instances", "folder", "mailboxes")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results.json")
QUICK_RESULTS = Path(__file__).with_name("results-quick.json")
MB = 1024 * 1024

# The targets, next to the figures (never a failure).
TARGET_RATE = 1500.0  # messages/s, forwarder once over a backlog
TARGET_RATIO = 50.0  # times fetchmail's rate
TARGET_P50 = 0.200  # s
TARGET_P99 = 1.0  # s
TARGET_RSS = 60.0  # MB, forwarder run, steady
TARGET_LARGE = 3.0  # peak RSS / message size
TARGET_LOAD = 1.0  # s, 10,000 lists
TARGET_STORE = 1.10  # cycle time with the big store / with an empty one

LOAD_LISTS = """\
import json, time
t0 = time.perf_counter()
from forwarder.config import load_settings
t1 = time.perf_counter()
s = load_settings()
t2 = time.perf_counter()
lists = s.mailboxes()[0].lists
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_settings_s": t2 - t1, "expand_s": t3 - t2,
                  "lists": len(lists), "members": sum(len(m) for m in lists.values())}))
"""


# --------------------------------------------------------------------------- helpers


def log(text: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was actually observed."""
    ordered = sorted(values)
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def expected_deliveries(n: int) -> int:
    """Member deliveries for n backlog messages cycling through LIST_ADDRESSES."""
    return sum(len(LISTS[LIST_ADDRESSES[i % len(LISTS)]]) for i in range(n))


def backlog(tag: str, n: int) -> Iterator[tuple[bytes, str]]:
    for i in range(n):
        rcpt = LIST_ADDRESSES[i % len(LIST_ADDRESSES)]
        yield h.small_message(tag, i, rcpt), rcpt


class Bench:
    def __init__(
        self, opts: argparse.Namespace, workdir: Path, mail: MailServer, sink: h.SmtpSinkProcess
    ) -> None:
        self.opts = opts
        self.workdir = workdir
        self.mail = mail
        self.sink = sink
        self.results: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.notes: list[str] = []

    def check(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
            log("PROBLEM: " + problem)
        return ok

    def env(self, state_db: Path, lists: Any = LISTS, **extra: str) -> dict[str, str]:
        return h.forwarder_env(self.mail, self.sink.port, lists, state_db, **extra)

    def refill(self, tag: str, n: int) -> tuple[int, int, float]:
        self.mail.clear()
        self.sink.clear()
        return h.fill(self.mail, backlog(tag, n))

    # ------------------------------------------------------------------- 1. throughput

    def throughput(self) -> None:
        n, runs = self.opts.messages, self.opts.runs
        want_rcpts = expected_deliveries(n)
        log(f"throughput: filling the catch-all with {n} messages over one LMTP connection")
        count, size, fill_s = self.refill("tp", n)
        log(f"throughput: {count} messages ({size / count:,.0f} B avg) in {fill_s:.1f} s")
        per_run: list[dict[str, Any]] = []
        for r in range(runs):
            if r:
                h.reset_flags(self.mail)  # the same backlog, unforwarded again
                self.sink.clear()
            state = self.workdir / f"throughput-{r}.db"
            result = h.forwarder_once(self.env(state), self.workdir, f"throughput-{r}")
            dumps = self.sink.transactions()
            rcpts = sum(d.rcpts for d in dumps)
            _total, left = h.mailbox_counts(self.mail)
            self.check(
                len(dumps) == n and rcpts == want_rcpts and left == 0,
                f"throughput run {r + 1}: smtp-sink got {len(dumps)} transactions / {rcpts} "
                f"recipients (expected {n} / {want_rcpts}); {left} left without $Forwarded",
            )
            child, cycle_s = result.child, result.cycle_seconds
            per_run.append(
                {
                    "wall_s": child.wall,
                    "cycle_s": cycle_s,
                    "msgs_per_s": n / child.wall,
                    "cycle_msgs_per_s": n / cycle_s if cycle_s else None,
                    "cpu_s": child.cpu,
                    "user_s": child.user,
                    "sys_s": child.sys,
                    "maxrss_mb": child.maxrss_mb,
                    "transactions": len(dumps),
                    "recipients": rcpts,
                    "cycle": result.cycle,
                }
            )
            log(
                f"throughput: forwarder once run {r + 1}/{runs}: {n / child.wall:,.0f} msg/s "
                f"(wall {child.wall:.2f} s, cycle {cycle_s} s, CPU {child.cpu:.2f} s, "
                f"RSS {child.maxrss_mb:.1f} MB)"
            )
            state.unlink(missing_ok=True)

        def med(key: str) -> float | None:
            values = [run[key] for run in per_run if run[key] is not None]
            return median(values) if values else None

        rate = med("msgs_per_s")
        forwarder = {
            "messages": n,
            "message_bytes_avg": size / count,
            "deliveries": want_rcpts,
            "lmtp_fill_msgs_per_s": count / fill_s,
            "runs": per_run,
            "median": {k: med(k) for k in per_run[0] if k not in ("cycle",)},
        }

        self.results["throughput"] = {"forwarder": forwarder}
        if self.opts.fetchmail_messages == 0:
            self.rows += self._throughput_rows(n, runs, rate, forwarder, count / fill_s)
            return
        m = self.opts.fetchmail_messages or n
        sample = m < n
        log(f"throughput: fetchmail over {m} messages ({'a sample' if sample else 'the backlog'})")
        self.refill("tp", m)
        fm = h.fetchmail_once(self.mail, self.sink.port, self.workdir, timeout=max(600.0, m))
        got = self.sink.wait_for(m, 30)
        self.check(
            fm.returncode == 0 and got == m,
            f"fetchmail exited with {fm.returncode} and forwarded {got}/{m} messages: "
            f"{fm.stderr_tail(5)}",
        )
        fm_rate = m / fm.wall
        fetchmail = {
            "messages": m,
            "sample": sample,
            "wall_s": fm.wall,
            "msgs_per_s": fm_rate,
            "cpu_s": fm.cpu,
            "maxrss_mb": fm.maxrss_mb,
            "returncode": fm.returncode,
            "transactions": got,
        }
        log(f"throughput: fetchmail {fm_rate:.1f} msg/s (wall {fm.wall:.1f} s)")
        ratio = rate / fm_rate if rate and fm_rate else None
        self.results["throughput"].update({"fetchmail": fetchmail, "ratio": ratio})
        self.rows += self._throughput_rows(n, runs, rate, forwarder, count / fill_s)
        sec = "throughput"
        self.rows += [
            Row(
                sec,
                f"fetchmail multidrop, {m:,} msgs" + (" (SAMPLE of the backlog)" if sample else ""),
                fm_rate,
                "msg/s",
                note=f"CPU {fm.cpu:.1f} s, RSS {fm.maxrss_mb:.1f} MB",
            ),
            target_row(
                sec,
                "forwarder / fetchmail" + (" (fetchmail rate from a sample)" if sample else ""),
                ratio,
                "x",
                f">= {TARGET_RATIO:.0f}x",
                lambda v: v >= TARGET_RATIO,
            ),
        ]

    def _throughput_rows(
        self, n: int, runs: int, rate: float | None, forwarder: dict[str, Any], fill_rate: float
    ) -> list[Row]:
        median_run = forwarder["median"]
        sec = "throughput"
        return [
            target_row(
                sec,
                f"forwarder once, {n:,} msgs (3/1/1 members), median of {runs}",
                rate,
                "msg/s",
                f">= {TARGET_RATE:,.0f} msg/s",
                lambda v: v >= TARGET_RATE,
                note="wall time of the process, start-up included",
            ),
            Row(
                sec,
                "  same, inside the cycle (cycle_finished duration)",
                median_run["cycle_msgs_per_s"],
                "msg/s",
            ),
            Row(
                sec,
                "  CPU of the child (user+sys)",
                median_run["cpu_s"],
                "s",
                note=f"{median_run['cpu_s'] / n * 1000:.2f} ms/msg; user "
                f"{median_run['user_s']:.2f} s, sys {median_run['sys_s']:.2f} s",
            ),
            Row(sec, "  peak RSS of the child", median_run["maxrss_mb"], "MB"),
            Row(sec, "  LMTP fill rate (Dovecot, one connection)", fill_rate, "msg/s"),
        ]

    # ------------------------------------------------------------------- 2. latency

    def latency(self) -> None:
        n, rate = self.opts.latency_messages, self.opts.latency_rate
        self.mail.clear()
        self.sink.clear()
        state = self.workdir / "latency.db"
        daemon = h.ForwarderDaemon(self.env(state, POLL_INTERVAL="3600"), self.workdir)
        log(f"latency: forwarder run (IDLE), {n} messages at {rate:g}/s")
        accepted: dict[str, float] = {}
        daemon.start()
        probe = h.IdleProbe(self.mail)
        try:
            daemon.wait_event("idle_started", 30)
            daemon.wait_event("ready", 30)
            idle_status = daemon.status()
            probe.start()
            time.sleep(0.5)
            with h.LmtpFeeder(self.mail) as feeder:
                start = time.monotonic() + 0.1
                for i in range(n):
                    if (delay := start + i / rate - time.monotonic()) > 0:
                        time.sleep(delay)
                    rcpt = LIST_ADDRESSES[i % len(LIST_ADDRESSES)]
                    accepted[f"lat-{i}@remote.example"] = feeder.send(
                        h.small_message("lat", i, rcpt), rcpt
                    )
                feed_s = time.monotonic() - start
            got = self.sink.wait_for(n, 60)
            time.sleep(1.0)  # the last cycle marks and commits; then the steady state
            status = daemon.status()
        except BaseException:
            daemon.kill()
            raise
        finally:
            probe.stop()
        returncode, usage = daemon.stop()
        # The mailbox was empty: message i is announced by the first `* n EXISTS` with n > i.
        announced = [probe.announced(i + 1) for i in range(n)]
        floor = [
            ts - accepted[f"lat-{i}@remote.example"]
            for i, ts in enumerate(announced)
            if ts is not None
        ] or [math.nan]
        cycles = [e for e in daemon.events if e.get("event") == "cycle_finished"]
        self.check(returncode == 0, f"forwarder run exited with {returncode}")
        latencies = []
        for dump in self.sink.transactions(with_ids=True):
            if dump.message_id in accepted:
                latencies.append(dump.accepted_ns / 1e9 - accepted[dump.message_id])
        self.check(
            got == n and len(latencies) == n,
            f"latency: smtp-sink got {got} transactions, {len(latencies)} matched of {n}",
        )
        if not latencies:
            latencies = [math.nan]
        p50, p99, worst = percentile(latencies, 50), percentile(latencies, 99), max(latencies)
        rss, hwm = status.get("VmRSS", 0) / 1024, status.get("VmHWM", 0) / 1024
        self.results["latency"] = {
            "messages": n,
            "rate_per_s": rate,
            "feed_s": feed_s,
            "p50_s": p50,
            "p90_s": percentile(latencies, 90),
            "p99_s": p99,
            "max_s": worst,
            "min_s": min(latencies),
            "mean_s": statistics.fmean(latencies),
            "cycles": len(cycles),
            "forwarder_run_rss_mb": rss,
            "forwarder_run_hwm_mb": hwm,
            "forwarder_run_rss_idle_mb": idle_status.get("VmRSS", 0) / 1024,
            "forwarder_run_cpu_s": usage.ru_utime + usage.ru_stime,
            "latencies_s": sorted(latencies),
            "idle_notification": {
                "what": "LMTP accepted -> '* n EXISTS' on an IDLE connection of the bench's own",
                "announced": len(floor),
                "p50_s": percentile(floor, 50),
                "p99_s": percentile(floor, 99),
                "max_s": max(floor),
            },
        }
        self.results.setdefault("memory", {})["forwarder_run_rss_mb"] = rss
        log(
            f"latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms"
            f" over {len(cycles)} cycles; RSS {rss:.1f} MB"
        )
        sec = "latency"
        self.rows += [
            target_row(
                sec,
                f"LMTP accepted -> smtp-sink accepted, p50 ({n} msgs at {rate:g}/s)",
                p50 * 1000,
                "ms",
                f"< {TARGET_P50 * 1000:.0f} ms",
                lambda v: v < TARGET_P50 * 1000,
            ),
            target_row(
                sec,
                "  p99",
                p99 * 1000,
                "ms",
                f"< {TARGET_P99 * 1000:.0f} ms",
                lambda v: v < TARGET_P99 * 1000,
            ),
            Row(sec, "  max", worst * 1000, "ms", note=f"{len(cycles)} cycles"),
            Row(
                sec,
                "  Dovecot alone: LMTP accepted -> IDLE '* EXISTS', p50",
                percentile(floor, 50) * 1000,
                "ms",
                note=f"p99 {percentile(floor, 99) * 1000:.0f} ms; Dovecot delays IDLE "
                "notifications up to 500 ms",
            ),
        ]
        self.rows.append(
            target_row(
                "memory",
                "forwarder run, steady RSS after the latency run",
                rss,
                "MB",
                f"< {TARGET_RSS:.0f} MB",
                lambda v: v < TARGET_RSS,
                note=f"peak {hwm:.1f} MB",
            )
        )

    # ------------------------------------------------------------------- 3. memory

    def memory(self) -> None:
        runs = self.opts.runs
        size = int(self.opts.large_message_mb * MB)
        self.mail.clear()
        self.sink.clear()
        h.fill(
            self.mail,
            iter([(h.small_message("base", 0, "direction@example.org"), "direction@example.org")]),
        )
        base = h.forwarder_once(self.env(self.workdir / "mem-base.db"), self.workdir, "mem-base")
        baseline = base.child.maxrss_mb

        raw = h.large_message("mem", size, "contact@example.org")
        size = len(raw)
        dumped = size - raw.count(b"\r\n")  # smtp-sink dumps lines with LF endings
        log(f"memory: one message of {size / MB:.1f} MiB")
        self.mail.clear()
        self.sink.clear()
        h.fill(self.mail, iter([(raw, "contact@example.org")]))
        del raw
        per_run = []
        for r in range(runs):
            if r:
                h.reset_flags(self.mail)
                self.sink.clear()
            state = self.workdir / f"mem-{r}.db"
            result = h.forwarder_once(self.env(state), self.workdir, f"memory-{r}")
            dumps = self.sink.transactions()
            self.check(
                len(dumps) == 1 and dumps[0].rcpts == 3 and dumps[0].size >= dumped,
                f"memory run {r + 1}: smtp-sink got {[(d.rcpts, d.size) for d in dumps]}",
            )
            per_run.append(
                {
                    "maxrss_mb": result.child.maxrss_mb,
                    "wall_s": result.child.wall,
                    "cpu_s": result.child.cpu,
                }
            )
            log(f"memory: run {r + 1}/{runs}: peak RSS {result.child.maxrss_mb:.1f} MB")
        peak = median([run["maxrss_mb"] for run in per_run])
        ratio = peak * MB / size
        over = (peak - baseline) * MB / size
        self.results.setdefault("memory", {}).update(
            {
                "large_message_bytes": size,
                "large_peak_rss_mb": peak,
                "large_ratio": ratio,
                "baseline_peak_rss_mb": baseline,
                "large_increment_ratio": over,
                "runs": per_run,
            }
        )
        sec = "memory"
        self.rows += [
            Row(
                sec,
                f"forwarder once, one {size / MB:.0f} MiB message: peak RSS",
                peak,
                "MB",
                note=f"1-small-message run: {baseline:.1f} MB",
            ),
            target_row(
                sec,
                "  peak RSS / message size",
                ratio,
                "x",
                f"< {TARGET_LARGE:g}x",
                lambda v: v < TARGET_LARGE,
                note=f"above the small-message run: {over:.2f}x",
            ),
        ]

    # ------------------------------------------------------------------- 4. scale

    def scale(self) -> None:
        self._scale_lists()
        self._scale_store()

    # ------------------------------------------------------------------- 5. instances

    def instances(self) -> None:
        from bench.instances import Instances

        with PostgresCluster(fsync=True) as cluster:
            Instances(self, cluster)()

    # ------------------------------------------------------------------- 6. folder

    def folder(self) -> None:
        from bench.folder import FolderScale

        FolderScale(self)()

    # ------------------------------------------------------------------- 7. mailboxes

    def mailboxes(self) -> None:
        from bench.mailboxes import Mailboxes

        Mailboxes(self)()

    def _big_lists(self) -> dict[str, list[str]]:
        rng = random.Random(20261124)
        domains = ("example.org", "example.net", "example.com")
        pool = [f"member{i}@{domains[i % 3]}" for i in range(50_000)]
        lists: dict[str, list[str]] = {}
        for k in range(self.opts.lists):
            members = rng.sample(pool, self.opts.list_members)
            if k % 10 == 9:  # one list in ten includes an earlier list (nesting, no cycle)
                members[-1] = f"list{rng.randrange(k)}@example.org"
            lists[f"list{k}@example.org"] = members
        return lists

    def _load(
        self, name: str, lists: dict[str, list[str]], quote: str | None = "'"
    ) -> dict[str, Any]:
        """`python -c` loading the lists from a .env file, the value quoted as in .env.example
        (single quotes) or not at all, or (quote=None) from FORWARDER_LISTS_FILE."""
        directory = self.workdir / name
        directory.mkdir(exist_ok=True)
        extra: dict[str, str] = {}
        if quote is None:
            (directory / "lists.json").write_text(json.dumps(lists))
            extra["LISTS_FILE"] = str(directory / "lists.json")
        else:
            (directory / ".env").write_text(f"FORWARDER_LISTS={quote}{json.dumps(lists)}{quote}\n")
        env = self.env(
            directory / "state.db",
            lists=None,
            MEMBER_DOMAINS="example.org,example.net,example.com",
            **extra,
        )
        runs = []
        for r in range(self.opts.runs):
            child = h.run_child(
                [sys.executable, "-c", LOAD_LISTS],
                env=env,
                cwd=directory,
                name=f"load-{r}",
                timeout=300,
            )
            out = child.stdout.read_text().strip().splitlines()
            self.check(
                child.returncode == 0 and bool(out), f"loading {name} failed: {child.stderr_tail()}"
            )
            inner = json.loads(out[-1]) if out else {}
            runs.append({"wall_s": child.wall, "maxrss_mb": child.maxrss_mb, **inner})
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        return {
            "runs": runs,
            "median": {k: median([run[k] for run in runs]) for k in keys},
            "lists_json_bytes": len(json.dumps(lists)),
        }

    def _scale_lists(self) -> None:
        count, members = self.opts.lists, self.opts.list_members
        lists = self._big_lists()
        log(f"scale: loading {count:,} lists of {members} members (FORWARDER_LISTS_FILE, .env)")
        big = self._load("lists-big-file", lists, quote=None)
        dotenv = self._load("lists-big-dotenv", lists)
        unquoted = self._load("lists-big-unquoted", lists, quote="")
        small = self._load("lists-small", LISTS)  # interpreter + imports, for comparison
        # The same JSON in the environment: does exec even accept it?
        env = self.env(self.workdir / "unused.db", lists=lists)
        try:
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
            via_env = "accepted"
        except OSError as exc:
            via_env = f"refused by exec: {exc.strerror} (errno {exc.errno})"
        self.results["scale_lists"] = {
            "lists": count,
            "members_per_list": members,
            "big": big,
            "big_dotenv": dotenv,
            "big_unquoted": unquoted,
            "small": small,
            "as_environment_variable": via_env,
        }
        b, d, u, s = big["median"], dotenv["median"], unquoted["median"], small["median"]
        inner = b["load_settings_s"] + b["expand_s"]
        log(
            f"scale: {b['wall_s']:.2f} s wall ({inner:.2f} s load+expand), "
            f"RSS {b['maxrss_mb']:.1f} MB; as an environment variable: {via_env}"
        )
        if via_env != "accepted":
            self.notes.append(
                f"FORWARDER_LISTS of {count:,} lists x {members} "
                f"({big['lists_json_bytes']:,} bytes of JSON) cannot be passed in the "
                f"environment: {via_env}. Linux limits one "
                "environment string to 128 KiB (MAX_ARG_STRLEN); systemd's EnvironmentFile= "
                "ends up in the same execve environment. Use FORWARDER_LISTS_FILE."
            )
        sec = "scale"
        self.rows += [
            target_row(
                sec,
                f"load {count:,} lists x {members} from FORWARDER_LISTS_FILE (python -c "
                "load_settings + expanded_lists, wall)",
                b["wall_s"],
                "s",
                f"< {TARGET_LOAD:g} s",
                lambda v: v < TARGET_LOAD,
                note=f"load+expand {inner:.2f} s, RSS {b['maxrss_mb']:.0f} MB",
            ),
            Row(
                sec,
                "  same, FORWARDER_LISTS single-quoted in .env",
                d["wall_s"],
                "s",
                note=f"RSS {d['maxrss_mb']:.0f} MB",
            ),
            Row(
                sec,
                "  same, the JSON unquoted in .env",
                u["wall_s"],
                "s",
                note=f"RSS {u['maxrss_mb']:.0f} MB; the difference is python-dotenv parsing "
                "a quoted value",
            ),
            Row(
                sec,
                "  same with the 3 sample lists",
                s["wall_s"],
                "s",
                note=f"RSS {s['maxrss_mb']:.0f} MB",
            ),
        ]

    def _build_store(self, path: Path, rows: int) -> float:
        """A state store of `rows` final deliveries, by direct inserts into the real schema."""
        from forwarder.sqlite_store import SqliteStateStore

        started = time.perf_counter()
        SqliteStateStore(path).close()  # the forwarder's own schema and meta row
        db = sqlite3.connect(path, isolation_level=None)
        columns = [row[1] for row in db.execute("PRAGMA table_info(deliveries)")]
        expected = [
            "mailbox",
            "message_key",
            "member",
            "address",
            "status",
            "code",
            "reply",
            "attempts",
            "first_try",
            "next_try",
            "updated",
            "lists",
            "message_id",
            "sender",
            "claim_owner",
            "claim_until",
        ]
        if columns != expected:
            raise RuntimeError(f"the deliveries columns changed: {columns}")
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'deliveries' AND sql IS NOT NULL"
        ).fetchall()
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute("PRAGMA synchronous = OFF")
        for name, _sql in indexes:
            db.execute(f'DROP INDEX "{name}"')
        db.execute("BEGIN")
        db.executemany(
            f"INSERT INTO deliveries ({', '.join(expected)}) "
            f"VALUES ({', '.join('?' * len(expected))})",
            (("default", *row, None, None, None) for row in _archive(rows)),
        )
        db.execute("COMMIT")
        for _name, sql in indexes:
            db.execute(sql)
        db.execute("PRAGMA journal_mode = WAL")
        count = db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
        db.close()
        if count != rows:
            raise RuntimeError(f"built {count} deliveries instead of {rows}")
        return time.perf_counter() - started

    def _time_prune(self, path: Path) -> float:
        """The forwarder's own prune() with its default retention (the rows are all newer)."""
        from forwarder.config import field_default
        from forwarder.sqlite_store import SqliteStateStore

        retention = field_default("state_retention")
        store = SqliteStateStore(path)
        try:
            started = time.perf_counter()
            removed = store.prune(time.time() - retention)
            elapsed = time.perf_counter() - started
        finally:
            store.close()
        self.check(removed == 0, f"prune() removed {removed} recent deliveries")
        return elapsed

    def _scale_store(self) -> None:
        rows, batch, runs = self.opts.deliveries, self.opts.batch, self.opts.store_runs
        big = self.workdir / "store-big.db"
        log(f"scale: building a state store of {rows:,} deliveries")
        build_s = self._build_store(big, rows)
        store_mb = big.stat().st_size / MB
        prune_s = self._time_prune(big)
        log(f"scale: built in {build_s:.1f} s ({store_mb:.0f} MB); prune() {prune_s * 1000:.0f} ms")
        figures: dict[str, list[dict[str, Any]]] = {"empty": [], "full": []}
        for r in range(runs):
            for kind in ("empty", "full") if r % 2 == 0 else ("full", "empty"):
                self.refill(f"sc{r}{kind}", batch)
                state = self.workdir / f"store-{kind}-{r}.db"
                if kind == "full":
                    _durable_copy(big, state)
                result = h.forwarder_once(self.env(state), self.workdir, f"store-{kind}-{r}")
                got = len(self.sink.transactions())
                self.check(got == batch, f"store {kind} run {r + 1}: {got}/{batch} forwarded")
                figures[kind].append(
                    {
                        "wall_s": result.child.wall,
                        "cycle_s": result.cycle_seconds,
                        "maxrss_mb": result.child.maxrss_mb,
                        "cpu_s": result.child.cpu,
                    }
                )
                log(
                    f"scale: {batch} messages, {kind} store, run {r + 1}/{runs}: cycle "
                    f"{result.cycle_seconds} s, wall {result.child.wall:.2f} s"
                )
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{state}{suffix}").unlink(missing_ok=True)
        big.unlink()

        def med(kind: str, key: str) -> float:
            return median([run[key] for run in figures[kind]])

        empty, full = med("empty", "cycle_s"), med("full", "cycle_s")
        ratio = full / empty
        wall_ratio = med("full", "wall_s") / med("empty", "wall_s")
        self.results["scale_store"] = {
            "deliveries": rows,
            "store_mb": store_mb,
            "build_s": build_s,
            "prune_s": prune_s,
            "batch": batch,
            "runs": figures,
            "cycle_empty_s": empty,
            "cycle_full_s": full,
            "ratio": ratio,
            "wall_ratio": wall_ratio,
        }
        sec = "scale"
        self.rows += [
            Row(
                sec,
                f"forwarder once, {batch} new msgs, empty state store: cycle",
                empty * 1000,
                "ms",
                note=f"wall {med('empty', 'wall_s'):.2f} s",
            ),
            Row(
                sec,
                f"  same, store of {rows:,} deliveries ({store_mb:.0f} MB)",
                full * 1000,
                "ms",
                note=f"wall {med('full', 'wall_s'):.2f} s",
            ),
            Row(
                sec,
                f"  StateStore.prune() alone on {rows:,} deliveries, none prunable",
                prune_s * 1000,
                "ms",
                note="run at the first cycle of every process",
            ),
            target_row(
                sec,
                "  ratio full / empty (cycle time)",
                ratio,
                "x",
                f"<= {TARGET_STORE:.2f}x",
                lambda v: v <= TARGET_STORE,
                note=f"wall ratio {wall_ratio:.2f}x",
            ),
        ]


def _durable_copy(source: Path, target: Path) -> None:
    """Copy and fsync, so that the forwarder's first fsync does not flush the bench's copy."""
    shutil.copyfile(source, target)
    with open(target, "rb+") as copy:
        os.fsync(copy.fileno())


def _archive(rows: int) -> Iterator[tuple[Any, ...]]:
    """Past deliveries: 5 members a message, updated within the last 30 days (none prunable)."""
    rng = random.Random(1_000_000)
    pool = sorted(f"member{i}@example.org" for i in range(200))
    now = time.time()
    made = 0
    message = 0
    while made < rows:
        ident = f"archive-{message:08d}@remote.example"
        key = f"{ident}#{rng.getrandbits(64):016x}"
        updated = now - rng.uniform(60, 30 * 86400)
        for member in sorted(rng.sample(pool, min(5, rows - made))):
            roll = rng.random()
            if roll < 0.98:
                status, code, reply, next_try = "delivered", 250, "2.0.0 Ok: queued", None
            elif roll < 0.99:
                status, code, reply, next_try = "failed", 550, "5.1.1 no such user", None
            else:
                status, code, reply, next_try = "deferred", 451, "4.3.0 try later", updated + 3600
            yield (
                key,
                member,
                member,
                status,
                code,
                reply,
                1,
                updated - 1,
                next_try,
                updated,
                "contact@example.org",
                ident,
            )
            made += 1
        message += 1


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the forwarder against a private Dovecot and Postfix's smtp-sink. "
        "The forwarder's FORWARDER_SMTP_CONNECTIONS, FORWARDER_FETCH_BATCH_MESSAGES and "
        "FORWARDER_FETCH_BATCH_BYTES are passed through from the environment.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: smaller N, one run each (writes bench/results-quick.json)",
    )
    parser.add_argument("--messages", type=int, help="backlog size N (default 5000; quick 500)")
    parser.add_argument(
        "--runs", type=int, help="runs per forwarder figure, median reported (default 3; quick 1)"
    )
    parser.add_argument(
        "--fetchmail-messages",
        type=int,
        help="fetchmail sample size (default: N; it does ~23 msg/s; 0 skips fetchmail)",
    )
    parser.add_argument("--latency-messages", type=int, help="default 200; quick 60")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="messages/s (default 20)")
    parser.add_argument(
        "--large-message-mb",
        type=float,
        default=25.0,
        help="size of the large message in MiB (default 25)",
    )
    parser.add_argument("--lists", type=int, default=10_000, help="lists for the scale figure")
    parser.add_argument("--list-members", type=int, default=20, help="members per list")
    parser.add_argument(
        "--deliveries",
        type=int,
        help="rows in the big state store (default 1,000,000; quick 100,000)",
    )
    parser.add_argument(
        "--batch", type=int, default=100, help="new messages per cycle for the state store figure"
    )
    parser.add_argument(
        "--store-runs",
        type=int,
        help="runs of each store size for the state store figure (default 7; quick 2): "
        "its cycles are short, so it needs more runs than the others",
    )
    parser.add_argument(
        "--folder-messages",
        type=int,
        help="messages in the big folder of the folder figure (default 100,000; quick 10,000)",
    )
    parser.add_argument(
        "--folder-new", type=int, default=10, help="new messages per cycle for the folder figure"
    )
    parser.add_argument(
        "--folder-runs",
        type=int,
        help="runs of each folder for the folder figure (default 21; quick 3)",
    )
    parser.add_argument(
        "--mailboxes", type=int, help="catch-alls in one forwarder run (default 1,000; quick 100)"
    )
    parser.add_argument(
        "--mailbox-messages",
        type=int,
        help="messages to random mailboxes for the mailboxes figure (default 300; quick 60)",
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    opts = parser.parse_args(argv)
    quick = opts.quick
    opts.messages = opts.messages or (500 if quick else 5000)
    opts.runs = opts.runs or (1 if quick else 3)
    opts.latency_messages = opts.latency_messages or (60 if quick else 200)
    opts.deliveries = opts.deliveries or (100_000 if quick else 1_000_000)
    opts.store_runs = opts.store_runs or (2 if quick else 7)
    opts.folder_messages = opts.folder_messages or (10_000 if quick else 100_000)
    opts.mailboxes = opts.mailboxes or (100 if quick else 1000)
    opts.mailbox_messages = opts.mailbox_messages or (60 if quick else 300)
    opts.folder_runs = opts.folder_runs or (3 if quick else 21)
    opts.output = opts.output or (QUICK_RESULTS if quick else RESULTS)
    opts.phases = [p.strip() for p in opts.phases.split(",") if p.strip()]
    unknown = set(opts.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return opts


def tunables() -> dict[str, Any]:
    from forwarder.config import field_default

    found = {}
    for name in h.TUNABLES:
        default = field_default(name.lower())
        found["FORWARDER_" + name] = os.environ.get("FORWARDER_" + name) or default
    return found


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench: must run as root (Dovecot's privilege separation, smtp-sink -u)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    workdir.chmod(0o755)
    started = time.time()
    info = machine(workdir)
    code = source(ROOT)
    bench: Bench | None = None
    crashed = None
    try:
        with MailServer() as mail, h.SmtpSinkProcess(workdir) as sink:
            bench = Bench(opts, workdir, mail, sink)
            steps: dict[str, Callable[[], None]] = {
                "throughput": bench.throughput,
                "latency": bench.latency,
                "memory": bench.memory,
                "scale": bench.scale,
                "instances": bench.instances,
                "folder": bench.folder,
                "mailboxes": bench.mailboxes,
            }
            for phase in PHASES:
                if phase in opts.phases:
                    try:
                        steps[phase]()
                    except Exception as exc:  # report what was measured, then fail
                        crashed = f"{phase}: {exc}"
                        bench.problems.append(crashed)
                        traceback.print_exc()
    finally:
        if opts.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    assert bench is not None
    info["loadavg_end"] = list(os.getloadavg())
    code["digest_end"] = source_digest(ROOT)
    if code["digest_end"] != code["digest_start"]:
        bench.notes.append(
            "forwarder/ changed while the bench ran: these figures mix two versions of the "
            "code; run it again"
        )
    table = render(bench.rows)
    changes = (
        f" + uncommitted changes to {len(code['uncommitted'])} file(s)"
        if code["uncommitted"]
        else ""
    )
    print(f"\nforwarder at commit {code['commit']}{changes} (source digest {code['digest_start']})")
    print(table)
    for note in bench.notes:
        print(f"\nnote: {note}")
    if info["loadavg_start"][0] > 0.5 * info["nproc"]:
        print(
            f"\nnote: the machine was busy at the start (load average "
            f"{info['loadavg_start'][0]:.2f} on {info['nproc']} CPUs): figures are pessimistic."
        )
    for problem in bench.problems:
        print(f"\nPROBLEM: {problem}")
    document = {
        "generated": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "command": ["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])],
        "quick": opts.quick,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "forwarder_settings": tunables(),
        "forwarder_source": code,
        "machine": info,
        "table": [row.as_dict() for row in bench.rows],
        "table_text": table,
        "results": bench.results,
        "notes": bench.notes,
        "problems": bench.problems,
    }
    opts.output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwritten: {opts.output}")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
