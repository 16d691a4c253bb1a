"""``erofs-fuse info``: what an image's superblock and device table say, and whether its files
hold that much.

Only the superblock and the device table are read, so an image is described even when its extra
devices are missing (each device's row says where its bytes are, or that its file is needed) or
its inodes are corrupt; a file shorter than the superblock says is described, then reported.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Sequence, TypeVar

from ..blob import FileBlob
from ..erofs import ondisk as d
from ..erofs.superblock import Device, SuperBlock, parse_superblock

Rows = list[tuple[str, str]]


def describe(image: str, devices: Sequence[str] = ()) -> tuple[Rows, str | None]:
    """The rows to show for ``image`` (with its device files, in table order) and, when a file
    is shorter than the superblock says, why. ``OSError`` if the image cannot be read,
    ``ErofsError`` if its superblock is not one."""
    blob = FileBlob(image)
    try:
        sb = parse_superblock(blob.read, blob.size, image)
        size = blob.size
    finally:
        blob.close()
    rows = superblock_rows(image, sb) + device_rows(sb, size, devices)
    return rows, short_of(image, size, sb, devices)


def utc(seconds: int, fmt: str) -> str:
    """A UTC time, or the raw number for one the platform cannot show (images hold any 64-bit
    number of seconds)."""
    try:
        return time.strftime(fmt, time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"@{seconds}"


def superblock_rows(image: str, sb: SuperBlock) -> Rows:
    rows = [
        ("image", image),
        ("block size", str(sb.block_size)),
        ("uuid", sb.uuid),
        ("volume name", sb.volume_name or "-"),
        ("build time", utc(sb.build_time, "%Y-%m-%d %H:%M:%S UTC")),
        ("inodes", str(sb.raw.inos)),
        ("blocks", str(sb.primary_blocks)),
        ("root nid", str(sb.root_nid)),
        ("features", " ".join(sb.feature_names()) or "-"),
        ("compression", " ".join(d.ALG_NAMES[a] for a in sorted(sb.available_algorithms))
         if sb.feature_incompat & (d.INCOMPAT_COMPR_CFGS | d.INCOMPAT_ZERO_PADDING) else "-"),
    ]
    if sb.packed_nid is not None:
        rows.append(("packed nid", str(sb.packed_nid)))
    if sb.metabox_nid is not None:
        rows.append(("metabox nid", str(sb.metabox_nid)))
    return rows


def device_rows(sb: SuperBlock, size: int, files: Sequence[str]) -> Rows:
    """One row per extra device: its table entry and where its bytes are to be found."""
    rows = [("extra devices", str(len(sb.devices)))]
    for k, dev in enumerate(sb.devices):
        # mkfs.erofs 1.5 (Debian 12) records no size for a --blobdev device
        blocks = f"{dev.blocks} blocks" if dev.blocks else "size not recorded"
        if k < len(files):
            where = f"file {files[k]}"
        elif flattened(dev, size, sb.block_size):
            where = f"in this file from block {dev.uniaddr}"
        else:
            where = "a file of its own, needed: give it with --device"
        tag = dev.tag.decode(errors="replace") or "-"
        rows.append((f"device {k + 1}", f"{blocks}, tag {tag}; {where}"))
    return rows


def flattened(dev: Device, size: int, bs: int) -> bool:
    """Whether the device follows the image in its file (mkfs.erofs records a place for it,
    block 0 meaning none, even when it writes the device to a file of its own)."""
    return dev.uniaddr > 0 and size > dev.uniaddr * bs


def short_of(image: str, size: int, sb: SuperBlock, files: Sequence[str]) -> str | None:
    """Why the image file (with its flattened devices) or a device file is shorter than the
    superblock says; None when none is."""
    bs = sb.block_size
    need = sb.primary_blocks * bs
    if not files:
        need = max([need, *((dev.uniaddr + dev.blocks) * bs for dev in sb.devices
                             if flattened(dev, size, bs))])
    if size < need:
        return (f"{image}: truncated: {size} bytes, the superblock says {need} "
                f"({need // bs} blocks of {bs})")
    for k, (dev, path) in enumerate(zip(sb.devices, files)):
        try:
            have = os.path.getsize(path)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if have < dev.blocks * bs:
            return f"{path}: truncated: {have} bytes, device {k + 1} has {dev.blocks * bs}"
    return None


N = TypeVar("N")


def print_listing(path: str, top: N, *, children: Callable[[N], Iterable[tuple[str, N]]],
                  is_dir: Callable[[N], bool], line: Callable[[str, N], str], long: bool,
                  recursive: bool) -> None:
    """``ls [-l] [-R] PATH`` of a local image or a merged remote one, as ls prints it:
    with -R, each directory under a ``PATH:`` heading, depth first in listing order."""
    if not is_dir(top):
        print(line(path, top) if long else path)
        return
    todo = [(path.rstrip("/") or "/", top)]
    first = True
    while todo:
        dir_path, node = todo.pop(0)
        if recursive:
            print(("" if first else "\n") + f"{dir_path}:")
        first = False
        subdirs = []
        for name, child in children(node):
            print(line(name, child) if long else name)
            if recursive and is_dir(child):
                subdirs.append((dir_path.rstrip("/") + "/" + name, child))
        todo[0:0] = subdirs
