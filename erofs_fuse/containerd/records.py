"""The plain records the client hands out, free of protobuf types: descriptors, blob infos,
image records, snapshot infos, mounts and leases. Converted from and to the wire messages
here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .api import descriptor_pb2, mount_pb2


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI descriptor: what an image record points at."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_pb(self) -> Any:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest,
                                         size=self.size, annotations=self.annotations)

    @classmethod
    def from_pb(cls, m: Any) -> Descriptor:
        return cls(m.media_type, m.digest, m.size, dict(m.annotations))


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """A committed blob of containerd's content store, as this namespace sees it."""

    digest: str
    size: int
    labels: dict[str, str]
    created_at: datetime | None = None

    @classmethod
    def from_pb(cls, m: Any) -> ContentInfo:
        return cls(m.digest, m.size, dict(m.labels), _time(m, "created_at"))


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """containerd's image record: a name pointing at a manifest or index descriptor."""

    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_pb(cls, m: Any) -> ImageRecord:
        return cls(m.name, Descriptor.from_pb(m.target), dict(m.labels),
                   _time(m, "created_at"), _time(m, "updated_at"))


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount(2)-like step of a snapshot's mounts."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    @classmethod
    def from_pb(cls, m: Any) -> Mount:
        return cls(m.type, m.source, tuple(m.options), m.target)

    def to_pb(self) -> Any:
        return mount_pb2.Mount(type=self.type, source=self.source, target=self.target,
                               options=list(self.options))


KIND_NAMES = {0: "unknown", 1: "view", 2: "active", 3: "committed"}  # snapshots.proto Kind


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A snapshot as containerd's metadata store reports it (names as clients see them)."""

    name: str
    parent: str
    kind: str  # "view", "active" or "committed"
    labels: dict[str, str]

    @classmethod
    def from_pb(cls, m: Any) -> SnapshotInfo:
        return cls(m.name, m.parent, KIND_NAMES.get(m.kind, "unknown"), dict(m.labels))


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    labels: dict[str, str]

    @classmethod
    def from_pb(cls, m: Any) -> Lease:
        return cls(m.id, dict(m.labels))


def _time(m: Any, name: str) -> datetime | None:
    if not m.HasField(name):
        return None
    ts = getattr(m, name)
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, timezone.utc)
