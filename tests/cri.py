"""A small client of CRI's image service (``runtime.v1``), for the tests: containerd's CRI
plugin serves it on containerd's own socket, in its own namespace (``k8s.io``), so no metadata
is sent. Messages come from ``erofs_fuse/containerd/api/cri.proto`` (a trimmed cri-api)."""

from __future__ import annotations

from typing import Any

import grpc

from erofs_fuse.containerd.api import cri_pb2 as pb
from erofs_fuse.containerd.api import cri_pb2_grpc as pb_grpc

PULL_TIMEOUT = 300.0  # seconds: every layer is converted before PullImage answers


class Cri:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.images: Any = pb_grpc.ImageServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Cri:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pull(self, image: str, auth: tuple[str, str] | None = None) -> str:
        """PullImage (with ``auth``, a user and password for the registry); the image's id
        (its config digest). Raises grpc.RpcError."""
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image))
        if auth is not None:
            request.auth.username, request.auth.password = auth
        reply = self.images.PullImage(request, timeout=PULL_TIMEOUT)
        return str(reply.image_ref)

    def status(self, image: str) -> Any:
        """The image record CRI reports (``id``, ``repo_tags``, ``repo_digests``), or None."""
        reply = self.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                                        timeout=30)
        return reply.image if reply.HasField("image") else None

    def list(self) -> list[Any]:
        return list(self.images.ListImages(pb.ListImagesRequest(), timeout=30).images)

    def remove(self, image: str) -> None:
        self.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image)),
                                timeout=30)
