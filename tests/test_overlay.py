"""MergedTree in-process: the fixture layer stacks, every rule of the overlay table on small
mkfs.erofs-made layers, inode numbers, the directory cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from erofs_fuse.erofs import ondisk as d
from erofs_fuse.erofs.dirent import DirEntry
from erofs_fuse.erofs.errors import CorruptImageError
from erofs_fuse.erofs.image import Image, Inode
from erofs_fuse.fuse.overlay import (
    FIRST_INO,
    MAX_LAYERS,
    MergedTree,
    Node,
    is_hidden_name,
    is_hidden_xattr,
    make_ino,
    oci_whiteout_target,
    split_ino,
)
from helpers import EXPECTED, corpus, mkfs_erofs
from treeview import TreeView, inode_line, parse_manifest

LOWERS = ["aufs", "oci", "aufs-lz4", "tarindex"]
UPPERS = ["aufs", "oci", "aufs-lz4"]
# images made with -T0 (every mtime 0, as in the manifest)
T0 = {"layer-lower-aufs", "layer-lower-oci", "layer-upper-aufs", "layer-upper-oci"}


def view_of_tree(tree: MergedTree, *, with_mtime: bool = True) -> TreeView:
    """The treeview of a merged tree, as ``view_of_image`` makes it of one image."""
    view = TreeView()
    groups: dict[int, list[str]] = {}

    def add(path: str, node: Node) -> None:
        ino = node.inode
        content = tree.read(node, 0, ino.size) if ino.is_reg else None
        target = tree.readlink(node) if ino.is_symlink else None
        view.entries[path] = inode_line(path, ino, content, target, tree.xattrs(node),
                                        with_mtime=with_mtime)
        if not ino.is_dir and node.nlink > 1:
            groups.setdefault(node.ino, []).append(path)

    add(".", tree.root)
    for raw, node in tree.walk():
        add(raw.decode(errors="surrogateescape"), node)
    view.hardlinks = {frozenset(g) for g in groups.values() if len(g) > 1}
    return view


def without_mtime(view: TreeView) -> TreeView:
    entries = {p: "\t".join(c for c in line.split("\t") if not c.startswith("mtime="))
               for p, line in view.entries.items()}
    return TreeView(entries, view.hardlinks)


def open_stack(*names: str) -> MergedTree:
    return MergedTree([Image.open(corpus(f"{n}.erofs")) for n in names])


def node_at(tree: MergedTree, path: str) -> Node | None:
    node: Node | None = tree.root
    for part in filter(None, path.split("/")):
        assert node is not None
        node = tree.lookup(node, part.encode())
    return node


def names_in(tree: MergedTree, path: str) -> list[str]:
    node = node_at(tree, path)
    assert node is not None
    return sorted(n.decode() for n, _ in tree.listdir(node).entries)


# the fixture stacks ---------------------------------------------------------------------------
@pytest.mark.parametrize("lower", LOWERS)
@pytest.mark.parametrize("upper", UPPERS)
def test_fixture_stack_equals_manifest(lower: str, upper: str) -> None:
    names = (f"layer-lower-{lower}", f"layer-upper-{upper}")
    tree = open_stack(*names)
    expected = parse_manifest(str(EXPECTED / "layers-lower+upper.manifest"))
    with_mtime = set(names) <= T0
    got = view_of_tree(tree, with_mtime=with_mtime)
    if not with_mtime:
        expected = without_mtime(expected)
    assert expected.diff(got) == []


@pytest.mark.parametrize("form", ["aufs", "oci"])
def test_whiteouts_hide_lower_entries_and_never_show(form: str) -> None:
    tree = open_stack(f"layer-lower-{form}", f"layer-upper-{form}")
    assert names_in(tree, "etc/app") == ["attr", "hard", "keep", "link", "new"]
    app = node_at(tree, "etc/app")
    assert app is not None
    for hidden in (b"config", b".wh.config", b"tool"):
        assert tree.lookup(app, hidden) is None
    assert node_at(tree, "opt/tool") is None
    assert names_in(tree, "opt") == ["was-file"]


@pytest.mark.parametrize("form", ["aufs", "oci"])
def test_opaque_directory_hides_lower_contents(form: str) -> None:
    tree = open_stack(f"layer-lower-{form}", f"layer-upper-{form}")
    assert names_in(tree, "var/cache") == ["fresh"]
    cache = node_at(tree, "var/cache")
    assert cache is not None and not cache.merged and cache.nlink == cache.inode.nlink
    assert tree.lookup(cache, b"old1") is None
    assert tree.lookup(cache, b".wh..wh..opq") is None


def test_file_over_directory_hides_it_entirely() -> None:
    tree = open_stack("layer-lower-aufs", "layer-upper-aufs")
    pkg = node_at(tree, "usr/lib/pkg")
    assert pkg is not None and stat.S_ISREG(pkg.inode.mode) and pkg.layer == 1
    assert pkg.dirs == ()


def test_directory_over_file_replaces_it() -> None:
    tree = open_stack("layer-lower-oci", "layer-upper-oci")
    node = node_at(tree, "opt/was-file")
    assert node is not None and node.is_dir and not node.merged
    assert names_in(tree, "opt/was-file") == ["now-dir"]


@pytest.mark.parametrize("form", ["aufs", "oci"])
def test_overlay_xattrs_never_show(form: str) -> None:
    tree = open_stack(f"layer-lower-{form}", f"layer-upper-{form}")
    for path in ("var/cache", "etc/app", "opt", "usr/lib"):
        node = node_at(tree, path)
        assert node is not None
        assert not any(is_hidden_xattr(n) for n in tree.listxattr(node))
        assert tree.getxattr(node, b"trusted.overlay.opaque") is None
    upper_cache = Image.open(corpus("layer-upper-aufs.erofs")).lookup("var/cache")
    assert upper_cache.getxattr(b"trusted.overlay.opaque") == b"y"  # it is there, hidden
    attr = node_at(tree, "etc/app/attr")
    assert attr is not None and tree.getxattr(attr, b"user.origin") == b"upper"


def test_merged_directory_attributes_come_from_the_top() -> None:
    tree = open_stack("layer-lower-aufs", "layer-upper-aufs")
    app = node_at(tree, "etc/app")
    assert app is not None and app.merged and app.layer == 1
    assert app.inode.size == Image.open(corpus("layer-upper-aufs.erofs")).lookup("etc/app").size
    # kernel overlayfs: nlink 1 for merged directories, the real count otherwise
    assert app.nlink == 1 and tree.root.nlink == 1
    was_file = node_at(tree, "opt/was-file")
    assert was_file is not None and was_file.nlink == 2


def test_hardlinks_share_an_inode_number_and_numbers_are_stable() -> None:
    a = open_stack("layer-lower-aufs", "layer-upper-aufs")
    b = open_stack("layer-lower-aufs", "layer-upper-aufs")
    hard, keep = node_at(a, "etc/app/hard"), node_at(a, "etc/app/keep")
    assert hard is not None and keep is not None and hard.ino == keep.ino
    assert {p: n.ino for p, n in a.walk()} == {p: n.ino for p, n in b.walk()}
    inos = [n.ino for p, n in a.walk() if p not in (b"etc/app/hard", b"etc/app/keep")]
    assert len(set(inos)) == len(inos)


# the rules on small layers --------------------------------------------------------------------
class Layer:
    """An overlay-style upper directory, built by hand and then made into an image."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def file(self, rel: str, content: bytes = b"x") -> Layer:
        self._path(rel).write_bytes(content)
        return self

    def dir(self, rel: str, *, opaque: str | None = None) -> Layer:
        path = self._path(rel)
        path.mkdir(exist_ok=True)
        if opaque:
            os.setxattr(path, f"{opaque}.overlay.opaque", b"y")
        return self

    def whiteout(self, rel: str) -> Layer:
        os.mknod(self._path(rel), stat.S_IFCHR | 0o600, os.makedev(0, 0))
        return self

    def xattr(self, rel: str, name: str, value: bytes) -> Layer:
        os.setxattr(self.root / rel, name, value, follow_symlinks=False)
        return self

    def image(self, kind: type[Image] = Image) -> Image:
        out = str(self.root) + ".erofs"
        mkfs_erofs(str(self.root), out)
        return kind.open(out)


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[list[Layer]]:
    yield [Layer(tmp_path / f"L{i}") for i in range(3)]


def stack(*ls: Layer) -> MergedTree:
    return MergedTree([layer.image() for layer in ls])


def test_dir_over_file_over_dir_does_not_merge_the_bottom(layers: list[Layer]) -> None:
    l0, l1, l2 = layers
    l0.file("d/bottom")
    l1.file("d")
    l2.file("d/top")
    tree = stack(l0, l1, l2)
    assert names_in(tree, "d") == ["top"]
    d_node = node_at(tree, "d")
    assert d_node is not None and not d_node.merged


def test_whiteout_in_the_bottom_layer_does_not_show(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.whiteout("gone").file("kept")
    l1.file("other")
    assert names_in(stack(l0, l1), "") == ["kept", "other"]


def test_whiteout_acts_on_lower_layers_only(layers: list[Layer]) -> None:
    l0, l1, l2 = layers
    l0.file("a/f", b"0")
    l1.whiteout("a")
    l2.file("a/g", b"2")
    tree = stack(l0, l1, l2)
    assert names_in(tree, "a") == ["g"]  # the whiteout stops the merge below l2
    assert names_in(stack(l0, l1), "") == []


@pytest.mark.parametrize("prefix", ["trusted", "user"])
def test_opaque_xattr_forms(layers: list[Layer], prefix: str) -> None:
    l0, l1, l2 = layers
    l0.file("d/low")
    l1.dir("d", opaque=prefix).file("d/mid")
    l2.file("d/top")
    tree = stack(l0, l1, l2)
    assert names_in(tree, "d") == ["mid", "top"]  # opaque hides l0 only, l2 merges over it
    d_node = node_at(tree, "d")
    assert d_node is not None and d_node.merged and d_node.nlink == 1
    assert tree.listxattr(d_node) == []


def test_oci_opaque_marker(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.file("d/low").file("e/low")
    l1.file("d/.wh..wh..opq", b"").file("d/mine").file("e/.wh.low", b"").file("e/.wh.nothing")
    tree = stack(l0, l1)
    assert names_in(tree, "d") == ["mine"]
    assert names_in(tree, "e") == []


def test_oci_whiteout_keeps_the_layers_own_entry(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.file("d/x/low").file("f", b"low")
    l1.file("d/.wh.x", b"").file("d/x/new").file(".wh.f", b"").file("f", b"new")
    tree = stack(l0, l1)
    assert names_in(tree, "d/x") == ["new"]  # deleted, then made again in the same layer
    f = node_at(tree, "f")
    assert f is not None and tree.read(f, 0, 10) == b"new"


def test_lookups_probe_for_whiteouts_only_where_a_layer_holds_some(
        layers: list[Layer]) -> None:
    """Lookups alone (no listing cached): an upper layer's directory without ``.wh.`` names
    is not searched for ``.wh.NAME``; whiteouts and opaque markers still act where held."""
    l0, l1, l2 = layers
    l0.file("d/dlow").file("e/low").file("e/gone").file("o/low")
    l1.file("d/dmid").file("e/.wh.gone", b"").file("o/.wh..wh..opq", b"").file("o/mine")
    l2.file("d/dtop").file("e/top").file("o/top")
    searched: list[bytes] = []

    class Counting(Image):  # a subclass: compiled callers do not see patched attributes
        def lookup_entry(self, inode: Inode, name: bytes) -> DirEntry | None:
            searched.append(name)
            return super().lookup_entry(inode, name)

    tree = MergedTree([layer.image(Counting) for layer in (l0, l1, l2)])
    for path in ("d/dlow", "d/dmid", "d/dtop", "e/low", "e/top", "o/mine", "o/top"):
        assert node_at(tree, path) is not None, path
    for path in ("e/gone", "o/low"):
        assert node_at(tree, path) is None, path
    assert not {b".wh.dlow", b".wh.dmid", b".wh.dtop"} & set(searched)  # d holds no .wh. names
    assert b".wh.gone" in searched  # e of l1 does


def test_root_opaque_is_ignored_like_the_kernel(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.file("low")
    l1.file("top").file(".wh..wh..opq", b"")
    os.setxattr(l1.root, "trusted.overlay.opaque", b"y")
    tree = stack(l0, l1)
    assert names_in(tree, "") == ["low", "top"]
    assert tree.listxattr(tree.root) == []


def test_file_over_directory_over_whiteout(layers: list[Layer]) -> None:
    l0, l1, l2 = layers
    l0.file("a/inner")
    l1.dir("a").file("a/more")
    l2.file("a", b"file")
    tree = stack(l0, l1, l2)
    a = node_at(tree, "a")
    assert a is not None and not a.is_dir and tree.read(a, 0, 9) == b"file"


def test_single_layer_directory_reports_its_nlink(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.dir("only/sub1").dir("only/sub2")
    l1.file("x")
    tree = stack(l0, l1)
    only = node_at(tree, "only")
    assert only is not None and not only.merged and only.nlink == 4


def test_user_xattrs_show_overlay_ones_do_not(layers: list[Layer]) -> None:
    l0, _, _ = layers
    l0.file("f").xattr("f", "user.keep", b"1").xattr("f", "trusted.overlay.origin", b"")
    l0.xattr("f", "user.overlay.redirect", b"/x")
    tree = stack(l0)
    f = node_at(tree, "f")
    assert f is not None
    assert tree.listxattr(f) == [b"user.keep"]
    assert tree.getxattr(f, b"user.overlay.redirect") is None


def test_hardlinks_in_different_layers_are_different_inodes(layers: list[Layer]) -> None:
    l0, l1, _ = layers
    l0.file("a/one")
    os.link(l0.root / "a/one", l0.root / "a/two")
    l1.file("b/one")
    os.link(l1.root / "b/one", l1.root / "b/two")
    tree = stack(l0, l1)
    nodes = {p: node_at(tree, p) for p in ("a/one", "a/two", "b/one", "b/two")}
    inos = {p: n.ino for p, n in nodes.items() if n is not None}
    assert inos["a/one"] == inos["a/two"] != inos["b/one"] == inos["b/two"]


def shape(listing: list[tuple[bytes, Node]]) -> list[tuple[object, ...]]:
    return [(name, n.ino, n.layer, n.inode.nid, tuple((k, i.nid) for k, i in n.dirs), n.parent)
            for name, n in listing]


@pytest.mark.parametrize("names", [("layer-lower-oci",), ("layer-lower-aufs", "layer-upper-oci"),
                                   ("layer-lower-oci", "layer-upper-aufs")])
def test_single_layer_listings_equal_the_probed_ones(names: tuple[str, ...]) -> None:
    # directories found in one layer take a shortcut past the probing of the overlay table
    tree = open_stack(*names)
    single = 0
    for _, node in [("", tree.root), *tree.walk()]:
        if node.is_dir and len(node.dirs) == 1:
            single += 1
            assert shape(list(tree._single(node).entries)) == shape(
                list(tree._probed(node).entries))
    assert single


def test_single_layer_directory_hides_whiteouts_and_wh_names(layers: list[Layer]) -> None:
    layers[0].file("d/keep").whiteout("d/gone").file("d/.wh.other").dir("d/sub")
    tree = stack(layers[0])
    node = node_at(tree, "d")
    assert node is not None and len(node.dirs) == 1
    listing = dict(tree.listdir(node).entries)
    assert sorted(listing) == [b"keep", b"sub"]
    assert listing[b"sub"].dirs and listing[b"sub"].parent == node.ino


# the directory cache --------------------------------------------------------------------------
def test_directory_cache_is_bounded() -> None:
    images = [Image.open(corpus("plain.erofs"))]
    tree = MergedTree(images, dir_cache_entries=50)
    full = MergedTree([Image.open(corpus("plain.erofs"))])
    assert [(p, n.ino) for p, n in tree.walk()] == [(p, n.ino) for p, n in full.walk()]
    assert tree._dirs.currsize <= 50


# inode numbers and predicates -----------------------------------------------------------------
@pytest.mark.parametrize("layer,nid", [(0, 0), (3, 27), (MAX_LAYERS - 1, 1 << 40),
                                       (1, d.NID_METABOX_BIT | 5)])
def test_inode_numbers_round_trip(layer: int, nid: int) -> None:
    ino = make_ino(layer, nid)
    assert ino >= FIRST_INO and ino < 1 << 64
    assert split_ino(ino) == (layer, nid)


def test_inode_numbers_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(CorruptImageError):
        make_ino(0, 1 << 62)
    with pytest.raises(ValueError):
        make_ino(MAX_LAYERS, 1)


def test_nodes_are_one_object_per_entry_and_hold_no_other_fields() -> None:
    # a plain slotted class (cheaper to make than a frozen dataclass): compared by identity, as
    # the dataclass was (eq=False), and no field can be added by mistake
    tree = open_stack("layer-lower-aufs")
    node = node_at(tree, "etc")
    assert node is not None
    twin = Node(node.ino, node.layer, node.inode, node.dirs, node.parent)
    assert twin != node and twin == twin and len({node, twin}) == 2
    tree.listdir(tree.root)
    assert tree.lookup(tree.root, b"etc") is tree.lookup(tree.root, b"etc")  # the listing's
    with pytest.raises(AttributeError):
        twin.extra = 1  # type: ignore[attr-defined]
    assert f"ino={node.ino}" in repr(node)


def test_predicates() -> None:
    assert oci_whiteout_target(b".wh.foo") == b"foo"
    assert oci_whiteout_target(b".wh..wh..opq") is None
    assert oci_whiteout_target(b"foo") is None and oci_whiteout_target(b".wh.") is None
    assert is_hidden_name(b".wh..wh..opq") and is_hidden_name(b".wh.x")
    assert not is_hidden_name(b"wh.x")
    assert is_hidden_xattr(b"trusted.overlay.opaque") and is_hidden_xattr(b"user.overlay.x")
    assert not is_hidden_xattr(b"trusted.overlayx") and not is_hidden_xattr(b"user.x")


def test_stack_needs_layers() -> None:
    with pytest.raises(ValueError):
        MergedTree([])
