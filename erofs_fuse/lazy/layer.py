"""Opening the layers of a pinned registry image for lazy reading (``remote.LazyBlob``).

Only a reference pinned by digest is accepted: the manifest must hash to it, so its layer
descriptors and their annotations (fs-verity digest, tree blob) can be trusted; a tag would
let the registry choose what is trusted. A layer that is not a native EROFS layer with
``push``'s annotations is refused: nothing could verify its blocks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..blob import Blob, BytesBlob, FileBlob, write_atomic
from ..oci.image import Descriptor, Platform
from ..registry.client import RegistryClient, Resolved
from ..registry.errors import AuthError, NotFound, RegistryError
from ..registry.push import ANNOTATIONS, LAYER_MEDIA_TYPE, TREE_MEDIA_TYPE
from ..registry.reference import Reference
from ..verity.blob import MerkleTree, VerifiedBlob
from ..verity.formats import FormatError, HashParams
from ..verity.trust import FsVerityDigest, IntegrityError
from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE, EVICT_EVERY, BlockCache, entry_key
from .remote import DEFAULT_UNIT, LazyBlob

MAX_TREE_SLACK = 64 << 10  # bytes a tree blob may hold beyond offset + tree (a superblock)


class RemoteLayerError(RegistryError):
    """A layer of the image cannot be read lazily (what it lacks, in one line)."""


@dataclass(frozen=True)
class LazyOptions:
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_size: int = DEFAULT_CACHE_SIZE
    unit: int = DEFAULT_UNIT
    deadline: float = 60.0  # longest wait of a read for its fetch
    evict_every: int = EVICT_EVERY  # bytes stored between evictions (besides at open)


def resolve_pinned(client: RegistryClient, ref: Reference,
                   platform: Platform | None = None) -> Resolved:
    """The manifest ``ref`` pins (an index: this platform's entry, checked by the index)."""
    if ref.digest is None:
        raise RemoteLayerError(f"{ref}: not pinned by a digest (REF@sha256:...)")
    return client.resolve(ref, platform)


def open_layers(client: RegistryClient, resolved: Resolved,
                options: LazyOptions = LazyOptions(),
                indexes: list[int] | None = None) -> list[Blob]:
    """Every layer of ``resolved``, bottom first (or the layers at ``indexes``, in that
    order), as verified lazy blobs; then the cache is brought under its size limit (never
    evicting a layer in use)."""
    count = len(resolved.layers)
    wanted = list(range(count)) if indexes is None else indexes
    for index in wanted:
        if not 0 <= index < count:
            raise RemoteLayerError(f"{resolved.pinned}: no layer {index} (it has {count}, "
                                   f"0 to {count - 1})")
    cache = BlockCache(options.cache_dir, options.cache_size, options.evict_every)
    blobs: list[Blob] = []
    try:
        for index in wanted:
            blobs.append(open_layer(client, resolved.pinned, resolved.layers[index], cache,
                                    index, options))
        cache.evict()
    except BaseException:
        for blob in blobs:
            blob.close()
        raise
    return blobs


@dataclass(frozen=True)
class _TreeInfo:
    verity: FsVerityDigest
    digest: str
    size: int
    offset: int


def layer_name(ref: Reference, index: int, desc: Descriptor) -> str:
    return f"{ref.host}/{ref.repository} layer {index} ({desc.digest[:19]})"


def lazy_verity(desc: Descriptor, where: str) -> str:
    """The layer's fs-verity digest (``sha256:HEX``) if it can be read lazily (a native EROFS
    layer with push's annotations); RemoteLayerError naming what it lacks otherwise."""
    return str(_tree_info(desc, where).verity)


def lazy_xattr_free(desc: Descriptor) -> bool:
    """Whether push found that the layer shows no xattr (its annotation; the manifest is
    pinned by digest, so it is as trusted as the layer's fs-verity digest)."""
    return desc.annotations.get(ANNOTATIONS.xattr_free) == "true"


def _tree_info(desc: Descriptor, where: str) -> _TreeInfo:
    if desc.media_type != LAYER_MEDIA_TYPE:
        raise RemoteLayerError(f"{where}: media type {desc.media_type}, not a native EROFS "
                               f"layer ({LAYER_MEDIA_TYPE}, as erofs-fuse push makes them)")
    a, ann = ANNOTATIONS, desc.annotations
    try:
        verity = FsVerityDigest.parse(ann[a.verity])
        info = _TreeInfo(verity, ann[a.tree], int(ann[a.tree_size]), int(ann[a.tree_offset]))
    except KeyError as exc:
        raise RemoteLayerError(f"{where}: no annotation {exc.args[0]} (its Merkle tree is "
                               "needed to verify blocks; push it with erofs-fuse push)") from None
    except (ValueError, FormatError) as exc:
        raise RemoteLayerError(f"{where}: bad verity annotation: {exc}") from None
    if info.size < 0 or info.offset < 0:
        raise RemoteLayerError(f"{where}: negative tree size or offset")
    return info


def open_layer(client: RegistryClient, ref: Reference, desc: Descriptor, cache: BlockCache,
               index: int, options: LazyOptions = LazyOptions()) -> Blob:
    """One layer as a verified lazy blob (a one-block layer: fetched and verified at once)."""
    name = layer_name(ref, index, desc)
    info = _tree_info(desc, name)
    params = HashParams.fsverity(info.verity.alg)
    need = MerkleTree(params, desc.size, None, 0, info.verity).tree_bytes
    if not info.offset + need <= info.size <= info.offset + need + MAX_TREE_SLACK:
        raise RemoteLayerError(
            f"{name}: tree blob of {info.size} bytes with the tree at {info.offset}; a "
            f"{desc.size}-byte layer has a {need}-byte tree")
    entry = cache.open_entry(entry_key(info.verity.alg, info.verity.digest), desc.size,
                             params.data_block_size, info.verity.digest)
    try:
        if not need:  # no tree levels: the root hashes the one block itself
            entry.close()
            data = client.read_range(ref, desc, 0, desc.size) if desc.size else b""
            tree = MerkleTree(params, desc.size, None, 0, info.verity)
            return VerifiedBlob(BytesBlob(data, name), tree, name=name)
        for cached in (True, False):
            if not cached or _size(entry.tree_path) != need:
                write_atomic(entry.tree_path, _fetch_tree(client, ref, info, name, need))
                cached = False
            tree = MerkleTree(params, desc.size, FileBlob(entry.tree_path), 0, info.verity)
            try:
                verified = VerifiedBlob(FileBlob(entry.data_path), tree, name=name)
            except IntegrityError:
                if not cached:
                    raise
                os.unlink(entry.tree_path)  # a cached tree gone bad: fetch it again
                continue
            return LazyBlob(client, ref, desc, entry, verified, name=name, unit=options.unit,
                            deadline=options.deadline, cache=cache)
        raise AssertionError("unreachable")
    except BaseException:
        entry.close()
        raise


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _fetch_tree(client: RegistryClient, ref: Reference, info: _TreeInfo, name: str,
                need: int) -> bytes:
    """The tree levels from the tree blob, which must hash to its annotated digest (fetched
    again after a broken or wrong body, as often as the client's policy tries)."""
    desc = Descriptor(TREE_MEDIA_TYPE, info.digest, info.size)
    attempts = client.session.retry.attempts
    for tries in range(1, attempts + 1):
        try:
            with client.open_blob(ref, desc, name=f"{name} Merkle tree") as blob:
                data = b"".join(blob.chunks())
            break
        except (NotFound, AuthError, RemoteLayerError):
            raise
        except RegistryError:
            if tries >= attempts:
                raise
    assert "sha256:" + hashlib.sha256(data).hexdigest() == info.digest  # BlobReader checked
    return data[info.offset:info.offset + need]
