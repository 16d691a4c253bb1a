"""OCI archives of the Debian three-layer root filesystems (and of a synthetic four-layer
image), for ``ctr images import`` and, as layout directories, for a registry.

* ``demo``: the layers of ``scripts/rootfs-demo`` (debootstrap minbase; ``apt-get install
  hello``; deletions and replacements), the layer tars of ``scripts/bench-convert``
  (``devtools.bench.inputs.debian_layers``). The slow test of ``tests/test_snapshotter.py``
  runs it.
* ``python``: the layers of ``scripts/bench`` (``bench_layers.build``: python3, perl and
  ca-certificates installed in layer 1), turned into layer tars the same way: overlay-form
  whiteouts become OCI ``.wh.`` entries, overlayfs' own xattrs are dropped, GNU tar through
  ``gzip -n``. ``scripts/bench-snapshotter`` imports it (its python workload needs python3).

* ``balanced``: four synthetic layers sized 2:1:1:1, about 400 MB of tar at ``scale`` 1
  (``devtools.bench.inputs``' files, half text, half random bytes, gzip), the bottom one
  beginning with a static busybox (``/bin/busybox``) so that the image runs.
  ``scripts/bench-pull`` pulls it; ``scale`` shrinks every layer alike.

Everything is built once into the work directory and reused (keyed by the trees it was made
of); the archive holds one image whose index ``ctr images import --index-name NAME`` names.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import sys
import tarfile
from pathlib import Path

from devtools import ROOT
from devtools.bench import inputs
from devtools.bench import layers as bench_layers
from devtools.tars import MTIME

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


BALANCED = [(8000, 160_000_000), (4000, 80_000_000), (4000, 80_000_000), (4000, 80_000_000)]
BUSYBOX = "/bin/busybox"  # static (Debian's busybox-static)


def busybox_head() -> bytes:
    """Tar members of a root that runs: /bin/busybox and the directories a runtime mounts
    over (no end-of-archive blocks: the synthetic files follow)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, mode in [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o755),
                           ("sys", 0o755), ("tmp", 0o1777)]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, MTIME
            tar.addfile(info)
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, MTIME
        tar.addfile(info, io.BytesIO(data))
        end = out.tell()  # before the end-of-archive blocks close() writes
    return out.getvalue()[:end]


def balanced_layers(work: Path, scale: float) -> list[inputs.LayerInput]:
    """Four synthetic gzip layers sized 2:1:1:1 (~400 MB of tar times ``scale``)."""
    out = []
    for k, (files, total) in enumerate(BALANCED):
        spec = inputs.Synthetic(max(int(files * scale), 20), int(total * scale), 40 + k)
        head = busybox_head() if k == 0 else b""
        key = {"synthetic": dataclasses.asdict(spec), "busybox": len(head), "version": 1}
        what = f"synthetic layer {k + 1} of 4, sized 2:1:1:1" + (
            ", with /bin/busybox" if head else "")
        out.append(inputs._layer(work, f"balanced-{scale:g}-{k}", what, key,
                                 functools.partial(_write_balanced, spec=spec, head=head)))
    return out


def _write_balanced(path: Path, *, spec: inputs.Synthetic, head: bytes) -> None:
    inputs.write_synthetic(path, spec, head)


def image_input(which: str, work: Path = DEFAULT_WORK, scale: float = 1.0) -> inputs.ImageInput:
    """The OCI layout of the ``demo``, ``python`` or ``balanced`` image (built if missing or
    stale; ``scale`` applies to ``balanced``)."""
    work.mkdir(parents=True, exist_ok=True)
    if which == "balanced":
        name = f"balanced-{scale:g}"
        return inputs.oci_image(work, name, "4 synthetic layers sized 2:1:1:1",
                                balanced_layers(work, scale))
    layers = inputs.debian_layers(work) if which == "demo" else python_layers(work)
    return inputs.oci_image(work, which, f"Debian, {which} layers", layers)


def oci_archive(which: str, work: Path = DEFAULT_WORK,
                scale: float = 1.0) -> tuple[Path, list[Path]]:
    """The OCI archive of the ``demo``, ``python`` or ``balanced`` image, built if missing or
    stale, and its gzip layer tars (bottom first)."""
    image = image_input(which, work, scale)
    layers = image.layers
    out = work / f"{Path(image.layout).name}.oci.tar"
    stamp = Path(image.layout) / "bench-layers.json"  # rewritten when the layout is
    if not out.exists() or out.stat().st_mtime < stamp.stat().st_mtime:
        tmp = out.with_name(out.name + ".tmp")
        archive(Path(image.layout), tmp)
        os.replace(tmp, out)
    return out, [Path(layer.tar) for layer in layers]


if __name__ == "__main__":
    for name in sys.argv[1:] or ["demo", "python"]:
        print(oci_archive(name)[0])
