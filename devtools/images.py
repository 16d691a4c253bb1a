"""OCI archives of the Debian three-layer root filesystems, for ``ctr images import``.

* ``demo``: the layers of ``scripts/rootfs-demo`` (debootstrap minbase; ``apt-get install
  hello``; deletions and replacements), the layer tars of ``scripts/bench-convert``
  (``devtools.bench.inputs.debian_layers``). The slow test of ``tests/test_snapshotter.py``
  runs it.
* ``python``: the layers of ``scripts/bench`` (``bench_layers.build``: python3, perl and
  ca-certificates installed in layer 1), turned into layer tars the same way: overlay-form
  whiteouts become OCI ``.wh.`` entries, overlayfs' own xattrs are dropped, GNU tar through
  ``gzip -n``. ``scripts/bench-snapshotter`` imports it (its python workload needs python3).

Everything is built once into the work directory and reused (keyed by the trees it was made
of); the archive holds one image whose index ``ctr images import --index-name NAME`` names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devtools import ROOT
from devtools.bench import inputs
from devtools.bench import layers as bench_layers

sys.path.insert(0, str(ROOT / "tests"))
from ocilayout import archive  # noqa: E402

DEFAULT_WORK = Path("/var/tmp/erofs-fuse-bench-snapshotter")


def python_layers(work: Path) -> list[inputs.LayerInput]:
    """scripts/bench's stack (built if missing) as gzip OCI layer tars."""
    bench = bench_layers.build(Path("/var/tmp/erofs-fuse-bench"))[0].parent
    base = bench_layers.base_dir(bench, None)
    stamp = int((bench / "layer2.erofs").stat().st_mtime)
    parts = [(base, "Debian bookworm minbase (scripts/bench layer 0)", inputs._tar_gz_of),
             (bench / "upper1", "scripts/bench layer 1: apt-get install python3 perl "
              "ca-certificates", inputs._upper_tar_gz),
             (bench / "upper2", "scripts/bench layer 2: docs deleted, a dir replaced by a file",
              inputs._upper_tar_gz)]
    for src, _, _ in parts[1:]:
        if not src.is_dir():
            sys.exit(f"{src} is missing: delete {bench} to rebuild scripts/bench's layers")
    return [inputs._layer(work, f"py-layer{k}", what,
                          {"tree": str(src), "built": stamp, "version": 1},
                          lambda path, src=src, make=make: make(src, path))  # type: ignore
            for k, (src, what, make) in enumerate(parts)]


def oci_archive(which: str, work: Path = DEFAULT_WORK) -> tuple[Path, list[Path]]:
    """The OCI archive of the ``demo`` or ``python`` image, built if missing or stale, and
    its gzip layer tars (bottom first)."""
    work.mkdir(parents=True, exist_ok=True)
    layers = inputs.debian_layers(work) if which == "demo" else python_layers(work)
    image = inputs.oci_image(work, which, f"Debian, {which} layers", layers)
    out = work / f"{which}.oci.tar"
    stamp = Path(image.layout) / "bench-layers.json"  # rewritten when the layout is
    if not out.exists() or out.stat().st_mtime < stamp.stat().st_mtime:
        tmp = out.with_name(out.name + ".tmp")
        archive(Path(image.layout), tmp)
        os.replace(tmp, out)
    return out, [Path(layer.tar) for layer in layers]


if __name__ == "__main__":
    for name in sys.argv[1:] or ["demo", "python"]:
        print(oci_archive(name)[0])
