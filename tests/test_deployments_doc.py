"""docs/deployments.md gives the recipes the test servers run (tests/servers/exim.py,
cyrus.py, courier.py), and the README links to it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.servers.courier import RECIPE_IMAPD as COURIER_IMAPD
from tests.servers.cyrus import RECIPE_IMAPD as CYRUS_IMAPD
from tests.servers.exim import (
    LMTP_TRANSPORT,
    RECIPE_ENVELOPE_TO,
    RECIPE_ROUTER,
    RECIPE_SUBMISSION_EXEMPTION,
    SUBMISSION_ACL,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deployments.md"


def blocks(heading: str) -> list[str]:
    """The fenced blocks of the doc's section ``## heading``."""
    text = DOC.read_text()
    section = text[text.index(f"\n## {heading}\n") + 1 :]
    end = section.find("\n## ", 1)
    return (section if end < 0 else section[:end]).split("```")[1::2]


def block_with(heading: str, anchor: str) -> str:
    [block] = [b for b in blocks(heading) if anchor in b]
    return block.strip("\n") + "\n"


def test_exim_router_is_the_fixtures() -> None:
    block = block_with("Behind Exim", "driver = redirect")
    assert block.split("\n", 1)[1] == RECIPE_ROUTER  # after its comment line


def test_exim_transport_setting_is_the_fixtures() -> None:
    assert block_with("Behind Exim", "envelope_to_add").strip() == RECIPE_ENVELOPE_TO


def test_exim_submission_exemption_is_the_fixtures_and_comes_first() -> None:
    block = block_with("Exim as the submission server", "suppress_local_fixups")
    code = "".join(line + "\n" for line in block.splitlines() if not line.strip().startswith("#"))
    assert code == SUBMISSION_ACL.replace(
        "acl_check_rcpt:\n", "acl_check_rcpt:\n" + RECIPE_SUBMISSION_EXEMPTION
    ).replace("  deny message = 5.7.1 authentication required\n", "")


def test_cyrus_lmtp_transport_is_the_fixtures() -> None:
    block = block_with("Cyrus IMAP", "protocol = lmtp")
    assert block == LMTP_TRANSPORT.format(host="127.0.0.1", port=24)


def test_cyrus_imapd_conf_is_the_fixtures() -> None:
    block = block_with("Cyrus IMAP", "duplicatesuppression")
    assert block == "".join(f"{k}: {v}\n" for k, v in CYRUS_IMAPD.items())


def test_courier_imapd_is_the_fixtures() -> None:
    block = block_with("Courier-IMAP", "IMAP_ENHANCEDIDLE")
    assert block == "".join(f"{k}={v}\n" for k, v in COURIER_IMAPD.items())


def test_every_test_file_the_doc_names_exists() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", DOC.read_text()))
    assert named and all((ROOT / path).exists() for path in named), named


def test_readme_links_to_the_doc() -> None:
    assert "](docs/deployments.md)" in (ROOT / "README.md").read_text()
