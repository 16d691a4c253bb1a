"""The writer's one exception family.

Every failure caused by the input (a tar stream or a source directory) is a ``MkfsError`` whose
message names the entry and the byte offset of its header in the uncompressed stream, so the
command line prints it as one line. Nothing is left behind when one is raised: the output is
written to a temporary file that is removed.
"""

from __future__ import annotations


class MkfsError(Exception):
    """Root of every error the writer raises."""

    def __init__(self, message: str, *, entry: bytes | str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.entry = entry
        self.offset = offset

    def __str__(self) -> str:
        where = []
        if self.entry is not None:
            name = self.entry if isinstance(self.entry, str) else \
                self.entry.decode("utf-8", "backslashreplace")
            where.append(repr(name)[1:-1] if name.isprintable() else ascii(name)[1:-1])
        if self.offset is not None:
            where.append(f"at byte {self.offset}")
        return one_line((" ".join(where) + ": " if where else "") + self.message)


def one_line(text: str) -> str:
    """``text`` with control characters escaped: names from a tar may hold newlines, and an
    error is one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class BadInputError(MkfsError):
    """The input stream is not a valid tar (or gzip/zstd stream of one)."""


class UnsupportedInputError(MkfsError):
    """The input is valid but uses something the writer cannot represent."""
