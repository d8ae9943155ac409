"""The documentation says what the code does: every setting, log event and module is
documented once, `.env.example` is a valid configuration, and every link between the
documents leads somewhere."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from forwarder.config import KNOWN_FIELDS, load_settings
from forwarder.config_sources import env_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LOGS = ROOT / "docs" / "logs.md"
DEVELOPMENT = ROOT / "docs" / "development.md"
ENV_EXAMPLE = ROOT / ".env.example"
DOCUMENTS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy" / "README.md",
    ROOT / "bench" / "README.md",
    ROOT / "tests" / "corpus" / "README.md",
]
LEVELS = frozenset({"debug", "info", "warning", "error"})


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]


def names_in(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ----------------------------------------------------------------------------- settings


def test_every_setting_is_in_the_readme_table_once() -> None:
    rows = [names_in(row[0]) for row in table_rows(README.read_text())]
    listed = [name for names in rows for name in names if name.startswith("FORWARDER_")]
    expected = sorted(env_name(field) for field in KNOWN_FIELDS)
    assert sorted(listed) == expected


def test_env_example_names_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^#?\s*(FORWARDER_[A-Z_]+)=", text, re.M))
    assert named == {env_name(field) for field in KNOWN_FIELDS}


def test_env_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FORWARDER_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    [mailbox] = load_settings(_env_file=ENV_EXAMPLE).mailboxes()
    assert mailbox.lists and mailbox.envelope_sender


# ----------------------------------------------------------------------------- log events


def logged_events() -> dict[str, set[str]]:
    """Every event name forwarder/ logs, with the levels it is logged at."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "forwarder").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func, first = node.func, node.args[0]
            if isinstance(func, ast.Name) and func.id == "report":  # service.report: error
                event, levels = node.args[1], {"error"}
            elif isinstance(func, ast.Attribute) and func.attr in LEVELS:
                event, levels = first, {func.attr}
            elif isinstance(func, ast.Call) and ast.unparse(func).startswith("getattr(log,"):
                event, levels = first, {"debug", "info"}  # reporting: the level chosen
            else:
                continue
            if isinstance(event, ast.BinOp):  # "message_" + outcome
                assert isinstance(event.left, ast.Constant), ast.unparse(node)
                for outcome in ("forwarded", "failed", "deferred"):
                    found.setdefault(f"{event.left.value}{outcome}", set()).update(levels)
            elif isinstance(event, ast.Constant) and isinstance(event.value, str):
                found.setdefault(event.value, set()).update(levels)
    return found


def documented_events() -> dict[str, set[str]]:
    """Event -> the levels its row of docs/logs.md gives."""
    found: dict[str, set[str]] = {}
    for row in table_rows(LOGS.read_text()):
        if len(row) == 3 and row[0] != "Event":
            levels = set(re.findall(r"\b(debug|info|warning|error)\b", row[1]))
            for name in names_in(row[0]):
                found.setdefault(name, set()).update(levels)
    return found


def test_every_logged_event_is_documented_with_its_level() -> None:
    documented = documented_events()
    missing = {e: lv for e, lv in logged_events().items() if not lv <= documented.get(e, set())}
    assert not missing, f"not in docs/logs.md (or not at these levels): {missing}"


def test_every_documented_event_is_logged() -> None:
    assert not set(documented_events()) - set(logged_events())


# ----------------------------------------------------------------------------- modules


def test_every_module_is_in_the_layout_table_once() -> None:
    rows = table_rows(DEVELOPMENT.read_text())
    listed = [n for row in rows for n in names_in(row[0]) if re.fullmatch(r"\w+\.py", n)]
    modules = sorted(p.name for p in (ROOT / "forwarder").glob("*.py"))
    assert sorted(listed) == modules


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(text), re.M):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_the_document_leads_somewhere(document: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(document.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        destination = (document.parent / path) if path else document
        checked = bool(anchor) and destination.suffix == ".md"
        if not destination.exists() or (checked and anchor not in anchors(destination)):
            broken.append(target)
    assert not broken
