"""Unit tests for forwarder.lists_text: the aliases(5) syntax and JSON with positions."""

from __future__ import annotations

import pytest

from forwarder.lists import validate_lists_shape
from forwarder.lists_text import parse_lists_text

ALIASES = """\
# The organization's lists
contact@example.org: alice@example.org, bob@example.org

compta@example.org: bob@example.org,
    carol@example.org
  # a comment between continuation lines
\tdave@example.org
direction@example.org:dave@example.org compta@example.org
"""


def test_aliases_syntax_gives_the_same_lists_as_json():
    parsed = parse_lists_text(ALIASES)
    assert validate_lists_shape(parsed.lists) == {
        "contact@example.org": ("alice@example.org", "bob@example.org"),
        "compta@example.org": ("bob@example.org", "carol@example.org", "dave@example.org"),
        "direction@example.org": ("dave@example.org", "compta@example.org"),
    }


def test_aliases_syntax_remembers_the_line_of_each_list():
    assert parse_lists_text(ALIASES).lines == {
        "contact@example.org": 2,
        "compta@example.org": 4,
        "direction@example.org": 8,
    }


def test_a_text_starting_with_a_brace_is_json():
    parsed = parse_lists_text('\n  {"team@example.org": ["a@example.org"]}')
    assert parsed.lists == {"team@example.org": ["a@example.org"]}


@pytest.mark.parametrize(
    ("text", "said"),
    [
        pytest.param("contact@example.org alice@example.org\n", "line 1: expected", id="no-colon"),
        pytest.param("# lists\n: alice@example.org\n", "line 2: expected", id="no-list-address"),
        pytest.param(
            "  alice@example.org\n", "line 1: starts with a space", id="orphan-continuation"
        ),
        pytest.param(
            "a@example.org: x@example.org\nb@example.org: y@example.org\n"
            "A@Example.org: z@example.org\n",
            "line 3: list a@example.org is already defined on line 1",
            id="defined-twice",
        ),
    ],
)
def test_aliases_syntax_errors_name_the_line(text, said):
    with pytest.raises(ValueError) as caught:
        parse_lists_text(text)
    assert said in str(caught.value)


def test_a_bad_member_in_the_aliases_syntax_names_its_line():
    parsed = parse_lists_text(
        "a@example.org: x@example.org\nb@example.org: y@example.org,\n  bob\n"
    )
    with pytest.raises(ValueError) as caught:
        validate_lists_shape(parsed.lists, parsed.lines)
    assert str(caught.value) == "line 2: list b@example.org: member 'bob' is not an address"


def test_a_list_without_members_names_its_line():
    parsed = parse_lists_text("a@example.org: x@example.org\nb@example.org:\n")
    with pytest.raises(ValueError, match=r"^line 2: list b@example\.org has no members"):
        validate_lists_shape(parsed.lists, parsed.lines)


def test_a_json_error_names_line_and_column():
    text = '{\n  "a@example.org": ["x@example.org"],\n  "b@example.org": ["y@example.org"\n}\n'
    with pytest.raises(ValueError) as caught:
        parse_lists_text(text)
    assert str(caught.value).startswith("line 4, column 1: not valid JSON (")


def test_json_with_a_list_written_twice_is_refused():
    with pytest.raises(ValueError, match="appears twice"):
        parse_lists_text('{"a@example.org": ["x@example.org"], "a@example.org": ["y@example.org"]}')
