"""Pulling images from an OCI distribution registry: manifests, configs, blobs, ranges.

Spec: OCI distribution-spec v1.1 ("Pulling manifests", "Pulling blobs"; Range as in v1.1.1:
a registry SHOULD honour it, RFC 9110 §14), image-spec v1.1 (index, manifest, descriptor).
Docker's schema 2 manifest and manifest list are accepted as their OCI twins.

Nothing a registry sends is trusted until it hashes to a digest: a manifest fetched by digest
must hash to it; one fetched by tag is named by its own hash (and must agree with
``Docker-Content-Digest`` when that is sent); a manifest chosen from an index, the config and
every blob must hash to their descriptors. Manifests and configs are read only up to a bound.
A range cannot be checked against the blob's digest: its reader checks it (the lazy layers
check every block against a Merkle tree pinned by the manifest).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import httpx

from ..oci.image import (CONFIG_TYPES, INDEX_TYPES, MANIFEST_TYPES, Descriptor, OciError,
                         Platform, host_platform, json_list, parse_descriptor)
from ..oci.layout import parse_json
from .auth import CredentialSource, DockerConfig
from . import upload
from .blobs import BlobReader
from .errors import BadResponse, DigestMismatch, IncompleteBody, NotFound, RegistryError
from .reference import Reference
from .session import RetryPolicy, Session, read_limited

__all__ = ["Document", "RegistryClient", "RemoteLayer", "Resolved"]

MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit; registries SHOULD accept at least 4 MB
MAX_CONFIG_BYTES = 8 << 20
MAX_RANGE_DISCARD = 16 << 20  # a 200 to a Range request: read (and drop) at most this much
ACCEPT_MANIFESTS = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")


@dataclass(frozen=True)
class Document:
    """A JSON document as fetched: its descriptor, its exact bytes, and parsed."""

    descriptor: Descriptor
    data: bytes
    content: Mapping[str, Any]


@dataclass(frozen=True)
class Resolved:
    """An image resolved to one platform's manifest. ``index`` is the index the reference
    named, if it named one; ``layers`` bottom to top."""

    reference: Reference
    index: Document | None
    manifest: Document
    config: Document
    layers: tuple[Descriptor, ...]
    platform: Platform | None

    @property
    def manifest_digest(self) -> str:
        return self.manifest.descriptor.digest

    @property
    def pinned(self) -> Reference:
        """The reference pinned to the manifest chosen."""
        return self.reference.with_digest(self.manifest_digest)


class RegistryClient:
    """A registry client; see the package docstring. Thread-safe, and picklable (a worker
    process gets the settings, then its own connections and tokens)."""

    def __init__(self, *, plain_http: bool | None = None,
                 credentials: CredentialSource | None = DockerConfig(),
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.session = Session(plain_http=plain_http, credentials=credentials, retry=retry)

    def __getstate__(self) -> dict[str, Any]:
        s = self.session
        return {"plain_http": s.plain_http, "credentials": s.credentials, "retry": s.retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.session = Session(**state)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # manifests ------------------------------------------------------------------------------
    def resolve(self, ref: Reference | str, platform: Platform | None = None) -> Resolved:
        """The manifest (for ``platform``, default this machine's, when ``ref`` names an
        index) and config of ``ref``, all verified."""
        ref = Reference.parse(ref) if isinstance(ref, str) else ref
        top = self.fetch_manifest(ref)
        index: Document | None = None
        manifest = top
        if top.descriptor.media_type in INDEX_TYPES:
            index = top
            chosen = _choose(_entries(top, str(ref)), platform, str(ref))
            manifest = self.fetch_manifest(ref, chosen)
            if manifest.descriptor.media_type not in MANIFEST_TYPES:
                raise BadResponse(f"{ref}: index entry {chosen.digest} is "
                                  f"{manifest.descriptor.media_type}, not an image manifest")
        where = f"{ref}: manifest {manifest.descriptor.digest[:19]}"
        try:
            cdesc = parse_descriptor(manifest.content.get("config"), f"{where}: config")
            layers = tuple(parse_descriptor(v, f"{where}: layers[{k}]")
                           for k, v in enumerate(_list(manifest.content, "layers", where)))
        except RegistryError:
            raise
        except OciError as exc:
            raise BadResponse(str(exc)) from None
        if cdesc.media_type not in CONFIG_TYPES:
            raise BadResponse(f"{where}: config media type {cdesc.media_type!r}: not a "
                              "container image")
        config = self.fetch_config(ref, cdesc)
        found = manifest.descriptor.platform or _config_platform(config.content)
        if index is None and platform is not None and found is not None and \
                not platform.matches(found):
            raise NotFound(f"{ref}: the image is for {found}, not {platform}")
        return Resolved(ref, index, manifest, config, layers, found)

    def fetch_manifest(self, ref: Reference, descriptor: Descriptor | None = None) -> Document:
        """The manifest or index ``descriptor`` names, or else the one ``ref`` names (by its
        digest, or by its tag: then named by its own hash)."""
        name = descriptor.digest if descriptor is not None else ref.reference
        what = f"{ref.host}/{ref.repository}: manifest {name}"
        data, headers = self._fetch_small(ref, f"/v2/{ref.repository}/manifests/{name}",
                                          {"Accept": ACCEPT_MANIFESTS}, MAX_MANIFEST_BYTES, what)
        content_type = headers.get("Content-Type", "").partition(";")[0].strip()
        sent_digest = headers.get("Docker-Content-Digest", "")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        expected = descriptor.digest if descriptor is not None else ref.digest
        if expected is not None and actual != expected:
            raise DigestMismatch(f"{what}: hashes to {actual}")
        if expected is None and _DIGEST.fullmatch(sent_digest) and sent_digest != actual:
            raise DigestMismatch(f"{what}: hashes to {actual}, the registry says {sent_digest}")
        if descriptor is not None and len(data) != descriptor.size:
            raise DigestMismatch(f"{what}: {len(data)} bytes, its descriptor says "
                                 f"{descriptor.size}")
        try:
            content = parse_json(data, what)
        except OciError as exc:
            raise BadResponse(str(exc)) from None
        declared = content.get("mediaType")
        media_type = declared if isinstance(declared, str) and declared else content_type
        if isinstance(declared, str) and content_type and declared != content_type:
            raise BadResponse(f"{what}: says it is {declared}, sent as {content_type}")
        if descriptor is not None and media_type != descriptor.media_type:
            raise BadResponse(f"{what}: is {media_type}, its descriptor says "
                              f"{descriptor.media_type}")
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            raise BadResponse(f"{what}: media type {media_type!r} is not an image manifest "
                              "or index")
        if content.get("schemaVersion") != 2:
            raise BadResponse(f"{what}: schemaVersion {content.get('schemaVersion')!r} "
                              "is not 2")
        platform = descriptor.platform if descriptor is not None else None
        return Document(Descriptor(media_type, actual, len(data), {}, platform), data, content)

    def fetch_config(self, ref: Reference, descriptor: Descriptor) -> Document:
        """An image config (any small JSON blob), verified and parsed."""
        if descriptor.size > MAX_CONFIG_BYTES:
            raise BadResponse(f"{ref}: config {descriptor.digest} is {descriptor.size} bytes, "
                              f"more than the {MAX_CONFIG_BYTES} accepted")
        what = f"{ref.host}/{ref.repository}: config {descriptor.digest}"
        data, _ = self._fetch_small(ref, f"/v2/{ref.repository}/blobs/{_sha256(descriptor)}",
                                    {}, MAX_CONFIG_BYTES, what)
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(data) != descriptor.size or actual != descriptor.digest:
            raise DigestMismatch(f"{what}: {len(data)} bytes hashing to {actual}, its "
                                 f"descriptor says {descriptor.size} bytes")
        try:
            content = parse_json(data, f"{ref}: config {descriptor.digest[:19]}")
        except OciError as exc:
            raise BadResponse(str(exc)) from None
        return Document(descriptor, data, content)

    def _fetch_small(self, ref: Reference, path: str, headers: dict[str, str], limit: int,
                     what: str) -> tuple[bytes, httpx.Headers]:
        """A whole small reply (at most ``limit`` bytes) and its headers; a body that breaks
        off is fetched again, like a connection error."""
        retry = self.session.retry
        for tries in range(1, retry.attempts + 1):
            response = self.session.send("GET", ref.host, ref.api_host, path, scope=_pull(ref),
                                         headers=headers, what=what)
            try:
                return read_limited(response, limit, retry.deadline, what), response.headers
            except IncompleteBody:
                if tries >= retry.attempts:
                    raise
            finally:
                response.close()
            time.sleep(retry.wait(tries, None))
        raise AssertionError("unreachable")

    # pushing (upload.py) --------------------------------------------------------------------
    def blob_exists(self, ref: Reference, digest: str) -> bool:
        """Whether ``ref``'s repository has the blob (HEAD, with a push token)."""
        return upload.blob_exists(self.session, ref, digest)

    def push_blob(self, ref: Reference, digest: str, size: int,
                  opener: Callable[[], Iterator[bytes]], *, name: str = "blob") -> None:
        """Upload a blob whose bytes ``opener`` gives anew for each try (``upload.py``)."""
        upload.push_blob(self.session, ref, digest, size, opener, name=name)

    def mount_blob(self, ref: Reference, digest: str, source_repository: str) -> bool:
        """Link a blob of another repository of the same registry into ``ref``'s; False
        when the registry cannot (then the blob must be uploaded)."""
        return upload.mount_blob(self.session, ref, digest, source_repository)

    def push_manifest(self, ref: Reference, reference: str, data: bytes,
                      media_type: str) -> str:
        """PUT these exact manifest bytes under a tag or digest; their digest."""
        return upload.push_manifest(self.session, ref, reference, data, media_type)

    # blobs ----------------------------------------------------------------------------------
    def open_blob(self, ref: Reference, descriptor: Descriptor, *, name: str = "blob",
                  on_read: Callable[[int], None] | None = None) -> BlobReader:
        """The blob ``descriptor`` of ``ref``'s repository as a stream checked against its
        digest (see ``BlobReader``); close it (it is a context manager)."""
        what = f"{ref.host}/{ref.repository}: {name} {descriptor.digest}"
        response = self._get_blob(ref, descriptor, what, {})
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != descriptor.size:
            response.close()
            error = IncompleteBody if int(length) < descriptor.size else DigestMismatch
            raise error(f"{what}: {length} bytes, its descriptor says {descriptor.size}")
        return BlobReader(response, descriptor, what, on_read)

    def read_range(self, ref: Reference, descriptor: Descriptor, offset: int,
                   length: int) -> bytes:
        """``length`` bytes at ``offset`` of the blob ``descriptor`` (inside it), by an HTTP
        Range request. Not verified: the caller checks them. A registry that ignores Range
        (200) is tolerated while ``offset + length`` stays within MAX_RANGE_DISCARD."""
        if offset < 0 or length <= 0 or offset + length > descriptor.size:
            raise ValueError(f"range {offset}+{length} outside blob of {descriptor.size} bytes")
        end = offset + length - 1
        what = f"{ref.host}/{ref.repository}: blob {descriptor.digest} bytes {offset}-{end}"
        deadline = self.session.retry.deadline
        for tries in range(1, self.session.retry.attempts + 1):
            response = self._get_blob(ref, descriptor, what, {"Range": f"bytes={offset}-{end}"})
            try:
                if response.status_code == 206:
                    _check_content_range(response, offset, end, descriptor.size, what)
                    data = read_limited(response, length, deadline, what)
                elif offset + length > MAX_RANGE_DISCARD:
                    raise BadResponse(f"{what}: the registry ignores Range requests "
                                      f"({response.status_code})")
                else:
                    data = _prefix(response, offset + length, deadline, what)[offset:]
            except IncompleteBody:
                if tries >= self.session.retry.attempts:
                    raise
                data = b""
            finally:
                response.close()
            if len(data) == length:
                return data
            if tries >= self.session.retry.attempts:
                raise IncompleteBody(f"{what}: {len(data)} bytes instead of {length}")
            time.sleep(self.session.retry.wait(tries, None))
        raise AssertionError("unreachable")

    def _get_blob(self, ref: Reference, descriptor: Descriptor, what: str,
                  headers: dict[str, str]) -> httpx.Response:
        return self.session.send("GET", ref.host, ref.api_host,
                                 f"/v2/{ref.repository}/blobs/{_sha256(descriptor)}",
                                 scope=_pull(ref), headers=headers, what=what)


def _sha256(descriptor: Descriptor) -> str:
    """The descriptor's digest, which goes into a URL path: only ``sha256:<64 hex>``."""
    if not _DIGEST.fullmatch(descriptor.digest):
        raise BadResponse(f"digest {descriptor.digest[:80]!r} is not sha256:<64 hex>")
    return descriptor.digest


def _pull(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


def _check_content_range(response: httpx.Response, start: int, end: int, size: int,
                         what: str) -> None:
    header = response.headers.get("Content-Range", "")
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m or (int(m[1]), int(m[2])) != (start, end) or m[3] not in ("*", str(size)):
        raise BadResponse(f"{what}: 206 with Content-Range {header[:80]!r}, "
                          f"not bytes {start}-{end}/{size}")


def _prefix(response: httpx.Response, length: int, deadline: float, what: str) -> bytes:
    """The first ``length`` bytes of a body (the rest is not read)."""
    return read_limited(response, length, deadline, what, truncate=True)


# indexes --------------------------------------------------------------------------------------
def _list(doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
    try:
        return json_list(doc, key, where)
    except OciError as exc:  # a registry's reply: its error family
        raise BadResponse(str(exc)) from None


def _entries(index: Document, where: str) -> list[Descriptor]:
    here = f"{where}: index {index.descriptor.digest[:19]}"
    try:
        return [parse_descriptor(v, f"{here} manifests[{k}]")
                for k, v in enumerate(_list(index.content, "manifests", here))]
    except RegistryError:
        raise
    except OciError as exc:
        raise BadResponse(str(exc)) from None


@dataclass(frozen=True)
class RemoteLayer:
    """A layer blob in a registry, as ``oci.image.Layer.location``: it pickles to the client's
    settings, the reference and the descriptor, and a worker process opens its own stream."""

    client: RegistryClient
    reference: Reference
    descriptor: Descriptor

    def open(self, name: str, on_read: Callable[[int], None] | None) -> BlobReader:
        return self.client.open_blob(self.reference, self.descriptor, name=name,
                                     on_read=on_read)


def _choose(entries: list[Descriptor], wanted: Platform | None, where: str) -> Descriptor:
    """The image manifest for ``wanted`` (default: this machine); else the one that names no
    platform. Entries of other types (attestations, nested indexes) are passed over."""
    want = wanted or host_platform()
    images = list({d.digest: d for d in entries if d.media_type in MANIFEST_TYPES}.values())
    matched = [d for d in images if d.platform is not None and want.matches(d.platform)]
    if len(matched) == 1:
        return matched[0]
    if matched:
        raise BadResponse(f"{where}: several manifests for {want}: "
                          f"{', '.join(sorted(str(d.platform) for d in matched))}")
    bare = [d for d in images if d.platform is None]
    if len(bare) == 1:
        return bare[0]
    have = sorted({str(d.platform) for d in images if d.platform is not None})
    raise NotFound(f"{where}: no image for {want} (the index has: {', '.join(have) or 'none'})")


def _config_platform(config: Mapping[str, Any]) -> Platform | None:
    os_, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return None
    variant = config.get("variant")
    return Platform(os_, arch, variant if isinstance(variant, str) else "")
