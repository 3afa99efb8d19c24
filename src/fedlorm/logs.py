"""Log levels of the ``fedlorm`` command: the ``-v``/``--log-level`` options and the handler they set.

fedlorm's own records (loggers under ``fedlorm``) go to stderr at the chosen level; other libraries'
records only from WARNING up (or the chosen level, if higher), so ``-vv`` shows fedlorm's debug lines
without timm's, PIL's or Flower's. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LEVELS", "add_logging_arguments", "command_logging", "log_level"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
"""The names ``--log-level`` accepts (any case)."""

FORMAT = "%(levelname)s %(name)s: %(message)s"


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` and ``--log-level LEVEL`` to one (sub)command's parser."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="Show more messages on stderr: -v info, -vv debug (default: warnings and errors only).",
    )
    group.add_argument(
        "--log-level",
        type=_level_name,
        metavar="LEVEL",
        help="Log level: debug, info, warning or error; it overrides -v.",
    )


def _level_name(text: str) -> str:
    """``--log-level``'s value, lower-cased; argparse turns the error into one line, exit code 2."""
    if text.lower() not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use debug, info, warning or error")
    return text.lower()


def log_level(args: argparse.Namespace) -> int:
    """``--log-level`` if given, else WARNING lowered one step per ``-v`` (INFO, then DEBUG)."""
    name = getattr(args, "log_level", None)
    if name is not None:
        return LEVELS[name]
    verbose = getattr(args, "verbose", 0) or 0
    if verbose >= 2:
        return logging.DEBUG
    return logging.INFO if verbose == 1 else logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (redirected or captured too)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is read instead
        pass


@contextmanager
def command_logging(level: int) -> Iterator[None]:
    """For one command: fedlorm's records at ``level``, other libraries' at WARNING or above, on stderr.

    The handler and levels are removed again afterwards, so ``main()`` can be called repeatedly in one
    process (tests, notebooks) without stacking handlers.
    """
    root, ours = logging.getLogger(), logging.getLogger("fedlorm")
    saved = root.level, ours.level
    handler = _StderrHandler()
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    ours.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
