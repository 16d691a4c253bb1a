"""Pushing to an OCI distribution registry: blobs and manifests.

Spec: OCI distribution-spec v1.1 ("Push": checking if content exists, monolithic POST then
PUT, cross-repository mount, pushing manifests). Written for what Debian's docker-registry
(distribution 2.8.2) does: it ignores a single-POST body and ``Content-Range`` on PATCH (the
body is appended), and its upload ``Location`` carries a signed ``_state`` query, so the
digest is appended with ``&``; the Location is used exactly as sent, never assembled.

A blob goes up as one streamed PUT (read from its file in chunks, ``Content-Length`` set):
a chunked PATCH upload would buy nothing here, since 2.8.2 cannot resume or seek an upload
and every chunk costs a round trip; streaming keeps memory bounded all the same. An upload
that fails is never re-sent into the same session (the registry may hold part of it): the
session is abandoned (DELETE, best effort), the blob is looked for (the PUT may have landed
and only its reply been lost), and a new session is started, up to the retry policy's tries.

Every request asks for the ``repository:NAME:pull,push`` token scope (its own token, cached
apart from pull's).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Callable, Iterator

import httpx

from .errors import (BadResponse, DigestMismatch, IncompleteBody, NotFound, RegistryError,
                     Unreachable)
from .reference import Reference, is_repository_name
from .session import Session

__all__ = ["blob_exists", "bytes_chunks", "file_chunks", "mount_blob", "push_blob",
           "push_manifest", "push_scope"]

CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def push_scope(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull,push"


def _checked(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise BadResponse(f"digest {digest[:80]!r} is not sha256:<64 hex>")
    return digest


def blob_exists(session: Session, ref: Reference, digest: str) -> bool:
    """Whether the repository of ``ref`` has the blob ``digest`` (HEAD)."""
    what = f"{ref.host}/{ref.repository}: blob {digest}"
    try:
        response = session.send("HEAD", ref.host, ref.api_host,
                                f"/v2/{ref.repository}/blobs/{_checked(digest)}",
                                scope=push_scope(ref), what=what)
    except NotFound:
        return False
    response.close()
    return True


def mount_blob(session: Session, ref: Reference, digest: str, source_repo: str) -> bool:
    """Ask the registry to link the blob ``digest`` of ``source_repo`` (same registry) into
    ``ref``'s repository; False when it cannot (it then opens an upload session, which is
    cancelled)."""
    what = f"{ref.host}/{ref.repository}: mount {digest} from {source_repo}"
    if not is_repository_name(source_repo):
        raise BadResponse(f"{what}: {source_repo!r} is not a repository name")
    path = (f"/v2/{ref.repository}/blobs/uploads/?mount={_checked(digest)}"
            f"&from={source_repo}")
    try:
        response = session.send("POST", ref.host, ref.api_host, path, scope=push_scope(ref),
                                what=what, body=b"")
    except NotFound:
        return False
    response.close()
    if response.status_code == 201:
        return True
    location = response.headers.get("Location")
    if location:
        _cancel(session, ref, _absolute(session, ref, location), what)
    return False


def push_blob(session: Session, ref: Reference, digest: str, size: int,
              opener: Callable[[], Iterator[bytes]], *, name: str = "blob") -> None:
    """Upload the blob ``digest`` of ``size`` bytes, whose bytes ``opener`` gives (anew for
    each try), monolithically: POST, then one streamed PUT to the Location with the digest."""
    what = f"{ref.host}/{ref.repository}: {name} {_checked(digest)}"
    retry = session.retry
    for tries in range(1, retry.attempts + 1):
        location = _start(session, ref, what)
        url = location + ("&" if "?" in location else "?") + "digest=" + digest
        try:
            response = session.send(
                "PUT", ref.host, ref.api_host, url, scope=push_scope(ref), what=what,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(size)},
                body=lambda: _counted(opener(), size, what), attempts=1)
        except (Unreachable, IncompleteBody) as exc:
            _cancel(session, ref, location, what)
            if blob_exists(session, ref, digest):
                return  # the PUT landed; its reply was lost
            if tries >= retry.attempts:
                raise Unreachable(f"{exc} (upload tried {tries} times)") from None
            time.sleep(retry.wait(tries, None))
            continue
        response.close()
        if response.status_code != 201:
            raise BadResponse(f"{what}: upload answered {response.status_code}, not 201")
        sent = response.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            raise DigestMismatch(f"{what}: the registry stored {sent}")
        return


def _start(session: Session, ref: Reference, what: str) -> str:
    """A new upload session's absolute Location."""
    response = session.send("POST", ref.host, ref.api_host,
                            f"/v2/{ref.repository}/blobs/uploads/", scope=push_scope(ref),
                            what=what, body=b"")
    response.close()
    location = response.headers.get("Location", "")
    if response.status_code != 202 or not location:
        raise BadResponse(f"{what}: starting an upload answered {response.status_code} "
                          f"{'without a Location' if not location else ''}".rstrip())
    return _absolute(session, ref, location)


def _absolute(session: Session, ref: Reference, location: str) -> str:
    """A Location as an absolute URL (it may be relative to the registry)."""
    base = httpx.URL(f"{session.scheme(ref.api_host)}://{ref.api_host}/")
    return str(base.join(location))


def _cancel(session: Session, ref: Reference, location: str, what: str) -> None:
    """Abandon an upload session (best effort: the registry purges stale ones anyway)."""
    try:
        session.send("DELETE", ref.host, ref.api_host, location, scope=push_scope(ref),
                     what=f"{what}: cancel upload", attempts=1).close()
    except RegistryError:
        pass  # not worth failing the push for


def _counted(chunks: Iterator[bytes], size: int, what: str) -> Iterator[bytes]:
    """The chunks, refusing a source that gives more or fewer than ``size`` bytes (the
    Content-Length promised): a file changed under the push."""
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > size:
            raise DigestMismatch(f"{what}: the source grew beyond {size} bytes")
        yield chunk
    if sent != size:
        raise DigestMismatch(f"{what}: the source gave {sent} of {size} bytes")


def file_chunks(path: str, on_sent: Callable[[int], None] | None = None
                ) -> Callable[[], Iterator[bytes]]:
    """An opener for ``push_blob``: the file's bytes in chunks, read positionally."""
    def opener() -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while chunk := os.pread(fd, CHUNK, pos):
                pos += len(chunk)
                if on_sent is not None:
                    on_sent(pos)
                yield chunk
        finally:
            os.close(fd)
    return opener


def bytes_chunks(data: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([data])


def push_manifest(session: Session, ref: Reference, reference: str, data: bytes,
                  media_type: str) -> str:
    """PUT the manifest (or index) ``data``, exactly these bytes, under ``reference`` (a tag
    or its digest); its digest, which the registry must confirm."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    what = f"{ref.host}/{ref.repository}: manifest {reference}"
    response = session.send("PUT", ref.host, ref.api_host,
                            f"/v2/{ref.repository}/manifests/{reference}",
                            scope=push_scope(ref), what=what, body=data,
                            headers={"Content-Type": media_type})
    response.close()
    sent = response.headers.get("Docker-Content-Digest")
    if sent and sent != digest:
        raise DigestMismatch(f"{what}: the registry says {sent}, the bytes sent hash to "
                             f"{digest}")
    return digest
