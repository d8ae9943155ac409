"""`python -m bench.compare --old PATH [--old PATH2]`: the throughput of builds in one run.

The machine is shared and its load moves, so builds are compared side by side: the
same backlog (N messages of 2 KB, as in the throughput phase), forwarded by
`forwarder once` of each build in turn, the order reversed every other run. This
build is `new`; each other one is named after its worktree.
The figures are medians of each build's runs: msg/s (wall, start-up included), msg/s
inside the cycle, and CPU ms per message (user+sys of the child, `wait4`), which
other load moves much less than wall time.

Another build is another worktree with its own virtual environment, e.g.
    git -C /work/main worktree add /work/wt/old dafd8c2
    make -C /work/wt/old venv
    .venv/bin/python -m bench.compare --old /work/wt/old/.venv/bin/forwarder

With --profile DIR, each build then forwards the backlog once more under cProfile
(`python -m cProfile -o DIR/<build>.prof -m forwarder once`, the build's own
interpreter) and the top functions by own time are printed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pstats
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

from bench import harness as h
from bench.run import LISTS, backlog, expected_deliveries, log
from tests.servers import MailServer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument(
        "--old", type=Path, action="append", required=True, help="another build's forwarder"
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5, help="runs of each build (default 5)")
    parser.add_argument("--profile", type=Path, help="directory for one cProfile run of each")
    parser.add_argument(
        "--log-level", default="info", help="FORWARDER_LOG_LEVEL (default info, as deployed)"
    )
    parser.add_argument("--output", type=Path, help="JSON file for every run's figures")
    return parser.parse_args(argv)


def summary(n: int, runs: list[dict[str, Any]]) -> dict[str, float]:
    def med(key: str) -> float:
        values = [run[key] for run in runs if run[key] is not None]
        return float(median(values)) if values else math.nan

    return {
        "msgs_per_s": n / med("wall_s"),
        "cycle_msgs_per_s": n / med("cycle_s"),
        "cpu_ms_per_msg": med("cpu_s") / n * 1000,
        "user_ms_per_msg": med("user_s") / n * 1000,
        "sys_ms_per_msg": med("sys_s") / n * 1000,
        "maxrss_mb": med("maxrss_mb"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    builds = {"new": h.forwarder_command()}
    builds.update({_name(path): [str(path)] for path in opts.old})
    n = opts.messages
    want = expected_deliveries(n)
    workdir = Path(tempfile.mkdtemp(prefix="forwarder-compare-"))
    workdir.chmod(0o755)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in builds}
    problems: list[str] = []
    load_start = os.getloadavg()
    try:
        with MailServer() as mail, h.SmtpSinkProcess(workdir) as sink:
            count, _size, fill_s = h.fill(mail, backlog("cmp", n))
            log(f"compare: {count} messages in {fill_s:.1f} s")

            def once(name: str, command: list[str], tag: str) -> h.OnceResult:
                h.reset_flags(mail)
                sink.clear()
                state = workdir / f"{tag}.db"
                env = h.forwarder_env(mail, sink.port, LISTS, state, LOG_LEVEL=opts.log_level)
                child = h.run_child([*command, "once"], env=env, cwd=workdir, name=tag, timeout=900)
                cycles = [
                    e for e in h.json_events(child.stdout) if e.get("event") == "cycle_finished"
                ]
                if child.returncode != 0:
                    raise RuntimeError(
                        f"{tag} exited with {child.returncode}: {child.stderr_tail()}"
                    )
                result = h.OnceResult(child, cycles[-1] if cycles else {})  # none below info
                dumps = sink.transactions()
                rcpts = sum(d.rcpts for d in dumps)
                if len(dumps) != n or rcpts != want:
                    problems.append(f"{tag}: {len(dumps)} transactions, {rcpts} recipients")
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{state}{suffix}").unlink(missing_ok=True)
                return result

            for r in range(opts.runs):
                for name in list(builds) if r % 2 == 0 else reversed(builds):
                    result = once(name, builds[name], f"{name}-{r}")
                    c = result.child
                    runs[name].append(
                        {
                            "wall_s": c.wall,
                            "cycle_s": result.cycle_seconds,
                            "cpu_s": c.cpu,
                            "user_s": c.user,
                            "sys_s": c.sys,
                            "maxrss_mb": c.maxrss_mb,
                            "loadavg": os.getloadavg()[0],
                        }
                    )
                    log(
                        f"compare: {name} run {r + 1}/{opts.runs}: {n / c.wall:,.0f} msg/s, "
                        f"CPU {c.cpu / n * 1000:.3f} ms/msg (load {os.getloadavg()[0]:.2f})"
                    )
            if opts.profile:
                opts.profile.mkdir(parents=True, exist_ok=True)
                for name, command in builds.items():
                    python = str(Path(command[0]).with_name("python"))
                    out = opts.profile / f"{name}.prof"
                    once(
                        name,
                        [python, "-m", "cProfile", "-o", str(out), "-m", "forwarder"],
                        f"{name}-profile",
                    )
                    text = io.StringIO()
                    pstats.Stats(str(out), stream=text).sort_stats("tottime").print_stats(25)
                    print(f"\n== {name}: top 25 by own time\n{text.getvalue()}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures = {name: summary(n, found) for name, found in runs.items()}
    load_end = os.getloadavg()
    print(f"\n{n:,} messages, median of {opts.runs} runs each, alternated")
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    width = max(len(name) for name in builds)
    print(
        f"{'':{width}} {'msg/s':>7} {'cycle msg/s':>12} {'CPU ms/msg':>11} {'user':>7} {'sys':>7}"
    )
    for name, f in figures.items():
        print(
            f"{name:{width}} {f['msgs_per_s']:7,.0f} {f['cycle_msgs_per_s']:12,.0f} "
            f"{f['cpu_ms_per_msg']:11.3f} {f['user_ms_per_msg']:7.3f} {f['sys_ms_per_msg']:7.3f}"
        )
    if opts.output:
        opts.output.write_text(
            json.dumps(
                {
                    "messages": n,
                    "figures": figures,
                    "runs": runs,
                    "builds": {k: v[0] for k, v in builds.items()},
                    "loadavg": [load_start, load_end],
                    "problems": problems,
                },
                indent=2,
            )
            + "\n"
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def _name(forwarder: Path) -> str:
    """`/work/wt/old/.venv/bin/forwarder` -> `old` (its worktree), else the path."""
    parts = forwarder.resolve().parts
    return parts[-4] if len(parts) >= 4 and parts[-3] == ".venv" else str(forwarder)


if __name__ == "__main__":
    sys.exit(main())
