"""The syntax of single setting values: durations, host names, protocol-safe text. Pure.

Each check returns the cleaned value or raises ValueError with the part of the
sentence that follows the setting's name ("FORWARDER_IMAP_HOST: <message>"),
never quoting a secret.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

# CR and LF end a protocol line (IMAP, SMTP); NUL ends a C string on the server's side.
# A setting holding one would let its value write a command of its own.
FORBIDDEN_CHARACTERS = {"\r": "CR", "\n": "LF", "\0": "NUL"}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
DURATION_HINT = "a number of seconds, or with a unit: 90s, 10m, 2h, 5d (or 1h30m)"

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def control_characters(text: str) -> list[str]:
    """The names of the forbidden characters in `text` (CR, LF, NUL), in that order."""
    return [name for char, name in FORBIDDEN_CHARACTERS.items() if char in text]


def check_protocol_text(text: str, *, secret: bool = False) -> str:
    """Refuse a value that would end a protocol line early (CR, LF) or a C string (NUL)."""
    if found := control_characters(text):
        what = " and ".join(found)
        shown = "" if secret else f" ({text.encode('unicode_escape').decode('ascii')!s})"
        raise ValueError(
            f"contains {what}{shown}, which would let it add commands to the IMAP or SMTP "
            "session; remove the line break or control character"
        )
    return text


def parse_duration(value: Any) -> Any:
    """`90`, `90s`, `10m`, `2h`, `5d`, `1h30m` -> seconds (float). Other types pass through."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    parts = list(_DURATION_PART.finditer(text))
    covered = "".join(part.group(0) for part in parts)
    if not parts or re.sub(r"\s+", "", covered) != re.sub(r"\s+", "", text):
        raise ValueError(f"{value.strip()!r} is not a duration ({DURATION_HINT})")
    return float(
        sum(
            float(number) * _UNITS[unit.lower()]
            for number, unit in (part.groups() for part in parts)
        )
    )


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 432000 -> `5d`, 600 -> `10m`, 90 -> `90s`, 0.2 -> `0.2s`."""
    if seconds > 0 and math.isclose(seconds, round(seconds)):
        whole = round(seconds)
        for unit in ("d", "h", "m"):
            if whole % _UNITS[unit] == 0:
                return f"{whole // _UNITS[unit]}{unit}"
        return f"{whole}s"
    return f"{seconds:g}s"


def check_host(value: str, port_setting: str) -> str:
    """A host name or IP address alone: no port, no brackets, no URL."""
    host = value.strip()
    if "://" in host or "/" in host:
        raise ValueError(f"{host!r} is a URL; give the host name only")
    if host.startswith("["):
        inside, _, rest = host[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            raise ValueError(
                f"{host!r} includes a port; set the host to {inside} and the port "
                f"({rest[1:]}) in {port_setting}"
            )
        raise ValueError(f"{host!r}: write an IPv6 address without brackets ({inside})")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            name, _, port = host.rpartition(":")
            if port.isdigit():
                raise ValueError(
                    f"{host!r} includes a port; set the host to {name} and the port ({port}) "
                    f"in {port_setting}"
                ) from None
            raise ValueError(f"{host!r} is not a host name or an IP address") from None
        return host
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not a host name or an IP address")
    return host
