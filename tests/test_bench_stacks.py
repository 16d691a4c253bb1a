"""``devtools/bench/stacks.py``: the kernel reference of the container benchmarks (the kernel's
erofs and overlayfs over an erofs-fuse snapshotter's layer files, with an upper directory as a
container's root has)."""

from __future__ import annotations

import os
from pathlib import Path

from devtools.bench.stacks import KernelContainerStack, KernelStack, committed_layers
from helpers import corpus


def test_committed_layers_are_bottom_first(tmp_path: Path) -> None:
    """Snapshot ids in numeric order (10 after 3), only those holding a ``layer.erofs``: an
    active snapshot (``fs``/``work``) is no layer."""
    snapshots = tmp_path / "snapshots"
    for name, layer in (("10", True), ("2", True), ("7", False), ("3", True), ("x", True)):
        (snapshots / name).mkdir(parents=True)
        (snapshots / name / ("layer.erofs" if layer else "fs")).touch()
    assert committed_layers(tmp_path) == [snapshots / n / "layer.erofs" for n in ("2", "3", "10")]


def tree(root: str) -> dict[str, int]:
    """Path -> size of every entry below ``root``."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_size
    return out


def test_kernel_container_stack_is_the_read_only_stack_with_an_upper(tmp_path: Path) -> None:
    """The same merged tree as the kernel stack of ``scripts/bench`` over the same layers, and
    writable as a container's root is: a new file lands in its upper directory."""
    layers = [Path(corpus("layer-lower-oci.erofs")), Path(corpus("layer-upper-oci.erofs"))]
    plain = KernelStack(layers, tmp_path / "plain")
    container = KernelContainerStack(layers, tmp_path / "container")
    plain.mount()
    try:
        container.mount()
        try:
            assert tree(container.mnt) == tree(plain.mnt) != {}
            Path(container.mnt, "new-file").write_text("x")
            assert (container.base / "upper" / "new-file").read_text() == "x"
        finally:
            container.unmount()
    finally:
        plain.unmount()
