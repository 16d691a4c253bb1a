"""Lazy layers: EROFS layers in a registry, read by range on first use, every block verified.

No FUSE, no trio, nothing from the command line. Modules: ``cache`` (the block cache on disk:
verified blocks, shared by mounts, evicted whole layers at a time), ``remote`` (``LazyBlob``:
a registry blob under the ``Blob`` seam, fetching, verifying and caching blocks), ``layer``
(opening the layers of a digest-pinned image: their trees, checked against the manifest's
annotations).

    client = RegistryClient(...)
    resolved = resolve_pinned(client, Reference.parse("host/repo@sha256:..."))
    blobs = open_layers(client, resolved, LazyOptions(cache_dir=..., cache_size=...))
    images = [Image(blob) for blob in blobs]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

# Public names and the module of each, loaded on first use (PEP 562), as in ``verity``: a
# module that needs one small part (``source``, which every ``erofs-fuse mount`` consults to
# find lazy: layers among its --layers) must not import the rest, which pulls in the registry
# client, httpx and the writer: 0.38 s of every mount's start-up before this was so.
_EXPORTS = {
    "DEFAULT_CACHE_DIR": "cache", "DEFAULT_CACHE_SIZE": "cache", "BlockCache": "cache",
    "LazyOptions": "layer", "RemoteLayerError": "layer", "lazy_verity": "layer",
    "open_layer": "layer", "open_layers": "layer", "resolve_pinned": "layer",
    "DEFAULT_UNIT": "remote", "LazyBlob": "remote",
}

if TYPE_CHECKING:
    from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE, BlockCache
    from .layer import (LazyOptions, RemoteLayerError, lazy_verity, open_layer, open_layers,
                        resolve_pinned)
    from .remote import DEFAULT_UNIT, LazyBlob

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_CACHE_SIZE", "DEFAULT_UNIT", "BlockCache",
           "LazyBlob", "LazyOptions", "RemoteLayerError", "lazy_verity", "open_layer",
           "open_layers", "resolve_pinned"]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
