"""Id mapping (erofs_fuse/fuse/idmap.py): fuse-overlayfs's uidmapping/gidmapping/squash semantics,
the mount options that ask for it, the mount(8) helper form of the command line, and the
attributes and ACLs the FUSE operations report with it (in-process; real mounts by an
unprivileged user are in test_rootless.py)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_fuse.cli import mount
from erofs_fuse.fuse.daemon import fuse_options
from erofs_fuse.cli.main import mount_helper_args
from erofs_fuse.console import CliError
from erofs_fuse.erofs.image import Image
from erofs_fuse.fuse.operations import Operations
from erofs_fuse.fuse.idmap import (
    DEFAULT_OVERFLOW_ID,
    IDENTITY,
    MAX_RANGES,
    NO_ID,
    IdMap,
    IdMapError,
    IdRange,
    kernel_overflow_ids,
    parse_id,
    parse_mapping,
)
from erofs_fuse.fuse.overlay import MergedTree
from helpers import corpus, resolve

ROOT = pyfuse3.ROOT_INODE


# parsing --------------------------------------------------------------------------------------
def test_parse_mapping_triples() -> None:
    assert parse_mapping("0:1000:1") == (IdRange(0, 1000, 1),)
    assert parse_mapping("0:1000:1:1:110000:65536") == (IdRange(0, 1000, 1),
                                                       IdRange(1, 110000, 65536))
    # the fuse-overlayfs manual writes ',' between triples; accepted on our command line too
    assert parse_mapping("0:1000:1,1:110000:65536") == parse_mapping("0:1000:1:1:110000:65536")


@pytest.mark.parametrize("text", ["", "0", "0:1", "0:1000:1:5", "a:b:c", "-1:0:1", "0::1000:1",
                                  "0:1000:1:", " : : ", "0x10:0:1", "1e3:0:1"])
def test_parse_mapping_refuses(text: str) -> None:
    with pytest.raises(IdMapError, match="CONTAINER:HOST:COUNT"):
        parse_mapping(text)


@pytest.mark.parametrize(("ranges", "why"), [
    ([IdRange(0, 1000, 0)], "at least 1"),
    ([IdRange(NO_ID - 1, 0, 2)], "container range ends above"),
    ([IdRange(0, NO_ID - 10, 11)], "host range ends above"),
    ([IdRange(0, 1000, 10), IdRange(5, 5000, 1)], "overlap in the container ids"),
    ([IdRange(0, 1000, 10), IdRange(100, 1009, 1)], "overlap in the host ids"),
    ([IdRange(k, k, 1) for k in range(MAX_RANGES + 1)], "at most 340"),
])
def test_invalid_maps_are_refused_as_the_kernel_refuses_a_uid_map(ranges: list[IdRange],
                                                                  why: str) -> None:
    with pytest.raises(IdMapError, match=why):
        IdMap(uid_ranges=tuple(ranges))
    with pytest.raises(IdMapError, match=why):
        IdMap(gid_ranges=tuple(ranges))


def test_parse_id() -> None:
    assert parse_id("0") == 0 and parse_id("4294967294") == NO_ID - 1
    for bad in ("-1", "4294967295", "x", ""):
        with pytest.raises(IdMapError):
            parse_id(bad)


# mapping --------------------------------------------------------------------------------------
def test_no_options_map_nothing() -> None:
    assert IDENTITY.is_identity and IdMap.from_options().is_identity
    for n in (0, 1, 1000, 65534, NO_ID - 1):
        assert IDENTITY.uid(n) == n and IDENTITY.gid(n) == n


def test_the_fuse_overlayfs_manual_example() -> None:
    # "uidmapping=0:1000:1:1:110000:65536": the container's uid_map on one line; a file stored
    # as 0 is reported as 1000, 1 as 110000, and ids outside every range as the overflow id
    m = IdMap.from_options(["0:1000:1:1:110000:65536"], ["0:1000:1:1:110000:65536"])
    assert [m.uid(n) for n in (0, 1, 2, 65536, 65537, 70000)] == [
        1000, 110000, 110001, 175535, DEFAULT_OVERFLOW_ID, DEFAULT_OVERFLOW_ID]
    assert m.gid(0) == 1000 and m.gid(65537) == DEFAULT_OVERFLOW_ID


def test_range_edges_and_overflow() -> None:
    m = IdMap.from_options(["100:5000:10:1000:7000:1"], overflow=(4444, 5555))
    assert [m.uid(n) for n in (99, 100, 109, 110, 999, 1000, 1001, 0)] == [
        4444, 5000, 5009, 4444, 4444, 7000, 4444, 4444]
    assert m.gid(100) == 100, "a uid mapping leaves groups as stored"
    g = IdMap.from_options(gidmap=["0:7:1"], overflow=(4444, 5555))
    assert g.uid(3) == 3 and g.gid(0) == 7 and g.gid(1) == 5555


def test_several_lists_of_one_kind_concatenate() -> None:
    assert IdMap.from_options(["0:1000:1", "1:100000:10"]) == \
        IdMap.from_options(["0:1000:1:1:100000:10"])


def test_squash_precedence() -> None:
    mapped = ["0:1000:1000"]
    root = IdMap.from_options(mapped, mapped, squash_to_root=True)
    assert (root.uid(5), root.gid(5), root.uid(99999), root.gid(99999)) == (0, 0, 0, 0)
    # squash_to_uid/gid win over squash_to_root, and each only for its kind of id
    both = IdMap.from_options(mapped, mapped, squash_to_root=True, squash_to_uid=7)
    assert (both.uid(5), both.gid(5)) == (7, 0)
    uid_only = IdMap.from_options(mapped, mapped, squash_to_uid=7)
    assert (uid_only.uid(5), uid_only.gid(5), uid_only.gid(2000)) == (7, 1005, 65534)
    gid_only = IdMap.from_options(squash_to_gid=9)
    assert (gid_only.uid(5), gid_only.gid(5)) == (5, 9)
    assert not gid_only.is_identity


def _reference(ranges: list[tuple[int, int, int]], stored: int, overflow: int) -> int:
    """fuse-overlayfs's lookup: the first triple that holds the id, else the overflow id."""
    if not ranges:
        return stored
    for container, host, length in ranges:
        if container <= stored < container + length:
            return host + stored - container
    return overflow


@st.composite
def disjoint_ranges(draw: Any) -> list[tuple[int, int, int]]:
    lengths = draw(st.lists(st.integers(1, 50), max_size=6))
    gaps = draw(st.lists(st.integers(0, 30), min_size=len(lengths), max_size=len(lengths)))
    hosts = draw(st.permutations(range(len(lengths))))
    out, pos = [], 0
    for length, gap, slot in zip(lengths, gaps, hosts):
        pos += gap
        out.append((pos, 10_000 + slot * 100, length))  # host blocks of 100 never overlap
        pos += length
    shuffled: list[tuple[int, int, int]] = draw(st.permutations(out))
    return shuffled


@given(disjoint_ranges(), st.lists(st.integers(0, 600), max_size=40))
def test_lookup_equals_a_linear_search(ranges: list[tuple[int, int, int]],
                                       ids: list[int]) -> None:
    text = ":".join(f"{c}:{h}:{n}" for c, h, n in ranges)
    m = IdMap.from_options([text] if ranges else [], overflow=(65534, 65534))
    for stored in ids + [c for c, _, _ in ranges] + [c + n for c, _, n in ranges]:
        assert m.uid(stored) == _reference(ranges, stored, 65534)


def test_kernel_overflow_ids() -> None:
    with open("/proc/sys/kernel/overflowuid", encoding="ascii") as f:
        assert kernel_overflow_ids()[0] == int(f.read())


# ACLs -----------------------------------------------------------------------------------------
def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _entries(acl: bytes) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<HHI", acl, 4 + 8 * k) for k in range((len(acl) - 4) // 8)]


def test_acl_named_entries_are_mapped() -> None:
    m = IdMap.from_options(["0:1000:2000"], ["0:3000:2000"], squash_to_root=True)
    value = _acl((0x01, 6, NO_ID), (0x02, 7, 1234), (0x02, 4, 5000), (0x04, 4, NO_ID),
                 (0x08, 5, 7), (0x10, 7, NO_ID), (0x20, 4, NO_ID))
    assert m.acl(value) == _acl((0x01, 6, NO_ID), (0x02, 7, 2234), (0x02, 4, 65534),
                                (0x04, 4, NO_ID), (0x08, 5, 3007), (0x10, 7, NO_ID),
                                (0x20, 4, NO_ID))
    for malformed in (b"", b"\x02\0\0", _acl((0x02, 7, 1))[:-1], b"\x01\0\0\0" + bytes(8)):
        assert m.acl(malformed) == malformed
    assert IDENTITY.acl(value) == value


# the FUSE operations --------------------------------------------------------------------------
def ops_with(idmap: IdMap, *names: str) -> Operations:
    return Operations(MergedTree([Image.open(corpus(n)) for n in names]), idmap=idmap)


async def test_getattr_lookup_and_readdir_report_mapped_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # /owners in plain.erofs: o1 1000:1000, o2 65534:65534, o3 70000:80000, o4 2**31:5
    m = IdMap.from_options(["0:100000:65536:70000:500:1"], ["0:200000:65536"])
    ops = ops_with(m, "plain.erofs")
    root = await ops.getattr(ROOT)
    assert (root.st_uid, root.st_gid) == (100000, 200000)
    owners = await resolve(ops, "/owners")
    seen = {}
    for name in ("o1", "o2", "o3", "o4"):
        attr = await ops.lookup(owners.st_ino, name.encode())
        seen[name] = (attr.st_uid, attr.st_gid)
        again = await ops.getattr(attr.st_ino)
        assert (again.st_uid, again.st_gid) == seen[name]
    assert seen == {"o1": (101000, 201000), "o2": (165534, 265534), "o3": (500, 65534),
                    "o4": (65534, 200005)}
    listed: dict[bytes, tuple[int, int]] = {}

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, nid: int) -> bool:
        listed[name] = (attr.st_uid, attr.st_gid)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    # a stateless mount (fs.STATELESS_OPEN) lists by inode, without opendir
    fh = owners.st_ino if ops.stateless_open else await ops.opendir(owners.st_ino)
    await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    assert {k.decode(): v for k, v in listed.items() if k.decode() in seen} == seen
    assert listed[b"o0"] == (100000, 200000)  # stored as 0:0


async def test_squash_and_acl_through_the_operations() -> None:
    ops = ops_with(IdMap.from_options(["0:1000:2000"], squash_to_uid=42), "plain.erofs")
    attr = await resolve(ops, "/xattrs/short")
    assert (attr.st_uid, attr.st_gid) == (42, 0)
    acl = await ops.getxattr(attr.st_ino, b"system.posix_acl_access")
    # the ACL's named user 1234 is mapped by the list (squashing concerns the owner only)
    assert (0x02, 7, 2234) in _entries(acl)
    plain = ops_with(IDENTITY, "plain.erofs")
    attr = await resolve(plain, "/xattrs/short")
    assert (0x02, 7, 1234) in _entries(await plain.getxattr(attr.st_ino,
                                                             b"system.posix_acl_access"))


# options --------------------------------------------------------------------------------------
def test_mount_options_build_the_map() -> None:
    cfg = mount.parse_args(["--layers", "a.erofs", "--uidmap", "0:1000:1", "--gidmap",
                            "0:2000:1", "-o", "uidmapping=1:100000:10,squash_to_gid=3", "/mnt"])
    assert cfg.idmap.uid_ranges == (IdRange(0, 1000, 1), IdRange(1, 100000, 10))
    assert cfg.idmap.gid_ranges == (IdRange(0, 2000, 1),) and cfg.idmap.squash_gid == 3
    assert not any(o.startswith(("uidmapping", "squash")) for o in cfg.options), cfg.options
    cfg = mount.parse_args(["--layers", "a", "-o", "squash_to_root", "--squash-to-uid", "9",
                            "/mnt"])
    assert (cfg.idmap.uid(5), cfg.idmap.gid(5)) == (9, 0)
    assert mount.parse_args(["--layers", "a", "/mnt"]).idmap.is_identity


def test_access_options_and_defaults() -> None:
    cfg = mount.parse_args(["--layers", "a", "/mnt"])
    assert "allow_other" not in cfg.options and {"nosuid", "nodev", "ro"} <= cfg.options
    cfg = mount.parse_args(["--layers", "a", "--allow-other", "--suid", "--dev", "/mnt"])
    assert {"allow_other", "suid", "dev"} <= cfg.options
    assert not {"nosuid", "nodev"} & cfg.options
    assert mount.parse_args(["--layers", "a", "-o", "allow_suid,allow_dev", "/mnt"]).options == \
        mount.parse_args(["--layers", "a", "-o", "suid,dev", "/mnt"]).options


@pytest.mark.parametrize(("args", "message"), [
    (["--uidmap", "0:1000"], "CONTAINER:HOST:COUNT"),
    (["--gidmap", "0:1000:0"], "at least 1"),
    (["-o", "uidmapping="], "expected -o uidmapping=VALUE"),
    (["-o", "squash_to_uid"], "expected -o squash_to_uid=VALUE"),
    (["-o", "squash_to_root=1"], "expected -o squash_to_root"),
    (["--squash-to-uid", "-3"], "not a decimal"),
    (["-o", "squash_to_gid=4294967295"], "outside"),
    (["-o", "rw"], "read-only"),
])
def test_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        mount.parse_args(["--layers", "a", *args, "/mnt"])


def test_only_root_may_ask_for_suid_and_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for opt in (["--suid"], ["--dev"], ["-o", "allow_suid"]):
        with pytest.raises(CliError, match="only root"):
            mount.parse_args(["--layers", "a", *opt, "/mnt"])
    # allow_other: as fusermount3 decides, from /etc/fuse.conf, but before anything is tried
    monkeypatch.setattr(mount, "user_allow_other", lambda: True)
    assert "allow_other" in mount.parse_args(["--layers", "a", "--allow-other", "/mnt"]).options
    monkeypatch.setattr(mount, "user_allow_other", lambda: False)
    with pytest.raises(CliError, match="has the line user_allow_other"):
        mount.parse_args(["--layers", "a", "-o", "allow_other", "/mnt"])


def test_user_allow_other_reads_fuse_conf_as_fusermount3_does(tmp_path: Path) -> None:
    conf = tmp_path / "fuse.conf"
    assert not mount.user_allow_other(str(conf))  # no file
    conf.write_text("# user_allow_other\nmount_max = 10\n")
    assert not mount.user_allow_other(str(conf))
    conf.write_text("mount_max = 10\n  user_allow_other   # for the sandbox\n")
    assert mount.user_allow_other(str(conf))


# the mount(8) helper form ---------------------------------------------------------------------
def helper(argv: list[str]) -> list[str]:
    args = mount_helper_args(argv)
    assert args is not None, f"{argv} not taken for a mount helper call"
    return args


def test_mount_helper_form() -> None:
    # what mount.fuse3 runs for an fstab line "L1,L2 /mnt fuse.erofs-fuse defaults,uidmapping=.."
    assert mount_helper_args(["/l/a.erofs,/l/b.erofs", "/mnt", "-o",
                              "rw,uidmapping=0:1000:1,squash_to_root,dev,suid"]) == [
        "--layers", "/l/a.erofs,/l/b.erofs", "--fsname", "/l/a.erofs,/l/b.erofs",
        "-o", "uidmapping=0:1000:1,squash_to_root", "--", "/mnt"]
    # a "user" line: mount(8) turns it into nosuid,noexec,nodev
    assert helper(["a", "/mnt", "-o", "ro,nosuid,noexec,nodev"])[-4:] == [
        "-o", "ro,nosuid,noexec,nodev", "--", "/mnt"]
    # options only mount(8) and fstab know are dropped (libmount passes some of them on)
    assert mount_helper_args(["a", "/mnt", "-o", "noauto,user,users,nofail,_netdev,"
                              "x-systemd.automount,comment=x,allow_suid"]) == [
        "--layers", "a", "--fsname", "a", "-o", "allow_suid", "--", "/mnt"]
    assert mount_helper_args(["a", "/mnt"]) == ["--layers", "a", "--fsname", "a", "--", "/mnt"]
    assert helper(["a", "/mnt", "-oro"])[-4:] == ["-o", "ro", "--", "/mnt"]


@pytest.mark.parametrize("argv", [["ls", "img"], ["info", "img"], ["mount", "x"],
                                  ["a", "b", "c"], ["a"], [], ["a", "-x", "b"], ["a", "b", "-o"]])
def test_other_command_lines_are_not_the_helper_form(argv: list[str]) -> None:
    assert mount_helper_args(argv) is None


def test_helper_form_refuses_drop_privileges() -> None:
    # mount.fuse3 -o drop_privileges mounts by itself (without ro, default_permissions) and
    # passes the FUSE descriptor as the mountpoint
    with pytest.raises(CliError, match="drop_privileges"):
        mount_helper_args(["a.erofs", "/dev/fd/3", "-o", "rw"])


def test_helper_form_reaches_mount_with_the_defaults_kept() -> None:
    cfg = mount.parse_args(helper(["/l/a.erofs,/l/b.erofs", "/mnt", "-o", "rw,dev,suid"]))
    assert cfg.layers == ["/l/a.erofs", "/l/b.erofs"] and cfg.mountpoint == "/mnt"
    assert cfg.fsname == "/l/a.erofs,/l/b.erofs"
    assert {"nosuid", "nodev", "ro"} <= cfg.options and "rw" not in cfg.options
    assert "fsname=/l/a.erofs\\,/l/b.erofs" in fuse_options(cfg)
