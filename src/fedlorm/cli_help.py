"""Command-line help written for a terminal: each command's description as wrapped paragraphs of
plain sentences, followed by the commands that show how it is used.

The texts live with the parsers (:mod:`fedlorm.cli`, :mod:`fedlorm.flower.cli`); this module only
lays them out, so every command's ``--help`` has the same shape. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any

__all__ = ["WIDTH", "add_command", "command_parser_options"]

WIDTH = 78
"""Columns the descriptions are wrapped to."""


def _paragraphs(text: str) -> str:
    """``text`` with each blank-line-separated paragraph re-wrapped to :data:`WIDTH` columns."""
    blocks = [" ".join(block.split()) for block in textwrap.dedent(text).strip().split("\n\n")]
    return "\n\n".join(
        textwrap.fill(block, WIDTH, break_on_hyphens=False, break_long_words=False) for block in blocks
    )


def _examples(examples: Sequence[str]) -> str:
    lines = ["Example:" if len(examples) == 1 else "Examples:"]
    lines += [f"  {example}" for example in examples]
    return "\n".join(lines)


def command_parser_options(description: str, examples: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments that give an ``argparse`` parser a wrapped description and examples.

    Args:
        description: Plain sentences; blank lines separate paragraphs.
        examples: Whole command lines, shown one per line under "Example:" or "Examples:".

    Returns:
        ``description``, ``epilog`` and a ``formatter_class`` that keeps their line breaks.
    """
    return {
        "description": _paragraphs(description),
        "epilog": _examples(examples),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def add_command(
    subparsers: Any, name: str, *, summary: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """Add a subcommand with a one-line summary, a description and examples.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.
        name: The subcommand, e.g. ``run``.
        summary: One sentence, shown in the parent command's list of subcommands.
        description: Plain sentences shown at the top of the subcommand's ``--help``.
        examples: Whole command lines shown at its end.

    Returns:
        The subcommand's parser.
    """
    return subparsers.add_parser(name, help=summary, **command_parser_options(description, examples))
