"""What a daemon does once its mount answers (the kernel's INIT request served).

The read-ahead, which the INIT reply sets, is raised by the first request served after it, so
that a workload started right after the mount command returns (before INIT: the kernel holds
its first request until then) reads with it from the start. The decompressors (the compressed
mappers, liblz4 or the codec modules of a layer's algorithms) are loaded at the loop's first
idle moment; the first compressed read waited for them otherwise (3 ms of CPU, more with the
modules' files out of the page cache). Then (``fuse/warmup.py``) the objects of start-up are
frozen and the cyclic collector runs less often (``tune_gc``), and glibc's malloc keeps large
replies on its heap (``tune_malloc``); the verified layers' hash trees are loaded ahead in
``test_integrity_mount.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT, corpus
from erofs_fuse.fuse.daemon import READ_AHEAD_KB
from erofs_fuse.fuse.warmup import GC_THRESHOLDS
from mounting import daemon_pids, fuse_mount, wait_until

PROBE = """
import sys
from erofs_fuse.erofs.image import Image
image = Image.open(sys.argv[1])
before = "erofs_fuse.erofs.zmap" in sys.modules
image.load_decoders()
with open("/proc/self/maps") as maps:
    print(before, "erofs_fuse.erofs.zmap" in sys.modules, "liblz4" in maps.read())
"""


def _loaded(image: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, image], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    return proc.stdout.strip()


def test_an_image_with_compression_loads_its_decoders_when_asked() -> None:
    assert _loaded(corpus("lz4.erofs")) == "False True True"


def test_an_image_without_compression_loads_none() -> None:
    assert _loaded(corpus("plain.erofs")) == "False False False"


def test_a_mount_loads_its_decoders_once_it_answers_before_any_read() -> None:
    with fuse_mount([corpus("lz4.erofs")]) as m:
        (pid,) = daemon_pids(m.mountpoint)

        def lz4_mapped() -> bool:
            with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
                return "liblz4" in maps.read()

        wait_until(lz4_mapped, what="liblz4 in the daemon, nothing read")


def _read_ahead_kb(mountpoint: str) -> int:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        devs = [line.split()[2] for line in f if line.split()[4] == mountpoint]
    with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", encoding="ascii") as f:
        return int(f.read())


def test_the_first_request_served_raises_the_read_ahead() -> None:
    # not a poll of the loop, which left the mmaps of a workload's executables at 128 KiB
    with fuse_mount([corpus("lz4.erofs")]) as m:
        os.stat(m.mountpoint)  # the first request: served after the INIT reply
        assert _read_ahead_kb(m.mountpoint) == READ_AHEAD_KB


GC_PROBE = """
import gc
from erofs_fuse.fuse.warmup import tune_gc
tune_gc()
print(gc.get_freeze_count() > 1000, gc.get_threshold())
"""


def _collector_after_tuning(**env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True,
                          cwd=ROOT, check=True, env={**os.environ, **env})
    return proc.stdout.strip()


def test_tune_gc_freezes_start_up_and_collects_less_often() -> None:
    assert _collector_after_tuning() == f"True {GC_THRESHOLDS}"


def test_tune_gc_leaves_the_collector_alone_when_asked() -> None:
    import gc

    defaults = gc.get_threshold()  # pytest's own interpreter: untouched
    assert _collector_after_tuning(EROFS_FUSE_GC="default") == f"False {defaults}"


def test_a_mount_tunes_its_collector_once_it_answers() -> None:
    with fuse_mount([corpus("plain.erofs")], "--debug") as m:
        os.listdir(m.mountpoint)

        def tuned() -> bool:
            with open(m.log, encoding="utf-8") as f:
                return "start-up objects frozen" in f.read()

        wait_until(tuned, what="the collector tuned")


MALLOC_PROBE = """
from erofs_fuse.fuse.warmup import tune_malloc
print(tune_malloc())
"""


def test_tune_malloc_keeps_large_replies_on_the_heap() -> None:
    # glibc here: the thresholds are set (mallopt answers 1)
    proc = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert proc.stdout.strip() == "True"
    proc = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True,
                          cwd=ROOT, check=True, env={**os.environ, "EROFS_FUSE_MALLOC": "default"})
    assert proc.stdout.strip() == "False"
