"""The shared layer files under ``ROOT/layers``: one sealed layer (and its tree beside it,
``FILE.verity``) per diff_id, taken in from a client's converted file or a CRI fetch, shared by
every snapshot of that diff_id in every namespace. The store is their reference count: every
row naming a file is a user of it, and the file goes with the last (core.py); at start, files no
row names (a crash before the row, or after its removal) are swept."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from typing import Iterable

log = logging.getLogger("erofs_fuse.snapshotter")

LAYERS = "layers"


class SharedLayers:
    """The files of ``<root>/layers``; ``lock`` (the snapshotter's) guards the set of
    temporary files being written, which the sweep spares."""

    def __init__(self, root: str, lock: threading.RLock) -> None:
        self.root = root
        self.dir = os.path.join(root, LAYERS)
        os.makedirs(self.dir, exist_ok=True)
        self.lock = lock
        self.installing: set[str] = set()  # temporary files of layers being taken in

    @staticmethod
    def name_of(diff_id: str) -> str:
        """The shared layer of ``diff_id`` (sha256:HEX), relative to the root."""
        return os.path.join(LAYERS, f"sha256-{diff_id.removeprefix('sha256:')}.erofs")

    @staticmethod
    def is_shared(layer: str) -> bool:
        """Whether a row's ``layer`` is a shared file (not a snapshot's own, not lazy)."""
        return layer.startswith(LAYERS + os.sep)

    @staticmethod
    def held_diff_ids(layers: Iterable[str]) -> set[str]:
        """The diff_ids of the shared files among a store's ``layers``."""
        prefix = os.path.join(LAYERS, "sha256-")
        return {"sha256:" + layer[len(prefix):].removesuffix(".erofs")
                for layer in layers if layer.startswith(prefix)}

    def take_in(self, source: str, layer: str) -> None:
        """Link (or, across file systems, copy) ``source`` and its tree to ``layer``: the tree
        first, each under a temporary name renamed when complete and durable."""
        dest = os.path.join(self.root, layer)
        for suffix in (".verity", ""):
            tmp = f"{dest}{suffix}.{os.getpid()}-{threading.get_ident()}.tmp"
            with self.lock:
                self.installing.add(tmp)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                try:
                    os.link(source + suffix, tmp)
                except OSError:
                    shutil.copyfile(source + suffix, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, dest + suffix)
            finally:
                with self.lock:
                    self.installing.discard(tmp)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def remove(self, layer: str) -> None:
        for suffix in ("", ".verity"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, layer + suffix))
        log.info("removed %s: no snapshot uses it", layer)

    def sweep(self, used: set[str]) -> None:
        """Remove the files no row names (``used``: the store's layers) and temporary files
        no take-in is writing."""
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            rel = os.path.join(LAYERS, name.removesuffix(".verity"))
            if path in self.installing or (rel in used and not name.endswith(".tmp")):
                continue
            log.info("removing %s: no snapshot uses it", path)
            with contextlib.suppress(OSError):
                os.unlink(path)
