"""What the benchmark drives: Postfix's smtp-sink, an LMTP feeder, child processes
measured with wait4(2), the forwarder (`once` and `run`) and fetchmail.

Dovecot itself is `tests.servers.MailServer` (read-only use of the test helpers).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import LOOPBACK, MailServer, free_port, wait_for_port

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "customer@remote.example"
ADMIN = "lists-admin@example.org"
FORWARDED = b"$Forwarded"
# Keywords the forwarder may set; removed to turn a forwarded backlog back into a fresh one.
FORWARDER_FLAGS = [FORWARDED, b"$ForwardFailed", b"$ForwarderQuarantine", b"\\Seen"]
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)
_RCPT = re.compile(rb"^X-Rcpt-Args:", re.MULTILINE)


# --------------------------------------------------------------------------- messages

_LOREM = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"


def small_message(tag: str, index: int, to: str, body_lines: int = 22) -> bytes:
    """A plain-text message of about 2 KB with a unique Message-ID and Subject."""
    head = (
        f"From: Customer {index} <{SENDER}>\r\n"
        f"To: {to}\r\n"
        f"Subject: bench {tag} #{index}\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{tag}-{index}@remote.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
    ).encode()
    return head + _LOREM * body_lines


def large_message(tag: str, size: int, to: str) -> bytes:
    """A multipart message of `size` bytes (±80) carrying a base64 attachment."""
    head = (
        "From: Customer <customer@remote.example>\r\n"
        f"To: {to}\r\n"
        f"Subject: bench {tag} large attachment\r\n"
        "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{tag}-large@remote.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b-bench"\r\n'
        "\r\n"
        "--b-bench\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "See the attachment.\r\n"
        "--b-bench\r\n"
        'Content-Type: application/octet-stream; name="data.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="data.bin"\r\n'
        "\r\n"
    ).encode()
    tail = b"--b-bench--\r\n"
    room = size - len(head) - len(tail)
    lines = max(room // 78, 1)  # 76 base64 characters + CRLF
    payload = base64.b64encode(random.Random(size).randbytes(lines * 57))
    body = b"".join(payload[i : i + 76] + b"\r\n" for i in range(0, len(payload), 76))
    return head + body + tail


# --------------------------------------------------------------------------- LMTP


class LmtpFeeder:
    """One LMTP connection to Dovecot, many transactions of one recipient each
    (so that Dovecot adds `Delivered-To:`)."""

    def __init__(self, mail: MailServer) -> None:
        self.lmtp = smtplib.LMTP(mail.host, mail.lmtp_port, timeout=120)
        self.lmtp.ehlo()

    def send(self, raw: bytes, rcpt: str) -> float:
        """Deliver; return the wall-clock time (time.time()) of the reply to DATA."""
        refused = self.lmtp.sendmail(SENDER, [rcpt], raw)
        accepted = time.time()
        if refused:
            raise RuntimeError(f"LMTP refused {refused}")
        return accepted

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.lmtp.quit()
        self.lmtp.close()

    def __enter__(self) -> LmtpFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reset_flags(mail: MailServer) -> int:
    """Remove the forwarder's keywords and \\Seen from every message: a fresh backlog again."""
    with mail.imap() as client:
        client.select_folder("INBOX")
        uids = client.search("ALL")
        if uids:
            client.remove_flags(uids, FORWARDER_FLAGS, silent=True)
        client.logout()
    return len(uids)


def mailbox_counts(mail: MailServer) -> tuple[int, int]:
    """(messages in INBOX, messages without $Forwarded)."""
    with mail.imap() as client:
        client.select_folder("INBOX", readonly=True)
        total = len(client.search("ALL"))
        left = len(client.search(["UNKEYWORD", FORWARDED.decode()]))
        client.logout()
    return total, left


class IdleProbe:
    """An IMAP IDLE connection of our own, noting when Dovecot announces each new message
    (`* n EXISTS`): the floor of any IDLE-woken forwarder's latency."""

    def __init__(self, mail: MailServer) -> None:
        self.client = mail.imap()
        self.client.select_folder("INBOX", readonly=True)
        self.seen: list[tuple[float, int]] = []  # (time.time(), message count)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.client.idle()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for response in self.client.idle_check(timeout=0.2):
                if len(response) > 1 and response[1] == b"EXISTS":
                    self.seen.append((time.time(), int(response[0])))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.client.idle_done()
            self.client.logout()

    def announced(self, count: int) -> float | None:
        """When the mailbox was first announced to hold at least `count` messages."""
        return next((ts for ts, n in self.seen if n >= count), None)


# --------------------------------------------------------------------------- smtp-sink


@dataclass(frozen=True)
class Dumped:
    """One transaction accepted by smtp-sink (one -d dump file)."""

    accepted_ns: int  # mtime of the dump file: when smtp-sink finished writing it
    rcpts: int
    message_id: str | None
    size: int


class SmtpSinkProcess:
    """Postfix's smtp-sink on a free loopback port, dumping each transaction to a file.

    The dump directory is on tmpfs (/dev/shm) when available, so the sink's own disk
    writes cost nearly nothing; the file mtime is the acceptance time of the message.
    """

    def __init__(self, workdir: Path) -> None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else workdir
        self.dump_dir = Path(tempfile.mkdtemp(prefix="forwarder-bench-sink-", dir=base))
        self.dump_dir.chmod(0o777)  # smtp-sink writes as `nobody`
        self.log_path = workdir / "smtp-sink.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not os.access(SMTP_SINK, os.X_OK):
            raise RuntimeError(
                f"{SMTP_SINK} not found: install postfix (bash .ci/system-deps postfix)"
            )
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        for _attempt in range(3):
            port = free_port()
            with open(self.log_path, "ab") as log:
                process = subprocess.Popen(
                    [SMTP_SINK, *user, "-d", f"{self.dump_dir}/m.", f"{LOOPBACK}:{port}", "256"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if wait_for_port(LOOPBACK, port, time.monotonic() + 5, b"220"):
                self._process, self.port = process, port
                return
            process.kill()
            process.wait()
        raise RuntimeError(f"smtp-sink did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def __enter__(self) -> SmtpSinkProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        for entry in self.dump_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def count(self) -> int:
        return sum(1 for _ in self.dump_dir.iterdir())

    def wait_for(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (count := self.count()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return count

    def transactions(self, with_ids: bool = False) -> list[Dumped]:
        found = []
        for entry in self.dump_dir.iterdir():
            stat = entry.stat()
            with open(entry, "rb") as dump:
                head = dump.read(64 * 1024)  # smtp-sink's and the trace headers come first
            ident = None
            if with_ids and (match := _MESSAGE_ID.search(head)):
                ident = match.group(1).decode("ascii", "replace")
            found.append(Dumped(stat.st_mtime_ns, len(_RCPT.findall(head)), ident, stat.st_size))
        return found


# --------------------------------------------------------------------------- children


@dataclass
class ChildRun:
    """A finished child process and its own resource usage (wait4)."""

    returncode: int
    wall: float
    user: float
    sys: float
    maxrss_kb: int
    stdout: Path
    stderr: Path

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    @property
    def maxrss_mb(self) -> float:
        return self.maxrss_kb / 1024

    def stderr_tail(self, lines: int = 15) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# Linux folds the parent's memory high-water mark into a child's ru_maxrss when the
# child execs after vfork() (Python's subprocess spawns with vfork), so a child of this
# process would "use" as much memory as the bench ever did. The measured command is
# therefore forked by a tiny launcher (python -I -S, a few MB), which reports the
# command's own rusage, measured with wait4(2) as well.
_LAUNCHER = r"""
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
started = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.monotonic() - started
with open(report, "w") as out:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "wall": wall,
               "user": usage.ru_utime, "sys": usage.ru_stime,
               "maxrss_kb": usage.ru_maxrss}, out)
"""


def launcher(report: Path) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report)]


class _Killer:
    """Kills a child's process group when it overruns its time limit, never after it was
    reaped."""

    def __init__(self, pid: int, timeout: float) -> None:
        self.pid = pid
        self.fired = False
        self._lock = threading.Lock()
        self._reaped = False
        self._timer = threading.Timer(timeout, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        with self._lock:
            if not self._reaped:
                self.fired = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)

    def reaped(self) -> None:
        with self._lock:
            self._reaped = True
        self._timer.cancel()


def _reap(
    process: subprocess.Popen[Any], timeout: float
) -> tuple[int, resource.struct_rusage, bool]:
    """wait4 the child (started with start_new_session=True) or kill its group on timeout."""
    killer = _Killer(process.pid, timeout)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:  # interrupted: take the whole group down with us
        killer.reaped()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    killer.reaped()
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage, killer.fired


@dataclass
class StartedChild:
    """A child started by `start_child`, not waited for yet."""

    process: subprocess.Popen[bytes]
    name: str
    stdout: Path
    stderr: Path
    report: Path

    def wait(self, timeout: float) -> ChildRun:
        returncode, _usage, killed = _reap(self.process, timeout)
        name, stderr = self.name, self.stderr
        if killed:
            raise RuntimeError(f"{name} killed after {timeout} s\n{stderr.read_text()[-2000:]}")
        if returncode != 0 or not self.report.exists():
            raise RuntimeError(f"launcher for {name} failed ({returncode})\n{stderr.read_text()}")
        figures = json.loads(self.report.read_text())
        return ChildRun(
            figures["returncode"],
            figures["wall"],
            figures["user"],
            figures["sys"],
            figures["maxrss_kb"],
            self.stdout,
            stderr,
        )


def start_child(cmd: Sequence[str], env: dict[str, str], cwd: Path, name: str) -> StartedChild:
    """Start `cmd` under the launcher (see above); `wait()` gives its figures."""
    stdout, stderr, report = (cwd / f"{name}.{ext}" for ext in ("out", "err", "rusage"))
    report.unlink(missing_ok=True)
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [*launcher(report), *cmd],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    return StartedChild(process, name, stdout, stderr, report)


def run_child(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    name: str,
    timeout: float,
) -> ChildRun:
    """Run `cmd` to completion: wall time from fork to exit, CPU and peak RSS of `cmd`."""
    return start_child(cmd, env, cwd, name).wait(timeout)


def json_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


# --------------------------------------------------------------------------- forwarder

TUNABLES = ("SMTP_CONNECTIONS", "FETCH_BATCH_MESSAGES", "FETCH_BATCH_BYTES")


def forwarder_command() -> list[str]:
    script = Path(sys.executable).with_name("forwarder")
    return [str(script)] if script.exists() else [sys.executable, "-m", "forwarder"]


def clean_environment() -> dict[str, str]:
    """The caller's environment without any FORWARDER_* setting (except the tunables)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FORWARDER_") and k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")
    }
    for name in TUNABLES:
        if value := os.environ.get("FORWARDER_" + name):
            env["FORWARDER_" + name] = value
    return env


def forwarder_env(
    mail: MailServer,
    sink_port: int,
    lists: dict[str, list[str]] | None,
    state_db: Path,
    **extra: str,
) -> dict[str, str]:
    env = clean_environment()
    env.update(
        {
            "FORWARDER_IMAP_HOST": mail.host,
            "FORWARDER_IMAP_PORT": str(mail.imap_port),
            "FORWARDER_IMAP_SECURITY": "none",
            "FORWARDER_IMAP_USERNAME": mail.username,
            "FORWARDER_IMAP_PASSWORD": mail.password,
            "FORWARDER_SMTP_HOST": LOOPBACK,
            "FORWARDER_SMTP_PORT": str(sink_port),
            "FORWARDER_SMTP_SECURITY": "none",
            "FORWARDER_ENVELOPE_SENDER": ADMIN,
            "FORWARDER_STATE_DB": str(state_db),
            "FORWARDER_LOG_FORMAT": "json",
            "FORWARDER_LOG_LEVEL": "info",
        }
    )
    if lists is not None:
        env["FORWARDER_LISTS"] = json.dumps(lists)
    env.update({"FORWARDER_" + k.upper(): v for k, v in extra.items()})
    return env


@dataclass
class OnceResult:
    child: ChildRun
    cycle: dict[str, Any]  # the cycle_finished event (empty if none was logged)

    @property
    def cycle_seconds(self) -> float | None:
        ms = self.cycle.get("duration_ms")
        return ms / 1000 if isinstance(ms, int | float) else None


def forwarder_once(
    env: dict[str, str],
    cwd: Path,
    name: str,
    timeout: float = 900,
    command: Sequence[str] | None = None,
) -> OnceResult:
    """`forwarder once` (or `command` + `once`: another build, a profiler) to completion."""
    cmd = [*(command or forwarder_command()), "once"]
    child = run_child(cmd, env=env, cwd=cwd, name=name, timeout=timeout)
    cycles = [e for e in json_events(child.stdout) if e.get("event") == "cycle_finished"]
    if child.returncode != 0 or not cycles or cycles[-1].get("outcome") != "ok":
        raise RuntimeError(
            f"forwarder once ({name}) exited with {child.returncode}: {child.stderr_tail()}\n"
            f"last cycle: {cycles[-1] if cycles else 'none logged'}"
        )
    return OnceResult(child, cycles[-1])


@dataclass
class ForwarderDaemon:
    """`forwarder run` as a child process, its JSON log read line by line."""

    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*forwarder_command(), "run"],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(self.cwd / "run.err", "wb"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.cwd / "run.out", "wb") as log:
            for line in self.process.stdout:
                log.write(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        with self._changed:
            found = self._changed.wait_for(
                lambda: (
                    any(e.get("event") == name for e in self.events)
                    or (self.process is not None and self.process.poll() is not None)
                ),
                timeout,
            )
            for event in self.events:
                if event.get("event") == name:
                    return event
        raise RuntimeError(
            f"forwarder run: no {name!r} event within {timeout} s (found={found})\n"
            + (self.cwd / "run.err").read_text(errors="replace")[-2000:]
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM ... of /proc/PID/status, in kB."""
        assert self.process is not None
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                values[key] = int(value.split()[0])
        return values

    def stop(self, timeout: float = 30) -> tuple[int, resource.struct_rusage]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        returncode, usage, killed = _reap(self.process, timeout)
        if self._reader is not None:
            self._reader.join(5)
        if killed:
            raise RuntimeError(f"forwarder run did not stop within {timeout} s")
        return returncode, usage

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.process.pid, 0)
            self.process.returncode = -9


# --------------------------------------------------------------------------- fetchmail


def fetchmail_once(mail: MailServer, sink_port: int, workdir: Path, timeout: float) -> ChildRun:
    """fetchmail in multidrop mode, once (no daemon), with a private HOME and idfile."""
    home = workdir / "fetchmail-home"
    home.mkdir(exist_ok=True)
    home.chmod(0o700)
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll {mail.host} port {mail.imap_port} protocol imap auth password\n"
        '  envelope "Delivered-To"\n'
        "  localdomains example.org\n"
        f'  user "{mail.username}" password "{mail.password}" is * here\n'
        f"  smtphost {LOOPBACK}/{sink_port}\n"
        "  keep fetchall\n"
        "  sslproto ''\n"  # plaintext: no opportunistic STARTTLS either
    )
    rc.chmod(0o600)
    env = clean_environment()
    env.update({"HOME": str(home), "FETCHMAILHOME": str(home)})
    return run_child(
        ["fetchmail", "--nodetach", "-f", str(rc), "-i", str(home / "fetchids")],
        env=env,
        cwd=workdir,
        name="fetchmail",
        timeout=timeout,
    )


def fill(mail: MailServer, messages: Iterator[tuple[bytes, str]]) -> tuple[int, int, float]:
    """Deliver every (raw, rcpt) over ONE LMTP connection: (count, bytes, seconds)."""
    count = size = 0
    started = time.perf_counter()
    with LmtpFeeder(mail) as feeder:
        for raw, rcpt in messages:
            feeder.send(raw, rcpt)
            count += 1
            size += len(raw)
    return count, size, time.perf_counter() - started
