"""One exception family for everything containerd answers, mapped from gRPC status codes.

containerd's ``errdefs`` turns its errors into status codes (``errdefs.ToGRPC``) and a message
such as ``image "x": not found``; we keep that message and name the call. The subclasses let a
caller catch one case (``except AlreadyExists``) and also derive from the matching built-in, so
``except LookupError`` or ``except ConnectionError`` work too.
"""

from __future__ import annotations

from typing import Any

import grpc


class ContainerdError(Exception):
    """A containerd call failed. ``kind`` names the case, ``code`` is the gRPC status code;
    ``str()`` is one line fit for a CLI error."""

    kind = "error"

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(" ".join(message.split()))  # one line whatever containerd sent
        self.code = code


class Unavailable(ContainerdError, ConnectionError):
    """containerd cannot be reached: the socket is missing, refuses, or the call timed out."""

    kind = "unavailable"


class NotFound(ContainerdError, LookupError):
    kind = "not found"


class AlreadyExists(ContainerdError, FileExistsError):
    kind = "already exists"


class FailedPrecondition(ContainerdError):
    """containerd refused the state the call needs: e.g. a blob's size or digest differs from
    the expected one at commit, or no namespace was given."""

    kind = "failed precondition"


_BY_CODE: dict[Any, type[ContainerdError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def error_from_rpc(exc: grpc.RpcError, address: str, what: str,
                   subject: str = "") -> ContainerdError:
    """The ContainerdError for a failed call ``what`` (e.g. ``get image``) on ``subject``
    (its name or digest) to the containerd listening on ``address``. containerd's message
    mostly names the subject already (``image "x": not found``): it is not repeated then."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    if subject and subject not in details:
        what = f"{what} {subject}"
    cls = _BY_CODE.get(code, ContainerdError)
    if cls is Unavailable:
        reason = "timed out" if code == grpc.StatusCode.DEADLINE_EXCEEDED else _short(details)
        return Unavailable(f"cannot reach containerd at {address} ({what}): {reason}; is "
                           f"containerd running, and is that its socket?", code)
    return cls(f"containerd {what}: {details}", code)


def _short(details: str) -> str:
    """grpc's connection failures carry a long chain ('failed to connect to all addresses;
    last error: UNKNOWN: unix:/x: No such file or directory'): keep the last reason."""
    return (details.rsplit(": ", 1)[-1].strip() or details).lower()
