"""``erofs-fuse info|ls|cat --image REF@sha256:DIGEST``: a pushed registry image read lazily,
as ``mount --image`` reads it (same cache, same verification), without mounting it.

``info`` shows each layer's superblock; ``ls`` and ``cat`` see the merged tree of all layers
(whiteouts and opaque directories applied), as the mount shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from ..console import CliError
from ..erofs.image import Image
from ..fuse.overlay import MergedTree, Node
from .info import print_listing, superblock_rows
from .lazy_mount import RemoteImage, check_pinned, open_remote_images

DEFAULT_FETCH_TIMEOUT = 10.0


def remote_of(args: argparse.Namespace) -> RemoteImage:
    from ..lazy import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE, DEFAULT_UNIT

    check_pinned(args.remote, f"{args.command}: --image")
    if args.device:
        raise CliError(f"{args.command}: --image and --device exclude each other")
    return RemoteImage(args.remote, args.plain_http,
                       os.path.abspath(args.cache_dir or DEFAULT_CACHE_DIR), DEFAULT_CACHE_SIZE,
                       "", DEFAULT_FETCH_TIMEOUT, DEFAULT_UNIT)


def with_images(args: argparse.Namespace, use: Callable[[list[Image]], int]) -> int:
    images = open_remote_images(remote_of(args), args.command)
    try:
        return use(images)
    finally:
        for image in images:
            image.close()


def info(args: argparse.Namespace) -> int:
    def show(images: list[Image]) -> int:
        for k, image in enumerate(images):
            rows = superblock_rows(image.name, image.superblock)
            width = max(len(key) for key, _ in rows)
            print(("\n" if k else "") + "\n".join(f"{key + ':':<{width + 1}} {value}"
                                                   for key, value in rows))
        return 0
    return with_images(args, show)


def lookup(tree: MergedTree, path: str) -> Node:
    node = tree.root
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or not node.is_dir:
            raise CliError(f"{path}: no such file or directory")
        found = tree.lookup(node, os.fsencode(part))
        if found is None:
            raise CliError(f"{path}: no such file or directory")
        node = found
    return node


def ls(args: argparse.Namespace, line: Callable[[str, Node], str]) -> int:
    def show(images: list[Image]) -> int:
        tree = MergedTree(images)
        print_listing(args.path, lookup(tree, args.path),
                      children=lambda d: ((os.fsdecode(raw), child)
                                          for raw, child in tree.listdir(d).entries),
                      is_dir=lambda n: n.is_dir, line=line, long=args.long,
                      recursive=args.recursive)
        return 0
    return with_images(args, show)


def cat(args: argparse.Namespace, write: Callable[[bytes], None]) -> int:
    def show(images: list[Image]) -> int:
        tree = MergedTree(images)
        node = lookup(tree, args.path)
        if node.is_dir:
            raise CliError(f"{args.path}: is a directory")
        if node.inode.is_symlink:
            write(tree.readlink(node))
            return 0
        pos = 0
        while pos < node.inode.size:
            chunk = tree.read(node, pos, 1 << 20)
            if not chunk:
                break
            write(chunk)
            pos += len(chunk)
        sys.stdout.buffer.flush()
        return 0
    return with_images(args, show)
