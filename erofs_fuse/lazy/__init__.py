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

from .cache import DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE, BlockCache
from .layer import (LazyOptions, RemoteLayerError, lazy_verity, open_layer, open_layers,
                    resolve_pinned)
from .remote import DEFAULT_UNIT, LazyBlob

__all__ = ["DEFAULT_CACHE_DIR", "DEFAULT_CACHE_SIZE", "DEFAULT_UNIT", "BlockCache",
           "LazyBlob", "LazyOptions", "RemoteLayerError", "lazy_verity", "open_layer",
           "open_layers", "resolve_pinned"]
