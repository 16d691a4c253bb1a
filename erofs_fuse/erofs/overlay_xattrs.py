"""Which xattrs of a layer a merged tree shows: overlayfs's own names are hidden.

Kernel overlayfs (``fs/overlayfs/xattrs.c``) never shows its private xattrs,
``trusted.overlay.*`` (and ``user.overlay.*`` with ``userxattr``), and shows an escaped one,
``trusted.overlay.overlay.X`` of a layer, as ``trusted.overlay.X`` (composefs stores the xattrs
of a nested overlay that way). The merged view (``fuse/overlay.py``) applies the rule to read
layers, the writer (``mkfs/``) to tell whether a layer it wrote shows any xattr at all: a
mount whose layers show none may answer every getxattr "not supported" (``mount -o noxattr``).
"""

from __future__ import annotations

from collections.abc import Iterable

HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
# an xattr of the layer's own overlay, escaped: stored as trusted.overlay.overlay.X, shown as
# trusted.overlay.X
ESCAPED_XATTR_PREFIX = b"trusted.overlay.overlay."
SHOWN_ESCAPED_PREFIX = b"trusted.overlay."


def is_hidden_xattr(name: bytes) -> bool:
    return name.startswith(HIDDEN_XATTR_PREFIXES)


def shown_xattr(name: bytes) -> bytes | None:
    """The name a layer's xattr shows under in the merged tree, or None if hidden: the
    overlay's own are hidden, escaped ones (``trusted.overlay.overlay.X``) are unescaped."""
    if name.startswith(ESCAPED_XATTR_PREFIX):
        return SHOWN_ESCAPED_PREFIX + name[len(ESCAPED_XATTR_PREFIX):]
    return None if is_hidden_xattr(name) else name


def shows_xattrs(names: Iterable[bytes]) -> bool:
    """Whether an inode with these xattr names shows any of them in a merged tree."""
    return any(shown_xattr(name) is not None for name in names)
