"""containerd's images service: image records, a name pointing at a manifest or index blob
(shared/docs/containerd-client.md 2). containerd does not check that the target blob exists;
the record is the garbage collector's root for the image's blobs and, through the config's
label, its snapshot chain."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from google.protobuf import field_mask_pb2

from .api import images_pb2 as pb
from .errors import AlreadyExists
from .records import Descriptor, ImageRecord

if TYPE_CHECKING:
    from .client import Client


class Images:
    def __init__(self, client: Client) -> None:
        self._c = client

    def get(self, name: str) -> ImageRecord:
        r = self._c.call(self._c.stubs.images.Get, pb.GetImageRequest(name=name),
                         "get image", name)
        return ImageRecord.from_pb(r.image)

    def create(self, name: str, target: Descriptor,
               labels: Mapping[str, str] | None = None) -> ImageRecord:
        """A new record (AlreadyExists if the name is taken)."""
        image = pb.Image(name=name, target=target.to_pb(), labels=dict(labels or {}))
        r = self._c.call(self._c.stubs.images.Create, pb.CreateImageRequest(image=image),
                         "create image", name)
        return ImageRecord.from_pb(r.image)

    def update(self, name: str, target: Descriptor,
               labels: Mapping[str, str] | None = None) -> ImageRecord:
        """Point the record ``name`` at ``target`` and set ``labels`` (others are kept, as
        ``ctr images import`` does: CRI and others may have labelled it)."""
        image = pb.Image(name=name, target=target.to_pb(), labels=dict(labels or {}))
        mask = field_mask_pb2.FieldMask(
            paths=["target", *(f"labels.{k}" for k in (labels or {}))])
        r = self._c.call(self._c.stubs.images.Update,
                         pb.UpdateImageRequest(image=image, update_mask=mask),
                         "update image", name)
        return ImageRecord.from_pb(r.image)

    def put(self, name: str, target: Descriptor,
            labels: Mapping[str, str] | None = None) -> ImageRecord:
        """Create the record, or update it if the name exists."""
        try:
            return self.create(name, target, labels)
        except AlreadyExists:
            return self.update(name, target, labels)

    def delete(self, name: str, *, sync: bool = False) -> None:
        """Delete the record; ``sync`` waits for the garbage collection this starts."""
        self._c.call(self._c.stubs.images.Delete, pb.DeleteImageRequest(name=name, sync=sync),
                     "delete image", name)
