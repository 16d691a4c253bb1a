"""What a mount's daemon does once it answers (the kernel's INIT request served; ``warm_up``,
called by either request loop): load the decompressors, tune Python's collector and glibc's
malloc for serving, and load the verified layers' hash trees ahead. Each is a hint: the daemon
serves the same bytes without it.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import TYPE_CHECKING

from ..erofs.image import Image

if TYPE_CHECKING:
    from .operations import Operations

log = logging.getLogger(__name__)


def warm_up(ops: Operations) -> None:
    """All of it, once the mount answers, in either request loop."""
    # the decompressors now, which the first compressed read would otherwise wait for (3 ms of
    # CPU, more with the modules' files cold)
    try:
        ops.tree.load_decoders()
    except Exception:  # a hint: a read that needs a codec loads (or misses) it again
        log.exception("loading the decompressors")
    tune_gc()
    tune_malloc()
    # not for remote layers: their trees would be fetched whole before anything is read
    if not ops.blocking_reads and os.environ.get("EROFS_FUSE_TREE") != "lazy":
        threading.Thread(target=load_trees, args=(ops.tree.images,), name="load-trees",
                         daemon=True).start()


def load_trees(images: list[Image]) -> None:
    """Load the verified layers' Merkle trees whole (``VerifiedBlob.load_tree``), in a thread
    of its own (its reads and hashing leave the GIL to the request loop). A verified read
    otherwise waits, on a cold page cache, for the leaf that checks its blocks as well as for
    the blocks: a container's first command (``sh -c 'echo ok'``) on a fresh verified chain
    mount of the bench layers, caches dropped, took 20.0 ms instead of 24.7 (paired 0.788, 11
    rounds; the kernel's unverified erofs 14.1 ms), its python imports 1.3% less. A tree is
    1/128 of its layer (SHA-256, 4 KiB blocks), read in one pass per level and kept in the
    blob's tree cache. ``EROFS_FUSE_TREE=lazy`` leaves every tree block to the read that needs
    it, to compare."""
    from ..verity.blob import VerifiedBlob

    for image in images:
        for blob in (image.blob, *image.device_blobs):
            if isinstance(blob, VerifiedBlob):
                try:
                    loaded = blob.load_tree()
                except Exception as exc:  # a hint: reads verify lazily all the same
                    log.info("%s: hash tree not loaded ahead: %s", blob.name, exc)
                    continue
                log.debug("%s: hash tree %s", blob.name, "loaded" if loaded else "left lazy")


# Python's cyclic collector, as the daemon serves. What it keeps (nodes, parsed inodes, listings,
# attributes) lives until forgotten and holds no cycles, yet every collection of the young
# generation scans it once more and each collection of the middle one scans all of it again.
# With the interpreter's defaults (700, 10, 10), a fresh mount's cold walk of the bench stack
# spent 8.1 ms in 55 collections and its read-all 38 ms (one full collection 20 ms, a pause
# of a single request); with these thresholds and the start-up objects frozen, 3.6 and 7.4 ms,
# none of them of the middle or old generation (one run each; the python imports 1.6 -> 0 ms).
# A cycle of garbage waits for 5,000 new objects at most.
GC_THRESHOLDS = (5000, 20, 100)


# glibc's malloc, as the daemon serves. A read's reply is a new object of up to 1 MiB; by default
# malloc maps one that large afresh (its threshold adapts, then falls back as the heap top is
# trimmed), so each reply's pages fault in and are zeroed by the kernel again: 0.5 ms per MiB
# here. Served from the heap below these thresholds, with up to 16 MiB kept free at its top:
# a cold read of the bench stack's 48 MiB lz4hc file took 74 ms instead of 127 (7 interleaved
# rounds; read-all paired 0.986, the python imports 0.970).
MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def tune_malloc() -> bool:
    """Set ``MALLOC_MMAP_THRESHOLD`` and ``MALLOC_TRIM_THRESHOLD`` where the C library is
    glibc; whether it was. ``EROFS_FUSE_MALLOC=default`` leaves malloc as it is, to compare."""
    if os.environ.get("EROFS_FUSE_MALLOC") == "default":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def tune_gc() -> None:
    """Freeze what start-up made (modules, codecs: never garbage, never scanned again) and
    collect less often (``GC_THRESHOLDS``); ``EROFS_FUSE_GC=default`` keeps Python's
    collector as it is, to compare."""
    if os.environ.get("EROFS_FUSE_GC") == "default":
        return
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.debug("collector: %d start-up objects frozen, thresholds %s", gc.get_freeze_count(),
              GC_THRESHOLDS)
