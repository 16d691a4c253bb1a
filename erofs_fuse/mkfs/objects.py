"""A composefs-style object store: file contents named by their fs-verity digest.

With ``--objects DIR`` a regular file's bytes go to ``DIR/ab/cdef...`` (the SHA-256 fs-verity
digest in hex, split after two digits, composefs's layout: ``objects.object_name``), once per
distinct content, and the image keeps only its metadata: the inode (size, a hole where data
would be) with ``trusted.overlay.metacopy`` (version 0, length, flags, algorithm 1 = SHA-256, digest: the
form the kernel's overlayfs checks with ``verity=``) and ``trusted.overlay.redirect=/ab/cdef...``,
as mkcomposefs writes them. The digest is computed while the bytes stream into a temporary file
in DIR, which is renamed to its name, or dropped when that object already exists.

Beside each object over ``WHOLE_OBJECT_BYTES`` (128 KiB) goes its Merkle tree, ``ab/cdef....verity``
(``objects.tree_name``): the raw fs-verity tree, root-first, byte for byte what ``fsverity digest
--out-merkle-tree`` writes (one of the two forms ``seal`` writes; not the veritysetup one, whose
superblock block would add 4 KiB to every object). The writer has the tree in hand (it hashed
the bytes as they streamed in), and a reader that finds it checks it against the digest in the
metacopy xattr instead of hashing the whole object before its first read. About 1/128 of the
object's size (at least one 4 KiB block); smaller objects need none (the reader reads them
whole at open, hashing them as they arrive, and serves the read that opened them from those
bytes). The tree is written, atomically, before the object is linked in, so a store
written by this writer never shows an object without its tree; an object already there whose
tree is missing (a store made before trees were kept) gets it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable

from ..objects import WHOLE_OBJECT_BYTES, object_name, tree_name
from ..verity.build import BuiltTree, hash_blocks, tree_from_leaves
from ..verity.formats import HashParams
from .errors import BadInputError

INLINE_LIMIT = 64  # mkcomposefs keeps files this small in the image itself
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
FSVERITY_SHA256 = 1
BLOCK = 4096


def metacopy_value(digest: bytes) -> bytes:
    """The ``trusted.overlay.metacopy`` value that carries a digest (struct ovl_metacopy)."""
    return bytes([0, 4 + len(digest), 0, FSVERITY_SHA256]) + digest


def redirect_value(digest: bytes) -> bytes:
    """The ``trusted.overlay.redirect`` value naming the object: an absolute path from the
    store's root."""
    return ("/" + object_name(digest)).encode()


class ObjectWriter:
    """Objects under ``root``; ``put`` returns the fs-verity digest of what it stored."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.params = HashParams.fsverity()
        self.stored = 0       # objects written
        self.deduplicated = 0  # contents found already there
        self.bytes_written = 0
        self.tree_bytes = 0   # bytes of the trees written beside the objects

    def put(self, pieces: Iterable[memoryview | bytes], size: int, *, entry: bytes,
            offset: int) -> bytes:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".object-")
        try:
            leaves = self._write_hashing(fd, pieces, size, entry=entry, offset=offset)
            built = tree_from_leaves(leaves, size, self.params)
            self._commit(tmp, built, size)
            return built.fsverity_digest
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _write_hashing(self, fd: int, pieces: Iterable[memoryview | bytes], size: int, *,
                       entry: bytes, offset: int) -> bytes:
        hashes: list[bytes] = []
        partial = b""
        written = 0
        for piece in pieces:
            os.write(fd, piece)
            written += len(piece)
            data = partial + bytes(piece) if partial else bytes(piece)
            whole = len(data) - len(data) % BLOCK
            hashes.append(hash_blocks(self.params, memoryview(data)[:whole], BLOCK,
                                      self.params.slot_size))
            partial = data[whole:]
        if written != size:
            raise BadInputError(f"tar truncated: {size} bytes of data declared, {written} "
                                "found", entry=entry, offset=offset)
        if partial:
            hashes.append(hash_blocks(self.params, partial, BLOCK, self.params.slot_size))
        return b"".join(hashes)

    def _commit(self, tmp: str, built: BuiltTree, size: int) -> None:
        digest = built.fsverity_digest
        final = os.path.join(self.root, object_name(digest))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.chmod(tmp, 0o644)
        self._write_tree(built)
        try:
            os.link(tmp, final)  # never replaces: an object with this name has these bytes
        except FileExistsError:
            self.deduplicated += 1
            return
        self.stored += 1
        self.bytes_written += size

    def _write_tree(self, built: BuiltTree) -> None:
        """The object's tree beside it, unless the object is small (read whole) or the tree is
        there: a tree is a function of the object's bytes, so one already written is the same."""
        if not built.tree or built.data_size <= WHOLE_OBJECT_BYTES:
            return
        path = os.path.join(self.root, tree_name(built.fsverity_digest))
        if os.path.exists(path):
            return
        # renamed into place (a reader never sees half a tree); not fsynced, like the objects
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tree-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(built.tree)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.tree_bytes += len(built.tree)
