"""``erofs-fuse mount --image`` and ``lazy:`` items of ``--layers``: the lazy reading options
and opening a registry image's layers lazily (``erofs_fuse.lazy``), for ``mount`` and for
``info``/``ls``/``cat --image``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..console import CliError
from ..fuse.daemon import MountConfig
from ..fuse.overlay import MAX_LAYERS

if TYPE_CHECKING:
    from ..erofs.image import Image


@dataclass(frozen=True)
class RemoteImage:
    """What --image and its options ask for."""

    ref: str
    plain_http: bool
    cache_dir: str
    cache_size: int
    fill: str  # "" (only what is read), "metadata" (--fill-metadata) or "all" (--fill)
    fetch_timeout: float
    fetch_unit: int


MAX_FETCH_UNIT = 16 << 20
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str, command: str = "mount") -> int:
    """``text`` (512M, 10G, 1.5G, 4096) in bytes; CliError naming ``command`` and ``what``."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_SUFFIXES else ""
    number = value[:len(value) - len(unit)]
    try:
        size = int(float(number) * _SIZE_SUFFIXES[unit])
    except ValueError:
        raise CliError(f"{command}: {what} {text}: expected a size such as 512M or 10G") \
            from None
    if size < 0:
        raise CliError(f"{command}: {what} {text}: negative")
    return size


def parse_remote(ns: argparse.Namespace) -> RemoteImage:
    if ns.layers or ns.device:
        raise CliError("mount: --image and --layers (or --device) exclude each other")
    if ns.verity or ns.verity_roots or ns.dm_verity or ns.verity_sidecar or \
            ns.trust_dmverity_sidecar:
        raise CliError("mount: --image takes its layers' digests from the pinned manifest; "
                       "the verity options are for --layers")
    check_pinned(ns.image, "mount: --image")
    return lazy_settings(ns, ns.image)


def lazy_settings(ns: argparse.Namespace, ref: str) -> RemoteImage:
    """The lazy reading options, for --image ``ref`` or (``ref`` empty) --layers' lazy:."""
    from ..lazy.cache import DEFAULT_CACHE_DIR

    if not ns.fetch_timeout > 0:
        raise CliError("mount: --fetch-timeout must be more than 0")
    unit = parse_size(ns.fetch_unit, "--fetch-unit")
    if unit <= 0 or unit % 4096 or unit > MAX_FETCH_UNIT:
        raise CliError(f"mount: --fetch-unit {ns.fetch_unit}: a multiple of 4K up to 16M")
    return RemoteImage(ref, ns.plain_http, os.path.abspath(ns.cache_dir or
                                                                DEFAULT_CACHE_DIR),
                       parse_size(ns.cache_size, "--cache-size"), ns.fill, ns.fetch_timeout,
                       unit)


def lazy_indexes(layers: list[str]) -> list[int]:
    """The positions of ``lazy:`` layers, each checked to parse."""
    from ..lazy.source import LazySource, LazySourceError, is_lazy

    found = []
    for index, layer in enumerate(layers):
        if is_lazy(layer):
            try:
                LazySource.parse(layer)
            except LazySourceError as exc:
                raise CliError(f"mount: --layers {exc}") from None
            found.append(index)
    return found


def check_pinned(text: str, option: str = "--image") -> None:
    ref, _, digest = text.rpartition("@")
    if not ref or not digest.startswith("sha256:"):
        raise CliError(f"{option} {text}: not pinned by a digest; give REF@sha256:DIGEST "
                       "(the digest is what is trusted; push prints it)")


def open_remote(remote: RemoteImage, cfg: MountConfig) -> list[Image]:
    """The layers of a registry image, opened lazily (``erofs_fuse.lazy``); fills ``cfg``'s
    layer names, marks its reads as blocking and schedules what --fill or --fill-metadata ask."""
    images = open_remote_images(remote)
    cfg.layers = [image.name for image in images]
    _lazy_reads(remote, cfg, images)
    return images


def open_mixed(remote: RemoteImage, cfg: MountConfig) -> list[Image]:
    """--layers with lazy: layers among local files: those opened lazily, grouped by image
    (each manifest resolved once), the files as usual (``--require-verity`` is for them: a
    lazy layer is always verified)."""
    from ..fuse.daemon import open_layers
    from ..lazy.source import LazySource

    sources = {index: LazySource.parse(cfg.layers[index])
               for index in lazy_indexes(cfg.layers)}
    opened: dict[int, Image] = {}
    try:
        for ref, plain in sorted({(s.reference, s.plain_http) for s in sources.values()}):
            wanted = {i: s.index for i, s in sources.items()
                      if (s.reference, s.plain_http) == (ref, plain)}
            settings = dataclasses.replace(remote, ref=ref,
                                           plain_http=remote.plain_http or plain)
            got = open_remote_images(settings, indexes=list(wanted.values()))
            opened.update(zip(wanted.keys(), got))
        images = open_layers(cfg, opened)
    except BaseException:
        for image in opened.values():
            image.close()
        raise
    _lazy_reads(remote, cfg, list(opened.values()))
    return images


def _lazy_reads(remote: RemoteImage, cfg: MountConfig, images: list[Image]) -> None:
    """Mark ``cfg``'s reads as blocking and schedule, once serving, the background fetches of
    --fill: each lazy layer's metadata (see ``metadata_region``), or the whole layers,
    metadata first. Not by default: the metadata of the python image is 17 MB, 5% of it,
    more than half of what a container start reads (``import ssl``: 28.9 MB), and on a slow
    link it would compete with the reads a start waits for."""
    from ..lazy import LazyBlob

    cfg.blocking_reads = True
    _few_malloc_arenas()
    lazy = [(image.blob, metadata_region(image)) for image in images
            if isinstance(image.blob, LazyBlob)]

    def fetch() -> None:
        for blob, (start, stop) in lazy:
            if remote.fill == "all":
                blob.start_fill(first=start)
            elif remote.fill == "metadata" and stop > start:
                blob.start_prefetch(start, stop)
    if remote.fill:
        cfg.on_serve.append(fetch)


MAX_METADATA_PREFETCH = 64 << 20
M_ARENA_MAX = -8  # glibc's mallopt() parameter
MALLOC_ARENAS = 2


def _few_malloc_arenas() -> None:
    """Fetch threads come and go, each holding up to 4 MiB of a layer for a moment; glibc
    gives threads arenas of their own (up to 8 per core) and keeps what they freed in each:
    the daemon held 140-174 MB after a cold read-all of the python image, 95 MB with two
    arenas, for no more CPU. A hint: without glibc, nothing."""
    import ctypes  # here: every mount imports this module, few are lazy

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


def metadata_region(image: Image) -> tuple[int, int]:
    """Where a layer's inodes, inline directories and xattrs are, if cheap to know: from the
    superblock's ``meta_blkaddr`` to the end, as our writer places them after the data (at
    most MAX_METADATA_PREFETCH). Empty for layers whose metadata starts at block 0
    (mkfs.erofs interleaves it with the data)."""
    start = image.superblock.meta_base
    if start <= 0:
        return 0, 0
    return start, min(image.blob.size, start + MAX_METADATA_PREFETCH)


def open_remote_images(remote: RemoteImage, what: str = "mount",
                       indexes: list[int] | None = None) -> list[Image]:
    """The layers of a registry image, bottom first (or those of ``indexes``, in that order),
    each an ``Image`` over a lazy blob."""
    from ..erofs.errors import ErofsError
    from ..erofs.image import Image
    from ..lazy import LazyOptions, open_layers, resolve_pinned
    from ..oci.layout import OciError
    from ..registry import Reference, RegistryClient, RetryPolicy

    timeout = remote.fetch_timeout
    client = RegistryClient(plain_http=True if remote.plain_http else None,
                            retry=RetryPolicy(attempts=3, backoff=0.2, max_backoff=2.0,
                                              timeout=timeout, deadline=2 * timeout))
    try:
        ref = Reference.parse(remote.ref)
        resolved = resolve_pinned(client, ref)
        if len(resolved.layers) > MAX_LAYERS:
            raise CliError(f"{what}: {len(resolved.layers)} layers; at most {MAX_LAYERS} are "
                           "supported")
        blobs = open_layers(client, resolved, LazyOptions(
            cache_dir=remote.cache_dir, cache_size=remote.cache_size, unit=remote.fetch_unit,
            deadline=6 * timeout), indexes)
    except (OciError, ErofsError, ValueError) as exc:
        raise CliError(f"{what}: {exc}") from exc
    except OSError as exc:
        raise CliError(f"{what}: cache {remote.cache_dir}: {exc.strerror or exc}") from exc
    images: list[Image] = []
    try:
        for blob in blobs:
            images.append(Image(blob, name=blob.name))
    except BaseException as exc:
        for blob in blobs:
            blob.close()
        if isinstance(exc, ErofsError):
            raise CliError(f"{what}: {exc}") from exc
        raise
    return images
