"""Metadata-only files of overlayfs and composefs: the ``trusted.overlay.metacopy`` and
``trusted.overlay.redirect`` xattrs (kernel ``Documentation/filesystems/overlayfs.rst``,
"Metadata only copy up", "Data-only lower layers" and "Verity"; ``fs/overlayfs/util.c``
``ovl_check_metacopy_xattr`` and ``ovl_get_redirect_xattr``).

A regular file carrying ``metacopy`` has its attributes here and its bytes elsewhere: in a
data-only layer (an object store), at the absolute path named by ``redirect``. The xattr's
value is empty (plain overlayfs) or ``struct ovl_metacopy``::

    u8 version;      /* 0 */
    u8 len;          /* size of the whole value: 4 + digest length */
    u8 flags;
    u8 digest_algo;  /* FS_VERITY_HASH_ALG_SHA256 = 1, SHA512 = 2; 0 with no digest */
    u8 digest[];     /* the object's fs-verity digest */

Parsing only: no I/O. Opening and verifying objects is ``erofs_fuse.objects``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MetacopyError

METACOPY_XATTR = b"trusted.overlay.metacopy"
REDIRECT_XATTR = b"trusted.overlay.redirect"
METACOPY_MIN_SIZE = 4
METACOPY_MAX_SIZE = 4 + 64
# FS_VERITY_HASH_ALG_* -> (name, digest size)
DIGEST_ALGS = {1: ("sha256", 32), 2: ("sha512", 64)}
MAX_REDIRECT = 4096


@dataclass(frozen=True, slots=True)
class Metacopy:
    """What a metadata-only file says about its data: where (``redirect``, raw, may be None)
    and, when given, the fs-verity digest of the object (``alg`` ``sha256``/``sha512``)."""

    redirect: bytes | None
    alg: str | None = None
    digest: bytes | None = None

    @property
    def digest_text(self) -> str | None:
        if self.digest is None:
            return None
        return f"{self.alg}:{self.digest.hex()}"


def parse_metacopy(value: bytes, redirect: bytes | None) -> Metacopy:
    """Decode the ``metacopy`` xattr (with the ``redirect`` one, if any). A malformed value,
    or a digest whose length is not its algorithm's, is refused (``MetacopyError``): such a
    file gets no bytes at all rather than unchecked ones."""
    if not value:
        return Metacopy(redirect)
    if not METACOPY_MIN_SIZE <= len(value) <= METACOPY_MAX_SIZE:
        raise MetacopyError(f"metacopy xattr of {len(value)} bytes (4..68 expected)")
    version, length, _flags, algo = value[:4]
    if version != 0 or length != len(value):
        raise MetacopyError(
            f"metacopy xattr version {version}, length field {length} for {len(value)} bytes")
    if length == METACOPY_MIN_SIZE:
        return Metacopy(redirect)
    if algo not in DIGEST_ALGS:
        raise MetacopyError(f"metacopy digest algorithm {algo} unknown (1 sha256, 2 sha512)")
    alg, size = DIGEST_ALGS[algo]
    digest = value[4:]
    if len(digest) != size:
        raise MetacopyError(f"metacopy {alg} digest of {len(digest)} bytes ({size} expected)")
    return Metacopy(redirect, alg, digest)


def redirect_components(redirect: bytes | None) -> list[str]:
    """The path components of an absolute redirect, as the object is looked up from a data
    directory's root. Refused: none, a relative one (the kernel follows only absolute
    redirects into data-only layers), empty components (as ``ovl_get_redirect_xattr``), and
    ``.``/``..`` (the kernel's lookup stays beneath the layer root; we refuse them outright)."""
    if redirect is None:
        raise MetacopyError("metacopy file without a redirect: no object named")
    shown = redirect.decode(errors="replace")
    if not redirect.startswith(b"/") or len(redirect) > MAX_REDIRECT or b"\0" in redirect:
        raise MetacopyError(f"redirect {shown!r} is not an absolute path")
    parts = redirect[1:].split(b"/")
    for part in parts:
        if part in (b"", b".", b".."):
            raise MetacopyError(f"redirect {shown!r} refused: empty, '.' or '..' component")
    return [part.decode("utf-8", errors="surrogateescape") for part in parts]
