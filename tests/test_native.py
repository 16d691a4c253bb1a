"""The modules mypyc compiles (erofs_fuse/native.py): compiled where installed, the same results
as their Python sources, and never a stale compiled copy in place of an edited source."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_fuse import native
from erofs_fuse.erofs.errors import ErofsError
from helpers import corpus

# a file of each layout: flat, inline, compact and full indexes, fragments, tail packing,
# dedupe, each algorithm, metabox, 48-bit, dot-omitted directories, xattrs of an aufs layer
IMAGES = ("plain.erofs", "noinline.erofs", "compact.erofs", "lz4-fragments.erofs",
          "lz4-ztailpacking.erofs", "lz4-dedupe.erofs", "lzma-mixed.erofs", "deflate.erofs",
          "zstd-extents.erofs", "metabox.erofs", "plain-48bit.erofs", "dot-omitted.erofs",
          "layer-upper-aufs.erofs")

# every file's bytes and every entry's metadata, hashed, as the reader gives them
SUMMARY = """
import hashlib, json, sys
from erofs_fuse import native
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse import overlay
out = {"compiled": native.is_compiled(overlay)}
for path in sys.argv[1:]:
    h = hashlib.sha256()
    with Image.open(path) as image:
        for name, inode in image.walk():
            h.update(name + b"%o %d %d %d" % (inode.mode, inode.size, inode.uid, inode.mtime))
            if inode.is_reg:
                h.update(inode.read(0, inode.size))
            elif inode.is_symlink:
                h.update(inode.readlink())
    out[path] = h.hexdigest()
print(json.dumps(out))
"""


def summary(paths: list[str], **env: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", SUMMARY, *paths], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=Path(__file__).parent.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_the_request_path_is_compiled() -> None:
    # scripts/install-deps builds them (setup.py); a failed or skipped build fails here, as
    # does a source edited since the build (its compiled copy is then set aside)
    if native.pure_requested():
        pytest.fail("EROFS_FUSE_PURE is set: these tests would not run the compiled modules")
    assert native.stale_modules() == [], "sources edited since the build: run scripts/install-deps"
    loose = [m for m in native.COMPILED
             if not native.is_compiled(importlib.import_module(f"erofs_fuse.{m}"))]
    assert loose == [], f"not compiled: {loose}; run scripts/install-deps"


def test_compiled_and_python_sources_read_every_layout_alike() -> None:
    paths = [corpus(name) for name in IMAGES]
    compiled = summary(paths)
    pure = summary(paths, EROFS_FUSE_PURE="1")
    assert compiled.pop("compiled") is True and pure.pop("compiled") is False
    assert compiled == pure


def _subclasses(cls: type[ErofsError]) -> list[type[ErofsError]]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def test_compiled_exceptions_keep_their_class_attributes() -> None:
    # mypyc makes a plain class attribute an instance default, which an exception without an
    # __init__ of its own never sets: BlobIOError once logged "error", not "I/O error"
    for module in native.COMPILED:
        importlib.import_module(f"erofs_fuse.{module}")
    kinds = {cls.__name__: cls.kind for cls in _subclasses(ErofsError)}
    assert all(isinstance(kind, str) for kind in kinds.values()), kinds
    assert kinds["BlobIOError"] == "I/O error"
    from erofs_fuse.blob import BlobIOError
    assert str(BlobIOError("gone", image="L", offset=8)) == "L: I/O error at offset 8: gone"


def test_a_stale_compiled_module_is_noticed(tmp_path: Path) -> None:
    module = native.COMPILED[0]
    source = Path(native.source_path(module, str(tmp_path)))
    built = source.with_name(source.stem + ".cpython-311-x86_64-linux-gnu.so")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("")
    built.write_bytes(b"")
    os.utime(source, (1000, 1000))
    os.utime(built, (2000, 2000))
    assert native.stale_modules(str(tmp_path)) == []
    os.utime(source, (3000, 3000))
    assert native.stale_modules(str(tmp_path)) == [module]
    built.unlink()  # no compiled copy: nothing to set aside
    assert native.stale_modules(str(tmp_path)) == []


def test_a_stale_compiled_module_gives_way_to_every_source(tmp_path: Path) -> None:
    # a copy of the package whose one compiled module is older than its source: all of the
    # listed modules then load from their sources (compiled ones call each other directly)
    package = Path(native.PACKAGE_DIR)
    copy = tmp_path / "erofs_fuse"
    subprocess.run(["cp", "-a", str(package), str(copy)], check=True)
    os.utime(copy / "erofs" / "inode.py")  # now: newer than its compiled copy
    probe = ("import json, importlib; from erofs_fuse import native; print(json.dumps("
             "[native.is_compiled(importlib.import_module('erofs_fuse.' + m)) "
             "for m in native.COMPILED]))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == [False] * len(native.COMPILED)
