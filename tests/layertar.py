"""Layer tars for the writer's tests (``TarBuilder``: ``devtools/tars.py``, shared with the
fuzzer), and the reference view of one: what GNU tar extracts.

``reference_view`` extracts with GNU tar exactly as the differ issue says
(``tar --xattrs --xattrs-include='*' --numeric-owner -xpf``), then turns OCI whiteouts into
overlay form the way the writer's ``--whiteouts overlay`` must (char 0:0 device without
permission bits, owner and mtime of the ``.wh.`` entry; ``trusted.overlay.opaque=y`` for
``.wh..wh..opq``; an empty ``trusted.overlay.origin`` on a directory that got a whiteout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from typing import Iterator

from helpers import kernel_erofs, require_tool
from treeview import TreeView, view_of_dir, view_of_image

from devtools.tars import TarBuilder  # noqa: F401 - the tests' tar builder, shared
from erofs_fuse.erofs.image import Image


def gnu_tar_of(src: str, out: str, *options: str) -> None:
    """GNU tar's archive of ``src``; with xattrs and ACLs in the formats that hold them."""
    tar = require_tool("tar")
    pax = not any(o.startswith("--format=") and o != "--format=posix" for o in options)
    extra = ["--xattrs", "--xattrs-include=*", "--acls"] if pax else []
    proc = subprocess.run([tar, *extra, "--numeric-owner", *options, "-cf", out, "-C", src, "."],
                          capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, f"GNU tar failed: {proc.stderr}"


def _last_positions(tar_path: str) -> dict[str, int]:
    """Each member path (normalised as tar extracts it) and the index of its last entry."""
    out: dict[str, int] = {}
    with tarfile.open(tar_path, encoding="utf-8", errors="surrogateescape") as tar:
        for k, member in enumerate(tar):
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            out["/".join(parts)] = k
    return out


def _whiteouts_to_overlay(root: str, order: dict[str, int]) -> None:
    """A ``.wh.NAME`` becomes the whiteout NAME, unless NAME came again after it in the stream
    (then the later entry stands, as the writer keeps tar order)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(filenames + dirnames):
            if not name.startswith(".wh."):
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if name == ".wh..wh..opq":
                os.unlink(path)
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                continue
            target = os.path.join(dirpath, name[4:])
            rel = os.path.relpath(path, root)
            rel_target = os.path.relpath(target, root)
            if order.get(rel_target, -1) > order.get(rel, -1):
                os.unlink(path)  # re-created after its whiteout: the later entry wins
                os.setxattr(dirpath, "trusted.overlay.origin", b"")
                continue
            if os.path.lexists(target) and not os.path.islink(target) and os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.unlink(target)
            os.unlink(path) if not stat.S_ISDIR(st.st_mode) else shutil.rmtree(path)
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0))
            os.chmod(target, 0)
            os.chown(target, st.st_uid, st.st_gid)
            os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
            os.setxattr(dirpath, "trusted.overlay.origin", b"")


@contextlib.contextmanager
def extracted(tar_path: str, *, overlay_whiteouts: bool = True,
              tar_options: tuple[str, ...] = ()) -> Iterator[str]:
    """GNU tar's extraction of ``tar_path`` (whiteouts converted), removed afterwards."""
    tar = require_tool("tar")
    dest = tempfile.mkdtemp(prefix="erofs-ref-")
    os.chmod(dest, 0o755)
    try:
        proc = subprocess.run([tar, "--xattrs", "--xattrs-include=*", "--numeric-owner",
                               *tar_options, "-xpf", tar_path, "-C", dest],
                              capture_output=True, text=True, errors="replace")
        assert proc.returncode == 0, f"GNU tar failed: {proc.stderr}"
        if overlay_whiteouts:
            _whiteouts_to_overlay(dest, _last_positions(tar_path))
        yield dest
    finally:
        shutil.rmtree(dest)


def reference_view(tar_path: str, *, overlay_whiteouts: bool = True,
                   tar_options: tuple[str, ...] = ()) -> TreeView:
    with extracted(tar_path, overlay_whiteouts=overlay_whiteouts,
                   tar_options=tar_options) as dest:
        return view_of_dir(dest)


def kernel_view(image: str) -> TreeView:
    with kernel_erofs(image) as mnt:
        return view_of_dir(mnt)


def reader_view(image: str) -> TreeView:
    with Image.open(image) as img:
        return view_of_image(img)


def fsck(image: str) -> None:
    fsck_erofs = require_tool("fsck.erofs")
    proc = subprocess.run([fsck_erofs, image], capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, f"fsck.erofs rejects {image}: {proc.stdout}{proc.stderr}"
    newer = os.environ.get("EROFS_UTILS_BIN")
    if newer:
        proc = subprocess.run([os.path.join(newer, "fsck.erofs"), image], capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"newer fsck.erofs rejects {image}: {proc.stderr}"


def assert_same(expected: TreeView, actual: TreeView, what: str) -> None:
    diff = expected.diff(actual)
    assert not diff, f"{what} differs from GNU tar's extraction:\n" + "\n".join(diff)


def check_image_views(tar: str, image: str, *, tar_index: bool = False) -> None:
    """The image reads as GNU tar extracts ``tar``: fsck, the kernel and our reader."""
    if not tar_index:
        fsck(image)
    ref = reference_view(tar)
    assert_same(ref, kernel_view(image), "the kernel's view")
    assert_same(ref, reader_view(image), "our reader's view")
