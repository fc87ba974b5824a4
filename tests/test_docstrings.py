"""The shared docstring entries (``jxent._docstrings``): every public function documents
each parameter once, every shared entry is filled in where it is used and written
nowhere else, and ``fill`` refuses a marker it cannot fill."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest

import jxent
from jxent import _docstrings

ROOT = Path(__file__).resolve().parents[1]

# jxent.linear's functions are jxent's; jxent.parallel's are their own objects.
PUBLIC = {f"jxent.{n}": getattr(jxent, n) for n in jxent.__all__}
PUBLIC |= {f"jxent.parallel.{n}": getattr(jxent.parallel, n) for n in jxent.parallel.__all__}


def _documented(fn) -> list[str]:
    """The parameter names of ``fn``'s Args section, in order."""
    doc = inspect.getdoc(fn) + "\n"
    section = re.search(r"^Args:\n((?:  .*\n|\n)*)", doc, re.MULTILINE)
    assert section, "no Args section"
    return re.findall(r"^  (\w+):", section.group(1), re.MULTILINE)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_parameter_is_documented_once_in_order(name):
    fn = PUBLIC[name]
    assert _documented(fn) == list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_no_marker_is_left(name):
    assert not re.search(r"<[a-z_]+>", inspect.getdoc(PUBLIC[name]))


@pytest.mark.parametrize("fragment", sorted(_docstrings.FRAGMENTS))
def test_each_entry_is_shared(fragment):
    # Args entries and section bodies both sit two spaces in, in inspect.getdoc's text.
    text = textwrap.indent(_docstrings.FRAGMENTS[fragment], "  ")
    users = [n for n, fn in PUBLIC.items() if text in inspect.getdoc(fn)]
    assert len(users) >= 2, users


def _folded(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines())


def test_no_entry_is_copied_into_a_module():
    copies = [
        f"{path.relative_to(ROOT)}: <{name}>"
        for path in sorted((ROOT / "jxent").rglob("*.py"))
        if path.name != "_docstrings.py"
        for name, text in _docstrings.FRAGMENTS.items()
        if _folded(text) in _folded(path.read_text())
    ]
    assert copies == []


def test_fill_replaces_a_marker_line_at_its_indentation():
    def fn():
        """Summary.

        Args:
          <precision>
          <filter_eps>
        """

    original = fn.__doc__
    assert _docstrings.fill(fn) is fn
    for name in ("precision", "filter_eps"):
        # The marker's own indentation: Python 3.13 dedents docstrings when compiling.
        (line,) = [ln for ln in original.splitlines() if ln.strip() == f"<{name}>"]
        indent = line[: len(line) - len(line.lstrip())]
        assert len(indent) >= 2
        want = textwrap.indent(_docstrings.FRAGMENTS[name], indent) + "\n"
        assert want in fn.__doc__
    assert "<" not in fn.__doc__


@pytest.mark.parametrize(
    "doc, message",
    [
        ("Args:\n  <no_such_entry>\n", "no entry <no_such_entry>"),
        ("Args:\n  <filter_eps>\n  x: see <precision>.\n", "not alone on its line"),
        ("Args:\n  x: no marker.\n", "no <name> line"),
    ],
)
def test_fill_refuses_what_it_cannot_fill(doc, message):
    def fn():
        pass

    fn.__doc__ = doc
    with pytest.raises(ValueError, match=message):
        _docstrings.fill(fn)


def test_fill_leaves_a_stripped_docstring():
    def fn():
        pass

    assert _docstrings.fill(fn) is fn and fn.__doc__ is None
