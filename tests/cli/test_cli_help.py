"""``--help`` of every ``corrosion`` command reads as prose at any terminal width: a paragraph
of a docstring is one line of help text, wrapped by the terminal, not at the docstring's own
margin (typer's listing of a group's commands kept those line breaks: "applied here at once,
then by every" / "node as it arrives" at any width)."""

from __future__ import annotations

import itertools
import re

import click
import pytest
import typer.main
from typer.testing import CliRunner

from corrosion.ops.cli import app, flowing_text


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))
PATHS = [path for path, _ in COMMANDS]


def test_flowing_text_joins_lines_and_keeps_paragraphs() -> None:
    doc = """First line
        goes on here.

        Second paragraph
        too."""
    assert flowing_text(doc) == "First line goes on here.\n\nSecond paragraph too."
    assert flowing_text(None) is None
    assert flowing_text("") == ""


def test_every_command_has_help_and_no_line_break_inside_a_paragraph() -> None:
    assert len(COMMANDS) > 30  # the tree was walked: groups and their commands
    for path, command in COMMANDS:
        assert command.help, f"corrosion {' '.join(path)} has no help"
        for paragraph in command.help.split("\n\n"):
            assert "\n" not in paragraph, (path, paragraph)


def _broken_sentences(text: str, width: int) -> list[tuple[str, str]]:
    """Pairs of lines where a sentence goes on after a line that stopped well short of the
    terminal's width: a line break the terminal did not need."""
    found = []
    lines = [line.rstrip() for line in text.splitlines()]
    for line, after in itertools.pairwise(lines):
        first = line.strip("│ ")
        rest = after.strip("│ ")
        if not first or not rest or first.endswith((".", ":")):
            continue
        if re.match(r"[a-z(`]", rest) and len(line.rstrip(" │")) < width - 20:
            found.append((line, after))
    return found


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "corrosion")
def test_help_breaks_lines_only_at_the_terminals_width(path: tuple[str, ...], columns: int) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    assert _broken_sentences(result.stdout, columns) == []


def test_the_reported_sentence_is_on_one_line_at_120_columns() -> None:
    result = CliRunner().invoke(app, ["schema", "--help"], env={"COLUMNS": "120"})
    assert "applied here at once, then by every node as it arrives." in result.stdout
