"""How the command line reports errors: one line, ``erofs-fuse: ...``, a non-zero exit."""

from __future__ import annotations

import sys
from typing import NoReturn

PROG = "erofs-fuse"
EXIT_USAGE = 2


class CliError(Exception):
    """An error to print as one line before exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    raise CliError(message, code)


def print_error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
