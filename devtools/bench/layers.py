"""The layer stack of ``scripts/bench``: a Debian root filesystem as three EROFS layers.

  layer 0  ``debootstrap --variant=minbase bookworm`` (lz4hc-compressed); the apt lists and the
           .debs debootstrap leaves are kept, as in an image built by a plain ``debootstrap``
  layer 1  an overlayfs upper directory: ``apt-get install python3 perl ca-certificates``, then
           ``apt-get clean``
           (its deletions become whiteouts); uncompressed
  layer 2  an overlayfs upper directory: docs, man and info pages deleted (whiteouts),
           ``/usr/share/locale`` (a directory) replaced by a file, ``/etc/motd`` replaced, a
           script added; uncompressed

Built once into the work directory and reused (delete it to rebuild). The debootstrap tree of
``scripts/rootfs-demo`` (``/var/tmp/erofs-fuse-rootfs/base``) is reused when present, as a
read-only lower directory; otherwise debootstrap runs (needs the network).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

SUITE = "bookworm"
ROOTFS_DEMO_BASE = Path("/var/tmp/erofs-fuse-rootfs/base")
PACKAGES = ("python3", "perl", "ca-certificates")  # what layer 1 installs
LAYERS = ("layer0.erofs", "layer1.erofs", "layer2.erofs")
MIN_TREE_BYTES = 200 * 1000 * 1000
MIN_ENTRIES = 5000


def log(msg: str) -> None:
    print(f"== {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path | None = None, **kw: object) -> None:
    out = open(logfile, "ab") if logfile else subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore
    finally:
        if logfile:
            out.close()  # type: ignore[union-attr]
    if proc.returncode:
        tail = logfile.read_text(errors="replace").splitlines()[-8:] if logfile else []
        sys.exit(f"bench: {' '.join(cmd[:3])}... failed ({proc.returncode})\n" + "\n".join(tail))


def mirror() -> str:
    """The mirror apt itself uses for SUITE."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE)"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        uri, _, release = line.partition(" ")
        if release == SUITE:
            return uri
    return "http://deb.debian.org/debian/"


def base_dir(work: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    own = work / "base"
    if (own / "usr/bin/apt-get").exists():
        return own
    if (ROOTFS_DEMO_BASE.parent / "layer0.erofs").exists() and ROOTFS_DEMO_BASE.is_dir():
        return ROOTFS_DEMO_BASE  # rootfs-demo made its layer 0 of it: debootstrap finished
    m = mirror()
    log(f"layer 0: debootstrap --variant=minbase {SUITE} from {m} (a few minutes)")
    shutil.rmtree(own, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", SUITE, str(own), m], work / "debootstrap.log")
    return own


def with_overlay(work: Path, lower: str, upper: Path, body: Callable[[Path], None]) -> None:
    """Run ``body(merged)`` over an overlayfs (lower dirs top:...:bottom, upper dir ``upper``)
    with /dev and /proc provided for apt and dpkg."""
    merged, wdir = work / "merged", work / "overlay-work"
    shutil.rmtree(upper, ignore_errors=True)
    shutil.rmtree(wdir, ignore_errors=True)
    for p in (upper, wdir, merged):
        p.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={wdir}", str(merged)])
    try:
        run(["mount", "--bind", "/dev", str(merged / "dev")])
        run(["mount", "-t", "proc", "proc", str(merged / "proc")])
        body(merged)
    finally:
        for sub in ("proc", "dev", ""):
            subprocess.run(["umount", str(merged / sub) if sub else str(merged)],
                           capture_output=True)
        shutil.rmtree(wdir, ignore_errors=True)


def _layer1(work: Path) -> Callable[[Path], None]:
    def body(root: Path) -> None:
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        script = ("export DEBIAN_FRONTEND=noninteractive; apt-get -q update && "
                  "apt-get -q install -y --no-install-recommends -o Dpkg::Use-Pty=0 "
                  f"{' '.join(PACKAGES)} && "
                  "apt-get clean && rm -rf /var/log/apt /var/log/dpkg.log")
        run(["chroot", str(root), "/bin/sh", "-c", script], work / "layer1.log")
        (root / "etc/resolv.conf").unlink()
    return body


def _layer2(root: Path) -> None:
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "usr/share/locale").write_text("locales were removed in layer 2\n")
    (root / "etc/motd").write_text("A Debian stack served by erofs-fuse (layer 2 wrote this).\n")
    script = root / "usr/local/bin/layer-report"
    script.write_text("#!/bin/sh\ncat /etc/motd\npython3 --version\n")
    script.chmod(0o755)


def build(work: Path, base: Path | None = None) -> list[Path]:
    """The three layer images in ``work`` (bottom to top), built if missing."""
    if os.geteuid() != 0:
        sys.exit("bench: needs root (debootstrap, mounts, chroot, drop_caches)")
    work.mkdir(parents=True, exist_ok=True)
    paths = [work / name for name in LAYERS]
    if all(p.exists() for p in paths):
        return paths
    src = base_dir(work, base)
    log(f"building the layer stack in {work} (base tree {src})")
    if not paths[0].exists():
        log("layer 0: mkfs.erofs -zlz4hc")
        run(["mkfs.erofs", "--quiet", "-zlz4hc", f"{paths[0]}.tmp", str(src)])
        os.replace(f"{paths[0]}.tmp", paths[0])
    if not paths[1].exists():
        log(f"layer 1: apt-get install {' '.join(PACKAGES)} in an overlay over layer 0")
        with_overlay(work, str(src), work / "upper1", _layer1(work))
        run(["mkfs.erofs", "--quiet", f"{paths[1]}.tmp", str(work / "upper1")])
        os.replace(f"{paths[1]}.tmp", paths[1])
    if not paths[2].exists():
        log("layer 2: deletions and replacements in an overlay over layers 1 and 0")
        with_overlay(work, f"{work / 'upper1'}:{src}", work / "upper2", _layer2)
        run(["mkfs.erofs", "--quiet", f"{paths[2]}.tmp", str(work / "upper2")])
        os.replace(f"{paths[2]}.tmp", paths[2])
    return paths


def tree_stats(mnt: str) -> dict[str, object]:
    """Entries, regular-file bytes and the largest file of a mounted merged tree."""
    entries = files = total = 0
    largest = ("", -1)
    for dirpath, dirnames, filenames in os.walk(mnt):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
                if st.st_size > largest[1]:
                    largest = (os.path.relpath(path, mnt), st.st_size)
    return {"entries": entries, "files": files, "file_bytes": total,
            "largest_file": largest[0], "largest_size": largest[1]}
