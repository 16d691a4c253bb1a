"""The command line, on top of every other room: argument parsing, the subcommands' front ends,
one-line errors and exit codes. Nothing below imports it."""

from .main import entry, main

__all__ = ["entry", "main"]
