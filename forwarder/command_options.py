"""The options of the operator commands, added to cli.py's parser (argparse only: no
heavy import). Each option's `dest` is the keyword its command function takes."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="as_json", action="store_true", help="one JSON object")


def _mailbox(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mailbox", metavar="NAME", help="only this mailbox (a name of FORWARDER_MAILBOXES_FILE)"
    )


def once(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch and route what is waiting, print who would receive each message and "
        "why; send nothing, record nothing, flag nothing",
    )
    _json(parser)
    _mailbox(parser)


def explain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="FILE", help="the message file (.eml), - for stdin")
    _json(parser)
    _mailbox(parser)


def baseline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="also on a folder the forwarder has already worked on",
    )
    _mailbox(parser)


def retry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--message-id", metavar="ID", help="the deliveries of this message")
    parser.add_argument("--member", metavar="ADDRESS", help="the deliveries to this member")
    parser.add_argument(
        "--failed", action="store_true", help="failed deliveries only (alone: all of them)"
    )
    parser.add_argument(
        "--uid",
        type=int,
        metavar="N",
        help="re-examine the message at this UID with the current lists",
    )
    _mailbox(parser)


def history(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="QUERY", help="a Message-ID, a member or a list address")
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only deliveries written at or after WHEN (ISO 8601 date or time; UTC if no offset)",
    )
    _json(parser)
    _mailbox(parser)


def status(parser: argparse.ArgumentParser) -> None:
    _json(parser)
    _mailbox(parser)


OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "once": once,
    "check": _mailbox,
    "status": status,
    "config": _mailbox,
    "explain": explain,
    "baseline": baseline,
    "retry": retry,
    "history": history,
}
