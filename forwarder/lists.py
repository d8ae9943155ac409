"""Distribution lists: their shape checked, nested lists expanded, cycles refused. Pure.

A list maps a normalised list address to its members as configured. Members
that are themselves lists are replaced by those lists' members, recursively.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forwarder.addresses import is_valid_address, normalize

Lists = dict[str, tuple[str, ...]]


def validate_lists_shape(value: Any, lines: Mapping[str, int] | None = None) -> Lists:
    """Raise ValueError (one line) unless `value` is {list address: [member, ...]}.

    `lines` (list address as written -> line number) puts `line N: ` before an error
    about one list, for a file in the aliases syntax.
    """
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object: {"list@domain": ["member@domain", ...]}')
    if not value:
        raise ValueError("defines no list")
    lists: Lists = {}
    for address, members in value.items():
        try:
            key, kept = validate_list(address, members)
            if key in lists:
                raise ValueError(f"list {key} is defined twice")
        except ValueError as exc:
            if lines and address in lines:
                raise ValueError(f"line {lines[address]}: {exc}") from None
            raise
        lists[key] = kept
    return lists


def validate_list(address: Any, members: Any) -> tuple[str, tuple[str, ...]]:
    """One list: its normalised address and its members (spelling kept, duplicates dropped)."""
    if not isinstance(address, str) or not is_valid_address(address):
        raise ValueError(f"list address {address!r} is not an address")
    if "+" in address.partition("@")[0]:
        raise ValueError(f"list address {address!r} has a +detail part; use the plain address")
    key = normalize(address)
    if not isinstance(members, list | tuple) or not members:
        raise ValueError(f"list {key} has no members (expected a non-empty array)")
    seen: dict[str, str] = {}
    for member in members:
        if not isinstance(member, str) or not is_valid_address(member):
            raise ValueError(f"list {key}: member {member!r} is not an address")
        norm = normalize(member)
        if norm == key:
            raise ValueError(f"list {key} contains its own address")
        seen.setdefault(norm, member.strip())
    return key, tuple(seen.values())


def allowed_domains(
    lists: Mapping[str, tuple[str, ...]], configured: tuple[str, ...]
) -> frozenset[str]:
    """The member domains allowed: as configured, else the domains of the list addresses."""
    if configured:
        return frozenset(configured)
    return frozenset(address.rpartition("@")[2] for address in lists)


def outside_domains(
    lists: Mapping[str, tuple[str, ...]], domains: frozenset[str]
) -> tuple[str, str] | None:
    """The first (list, member) whose member is outside `domains`, or None."""
    if "*" in domains:
        return None
    for key, members in lists.items():
        for member in members:
            domain = member.rpartition("@")[2].lower()
            if domain not in domains and normalize(member) not in lists:
                return key, member
    return None


def expand_lists(lists: Mapping[str, tuple[str, ...]]) -> Lists:
    """Resolve members that are themselves lists; raise ValueError on a cycle."""
    resolved: Lists = {}

    def visit(key: str, path: tuple[str, ...]) -> tuple[str, ...]:
        if key in path:
            cycle = " -> ".join((*path[path.index(key) :], key))
            raise ValueError(f"lists include each other in a cycle: {cycle}")
        if key in resolved:
            return resolved[key]
        members = lists[key]
        norms = [normalize(m) for m in members]
        if not any(n in lists for n in norms):  # the common case: no nested list
            resolved[key] = members  # already unique by normalised form
            return members
        out: dict[str, str] = {}
        for member, norm in zip(members, norms, strict=True):
            if norm in lists:
                for sub in visit(norm, (*path, key)):
                    out.setdefault(normalize(sub), sub)
            else:
                out.setdefault(norm, member)
        resolved[key] = tuple(out.values())
        return resolved[key]

    for key in lists:
        visit(key, ())
    return resolved
