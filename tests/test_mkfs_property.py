"""Random layer tars, made into images, read back by the kernel as GNU tar extracts them.

Every entry type, whiteouts (both forms), duplicates, hard links, xattrs and odd names. The
generator keeps to streams that GNU tar itself extracts without error (it will not put a file
over a non-empty directory) and never re-creates a name after its whiteout (the reference
converts whiteouts after extracting, so the two orders would differ).
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layertar import TarBuilder, check_image_views

from erofs_fuse.mkfs import ConvertOptions, convert_tar

NAME_BYTES = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    and not b.startswith(b".wh."))
SIZES = st.sampled_from([0, 1, 100, 4095, 4096, 4097, 8191, 12000, 70000])


@dataclass
class _State:
    dirs: set[str] = field(default_factory=lambda: {""})
    files: set[str] = field(default_factory=set)     # regular files now present
    others: set[str] = field(default_factory=set)    # other non-directories
    whited: set[str] = field(default_factory=set)    # names that must not come back
    symlinks: set[str] = field(default_factory=set)  # GNU tar creates some symlinks last


def _join(parent: str, name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape")
    return f"{parent}/{text}" if parent else text


@st.composite
def layer_tars(draw: st.DrawFn) -> bytes:
    b = TarBuilder(tarfile.PAX_FORMAT)
    state = _State()
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(sorted(state.dirs)))
        name = draw(NAME_BYTES)
        path = _join(parent, name)
        if path in state.whited:
            continue
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "chr", "fifo",
                                     "whiteout", "opaque"]))
        if path in state.dirs and kind not in ("dir", "whiteout", "opaque"):
            kind = "dir"  # GNU tar refuses a non-directory over a directory
        if path in state.files | state.others and kind == "dir":
            kind = "file"
        if path in state.symlinks and kind not in ("whiteout", "opaque"):
            # GNU tar defers symlinks that point up or out until the end of the archive, so
            # one replaced later in the stream comes back; the writer keeps the later entry
            continue
        attrs = dict(mode=draw(st.sampled_from([0o644, 0o755, 0o4711, 0o2750, 0o1777, 0o600])),
                     uid=draw(st.sampled_from([0, 1, 1000, 70000, 3_000_000])),
                     gid=draw(st.sampled_from([0, 5, 65534, 100000])),
                     mtime=draw(st.integers(0, 2_000_000_000)))
        pax = {}
        if draw(st.booleans()):
            key = draw(st.sampled_from(["user.a", "user.long." + "k" * 40, "trusted.t"]))
            pax[f"SCHILY.xattr.{key}"] = draw(st.binary(max_size=40)).decode(
                "utf-8", "surrogateescape")
        if kind == "file":
            data = draw(st.sampled_from([b"", b"x", b"ab" * 3000])) if draw(st.booleans()) \
                else bytes(draw(SIZES))
            b.add(path, data=data, pax=pax, **attrs)  # type: ignore[arg-type]
            state.files.add(path)
            state.others.discard(path)
        elif kind == "dir":
            # GNU tar leaves the setgid bit a directory inherits from a setgid parent when the
            # tar's mode lacks it; the writer stores the mode the tar gives. Not compared here.
            attrs["mode"] &= ~0o2000
            b.add(path, tarfile.DIRTYPE, pax=pax, **attrs)  # type: ignore[arg-type]
            state.dirs.add(path)
        elif kind == "symlink":
            target = draw(st.sampled_from(["a", "/abs/x", "../up", "t" * 300]))
            b.add(path, tarfile.SYMTYPE, linkname=target, pax=pax, **attrs)  # type: ignore[arg-type]
            state.others.add(path)
            state.symlinks.add(path)
            state.files.discard(path)
        elif kind == "hardlink" and state.files - {path}:
            target = draw(st.sampled_from(sorted(state.files - {path})))
            b.add(path, tarfile.LNKTYPE, linkname=target)
            state.files.add(path)
            state.others.discard(path)
        elif kind == "chr":
            b.add(path, tarfile.CHRTYPE, devmajor=draw(st.integers(0, 300)),
                  devminor=draw(st.integers(0, 70000)), **attrs)  # type: ignore[arg-type]
            state.others.add(path)
            state.files.discard(path)
        elif kind == "fifo":
            b.add(path, tarfile.FIFOTYPE, **attrs)  # type: ignore[arg-type]
            state.others.add(path)
            state.files.discard(path)
        elif kind == "whiteout" and path:
            b.add(_join(parent, b".wh." + name), uid=attrs["uid"], gid=attrs["gid"],
                  mtime=attrs["mtime"])
            _forget(state, path)
            state.whited.add(path)
        elif kind == "opaque":
            b.add(_join(parent, b".wh..wh..opq"))
    return b.bytes()


def _forget(state: _State, path: str) -> None:
    for group in (state.files, state.others, state.dirs, state.symlinks):
        for p in list(group):
            if p == path or p.startswith(path + "/"):
                group.discard(p)


@settings(max_examples=60, deadline=None, print_blob=False, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
@given(data=layer_tars(), tar_index=st.booleans())
def test_random_layer_tars_read_back_as_gnu_tar_extracts_them(data: bytes, tar_index: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "layer.tar"
        tar.write_bytes(data)
        out = str(Path(tmp) / "layer.erofs")
        convert_tar(str(tar), out, ConvertOptions(tar_index=tar_index))
        check_image_views(str(tar), out, tar_index=tar_index)
