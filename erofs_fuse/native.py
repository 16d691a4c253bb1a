"""Which modules mypyc compiles, and the switch back to their Python sources.

The request path of a mount (the reader under ``erofs/``, the daemon's ``fuse/overlay.py``,
``fuse/operations.py`` and ``fuse/readahead.py``, the layer files' ``blob.py``, the block checks
of ``verity/`` and the object stores) runs as C compiled by mypyc from the same typed sources,
when the install could build it (setup.py; mypy --strict is what makes that possible). It is
the same code: the sources stay the reference, and every module still runs as plain Python
where the compiled one is absent. Measured in-process on the bench stack's recorded
requests: python imports 45-49 -> 29-37 ms of handler work, read-all 0.87-1.04 -> 0.46-0.52 s
(docs/benchmarks.md).

An editable install keeps the compiled modules beside their sources, where a source edited
after the build would be shadowed by its stale compiled copy. ``use_sources_if_needed`` (run
by the package's ``__init__``) notices that and imports every listed module from its source
instead: all of them, as compiled modules call each other directly, past the import system.
``EROFS_FUSE_PURE=1`` does the same on purpose: for profilers that see Python frames only, and
for tests and fault injection that replace methods, which compiled callers would not see.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# package-relative module names; setup.py reads this tuple from this file's text
COMPILED = (
    "blob", "object_prefetch", "object_worker", "objects",
    "erofs.decompress", "erofs.dirent", "erofs.extent", "erofs.image", "erofs.inode",
    "erofs.lru", "erofs.metacopy", "erofs.ondisk", "erofs.overlay_xattrs", "erofs.reader",
    "erofs.space", "erofs.superblock", "erofs.xattr", "erofs.zindex", "erofs.zmap",
    "fuse.operations", "fuse.overlay", "fuse.readahead",
    "verity.blob", "verity.build", "verity.formats", "verity.objects",
)
PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def source_path(module: str, package_dir: str = PACKAGE_DIR) -> str:
    return os.path.join(package_dir, *module.split(".")) + ".py"


def compiled_path(module: str, package_dir: str = PACKAGE_DIR) -> str | None:
    """The compiled module beside ``module``'s source, or None where there is none."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, *module.split(".")) + suffix
        if os.path.exists(path):
            return path
    return None


def stale_modules(package_dir: str = PACKAGE_DIR) -> list[str]:
    """The compiled modules older than their sources (edited since the build)."""
    stale = []
    for module in COMPILED:
        built = compiled_path(module, package_dir)
        try:
            edited = os.stat(source_path(module, package_dir)).st_mtime
        except FileNotFoundError:  # an install that ships the compiled modules alone
            continue
        if built is not None and os.stat(built).st_mtime < edited:
            stale.append(module)
    return stale


def pure_requested() -> bool:
    """Whether ``EROFS_FUSE_PURE`` asks for the Python sources (setup.py reads it alike)."""
    return os.environ.get("EROFS_FUSE_PURE", "") not in ("", "0")


def is_compiled(module: ModuleType) -> bool:
    return (module.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


class _SourcesFirst:
    """A meta path finder that gives the listed modules their ``.py`` loader."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = source_path(fullname[len(PACKAGE) + 1:])
        loader = importlib.machinery.SourceFileLoader(fullname, source)
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=source)
        spec.has_location = True  # sets __file__, as the path finder's specs do
        return spec


def use_sources_if_needed() -> None:
    """Import the listed modules from their sources where asked to or where a compiled copy
    is stale (see the module docstring); a no-op without compiled modules."""
    pure = pure_requested()
    if not pure and not stale_modules():
        return
    if pure and compiled_path(COMPILED[0]) is None:
        return
    names = frozenset(f"{PACKAGE}.{m}" for m in COMPILED)
    if not any(isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst(names))
