"""What ``scripts/bench-convert`` runs: the cases (one command each) and their comparisons.

A layer case turns one gzip layer tar (or its extracted tree) into something a snapshotter can
use; an image case does so for every layer of an OCI image. Each names the C tool it is
compared with: ``new`` (erofs-utils 1.9.3's ``mkfs.erofs --tar``, from ``EROFS_UTILS_BIN``),
``tar`` (GNU ``tar -xzf``: containerd's overlayfs snapshotter) and ``old`` (the 1.5 path of
Debian's erofs-utils: ``tar -xzf``, then ``mkfs.erofs`` of the directory).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from devtools.bench.inputs import ImageInput, LayerInput
from devtools.bench.proc import TIME

CLI = [sys.executable, "-m", "erofs_fuse"]
EXTRACT_PLUS_OLD = "tar -xzf + mkfs.erofs 1.5"  # derived: the sum of the two rows' medians


@dataclass(frozen=True)
class Tools:
    mkfs_old: str           # Debian's mkfs.erofs (1.5 on Debian 12)
    mkfs_new: str | None    # erofs-utils 1.9.3's, or None
    old_version: str
    new_version: str | None


@dataclass(frozen=True)
class Case:
    name: str
    tool: str
    ours: bool
    argv: Callable[[Tools, LayerInput, Path], list[str]]
    needs_new: bool = False
    vs_new: str | None = None   # the case compared with, in each column
    vs_tar: str | None = None
    vs_old: str | None = None


@dataclass(frozen=True)
class ImageCase:
    name: str
    tool: str
    ours: bool
    argv: Callable[[ImageInput, Path], list[str]]


def _img(out: Path) -> str:
    return str(out / "layer.erofs")


def _tree(out: Path) -> str:
    """Where a case extracts (the runner sets trees aside instead of deleting them at once)."""
    path = out / "tree"
    path.mkdir(exist_ok=True)
    return str(path)


def _new(tools: Tools) -> str:
    assert tools.mkfs_new is not None
    return tools.mkfs_new


LAYER_CASES = [
    Case("convert", "erofs-fuse", True,
         lambda t, i, o: [*CLI, "convert", i.tar, _img(o)],
         vs_new="mkfs.erofs --tar=f --aufs", vs_tar="tar -xzf", vs_old=EXTRACT_PLUS_OLD),
    Case("convert --tar-index", "erofs-fuse", True,
         lambda t, i, o: [*CLI, "convert", "--tar-index", i.tar, _img(o)],
         vs_new="mkfs.erofs --tar=i --aufs", vs_tar="tar -xzf", vs_old=EXTRACT_PLUS_OLD),
    Case("convert --compress lz4", "erofs-fuse", True,
         lambda t, i, o: [*CLI, "convert", "--compress", "lz4", i.tar, _img(o)],
         vs_new="mkfs.erofs --tar=f --aufs -zlz4", vs_tar="tar -xzf", vs_old=EXTRACT_PLUS_OLD),
    Case("convert DIR", "erofs-fuse", True,
         lambda t, i, o: [*CLI, "convert", i.tree, _img(o)],
         vs_old="mkfs.erofs 1.5 DIR"),
    Case("mkfs.erofs --tar=f --aufs", "erofs-utils 1.9.3", False,
         lambda t, i, o: [_new(t), "--quiet", "--tar=f", "--aufs", "--ungzip", _img(o), i.tar],
         needs_new=True),
    Case("mkfs.erofs --tar=i --aufs", "erofs-utils 1.9.3", False,
         lambda t, i, o: [_new(t), "--quiet", "--tar=i", "--aufs",
                          f"--ungzip={o / 'layer.tar'}", _img(o), i.tar],
         needs_new=True),
    Case("mkfs.erofs --tar=f --aufs -zlz4", "erofs-utils 1.9.3", False,
         lambda t, i, o: [_new(t), "--quiet", "--tar=f", "--aufs", "--ungzip", "-zlz4",
                          _img(o), i.tar],
         needs_new=True),
    Case("tar -xzf", "GNU tar", False,
         lambda t, i, o: ["tar", "-xzf", i.tar, "-C", _tree(o)]),
    Case("mkfs.erofs 1.5 DIR", "erofs-utils (Debian)", False,
         lambda t, i, o: [t.mkfs_old, "--quiet", _img(o), i.tree]),
]

IMAGE_CASES = [
    ImageCase("convert-image -j 1", "erofs-fuse", True,
              lambda i, o: [*CLI, "convert-image", "-q", "-j", "1", i.layout, str(o / "out")]),
    ImageCase("convert-image -j 2", "erofs-fuse", True,
              lambda i, o: [*CLI, "convert-image", "-q", "-j", "2", i.layout, str(o / "out")]),
    ImageCase("tar -xzf, layer after layer", "GNU tar", False,
              lambda i, o: ["sh", "-c", 'out=$1; shift; k=0; for t; do k=$((k+1)); '
                            'mkdir "$out/$k" && tar -xzf "$t" -C "$out/$k" || exit 1; done',
                            "sh", _tree(o), *(layer.tar for layer in i.layers)]),
]


def find_tools() -> Tools:
    """The tools every run needs (one line and exit 1 if one is missing) and, when
    ``EROFS_UTILS_BIN`` names them (a directory holding mkfs.erofs, or the binary), 1.9.3's."""
    for tool in ("tar", "gzip", "mkfs.erofs", "sh", TIME):
        if shutil.which(tool) is None:
            sys.exit(f"bench-convert: {tool} is not installed (scripts/install-deps installs it)")
    old = shutil.which("mkfs.erofs")
    assert old is not None
    new = None
    where = os.environ.get("EROFS_UTILS_BIN")
    if where:
        new = os.path.join(where, "mkfs.erofs") if os.path.isdir(where) else where
        if not os.access(new, os.X_OK):
            sys.exit(f"bench-convert: EROFS_UTILS_BIN={where}: no executable mkfs.erofs there")
    return Tools(old, new, mkfs_version(old), mkfs_version(new) if new else None)


def mkfs_version(path: str) -> str:
    import subprocess

    proc = subprocess.run([path, "--version"], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("mkfs.erofs") and "unrecognized" not in line:
            return line.strip()
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "erofs-utils"],
                          capture_output=True, text=True)
    return f"erofs-utils {proc.stdout.strip() or '?'} (dpkg)"
