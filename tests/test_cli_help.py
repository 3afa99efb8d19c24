"""Command-line help is written for a terminal: plain sentences, no reStructuredText, an example for
every command (``fedlorm --help``, each subcommand's, and the Flower subcommands')."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from fedlorm import cli
from fedlorm.cli_help import WIDTH

RST = re.compile(r"``|`|:(?:func|class|mod|meth|attr|data|exc|obj):|^\.\. |\*\*", re.MULTILINE)
"""Markup a terminal shows as noise: literals and roles, directives, bold; any backtick at all."""


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command, by the command line that reaches it (``fedlorm flower submit``)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(f"{name} {sub}", child)

    walk("fedlorm", cli._build_parser())
    return found


PARSERS = _parsers()


def test_every_command_is_reached():
    expected = {"run", "compare", "partition", "presets", "predict", "evaluate", "flower"}
    assert {name.split()[1] for name in PARSERS if name != "fedlorm"} == expected
    flower = {name.split()[2] for name in PARSERS if name.startswith("fedlorm flower ")}
    assert flower == {"simulate", "deploy-local", "submit", "app-config"}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_is_plain_text_in_sentences_with_examples(name):
    parser = PARSERS[name]
    text = parser.format_help()
    assert RST.search(text) is None, RST.search(text)
    assert parser.description, f"{name} has no description"
    paragraphs = parser.description.split("\n\n")
    assert all(p[0].isupper() and p.rstrip().endswith(".") for p in paragraphs), paragraphs
    assert max(map(len, parser.description.splitlines())) <= WIDTH
    examples = text.split("\nExample:\n" if "\nExample:\n" in text else "\nExamples:\n", 1)
    assert len(examples) == 2, f"{name} --help shows no example"
    commands = [line.strip() for line in examples[1].splitlines() if line.strip()]
    assert commands and all(c.startswith(name.split()[0] + " ") for c in commands), commands
    command = name.split()[1:]
    assert all(c.split()[1 : 1 + len(command)] == command for c in commands), commands
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._VersionAction | argparse._SubParsersAction):
            continue
        assert action.help[0].isupper() and action.help.endswith("."), (name, action.help)


def test_the_module_docstring_is_not_the_description():
    """The old description was the module docstring's first line, cut off after a comma."""
    top = PARSERS["fedlorm"]
    assert cli.__doc__.splitlines()[0] not in top.format_help()
    assert top.description.startswith("Federated class-incremental learning with LoRA adapters")


def test_help_exits_zero_from_a_terminal():
    for args in (["--help"], ["run", "--help"], ["flower", "simulate", "--help"]):
        done = subprocess.run([sys.executable, "-m", "fedlorm", *args], capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr == "" and "Example" in done.stdout, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "fedlorm.flower", "deploy-local", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "fedlorm flower deploy-local --resume runs/deployed" in done.stdout
