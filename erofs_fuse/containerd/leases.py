"""containerd's leases service: a lease keeps every blob, ingest and snapshot made under it
(calls carrying its ``containerd-lease`` header) from the garbage collector until it is
deleted or its ``containerd.io/gc.expire`` time passes."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from .api import leases_pb2 as pb
from .labels import GC_EXPIRE, expire_at
from .records import Lease

if TYPE_CHECKING:
    from .client import Client


class Leases:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, lease_id: str = "", *, ttl: timedelta | None = timedelta(hours=24),
               labels: dict[str, str] | None = None) -> Lease:
        """A new lease (id ``lease_id``, or one of ours); with ``ttl`` it expires then, so a
        crash leaves nothing behind for longer."""
        from .client import new_lease_id
        all_labels = dict(labels or {})
        if ttl is not None:
            all_labels[GC_EXPIRE] = expire_at(ttl)
        lease_id = lease_id or new_lease_id()
        r = self._c.call(self._c.stubs.leases.Create,
                         pb.CreateRequest(id=lease_id, labels=all_labels),
                         "create lease", lease_id)
        return Lease.from_pb(r.lease)

    def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete a lease; ``sync`` waits for the garbage collection this starts."""
        self._c.call(self._c.stubs.leases.Delete, pb.DeleteRequest(id=lease_id, sync=sync),
                     "delete lease", lease_id)

    def list(self, *filters: str) -> list[Lease]:
        r = self._c.call(self._c.stubs.leases.List, pb.ListRequest(filters=list(filters)),
                         "list leases")
        return [Lease.from_pb(m) for m in r.leases]
