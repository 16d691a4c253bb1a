"""The inputs of ``scripts/bench-convert``: gzip layer tars, their extracted trees, OCI images.

* ``layer0``..``layer2``: the Debian root filesystem of ``scripts/rootfs-demo`` as OCI layer
  tars: its debootstrap tree (``base``) and its two overlayfs upper directories (``upper1``:
  ``apt-get install hello`` then ``apt-get clean``; ``upper2``: deletions and replacements),
  whiteouts turned from overlay form (char 0:0 devices, ``trusted.overlay.opaque``) into OCI
  form (``.wh.NAME``, ``.wh..wh..opq``) and overlayfs' own ``trusted.overlay.*`` xattrs dropped,
  as a containerd or Docker diff does. Each is ``tar --format=posix --sort=name
  --numeric-owner --xattrs`` (PAX records only where an entry needs one) through ``gzip -n``
  (level 6, the OCI tools' default). rootfs-demo's trees are used in place when present;
  otherwise rootfs-demo runs (debootstrap; network via apt's own mirror) in the work directory.
* ``small``: 100,000 small regular files (16 B - 8 KiB, log-uniform) in 2,000 directories.
* ``big`` (``--big``): 200,000 files, ~2 GB: 85% small as above, 15% larger ones sized so that
  the total comes to ~2 GB.
* ``211-a``, ``211-b``, ``211-c``: three synthetic layers sized 2:1:1 (the image on which
  ``convert-image -j 2`` can ideally be twice as fast as ``-j 1``).

Synthetic file data is cut from a 16 MiB pool, half Python source text, half random bytes, so
it compresses about as a rootfs does. Everything is deterministic and built once into the work
directory (``inputs/``; ``trees/`` holds the extractions), keyed by the parameters it was made
with; delete the directory to rebuild.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from devtools import ROOT
from devtools.bench.layers import ROOTFS_DEMO_BASE, log, run
from devtools.tars import ustar_header

sys.path.insert(0, str(ROOT / "tests"))
from ocilayout import MTIME, OCI_LAYER, LayerBlob, Layout  # noqa: E402

FILES_PER_DIR = 100
SMALL_MIN, SMALL_MAX, LARGE_MIN = 16, 8192, 16384
LARGE_SHARE = 0.15
POOL_BYTES = 16 << 20
TAR_OPTIONS = ["--format=posix", "--pax-option=delete=atime,delete=ctime,delete=mtime",
               "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name"]


@dataclass(frozen=True)
class LayerInput:
    name: str
    what: str
    tar: str            # the gzip layer tar
    tree: str           # its extraction by GNU tar (made once; the input of the dir cases)
    tar_bytes: int      # uncompressed tar bytes (what MB/s counts)
    gz_bytes: int
    entries: int        # tar members of every type (what files/s counts)
    files: int          # regular files among them
    diff_id: str


@dataclass(frozen=True)
class ImageInput:
    name: str
    what: str
    layout: str
    layers: tuple[LayerInput, ...]


@dataclass(frozen=True)
class Synthetic:
    files: int
    total: int | None   # target bytes of file data; None: all files small
    seed: int


# a cache of built things, keyed by what they were made from ------------------------------------
def _cached(meta: Path, key: dict[str, object], build: Callable[[], dict[str, object]]
            ) -> dict[str, object]:
    if meta.exists():
        doc: dict[str, object] = json.loads(meta.read_text())
        if doc.get("key") == key:
            return doc
    doc = {"key": key, **build()}
    meta.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def tar_stats(gz: Path) -> dict[str, object]:
    """Uncompressed size, diff_id, members and regular files of a gzip tar (Python's tarfile:
    a reader independent of the one being measured)."""
    digest = hashlib.sha256()
    size = 0

    class Hashing:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def read(self, n: int = -1) -> bytes:
            nonlocal size
            data = self.f.read(n)
            digest.update(data)
            size += len(data)
            return data

    entries = files = 0
    with gzip.open(gz, "rb") as f:
        stream = Hashing(f)  # type: ignore[arg-type]
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                entries += 1
                files += member.isreg()
        while stream.read(1 << 20):
            pass
    return {"tar_bytes": size, "gz_bytes": gz.stat().st_size, "entries": entries,
            "files": files, "diff_id": "sha256:" + digest.hexdigest()}


def extract(gz: Path, dest: Path) -> None:
    """``dest`` as GNU tar extracts the layer (once)."""
    if dest.is_dir():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run(["tar", "-xzf", str(gz), "-C", str(tmp)])
    tmp.rename(dest)


def _layer(work: Path, name: str, what: str, key: dict[str, object],
           make: Callable[[Path], None]) -> LayerInput:
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    gz, tree = inputs / f"{name}.tar.gz", work / "trees" / name

    def build() -> dict[str, object]:
        log(f"input {name}: {what}")
        shutil.rmtree(tree, ignore_errors=True)
        tmp = gz.with_name(gz.name + ".tmp")
        make(tmp)
        tmp.rename(gz)
        return tar_stats(gz)

    doc = _cached(inputs / f"{name}.json", key, build)
    if not gz.exists():
        (inputs / f"{name}.json").unlink()
        return _layer(work, name, what, key, make)
    extract(gz, tree)
    return LayerInput(name, what, str(gz), str(tree), int(doc["tar_bytes"]),  # type: ignore
                      int(doc["gz_bytes"]), int(doc["entries"]), int(doc["files"]),  # type: ignore
                      str(doc["diff_id"]))


# synthetic layers ------------------------------------------------------------------------------
def _log_uniform(rnd: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rnd.uniform(math.log(lo), math.log(hi))))


def _large_top(count: int, mean: float) -> int:
    """The upper bound H of a log-uniform [LARGE_MIN, H] with the given mean (bisection)."""
    lo, hi = 2.0 * LARGE_MIN, float(1 << 36)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if (mid - LARGE_MIN) / math.log(mid / LARGE_MIN) < mean:
            lo = mid
        else:
            hi = mid
    return int(hi)


def file_sizes(spec: Synthetic) -> list[int]:
    rnd = random.Random(spec.seed)
    if spec.total is None:
        return [_log_uniform(rnd, SMALL_MIN, SMALL_MAX) for _ in range(spec.files)]
    large = int(spec.files * LARGE_SHARE)
    small = [_log_uniform(rnd, SMALL_MIN, 2 * SMALL_MAX) for _ in range(spec.files - large)]
    mean = max(spec.total - sum(small), LARGE_MIN * large) / max(large, 1)
    top = _large_top(large, mean)
    sizes = small + [_log_uniform(rnd, LARGE_MIN, top) for _ in range(large)]
    rnd.shuffle(sizes)
    return sizes


def _pool(seed: int) -> bytes:
    """Half Python source (text), half random bytes."""
    text = bytearray()
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= POOL_BYTES // 2:
            break
    return bytes(text[:POOL_BYTES // 2]) + random.Random(seed).randbytes(POOL_BYTES // 2)


def write_synthetic(out: Path, spec: Synthetic, head: bytes = b"") -> None:
    """A gzip layer tar of ``spec.files`` regular files under ``d??/??/``, after the tar
    members ``head`` (whole 512-byte blocks) if given."""
    assert len(head) % 512 == 0
    rnd = random.Random(spec.seed + 1)
    pool = _pool(spec.seed)
    with open(out, "wb") as f:
        gz = subprocess.Popen(["gzip", "-n", "-c"], stdin=subprocess.PIPE, stdout=f,
                              bufsize=1 << 20)
        assert gz.stdin is not None
        put = gz.stdin.write
        written = put(head)
        for k, size in enumerate(file_sizes(spec)):
            if k % (FILES_PER_DIR * 100) == 0:
                written += put(ustar_header(f"d{k // 10000:02d}/", tarfile.DIRTYPE, 0, MTIME))
            if k % FILES_PER_DIR == 0:
                written += put(ustar_header(f"d{k // 10000:02d}/{k // 100 % 100:02d}/",
                                         tarfile.DIRTYPE, 0, MTIME))
            written += put(ustar_header(f"d{k // 10000:02d}/{k // 100 % 100:02d}/f{k:06d}",
                                     tarfile.REGTYPE, size, MTIME))
            start = rnd.randrange(len(pool) - min(size, len(pool) - 1))
            data = (pool[start:start + size] if size <= len(pool)
                    else (pool * -(-size // len(pool)))[:size])
            written += put(data + bytes(-size % 512))
        written += put(bytes(1024))
        put(bytes(-written % 10240))  # GNU tar's record size
        gz.stdin.close()
        if gz.wait():
            raise RuntimeError(f"gzip failed ({gz.returncode})")


def synthetic_layer(work: Path, name: str, spec: Synthetic, what: str) -> LayerInput:
    return _layer(work, name, what, {"synthetic": asdict(spec), "version": 2},
                  lambda out: write_synthetic(out, spec))


# the Debian layers of scripts/rootfs-demo ------------------------------------------------------
def rootfs_demo_trees(work: Path) -> Path:
    """A rootfs-demo work directory holding ``base``, ``upper1`` and ``upper2``: the default
    one when complete, else one built in ``work/rootfs`` by running rootfs-demo."""
    for candidate in (ROOTFS_DEMO_BASE.parent, work / "rootfs"):
        if all((candidate / d).is_dir() for d in ("base", "upper1", "upper2")) and \
                (candidate / "layer2.erofs").exists():
            return candidate
    own = work / "rootfs"
    log(f"building the Debian layers with scripts/rootfs-demo {own} (debootstrap: minutes)")
    run([str(ROOT / "scripts" / "rootfs-demo"), str(own)], work / "rootfs-demo.log")
    return own


def _tar_gz_of(src: Path, out: Path) -> None:
    names = sorted(os.listdir(src))
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(src), *TAR_OPTIONS, "-cf", "-", "--", *names],
                               stdout=subprocess.PIPE)
        gz = subprocess.run(["gzip", "-n", "-c"], stdin=tar.stdout, stdout=f)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() or gz.returncode:
            raise RuntimeError(f"tar | gzip of {src} failed ({tar.returncode}, {gz.returncode})")


def to_oci_whiteouts(stage: Path) -> None:
    """Turn an overlayfs upper directory (a copy) into what an OCI layer tar holds; the
    directories' mtimes are kept."""
    _drop_overlay_xattrs(str(stage))
    for dirpath, dirnames, filenames in os.walk(stage):
        times = os.lstat(dirpath)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if _drop_overlay_xattrs(path):  # opaque
                marker = os.path.join(path, ".wh..wh..opq")
                Path(marker).touch(0o644)
                os.utime(marker, ns=(st.st_mtime_ns, st.st_mtime_ns))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)
                marker = os.path.join(dirpath, ".wh." + name)
                Path(marker).touch(0o644)
                os.utime(marker, ns=(st.st_mtime_ns, st.st_mtime_ns))
        os.utime(dirpath, ns=(times.st_atime_ns, times.st_mtime_ns))


def _drop_overlay_xattrs(path: str) -> bool:
    """Remove overlayfs' own xattrs; whether the entry was an opaque directory."""
    opaque = False
    for xattr in os.listxattr(path, follow_symlinks=False):
        if xattr.startswith("trusted.overlay."):
            if xattr == "trusted.overlay.opaque":
                opaque = os.getxattr(path, xattr, follow_symlinks=False) == b"y"
            os.removexattr(path, xattr, follow_symlinks=False)
    return opaque


def _upper_tar_gz(upper: Path, out: Path) -> None:
    stage = out.with_name(out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    run(["cp", "-a", str(upper), str(stage)])
    try:
        to_oci_whiteouts(stage)
        _tar_gz_of(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def debian_layers(work: Path) -> list[LayerInput]:
    demo = rootfs_demo_trees(work)
    stamp = int((demo / "layer2.erofs").stat().st_mtime)
    parts = [("base", "Debian bookworm minbase (rootfs-demo layer 0, debootstrap)", _tar_gz_of),
             ("upper1", "rootfs-demo layer 1: apt-get install hello, apt-get clean (whiteouts)",
              _upper_tar_gz),
             ("upper2", "rootfs-demo layer 2: docs deleted, a dir replaced by a file",
              _upper_tar_gz)]
    out = []
    for k, (sub, what, make) in enumerate(parts):
        src = demo / sub
        out.append(_layer(work, f"layer{k}", what,
                          {"rootfs-demo": str(src), "built": stamp, "version": 1},
                          lambda path, src=src, make=make: make(src, path)))  # type: ignore
    return out


# OCI images ------------------------------------------------------------------------------------
def oci_image(work: Path, name: str, what: str, layers: list[LayerInput]) -> ImageInput:
    """An OCI image layout of ``layers`` (bottom first); blobs are the layer files' bytes."""
    from erofs_fuse.oci.image import host_platform

    root = work / "images" / name
    key = [layer.diff_id for layer in layers]
    meta = root / "bench-layers.json"
    if not (meta.exists() and json.loads(meta.read_text()) == key):
        shutil.rmtree(root, ignore_errors=True)
        layout = Layout(root)
        blobs = [LayerBlob(layout.blob(Path(layer.tar).read_bytes(), OCI_LAYER + "+gzip"),
                           layer.diff_id, b"")  # the tar itself is not needed: left empty
                 for layer in layers]
        layout.write_index([layout.image(blobs, arch=host_platform().architecture)])
        meta.write_text(json.dumps(key))
    return ImageInput(name, what, str(root), tuple(layers))
