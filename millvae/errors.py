"""The one exception type users see (a one-line message saying what was expected and what came),
and the one argument parser every entry point uses."""

from __future__ import annotations

import argparse
from typing import Any


class MillvaeError(Exception):
    """Bad input or environment; the CLI prints the message on one line and exits non-zero."""


class ArgParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and help text taken literally.

    argparse %-formats every help string, so a plain "30 %" in a parameter's description crashed
    `--help` with a TypeError; help here is text, never a format.
    """

    def error(self, message: str):  # one line, not a usage dump
        raise MillvaeError(f"{self.prog}: {message}")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        return super().add_argument(*args, **kwargs)
