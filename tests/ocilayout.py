"""Build OCI image layouts and archives in tests, with tarfile, gzip, zstandard and json only.

``Layout(root)`` writes ``oci-layout`` and content-addressed blobs; ``layer()`` returns the
descriptor of a layer blob with the diff_id of its tar; ``image()`` writes a config and a
manifest; ``write_index()`` writes index.json. ``archive()`` tars a layout into an OCI archive.
Everything is deterministic (gzip mtime 0, fixed tar mtimes), so equal inputs make equal blobs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import zstandard

from devtools.tars import ustar_header

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_700_000_000


# layer tars ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A tar entry: kind is file, dir, symlink, hardlink, chardev, whiteout (``.wh.NAME``),
    opaque (``DIR/.wh..wh..opq``). Xattr values are bytes (binary ones too)."""

    kind: str
    path: str
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    xattrs: tuple[tuple[str, bytes], ...] = ()
    rdev: tuple[int, int] = (0, 0)


def file(path: str, data: bytes | str, mode: int = 0o644, *,
         raw_xattrs: dict[str, bytes] | None = None, **xattrs: str) -> Entry:
    """A regular file; ``xattrs`` are user.NAME=VALUE, ``raw_xattrs`` full names with any
    bytes as values (``security.capability``); both become PAX SCHILY.xattr records."""
    items = [(f"user.{k}", v.encode()) for k, v in xattrs.items()]
    items += list((raw_xattrs or {}).items())
    return Entry("file", path, data.encode() if isinstance(data, str) else data, mode=mode,
                 xattrs=tuple(items))


def directory(path: str, mode: int = 0o755) -> Entry:
    return Entry("dir", path, mode=mode)


def symlink(path: str, target: str) -> Entry:
    return Entry("symlink", path, target=target, mode=0o777)


def hardlink(path: str, target: str) -> Entry:
    return Entry("hardlink", path, target=target)


def chardev(path: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry("chardev", path, mode=mode, rdev=(major, minor))


def whiteout(path: str) -> Entry:
    return Entry("whiteout", path)


def opaque(path: str) -> Entry:
    return Entry("opaque", path)


def tar_bytes(entries: Sequence[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      errors="surrogateescape") as tar:
        for e in entries:
            _add(tar, e)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, e: Entry) -> None:
    path, data = e.path, b""
    info = tarfile.TarInfo()
    info.mtime, info.mode, info.uid, info.gid = MTIME, e.mode, 0, 0
    if e.kind == "whiteout":
        head, base = os.path.split(path)
        path = os.path.join(head, ".wh." + base)
    elif e.kind == "opaque":
        path = os.path.join(path, ".wh..wh..opq")
    info.name = path
    # bytes that are not UTF-8 go out raw (tarfile then writes hdrcharset=BINARY)
    info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                        for k, v in e.xattrs}
    if e.kind in ("file", "whiteout", "opaque"):
        data = e.data
        info.size = len(data)
    elif e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    elif e.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, e.target
    elif e.kind == "chardev":
        info.type, (info.devmajor, info.devminor) = tarfile.CHRTYPE, e.rdev
    else:
        raise ValueError(e.kind)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def many_files_tar(count: int, size: int = 64) -> bytes:
    """A tar of ``count`` small files under ``many/`` (headers packed directly: fast)."""
    parts = [ustar_header("many", tarfile.DIRTYPE, 0, MTIME)]
    pad = bytes(-size % 512)
    for k in range(count):
        parts.append(ustar_header(f"many/{k // 1000}/f{k}", tarfile.REGTYPE, size, MTIME))
        parts.append(f"{k:0{size}d}".encode()[:size] + pad)
    parts.append(bytes(1024))
    return b"".join(parts)


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# layouts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerBlob:
    descriptor: dict[str, Any]
    diff_id: str
    tar: bytes


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
        digest = sha256(data)
        self.blob_path(digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def json_blob(self, doc: Any, media_type: str, **extra: Any) -> dict[str, Any]:
        return self.blob(json.dumps(doc).encode(), media_type, **extra)

    def layer(self, entries: Sequence[Entry] | bytes, compression: str | None = "gzip",
              media_type: str | None = None) -> LayerBlob:
        """A layer blob of a tar of ``entries`` (or of that tar itself)."""
        tar = entries if isinstance(entries, bytes) else tar_bytes(entries)
        if media_type is None:
            media_type = OCI_LAYER + ({"gzip": "+gzip", "zstd": "+zstd"}.get(compression or "", ""))
        return LayerBlob(self.blob(compress(tar, compression), media_type), sha256(tar), tar)

    def image(self, layers: Sequence[LayerBlob], *, os_: str = "linux", arch: str = "amd64",
              variant: str | None = None, diff_ids: Sequence[str] | None = None,
              docker: bool = False, platform: bool = False,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """Config and manifest; the manifest's descriptor (with ``platform`` if asked)."""
        config: dict[str, Any] = {
            "architecture": arch, "os": os_,
            "rootfs": {"type": "layers",
                       "diff_ids": list(diff_ids if diff_ids is not None
                                        else [layer.diff_id for layer in layers])},
            "config": {}}
        if variant:
            config["variant"] = variant
        cdesc = self.json_blob(config, DOCKER_CONFIG if docker else OCI_CONFIG)
        mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mtype, "config": cdesc,
                    "layers": [layer.descriptor for layer in layers]}
        extra: dict[str, Any] = {}
        if platform:
            extra["platform"] = {"os": os_, "architecture": arch,
                                 **({"variant": variant} if variant else {})}
        if annotations:
            extra["annotations"] = annotations
        return self.json_blob(manifest, mtype, **extra)

    def index(self, manifests: Sequence[dict[str, Any]], *, docker: bool = False,
              **extra: Any) -> dict[str, Any]:
        mtype = DOCKER_LIST if docker else OCI_INDEX
        doc = {"schemaVersion": 2, "mediaType": mtype, "manifests": list(manifests)}
        return self.json_blob(doc, mtype, **extra)

    def write_index(self, manifests: Sequence[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(manifests)}
        (self.root / "index.json").write_text(json.dumps(doc))


def archive(layout: Path, out: Path, *, prefix: str = "") -> Path:
    """An OCI archive of ``layout`` (members sorted, ``prefix`` before each name)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=prefix + str(path.relative_to(layout)), recursive=False)
    return out


def ref(name: str) -> dict[str, dict[str, str]]:
    return {"annotations": {"org.opencontainers.image.ref.name": name}}


def busybox_entries(busybox: str = "/bin/busybox") -> list[Entry]:
    """A one-file root filesystem: ``/bin/busybox`` (a static busybox, the Debian package
    busybox-static) and the directories a runtime mounts over."""
    with open(busybox, "rb") as f:
        data = f.read()
    return [directory("bin"), file("bin/busybox", data, mode=0o755), directory("etc"),
            directory("proc"), directory("sys"), directory("dev"), directory("tmp", 0o1777)]
