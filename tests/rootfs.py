"""What a container's root must be, shared by the containerd tests: a tree of layers with every
kind of entry and overlay rule, and the oracle a running container's root filesystem is compared
with (the kernel's overlayfs over GNU tar's extraction of the same layers)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ctrstack import SNAPSHOTTER, Stack
from layertar import extracted
from mounting import kernel_overlay
from ocilayout import (LayerBlob, Layout, busybox_entries, chardev, directory, file, hardlink,
                       opaque, symlink, whiteout)
from treeview import TreeView, view_of_dir

# security.capability, VFS_CAP_REVISION_2 with the effective bit: cap_net_bind_service=ep
CAP_NET_BIND = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


def tree_layers(layout: Layout) -> list[LayerBlob]:
    """Two layers holding every kind of entry and overlay rule a root filesystem meets."""
    base = layout.layer(busybox_entries() + [
        directory("run"),  # a mountpoint runc would otherwise create in the container's upper
        file("etc/hello", "hello\n", origin="layer 1"),
        file("bin/suid", b"#!/bin/sh\n", mode=0o4755,
             raw_xattrs={"security.capability": CAP_NET_BIND}),
        file("bin/sgid", b"#!/bin/sh\n", mode=0o2711),
        directory("data"), file("data/orig", "linked\n", a="1", b="2"),
        hardlink("data/link", "data/orig"), hardlink("data/link2", "data/orig"),
        symlink("lnk", "etc/hello"), symlink("dangling", "/nowhere"),
        directory("devs"), chardev("devs/null", 1, 3), chardev("devs/tty", 5, 0, 0o620),
        directory("shared", 0o3777),
        file("gone.txt", "deleted by layer 2\n"),
        directory("gonedir"), file("gonedir/f", "gone with its directory\n"),
        directory("opq"), file("opq/old", "hidden by the opaque dir\n"),
        directory("opq/sub"), file("opq/sub/deep", "hidden too\n"),
        directory("keep"), file("keep/a", "a\n"),
    ])
    top = layout.layer([
        whiteout("gone.txt"), whiteout("gonedir"),
        opaque("opq"), file("opq/new", "new\n"),
        file("etc/hello", "hello again\n", origin="layer 2"),  # replaced, other xattr value
        file("data/two", "two\n"), hardlink("data/two-link", "data/two"),
        file("keep/b", "b\n", mode=0o600),
        file("lnk2", "a file where layer 1 had nothing\n"),
        symlink("keep/up", "../etc/hello"),
    ])
    return [base, top]


def assert_rootfs_is_kernel_overlay(stack: Stack, image: str, layer_tars: list[Path],
                                    *cmd: str) -> TreeView:
    """Run ``cmd`` (one that waits) in a container of ``image`` and compare its whole root
    filesystem, as the host sees it, with the kernel's overlayfs over ``layer_tars`` (bottom
    first) extracted by GNU tar, whiteouts in overlay form: our writer, reader and FUSE mount
    are all outside that oracle. The container's view is returned."""
    cid = "t-compare"
    with contextlib.ExitStack() as es:
        stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, image, cid, *cmd)
        es.callback(stack.remove_container, cid)
        ours = view_of_dir(str(stack.rootfs(cid)))
        lowers = [es.enter_context(extracted(str(tar))) for tar in layer_tars]
        kernel = view_of_dir(es.enter_context(kernel_overlay(lowers[::-1])))
    diff = kernel.diff(ours)
    assert not diff, f"the root filesystem of a container of {image} differs from the " \
        "kernel's overlay:\n" + "\n".join(diff)
    return ours
