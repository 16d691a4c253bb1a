"""Reading OCI layouts and archives (erofs_fuse/oci/image.py): resolution to one platform's manifest,
diff_ids and chain ids, blobs streamed in place, and hostile layouts refused with one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import tarfile
from pathlib import Path
from typing import Any

import pytest

from erofs_fuse.oci.image import (
    OciError,
    Platform,
    ResolvedImage,
    chain_ids,
    host_platform,
    image_name,
    open_blob,
    resolve_image,
)
from erofs_fuse.oci.layout import read_location
from ocilayout import (
    DOCKER_LAYER,
    Layout,
    archive,
    directory,
    file,
    ref,
    sha256,
    whiteout,
)


def base_layers(lay: Layout) -> list[Any]:
    return [lay.layer([directory("etc"), file("etc/os-release", "ID=test\n")]),
            lay.layer([whiteout("etc/os-release"), file("app", "x" * 5000)], "zstd"),
            lay.layer([file("top", "t")], None)]


@pytest.fixture
def simple(tmp_path: Path) -> tuple[Path, list[Any]]:
    lay = Layout(tmp_path / "simple")
    layers = base_layers(lay)
    lay.write_index([{**lay.image(layers), **ref("example.com/app:1.0")}])
    return lay.root, layers


def refused(source: Path | str, match: str, **kwargs: Any) -> str:
    with pytest.raises(OciError) as info:
        resolve_image(str(source), **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


# resolution -----------------------------------------------------------------------------------
def test_layout_dir_gives_layers_bottom_to_top(simple: tuple[Path, list[Any]]) -> None:
    root, layers = simple
    image = resolve_image(str(root))
    assert [layer.diff_id for layer in image.layers] == [b.diff_id for b in layers]
    assert [layer.digest for layer in image.layers] == [b.descriptor["digest"] for b in layers]
    assert [layer.compression for layer in image.layers] == ["gzip", "zstd", None]
    assert image.name == "example.com_app_1.0" and image.ref_name == "example.com/app:1.0"
    assert str(image.platform) == "linux/amd64"
    for layer, blob in zip(image.layers, layers):
        assert read_location(layer.location) == Path(root, "blobs/sha256",
                                                     blob.descriptor["digest"][7:]).read_bytes()


def test_archive_is_read_in_place(simple: tuple[Path, list[Any]], tmp_path: Path) -> None:
    root, layers = simple
    tar = archive(root, tmp_path / "image.tar", prefix="./")
    image = resolve_image(str(tar))
    assert [layer.diff_id for layer in image.layers] == [b.diff_id for b in layers]
    for layer in image.layers:
        loc = layer.location
        assert loc.path == str(tar) and loc.offset % 512 == 0 and loc.size == layer.size
        with open_blob(layer) as reader:
            data = reader.read()
            reader.finish()
        assert sha256(data) == layer.digest


def test_chain_ids_follow_the_oci_rule() -> None:
    a, b, c = (sha256(x) for x in (b"a", b"b", b"c"))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]


def test_chain_ids_reach_the_image(simple: tuple[Path, list[Any]]) -> None:
    image = resolve_image(str(simple[0]))
    assert [layer.chain_id for layer in image.layers] == \
        chain_ids([layer.diff_id for layer in image.layers])


def multi_platform(tmp_path: Path, nested: bool = True, docker: bool = False) -> Path:
    lay = Layout(tmp_path / "multi")
    manifests = []
    for arch, variant in (("amd64", None), ("arm64", "v8"), ("arm", "v7"), ("arm", "v6")):
        layer = lay.layer([file("arch", f"{arch}{variant or ''}\n")],
                          media_type=DOCKER_LAYER if docker else None)
        manifests.append(lay.image([layer], arch=arch, variant=variant, platform=True,
                                   docker=docker))
    attestation = lay.image([lay.layer([file("sbom", "{}")])], os_="unknown", arch="unknown",
                            platform=True)
    manifests.append(attestation)
    if nested:
        lay.write_index([{**lay.index(manifests, docker=docker), **ref("multi:latest")}])
    else:
        lay.write_index(manifests)
    return lay.root


def arch_file(image: ResolvedImage) -> str:
    with open_blob(image.layers[0]) as reader:
        tar = gzip.decompress(reader.read())
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        member = t.extractfile("arch")
        assert member is not None
        return member.read().decode().strip()


@pytest.mark.parametrize("nested", [True, False])
def test_platform_choice(tmp_path: Path, nested: bool) -> None:
    root = multi_platform(tmp_path, nested)
    host = host_platform()
    if host.architecture in ("amd64", "arm64"):
        assert arch_file(resolve_image(str(root))).startswith(host.architecture)
    assert arch_file(resolve_image(str(root), Platform.parse("linux/arm64"))) == "arm64v8"
    assert arch_file(resolve_image(str(root), Platform.parse("linux/aarch64"))) == "arm64v8"
    assert arch_file(resolve_image(str(root), Platform.parse("linux/arm/v6"))) == "armv6"
    assert arch_file(resolve_image(str(root), Platform.parse("linux/amd64"))) == "amd64"
    refused(root, "several manifests match linux/arm (linux/arm/v6, linux/arm/v7)",
            platform=Platform.parse("linux/arm"))
    refused(root, "no image for linux/s390x (the image has: linux/amd64, linux/arm/v6",
            platform=Platform.parse("linux/s390x"))


def test_docker_manifest_list(tmp_path: Path) -> None:
    root = multi_platform(tmp_path, docker=True)
    image = resolve_image(str(root), Platform.parse("linux/arm64"))
    assert arch_file(image) == "arm64v8" and image.name == "multi_latest"


def test_host_platform_names_go_architectures() -> None:
    expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())
    if expected is not None:
        assert host_platform() == Platform("linux", expected)
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert Platform.parse("LINUX/X86_64") == Platform("linux", "amd64")
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "arm64"))
    assert not Platform("linux", "arm", "v7").matches(Platform("linux", "arm", "v6"))
    for bad in ("linux", "linux/", "a/b/c/d", "linux/../x"):
        with pytest.raises(OciError):
            Platform.parse(bad)


def test_single_manifest_without_platform(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "arm-only")
    lay.write_index([lay.image([lay.layer([file("a", "1")])], arch="arm64")])
    image = resolve_image(str(lay.root))  # whatever this machine is: the only image
    assert str(image.platform) == "linux/arm64" and image.name == "arm-only"
    assert resolve_image(str(lay.root), Platform.parse("linux/arm64")).layers
    refused(lay.root, "the image is for linux/arm64, not linux/s390x",
            platform=Platform.parse("linux/s390x"))


def test_ref_selects_among_images(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "two")
    one = {**lay.image([lay.layer([file("n", "1")])]), **ref("one")}
    two = {**lay.image([lay.layer([file("n", "2")])]), **ref("two")}
    lay.write_index([one, two])
    refused(lay.root, "2 manifests name no platform: choose one with --ref")
    image = resolve_image(str(lay.root), ref="two")
    assert image.name == "two-two" and image.ref_name == "two"
    refused(lay.root, "no image named 'three' (names: one, two)", ref="three")


def test_ref_picks_among_docker_save_images_sharing_a_tag(tmp_path: Path) -> None:
    """docker save of debian:12 and alpine:12: both entries have ref.name "12"."""
    lay = Layout(tmp_path / "saved")

    def named(full: str, n: str) -> dict[str, Any]:
        return {**lay.image([lay.layer([file("n", n)])]),
                "annotations": {"io.containerd.image.name": full,
                                "org.opencontainers.image.ref.name": "12"}}

    lay.write_index([named("docker.io/library/debian:12", "d"),
                     named("docker.io/library/alpine:12", "a")])
    for ref_ in ("docker.io/library/alpine:12", "alpine:12", "library/alpine:12"):
        image = resolve_image(str(lay.root), ref=ref_)
        assert image.name == "docker.io_library_alpine_12", ref_
    assert resolve_image(str(lay.root), ref="debian:12").name == "docker.io_library_debian_12"
    refused(lay.root, "--ref 12 is ambiguous, it names docker.io/library/alpine:12, "
            "docker.io/library/debian:12: give the full name", ref="12")
    refused(lay.root, "no image named 'debian:11' (names: docker.io/library/alpine:12, "
            "docker.io/library/debian:12)", ref="debian:11")


def test_image_names_are_safe_file_names() -> None:
    assert image_name("/x/app.tar", {}) == "app"
    assert image_name("/x/layout/", {}) == "layout"
    assert image_name("/x/app.tar", {"org.opencontainers.image.ref.name": "v2"}) == "app-v2"
    assert image_name("/x/a.tar", {"io.containerd.image.name": "docker.io/library/debian:12",
                                    "org.opencontainers.image.ref.name": "12"}) == \
        "docker.io_library_debian_12"
    assert image_name("/x/a", {"org.opencontainers.image.ref.name": "../../etc/passwd"}) == \
        "etc_passwd"
    assert image_name("/x/a", {"org.opencontainers.image.ref.name": "/"}) == "image"
    assert len(image_name("/x/a", {"org.opencontainers.image.ref.name": "a:" + "b" * 500})) == 100


# integrity ------------------------------------------------------------------------------------
def rewrite_blob(root: Path, digest: str, data: bytes) -> None:
    path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.chmod(0o644)
    path.write_bytes(data)


def test_tampered_manifest_config_and_index_are_refused(tmp_path: Path) -> None:
    for what in ("manifest", "config", "index"):
        lay = Layout(tmp_path / what)
        mdesc = lay.image([lay.layer([file("a", "1")])], platform=True)
        idesc = lay.index([mdesc])
        lay.write_index([idesc])
        manifest = json.loads(lay.blob_path(mdesc["digest"]).read_bytes())
        target = {"manifest": mdesc, "config": manifest["config"], "index": idesc}[what]
        data = bytearray(lay.blob_path(target["digest"]).read_bytes())
        data[data.index(b"{") + 1:data.index(b"{") + 1] = b" "  # same JSON, other bytes
        rewrite_blob(lay.root, target["digest"], bytes(data[:-1]))  # same size
        refused(lay.root, f"blob {target['digest']} hashes to sha256:")


def test_tampered_layer_blob_is_caught_while_streaming(simple: tuple[Path, list[Any]]) -> None:
    root, layers = simple
    digest = layers[0].descriptor["digest"]
    data = bytearray((root / "blobs/sha256" / digest[7:]).read_bytes())
    data[4:8] = b"\1\2\3\4"  # the gzip mtime: another blob, the same tar
    rewrite_blob(root, digest, bytes(data))
    image = resolve_image(str(root))  # layers are not read when resolving
    with open_blob(image.layers[0]) as reader:
        assert gzip.decompress(reader.read()) == layers[0].tar
        with pytest.raises(OciError, match=f"layer 0: blob {digest} hashes to"):
            reader.finish()


def test_layer_reader_reports_progress(simple: tuple[Path, list[Any]]) -> None:
    image = resolve_image(str(simple[0]))
    seen: list[int] = []
    reader = open_blob(image.layers[1], seen.append)
    with reader:
        while reader.read(100):
            pass
        reader.finish()
    assert seen[-1] == image.layers[1].size and seen == sorted(seen)


# hostile layouts ------------------------------------------------------------------------------
def index_doc(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "index.json").read_text())
    return doc


def set_index(root: Path, doc: Any) -> None:
    (root / "index.json").write_text(json.dumps(doc))


def test_malformed_descriptors_are_refused(simple: tuple[Path, list[Any]]) -> None:
    root, _ = simple
    good = index_doc(root)
    desc = good["manifests"][0]
    cases = [
        ({**desc, "digest": "sha256:../../../etc/passwd"}, "malformed digest"),
        ({**desc, "digest": "sha512:" + "0" * 128}, "digest algorithm 'sha512' is not supported"),
        ({**desc, "digest": "sha256:" + "0" * 64}, "is missing from"),
        ({**desc, "size": desc["size"] + 1}, "its descriptor says"),
        ({**desc, "size": -1}, "size -1 is not a byte count"),
        ({**desc, "size": True}, "size True is not a byte count"),
        ({**desc, "size": 5 << 20}, "more than the 4194304 allowed"),
        ({**desc, "annotations": {"a": 1}}, "annotations are not a map of strings"),
        ({**desc, "platform": {"os": "linux"}}, "platform: architecture is missing"),
        ("not an object", "expected a JSON object"),
    ]
    for bad, match in cases:
        set_index(root, {**good, "manifests": [bad]})
        refused(root, match)
    set_index(root, {**good, "schemaVersion": 1})
    refused(root, "schemaVersion 1 is not 2")
    set_index(root, {**good, "manifests": [desc] * 5000})
    refused(root, "manifests has 5000 entries, more than the 4096 allowed")
    (root / "index.json").write_text("[" * 100000 + "]" * 100000)
    refused(root, "not valid JSON")
    (root / "index.json").write_text("{")
    refused(root, "index.json: not valid JSON")


def test_layer_media_types(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "types")
    ok = [lay.layer([file("a", "1")], "gzip", media_type=DOCKER_LAYER),
          lay.layer([file("b", "2")], None)]
    foreign = lay.layer([file("c", "3")], "gzip",
                        media_type="application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    lay.write_index([lay.image(ok, docker=True)])
    assert len(resolve_image(str(lay.root)).layers) == 2
    lay.write_index([lay.image([*ok, foreign])])
    refused(lay.root, "layer 2: unsupported media type "
            "'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip'")


def test_config_must_match_the_layers(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "cfg")
    layer = lay.layer([file("a", "1")])
    lay.write_index([lay.image([layer], diff_ids=[layer.diff_id] * 2)])
    refused(lay.root, "2 diff_ids for 1 layers")
    lay.write_index([lay.image([layer], diff_ids=["sha256:abc"])])
    refused(lay.root, "diff_ids[0]: malformed digest")
    artifact = lay.json_blob({"schemaVersion": 2, "config": lay.blob(
        b"{}", "application/vnd.oci.empty.v1+json"), "layers": []}, "application/vnd.oci.image.manifest.v1+json")
    lay.write_index([artifact])
    refused(lay.root, "config media type 'application/vnd.oci.empty.v1+json': not a container "
            "image")


def test_deep_index_nesting_is_refused(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "deep")
    desc = lay.image([lay.layer([file("a", "1")])], platform=True)
    for _ in range(6):
        desc = lay.index([desc])
    lay.write_index([desc])
    refused(lay.root, "indexes nested deeper than 4")


def test_layout_marker_is_required(simple: tuple[Path, list[Any]]) -> None:
    root, _ = simple
    (root / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    refused(root, "unsupported imageLayoutVersion '2.0.0'")
    (root / "oci-layout").unlink()
    refused(root, "no oci-layout: not an OCI image layout")


def test_symlinks_out_of_the_layout_are_refused(simple: tuple[Path, list[Any]],
                                                 tmp_path: Path) -> None:
    root, layers = simple
    digest = layers[0].descriptor["digest"]
    blob = root / "blobs/sha256" / digest[7:]
    outside = tmp_path / "outside"
    outside.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(outside)
    refused(root, f"blobs/sha256/{digest[7:]} is a symlink leading out of the layout")
    blob.unlink()
    os.mkfifo(blob)
    refused(root, f"blobs/sha256/{digest[7:]} is not a regular file")


def tar_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_hostile_archives_are_refused(simple: tuple[Path, list[Any]], tmp_path: Path) -> None:
    root, _ = simple
    members = [(str(p.relative_to(root)), p.read_bytes()) for p in sorted(root.rglob("*"))
               if p.is_file()]
    for evil in ("../evil", "/etc/evil", "blobs/../../evil"):
        bad = tar_with(tmp_path / "bad.tar", [*members, (evil, b"x")])
        refused(bad, f"archive member {evil!r} leads out of the layout")
    dup = tar_with(tmp_path / "dup.tar", [*members, ("./index.json", b"{}")])
    refused(dup, "archive holds 'index.json' twice")
    good = archive(root, tmp_path / "good.tar")
    (tmp_path / "good.tar.gz").write_bytes(gzip.compress(good.read_bytes()))
    refused(tmp_path / "good.tar.gz", "a compressed archive: decompress it first")
    (tmp_path / "junk.tar").write_bytes(b"\1" * 2000)
    refused(tmp_path / "junk.tar", "not a readable tar archive")
    cut = tmp_path / "cut.tar"
    data = good.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    message = refused(cut, "")
    assert "cut.tar" in message
    with tarfile.open(tmp_path / "link.tar", "w") as tar:
        for name, data_ in members:
            info = tarfile.TarInfo(name)
            if name == "index.json":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data_)
                tar.addfile(info, io.BytesIO(data_))
    refused(tmp_path / "link.tar", "member index.json is not a plain regular file")


def test_missing_image(tmp_path: Path) -> None:
    refused(tmp_path / "nope", "cannot open archive: No such file or directory")
