"""A synchronous, thread-safe client for OCI distribution registries: pull and push.

No FUSE, no trio, nothing from the command line: the image conversion's worker processes each
open their own blob streams with it, and the lazy layers will read ranges with it.

    from erofs_fuse.registry import Reference, RegistryClient

    ref = Reference.parse("127.0.0.1:5000/team/app:v1")   # or "debian:12", "ghcr.io/x/y@sha256:…"
    with RegistryClient() as client:                      # plain_http=None: HTTP on loopback
        image = client.resolve(ref, platform)              # index -> this platform's manifest
        image.manifest_digest, image.manifest.data, image.config.content, image.layers
        with client.open_blob(ref, image.layers[0]) as blob:    # io.RawIOBase; or blob.chunks()
            consume(blob)                                  # raises at the end on a bad blob
            blob.finish()                                  # verify what the consumer left
        client.read_range(ref, image.layers[0], offset, length)  # 206 checked; not verified

- ``Reference.parse(text)``: ``[host[:port]/]repo[:tag][@sha256:…]`` with docker's defaults
  (``docker.io``, ``library/``, tag ``latest``); ``api_host``, ``reference``, ``with_digest``.
- ``RegistryClient(plain_http=None, credentials=DockerConfig(), retry=RetryPolicy())``:
  ``plain_http`` None = HTTP for ``localhost``/127.0.0.0/8/::1 and HTTPS elsewhere, True = HTTP
  everywhere, False = HTTPS everywhere. ``credentials`` maps a registry host to
  ``Credentials(username, password)`` or None; ``DockerConfig()`` reads ``auths`` from
  ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``; None = anonymous only.
  Registries asking for Bearer tokens (anonymous or with the credentials sent as Basic to the
  token realm) and for Basic authentication are both served; credentials go only over HTTPS or
  to this machine. The client pickles to its settings (a worker opens its own connections).
- ``resolve(ref, platform=None) -> Resolved`` (``index``, ``manifest``, ``config``:
  ``Document(descriptor, data, content)``; ``layers``; ``platform``; ``manifest_digest``;
  ``pinned``). ``fetch_manifest``, ``fetch_config``, ``open_blob(ref, descriptor, on_read=)``,
  ``read_range(ref, descriptor, offset, length)``.
- Push (``upload``): ``blob_exists(ref, digest)`` (HEAD), ``push_blob(ref, digest, size,
  opener)`` (POST, then one streamed PUT to the Location; a failed upload is never sent into
  its session again: a new session, up to the policy's tries), ``mount_blob(ref, digest,
  repository)``, ``push_manifest(ref, tag_or_digest, data, media_type)`` (exact bytes, the
  registry's digest checked). Push requests ask for ``repository:NAME:pull,push`` tokens,
  which then serve the push's reads too. ``push.push(PushRequest)`` is ``erofs-fuse push``:
  an image's layers as native EROFS blobs with their Merkle trees (see its docstring).
- ``RetryPolicy``: tries (4), exponential backoff from 0.2 s, Retry-After capped at 10 s, a
  30 s socket timeout, a 120 s deadline for each small reply.
- Errors: ``RegistryError`` (an ``OciError``) → ``NotFound``, ``AuthError``,
  ``DigestMismatch``, ``IncompleteBody``, ``Unreachable``, ``BadResponse``.

Modules: ``reference`` (names), ``auth`` (credentials, challenges, tokens), ``session`` (HTTP,
retries, authentication), ``blobs`` (the verifying reader), ``client`` (manifests, blobs,
ranges), ``upload`` (blobs and manifests pushed), ``push`` (an image pushed as EROFS layers),
``errors``.
"""

from __future__ import annotations

from .auth import Credentials, CredentialSource, DockerConfig
from .blobs import BlobReader
from .client import Document, RegistryClient, RemoteLayer, Resolved
from .errors import (AuthError, BadResponse, DigestMismatch, IncompleteBody, NotFound,
                     RegistryError, Unreachable)
from .reference import Reference, is_loopback
from .session import RetryPolicy

__all__ = [
    "AuthError", "BadResponse", "BlobReader", "CredentialSource", "Credentials",
    "DigestMismatch", "DockerConfig", "Document", "IncompleteBody", "NotFound", "Reference",
    "RegistryClient", "RegistryError", "RemoteLayer", "Resolved", "RetryPolicy", "Unreachable", "is_loopback",
]
