"""The `mailboxes` phase: 1,000 catch-alls in one `forwarder run` (issue 10).

A Dovecot of its own with 1,000 accounts, `catchall@orgN.example`, each the catch-all of
its domain (a static userdb whose home is per domain, so that LMTP to any address of
orgN.example lands in that account's INBOX), and a FORWARDER_MAILBOXES_FILE with one
`[[mailbox]]` per account (its login, one list `contact@orgN.example` -> one member).
`forwarder run` serves them all with the default poll interval (60 s, spread over the
interval) and FORWARDER_METRICS_ADDRESS on:

* start: time to READY and until every mailbox is watched (the metric
  `forwarder_mailbox_watched` at 1 for all), its RSS then;
* latency: M messages at a steady rate, each to a mailbox drawn at random, LMTP accepted
  -> smtp-sink accepted (as the `latency` phase), p50/p99/max;
* memory: peak RSS (VmHWM) over the whole run, threads.

Run once with the default two IMAP connections per mailbox and once with
FORWARDER_IMAP_CONNECTIONS=1 (IDLE on the cycle's connection).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from bench import harness as h
from bench.report import Row, target_row
from tests.servers import LOOPBACK, MailServer, free_port

if TYPE_CHECKING:
    from bench.run import Bench

TARGET_RSS = 400.0  # MB, 1,000 mailboxes in one process (issue 10)
TARGET_P99 = 2.0  # s
PASSWORD = "secret"


def dovecot_limits(accounts: int) -> tuple[str, str]:
    """Dovecot settings for `accounts` catch-alls, as docs/provider.md gives them: what goes
    before the configuration, and the imap service's block. Two connections a mailbox, plus
    logins and LMTP: above the defaults (1,000 clients; 1,024 imap processes, which the imap
    service sets for itself)."""
    limits = 3 * accounts + 100
    return (
        f"default_process_limit = {limits}\ndefault_client_limit = {limits}\n",
        f"service imap {{\n  process_limit = {limits}\n}}\n",
    )


def inotify_needed(accounts: int) -> int:
    """fs.inotify.max_user_instances for `accounts` catch-alls in IDLE (see inotify_instances)."""
    return 3 * accounts + 256


class ManyAccounts(MailServer):
    """The test suite's Dovecot with `accounts` catch-alls: catchall@org<N>.example."""

    def __init__(self, accounts: int) -> None:
        self.accounts = accounts
        self.other_logins = {self.account(n): PASSWORD for n in range(accounts)}  # type: ignore[misc]
        super().__init__(imap_connections=10)

    @staticmethod
    def domain(n: int) -> str:
        return f"org{n}.example"

    def account(self, n: int) -> str:
        return f"catchall@{self.domain(n)}"

    def _prepare_dirs(self) -> None:
        super()._prepare_dirs()
        for n in range(self.accounts):
            home = self.base_dir / "mail" / self.domain(n)
            home.mkdir(mode=0o700)
            os.chown(home, self.mail_uid, self.mail_gid)

    def _config(self) -> str:
        text = super()._config()
        text = text.replace(f"home={self.home}", f"home={self.base_dir}/mail/%d")
        text = text.replace(
            f"mail_location = {self.mail_format}:{self.mail_root}",
            "mail_location = maildir:~/Maildir",
        )
        before, imap_service = dovecot_limits(self.accounts)
        return before + text + imap_service


def log(text: str) -> None:
    from bench.run import log as bench_log

    bench_log(text)


def percentile(values: list[float], p: float) -> float:
    from bench.run import percentile as nearest_rank

    return nearest_rank(values, p) if values else float("nan")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def watched(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> int:
    return int(sum(v for (name, _), v in samples.items() if name == "forwarder_mailbox_watched"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")


@contextlib.contextmanager
def inotify_instances(needed: int) -> Iterator[None]:
    """Dovecot watches each mailbox an IDLE session holds with inotify, one instance per
    imap process, all of one user here (`nobody`); past the kernel's per-user limit (128 by
    default) it falls back to looking every 30 s. Raised for the run, as a provider would
    for Dovecot (its log says "Inotify instance limit ... exceeded"), and put back."""
    before = int(INOTIFY.read_text())
    if before < needed:
        INOTIFY.write_text(str(needed))
        log(f"mailboxes: fs.inotify.max_user_instances {before} -> {needed} for this phase")
    try:
        yield
    finally:
        if before < needed:
            INOTIFY.write_text(str(before))


class Mailboxes:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.n = bench.opts.mailboxes
        self.messages = bench.opts.mailbox_messages
        self.rate = bench.opts.latency_rate

    def __call__(self) -> None:
        workdir = self.bench.workdir / "mailboxes"
        workdir.mkdir(exist_ok=True)
        log(f"mailboxes: a Dovecot with {self.n} accounts")
        with inotify_instances(inotify_needed(self.n)), ManyAccounts(self.n) as mail:
            password = workdir / "password"
            password.write_text(PASSWORD + "\n")
            toml = workdir / "mailboxes.toml"
            toml.write_text(
                "".join(
                    f'[[mailbox]]\nname = "org{n}"\nimap_username = "{mail.account(n)}"\n'
                    f'imap_password_file = "{password}"\n'
                    f'lists = {{ "contact@{mail.domain(n)}" = ["member@{mail.domain(n)}"] }}\n\n'
                    for n in range(self.n)
                )
            )
            results = {}
            for connections in ("2", "1"):
                results[connections] = self.run(mail, workdir, toml, connections)
        self.bench.results["mailboxes"] = {"mailboxes": self.n, "runs": results}
        self.rows(results)

    def run(self, mail: MailServer, workdir: Path, toml: Path, connections: str) -> dict[str, Any]:
        sink = self.bench.sink
        sink.clear()
        port = free_port(LOOPBACK)
        state = workdir / f"state-{connections}.db"
        env = h.forwarder_env(
            mail,
            sink.port,
            None,
            state,
            MAILBOXES_FILE=str(toml),
            METRICS_ADDRESS=f"{LOOPBACK}:{port}",
            IMAP_CONNECTIONS=connections,
        )
        env.pop("FORWARDER_IMAP_USERNAME")
        env.pop("FORWARDER_IMAP_PASSWORD")
        rundir = workdir / f"run-{connections}"
        rundir.mkdir(exist_ok=True)
        daemon = h.ForwarderDaemon(env, rundir)
        log(f"mailboxes: forwarder run, {self.n} mailboxes, {connections} IMAP connection(s)")
        started = time.monotonic()
        daemon.start()
        try:
            daemon.wait_event("ready", 600)
            ready_s = time.monotonic() - started
            deadline = time.monotonic() + 600
            while (count := watched(scrape(port))) < self.n and time.monotonic() < deadline:
                time.sleep(0.5)
            watched_s = time.monotonic() - started
            settled = daemon.status()
            self.bench.check(count == self.n, f"mailboxes: {count} of {self.n} watched")
            accepted = self.feed(mail)
            got = sink.wait_for(len(accepted), 120)
            time.sleep(1.0)
            status = daemon.status()
            pid = daemon.process.pid if daemon.process is not None else 0
            thread_count = threads(pid)
            final = scrape(port)
        except BaseException:
            daemon.kill()
            raise
        returncode, usage = daemon.stop(60)
        self.bench.check(returncode == 0, f"mailboxes: forwarder run exited with {returncode}")
        latencies = [
            dump.accepted_ns / 1e9 - accepted[dump.message_id]
            for dump in sink.transactions(with_ids=True)
            if dump.message_id in accepted
        ]
        self.bench.check(
            got == len(accepted) == len(latencies),
            f"mailboxes: smtp-sink got {got}, {len(latencies)} matched of {len(accepted)}",
        )
        failures = sum(
            v for (name, _), v in final.items() if name == "forwarder_cycle_failures_total"
        )
        result = {
            "imap_connections": int(connections),
            "ready_s": ready_s,
            "all_watched_s": watched_s,
            "watched": count,
            "rss_settled_mb": settled.get("VmRSS", 0) / 1024,
            "rss_end_mb": status.get("VmRSS", 0) / 1024,
            "peak_rss_mb": status.get("VmHWM", 0) / 1024,
            "threads": thread_count,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "cycle_failures": failures,
            "messages": len(accepted),
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "max_s": max(latencies, default=float("nan")),
            "latencies_s": sorted(latencies),
        }
        log(
            f"mailboxes ({connections} conn): ready {ready_s:.1f} s, all watched {watched_s:.1f} s,"
            f" peak RSS {result['peak_rss_mb']:.0f} MB, p99 {result['p99_s'] * 1000:.0f} ms"
        )
        return result

    def feed(self, mail: MailServer) -> dict[str, float]:
        """Messages at a steady rate, each to a mailbox drawn at random; their LMTP times."""
        draw = random.Random(1000)
        accepted: dict[str, float] = {}
        with h.LmtpFeeder(mail) as feeder:
            start = time.monotonic() + 0.1
            for i in range(self.messages):
                if (delay := start + i / self.rate - time.monotonic()) > 0:
                    time.sleep(delay)
                rcpt = f"contact@{ManyAccounts.domain(draw.randrange(self.n))}"
                accepted[f"box-{i}@remote.example"] = feeder.send(
                    h.small_message("box", i, rcpt), rcpt
                )
        return accepted

    def rows(self, results: dict[str, dict[str, Any]]) -> None:
        sec = "mailboxes"
        rows: list[Row] = []
        for connections, r in results.items():
            label = f"{self.n} mailboxes, {connections} IMAP conn. each"
            rows += [
                target_row(
                    sec,
                    f"forwarder run, {label}: peak RSS",
                    r["peak_rss_mb"],
                    "MB",
                    f"< {TARGET_RSS:.0f} MB",
                    lambda v: v < TARGET_RSS,
                    note=f"settled {r['rss_settled_mb']:.0f} MB, {r['threads']} threads",
                ),
                Row(
                    sec,
                    "  READY; all watched (IDLE)",
                    r["ready_s"],
                    "s",
                    note=f"all {r['watched']} watched after {r['all_watched_s']:.1f} s",
                ),
                target_row(
                    sec,
                    f"  LMTP -> smtp-sink, random mailbox, p99 ({r['messages']} msgs)",
                    r["p99_s"] * 1000,
                    "ms",
                    f"< {TARGET_P99 * 1000:.0f} ms",
                    lambda v: v < TARGET_P99 * 1000,
                    note=f"p50 {r['p50_s'] * 1000:.0f} ms, max {r['max_s'] * 1000:.0f} ms",
                ),
                Row(
                    sec,
                    "  CPU of the run",
                    r["cpu_s"],
                    "s",
                    note=f"{r['cycle_failures']:.0f} failed cycles",
                ),
            ]
        self.bench.rows += rows
