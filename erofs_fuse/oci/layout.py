"""Where an OCI image's blobs are: a layout directory or an OCI archive, read in place.

Spec: OCI image-spec v1.1 ``image-layout.md``: a layout holds ``oci-layout`` (the version
marker), ``index.json`` and ``blobs/<alg>/<hex>``; an OCI archive is a tar of one. An archive is
indexed once (headers only: tarfile seeks over the data) and never extracted: a blob is a
``BlobLocation``, a byte range of a regular file, which a worker process can open and stream
(``BlobReader``, ``BlobStream``).

Hostile input: an archive member whose name is absolute or climbs out with ``..`` refuses the
whole archive, as does a name present twice (which of the two would count?); a blob reached
through a symlink must stay inside the layout directory; only regular files are read (opened
with O_NONBLOCK: a FIFO must not hang us), never past their recorded size. Small blobs are read
only up to a limit and checked against their digest; a streamed blob is hashed as it goes and
``BlobStream.finish`` refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import Any, Callable

MAX_ARCHIVE_MEMBERS = 1 << 20
MAX_MARKER_BYTES = 4096


class OciError(Exception):
    """An image that cannot be read or is refused; ``str()`` is one line naming where."""


def parse_json(data: bytes, where: str) -> dict[str, Any]:
    """A JSON object; anything else (or hostile nesting: RecursionError) is an OciError."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise OciError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(value, dict):
        raise OciError(f"{where}: expected a JSON object")
    return value


@dataclass(frozen=True)
class BlobLocation:
    """A blob's bytes: ``size`` bytes at ``offset`` of the regular file ``path`` (a layout's
    blob file, or an archive holding it). Picklable, so a worker process can open it."""

    path: str
    offset: int
    size: int


class BlobReader(io.RawIOBase):
    """The bytes of a ``BlobLocation``, read positionally (``os.preadv``), never past ``size``."""

    def __init__(self, loc: BlobLocation) -> None:
        super().__init__()
        self._loc = loc
        self._pos = 0
        self._fd = _open_regular(loc.path, "blob")
        try:
            if os.fstat(self._fd).st_size < loc.offset + loc.size:
                raise OciError(f"{loc.path}: truncated: the blob at offset {loc.offset} needs "
                               f"{loc.size} bytes")
        except BaseException:
            os.close(self._fd)
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._loc.size - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [view[:want]], self._loc.offset + self._pos)
        if got == 0:
            raise OciError(f"{self._loc.path}: truncated while reading the blob at offset "
                           f"{self._loc.offset + self._pos}")
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _open_regular(path: str, what: str) -> int:
    """A descriptor of the regular file ``path`` (O_NONBLOCK: a FIFO must not hang us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise OciError(f"{path}: cannot open {what}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OciError(f"{path}: {what} is not a regular file")
    return fd


def read_location(loc: BlobLocation) -> bytes:
    with BlobReader(loc) as reader:
        data = reader.read()
    assert isinstance(data, bytes)
    return data


class Layout:
    """Files of an image layout by name (``index.json``, ``blobs/sha256/<hex>``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def find(self, name: str) -> BlobLocation | None:
        raise NotImplementedError

    def read_file(self, name: str, limit: int) -> bytes:
        loc = self.find(name)
        if loc is None:
            raise OciError(f"{self.source}: no {name}: not an OCI image layout")
        if loc.size > limit:
            raise OciError(f"{self.source}: {name} has {loc.size} bytes, more than {limit}")
        return read_location(loc)

    def locate(self, digest: str, size: int, where: str) -> BlobLocation:
        """The blob ``digest`` (a checked ``sha256:<hex>``), which must exist with exactly
        the ``size`` its descriptor says."""
        loc = self.find("blobs/sha256/" + digest.removeprefix("sha256:"))
        if loc is None:
            raise OciError(f"{where}: blob {digest} is missing from {self.source}")
        if loc.size != size:
            raise OciError(f"{where}: blob {digest} has {loc.size} bytes, its descriptor "
                           f"says {size}")
        return loc

    def read_blob(self, digest: str, size: int, limit: int, where: str) -> bytes:
        """A small blob (manifest, index, config), checked against its digest."""
        if size > limit:
            raise OciError(f"{where}: {size} bytes, more than the {limit} allowed")
        data = read_location(self.locate(digest, size, where))
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise OciError(f"{where}: blob {digest} hashes to {actual}: corrupt or "
                           "tampered with")
        return data


class _LayoutDir(Layout):
    def __init__(self, source: str) -> None:
        super().__init__(source)
        self._root = os.path.realpath(source)

    def find(self, name: str) -> BlobLocation | None:
        real = os.path.realpath(os.path.join(self._root, name))
        if not real.startswith(self._root + os.sep):
            raise OciError(f"{self.source}: {name} is a symlink leading out of the layout")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OciError(f"{self.source}: {name}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise OciError(f"{self.source}: {name} is not a regular file")
        return BlobLocation(real, 0, st.st_size)


class _LayoutArchive(Layout):
    """A tar of a layout, indexed once (headers only: tarfile seeks over the data)."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self._path = os.path.abspath(source)
        self._members: dict[str, tarfile.TarInfo] = {}
        fd = _open_regular(source, "archive")
        with os.fdopen(fd, "rb") as f:
            head = f.read(4)
            if head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd":
                raise OciError(f"{source}: a compressed archive: decompress it first (layers "
                               "are streamed in place from a plain tar)")
            f.seek(0)
            self._size = os.fstat(fd).st_size
            self._index(f)

    def _index(self, f: io.BufferedReader) -> None:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for count, member in enumerate(tar):
                    if count >= MAX_ARCHIVE_MEMBERS:
                        raise OciError(f"{self.source}: more than {MAX_ARCHIVE_MEMBERS} members")
                    self._add(member)
        except tarfile.TarError as exc:
            raise OciError(f"{self.source}: not a readable tar archive ({exc})") from None

    def _add(self, member: tarfile.TarInfo) -> None:
        name = _member_name(member.name)
        if name is None:
            raise OciError(f"{self.source}: archive member {member.name[:200]!r} leads out of "
                           "the layout")
        if name in self._members:
            raise OciError(f"{self.source}: archive holds {name!r} twice")
        if member.isdir():
            return
        if member.offset_data + member.size > self._size:
            raise OciError(f"{self.source}: member {name!r} runs past the end of the archive")
        self._members[name] = member

    def find(self, name: str) -> BlobLocation | None:
        member = self._members.get(name)
        if member is None:
            return None
        if not member.isreg() or member.issparse():
            raise OciError(f"{self.source}: member {name} is not a plain regular file")
        return BlobLocation(self._path, member.offset_data, member.size)


def _member_name(raw: str) -> str | None:
    """``raw`` relative to the layout root, or None if it is absolute or climbs out."""
    if raw.startswith("/"):
        return None
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def open_layout(source: str) -> Layout:
    """A layout directory or an archive, with a version-1 ``oci-layout`` file."""
    layout: Layout = _LayoutDir(source) if os.path.isdir(source) else _LayoutArchive(source)
    marker = parse_json(layout.read_file("oci-layout", MAX_MARKER_BYTES), f"{source}: oci-layout")
    version = marker.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise OciError(f"{source}: oci-layout: unsupported imageLayoutVersion {version!r}")
    return layout


class CheckedStream(io.RawIOBase):
    """A blob read as a stream and checked against its digest: ``finish()`` reads what the
    consumer left and raises (an ``OciError``) if the whole does not hash to the digest. A
    layer blob in a layout or archive (``BlobStream``), or in a registry."""

    def finish(self) -> None:
        raise NotImplementedError


class BlobStream(CheckedStream):
    """A (layer) blob as a stream, hashed as it is read; ``on_read(n)`` hears the bytes read
    so far (and may raise to stop the reader). ``finish()`` reads what the consumer left (tar
    padding, a compressed stream's trailer) and checks the digest; ``name`` is for messages."""

    def __init__(self, loc: BlobLocation, digest: str, name: str,
                 on_read: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._digest = digest
        self._name = name
        self._blob = BlobReader(loc)
        self._hash = hashlib.sha256()
        self._on_read = on_read
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._blob.readinto(view)
        self._hash.update(view[:n])
        self.consumed += n
        if self._on_read is not None:
            self._on_read(self.consumed)
        return n

    def finish(self) -> None:
        chunk = bytearray(1 << 20)
        while self.readinto(chunk):
            pass
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise OciError(f"{self._name}: blob {self._digest} hashes to {actual}: corrupt or "
                           "tampered with")

    def close(self) -> None:
        self._blob.close()
        super().close()
