"""A lazy layer named in one string: where ``erofs-fuse mount --layers`` reads one layer of a
pushed image from, and what the snapshotter records as a committed snapshot's layer.

    lazy:HOST/REPO@sha256:MANIFEST#INDEX         HTTPS (HTTP for a registry on this machine)
    lazy+http:HOST/REPO@sha256:MANIFEST#INDEX    plain HTTP

The manifest digest is the trust: the layer's descriptor, its fs-verity digest and its tree
come from that manifest, and every block is verified against them. INDEX is the layer's
position in the manifest, 0 at the bottom. References hold no ``,`` (the --layers separator)
and no ``#``.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "lazy:"
PLAIN_PREFIX = "lazy+http:"


class LazySourceError(ValueError):
    """A string that starts like a lazy source but is not one (what is wrong, in one line)."""


def is_lazy(text: str) -> bool:
    return text.startswith((PREFIX, PLAIN_PREFIX))


@dataclass(frozen=True)
class LazySource:
    reference: str  # HOST/REPO[:TAG]@sha256:HEX, pinned
    index: int
    plain_http: bool = False

    def __str__(self) -> str:
        return f"{PLAIN_PREFIX if self.plain_http else PREFIX}{self.reference}#{self.index}"

    @classmethod
    def parse(cls, text: str) -> LazySource:
        plain = text.startswith(PLAIN_PREFIX)
        rest = text.removeprefix(PLAIN_PREFIX if plain else PREFIX)
        if rest == text:
            raise LazySourceError(f"{text[:100]!r}: not a lazy layer ({PREFIX}REF@sha256:"
                                  "DIGEST#INDEX)")
        ref, sep, index = rest.rpartition("#")
        name, _, digest = ref.rpartition("@")
        hexpart = digest.removeprefix("sha256:")
        if not sep or not index.isdigit() or not name or "," in ref \
                or not digest.startswith("sha256:") or len(hexpart) != 64 \
                or not all(c in "0123456789abcdef" for c in hexpart):
            raise LazySourceError(f"{text[:200]!r}: expected {PREFIX}REF@sha256:DIGEST#INDEX "
                                  "(the manifest's digest, the layer's index from 0)")
        return cls(ref, int(index), plain)
