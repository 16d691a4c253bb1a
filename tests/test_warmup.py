"""What a daemon loads once it is idle after mounting, so that no request waits for it.

The decompressors (the compressed mappers, liblz4 or the codec modules of a layer's
algorithms) are imported at the first compressed read otherwise: 3 ms of CPU in the first
request of a cold bench mount, more with the modules' files out of the page cache.
"""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT, corpus
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
