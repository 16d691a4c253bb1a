"""containerd's content store over gRPC: write a blob (digest- and size-checked by containerd),
read it, and read or change its labels (shared/docs/containerd-client.md 1.2 to 1.5).

A write is one ``Write`` stream in lock step, as containerd's own client does it: the server
answers each request with exactly one response. STAT opens the ingest (``ref``) and tells how
much it holds; WRITE appends at the offset we name (offset 0 restarts the ingest); COMMIT
checks size and digest and stores the blob with its labels. containerd answers ALREADY_EXISTS
as soon as the digest is known to this namespace: writing a blob twice is not an error.
"""

from __future__ import annotations

import contextlib
import queue
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping

import grpc
from google.protobuf import field_mask_pb2

from .api import content_pb2 as pb
from .errors import AlreadyExists, ContainerdError
from .records import ContentInfo

if TYPE_CHECKING:
    from .client import Client

CHUNK = 1 << 20  # bytes per WRITE: containerd's own buffer, far below the 16 MiB limit


class Content:
    def __init__(self, client: Client) -> None:
        self._c = client

    def info(self, digest: str) -> ContentInfo:
        """The blob ``digest`` (NotFound if this namespace does not have it)."""
        r = self._c.call(self._c.stubs.content.Info, pb.InfoRequest(digest=digest),
                         "get blob info", digest)
        return ContentInfo.from_pb(r.info)

    def update_labels(self, digest: str, labels: Mapping[str, str | None]) -> ContentInfo:
        """Set the given labels of blob ``digest`` (a value None removes that label); the
        others stay as they are."""
        info = pb.Info(digest=digest,
                       labels={k: v for k, v in labels.items() if v is not None})
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        r = self._c.call(self._c.stubs.content.Update,
                         pb.UpdateRequest(info=info, update_mask=mask),
                         "label blob", digest)
        return ContentInfo.from_pb(r.info)

    def read(self, digest: str, offset: int = 0, size: int = 0) -> bytes:
        """``size`` bytes of blob ``digest`` from ``offset`` (0: to the end)."""
        return b"".join(self.read_chunks(digest, offset, size))

    def read_chunks(self, digest: str, offset: int = 0, size: int = 0) -> Iterator[bytes]:
        call = self._c.stubs.content.Read(
            pb.ReadContentRequest(digest=digest, offset=offset, size=size),
            metadata=self._c.metadata)
        try:
            for r in call:  # r.offset is not to be trusted in 1.6 (starts at 0): not used
                yield r.data
        except grpc.RpcError as exc:
            raise self._c.error(exc, "read blob", digest) from None
        finally:
            call.cancel()

    def abort(self, ref: str) -> None:
        """Drop the unfinished ingest ``ref`` (NotFound if there is none)."""
        self._c.call(self._c.stubs.content.Abort, pb.AbortRequest(ref=ref),
                     "abort ingest", ref)

    def write_blob(self, ref: str, data: bytes | IO[bytes], expected: str, size: int,
                   labels: Mapping[str, str] | None = None) -> bool:
        """Store ``size`` bytes of ``data`` (bytes, or a binary stream read to its end) as blob
        ``expected`` with ``labels``, through the ingest ``ref`` (e.g. ``layer-sha256:…``).

        True if written, False if this namespace had the blob already (its labels are then
        set with ``update_labels``). containerd refuses a size or digest that differs
        (FailedPrecondition); the ingest is then aborted, so nothing is left behind."""
        labels = dict(labels or {})
        stream = _WriteStream(self._c, expected)
        try:
            try:
                done = self._write(stream, ref, data, expected, size, labels)
            finally:
                stream.close()
        except AlreadyExists:
            done = False
        except BaseException:
            with contextlib.suppress(ContainerdError):
                self.abort(ref)
            raise
        if not done and labels:
            self.update_labels(expected, labels)
        return done

    def _write(self, stream: _WriteStream, ref: str, data: bytes | IO[bytes], expected: str,
               size: int, labels: dict[str, str]) -> bool:
        st = stream.exchange(pb.WriteContentRequest(action=pb.STAT, ref=ref, total=size,
                                                    expected=expected))
        offset = 0
        if st.offset == size and st.digest == expected:
            offset = size  # an earlier ingest, or the blob of another namespace: commit only
        else:
            for chunk in _chunks(data):
                r = stream.exchange(pb.WriteContentRequest(action=pb.WRITE, offset=offset,
                                                           data=chunk))
                if r.offset != offset + len(chunk):
                    raise ContainerdError(f"containerd write blob {expected}: wrote {len(chunk)} "
                                          f"bytes at {offset}, containerd holds {r.offset}")
                offset = r.offset
                if offset > size:
                    break
        if offset != size:
            longer = "more than " if offset > size else ""
            raise ContainerdError(f"containerd write blob {expected}: the data is {longer}{offset} "
                                  f"bytes long, expected {size}")
        r = stream.exchange(pb.WriteContentRequest(action=pb.COMMIT, total=size, offset=offset,
                                                   expected=expected, labels=labels))
        if r.digest and r.digest != expected:
            raise ContainerdError(f"containerd write blob {expected}: committed as {r.digest}")
        return True


class _WriteStream:
    """A ``Write`` call driven one request and one response at a time: requests go through a
    queue that gRPC's sender thread drains, so a large blob is never buffered whole."""

    _END: Any = None

    def __init__(self, client: Client, digest: str) -> None:
        self._c = client
        self.digest = digest
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = client.stubs.content.Write(self._requests(), metadata=client.metadata)

    def _requests(self) -> Iterator[Any]:
        while (req := self._q.get()) is not self._END:
            yield req

    def exchange(self, request: Any) -> Any:
        self._q.put(request)
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise self._c.error(exc, "write blob", self.digest) from None
        except StopIteration:
            raise ContainerdError(f"containerd write blob {self.digest}: the stream ended "
                                  f"early") from None

    def close(self) -> None:
        """Half-close and read to the end: after a COMMIT, containerd sends its last response
        a second time; on failure, cancel so the sender thread stops."""
        self._q.put(self._END)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # the error, if any, was raised by exchange already
        finally:
            self._call.cancel()


def _chunks(data: bytes | IO[bytes]) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for pos in range(0, len(view), CHUNK):
            yield bytes(view[pos:pos + CHUNK])
        return
    while chunk := data.read(CHUNK):
        yield chunk

