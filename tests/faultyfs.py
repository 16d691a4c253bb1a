"""A FUSE filesystem that serves the files of one directory with faults on demand (tests only).

    python3 tests/faultyfs.py BACKING_DIR CONTROL_FILE MOUNTPOINT

Stands in for a failing disk under a layer file: the container here has no device-mapper (no
``error`` target), so the failure is made one level up, where the erofs-fuse daemon's
``pread`` of the layer meets it. Every read looks at CONTROL_FILE (absent or empty: no fault),
whose lines are

    eio START END     reads overlapping bytes [START, END) of any file fail with EIO
    delay SECONDS [START END]
                      reads (overlapping [START, END) if given) wait this long first: a slow
                      disk, reads kept "in flight"

Reads are ``direct_io``, so no page cache sits between the fault and the reader. Runs in the
foreground; ``fusermount3 -u MOUNTPOINT`` ends it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio


class FaultyFS(pyfuse3.Operations):
    def __init__(self, backing: str, control: str) -> None:
        super().__init__()
        self.backing = backing
        self.control = control
        names = sorted(os.listdir(backing))
        self.inodes = {name.encode(): pyfuse3.ROOT_INODE + 1 + k for k, name in enumerate(names)}
        self.paths = {ino: os.path.join(backing, name.decode()) for name, ino in self.inodes.items()}

    def _faults(self) -> tuple[list[tuple[int, int]], list[tuple[float, int, int]]]:
        ranges: list[tuple[int, int]] = []
        delays: list[tuple[float, int, int]] = []
        try:
            with open(self.control, encoding="ascii") as f:
                for line in f:
                    words = line.split()
                    if words[:1] == ["eio"]:
                        ranges.append((int(words[1]), int(words[2])))
                    elif words[:1] == ["delay"]:
                        start, end = (int(words[2]), int(words[3])) if len(words) > 3 else (0, 1 << 63)
                        delays.append((float(words[1]), start, end))
        except FileNotFoundError:
            pass
        return ranges, delays

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            return attr
        st = os.stat(self.paths[inode])
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = st.st_size
        attr.st_blksize = 4096
        attr.st_blocks = (st.st_size + 511) // 512
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        inode = self.inodes.get(name)
        if parent_inode != pyfuse3.ROOT_INODE or inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        items = sorted(self.inodes.items())
        for k in range(start_id, len(items)):
            name, inode = items[k]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), k + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in self.paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fd = os.open(self.paths[inode], os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        ranges, delays = self._faults()
        for seconds, start, end in delays:
            if off < end and start < off + size:
                await trio.sleep(seconds)
        if any(off < end and start < off + size for start, end in ranges):
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)


def main() -> int:
    backing, control, mountpoint = sys.argv[1:4]
    ops = FaultyFS(backing, control)
    pyfuse3.init(ops, mountpoint, {"fsname=faultyfs", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
