"""How the command line reports errors: one line, ``erofs-fuse: ...``, a non-zero exit."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import NoReturn

PROG = "erofs-fuse"
EXIT_USAGE = 2


class CliError(Exception):
    """An error to print as one line before exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def print_error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises CliError (one line, exit 2) instead of printing usage and exiting:
    ``erofs-fuse: info: the following arguments are required: image``."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()
        raise CliError(f"{where}: {message}" if where else message)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM in a command that cancels its workers itself; ``code`` is the exit
    status (128 + signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum
