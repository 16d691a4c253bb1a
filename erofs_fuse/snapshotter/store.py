"""The snapshotter's state: one sqlite3 database (WAL) under the root.

A row per snapshot, found by containerd's backend key (``<ns>/<seq>/<key>``: it holds ``/`` and
spaces, so directories are named by the row's numeric ``id`` instead). Each public method is one
transaction: a crash at any moment leaves the database as it was before or after the change.
Files on disk follow the database, never lead it: a directory or layer file that no row names
is garbage that ``Snapshotter.cleanup`` (and the start-up sweep) removes.

The error kinds are named after containerd's ``errdefs`` so that they map one to one onto gRPC
status codes (``service.py``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

# Kinds with the numbers of the proto enum ``containerd.services.snapshots.v1.Kind``.
class Kind(IntEnum):
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class StoreError(Exception):
    """Root of the store's errors."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class FailedPrecondition(StoreError):
    pass


class InvalidArgument(StoreError):
    pass


MAX_LABEL_BYTES = 4096  # key plus value, as containerd's proto says
# the chain id containerd asks a remote snapshotter for (containerd-client.md §3.1)
REF_LABEL = "containerd.io/snapshot.ref"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    layer TEXT,
    digest TEXT,
    xattr_free INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""
# Columns added since the first schema, with their declarations: a database of an older version
# gets them at open, each row with the default (for xattr_free, 0: not known to be free).
_ADDED_COLUMNS = {"xattr_free": "INTEGER NOT NULL DEFAULT 0"}


@dataclass(frozen=True)
class Snapshot:
    """One row: ``key`` is containerd's backend key (the name, once committed)."""

    id: int
    key: str
    parent_id: int | None
    parent: str  # the parent's key, "" for none
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    layer: str | None = None  # layer file, relative to the root (committed only)
    digest: str | None = None  # its fs-verity digest, "sha256:HEX"
    # its layer is known to show no xattr (the writer said so): a chain of such layers is
    # mounted -o noxattr; False also when not known (rows of older versions, lazy layers)
    xattr_free: bool = False


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {k!r} is longer than {MAX_LABEL_BYTES} bytes")


class Store:
    """The database; use from one thread at a time (the service holds a lock)."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """Migrate a database of an older version: add the columns it lacks."""
        with self.transaction() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(snapshots)")}
            for name, decl in _ADDED_COLUMNS.items():
                if name not in have:
                    db.execute(f"ALTER TABLE snapshots ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # reads -----------------------------------------------------------------------------------
    _SELECT = ("SELECT s.id, s.key, s.parent_id, COALESCE(p.key, ''), s.kind, s.labels, "
               "s.created_ns, s.updated_ns, s.layer, s.digest, s.xattr_free FROM snapshots s "
               "LEFT JOIN snapshots p ON p.id = s.parent_id")

    @staticmethod
    def _row(row: tuple[object, ...]) -> Snapshot:
        id_, key, parent_id, parent, kind, labels, created, updated, layer, digest, free = row
        assert isinstance(id_, int) and isinstance(key, str) and isinstance(parent, str)
        assert isinstance(kind, int) and isinstance(labels, str)
        assert isinstance(created, int) and isinstance(updated, int)
        assert parent_id is None or isinstance(parent_id, int)
        assert layer is None or isinstance(layer, str)
        assert digest is None or isinstance(digest, str)
        return Snapshot(id_, key, parent_id, parent, Kind(kind), json.loads(labels), created,
                        updated, layer, digest, bool(free))

    def get(self, key: str) -> Snapshot:
        row = self.db.execute(self._SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return self._row(row)

    def get_id(self, id_: int) -> Snapshot:
        row = self.db.execute(self._SELECT + " WHERE s.id = ?", (id_,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot #{id_} does not exist")
        return self._row(row)

    def all(self) -> list[Snapshot]:
        return [self._row(r) for r in self.db.execute(self._SELECT + " ORDER BY s.id")]

    def children(self, id_: int) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM snapshots WHERE parent_id = ?",
                               (id_,)).fetchone()
        assert isinstance(n, int)
        return n

    def users(self, id_: int) -> int:
        """Active snapshots and views on top of committed ``id_``: the users of its mount."""
        (n,) = self.db.execute(
            "SELECT count(*) FROM snapshots WHERE parent_id = ? AND kind IN (?, ?)",
            (id_, int(Kind.ACTIVE), int(Kind.VIEW))).fetchone()
        assert isinstance(n, int)
        return n

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """``snap`` and its ancestors, bottom first."""
        out = [snap]
        while out[-1].parent_id is not None:
            parent_id = out[-1].parent_id
            assert parent_id is not None
            out.append(self.get_id(parent_id))
        out.reverse()
        return out

    # changes ---------------------------------------------------------------------------------
    def create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> Snapshot:
        if not key:
            raise InvalidArgument("empty snapshot key")
        check_labels(labels)
        now = time.time_ns()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                raise AlreadyExists(f"snapshot {key} already exists")
            parent_id = self._committed_id(db, parent) if parent else None
            cur = db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent_id, int(kind), json.dumps(labels), now, now))
            id_ = cur.lastrowid
        assert id_ is not None
        return self.get_id(id_)

    def commit(self, key: str, name: str, labels: dict[str, str], layer: str,
               digest: str, parent: str = "", *, xattr_free: bool = False) -> Snapshot:
        """Turn active ``key`` into committed ``name``, keeping its id (and directory).

        ``parent`` (containerd 2.2's rebase): an active snapshot prepared without a parent takes
        this committed one as its parent now; one prepared with a parent must name that one."""
        check_labels(labels)
        now = time.time_ns()
        with self.transaction() as db:
            row = db.execute("SELECT id, kind, parent_id FROM snapshots WHERE key = ?",
                             (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            if row[1] != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name} already exists")
            parent_id = row[2]
            if parent:
                new_parent = self._committed_id(db, parent)
                if parent_id is not None and parent_id != new_parent:
                    raise InvalidArgument(f"snapshot {key}: cannot change its parent")
                parent_id = new_parent
            db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, "
                       "updated_ns = ?, layer = ?, digest = ?, parent_id = ?, xattr_free = ? "
                       "WHERE id = ?",
                       (name, int(Kind.COMMITTED), json.dumps(labels), now, now, layer, digest,
                        parent_id, int(xattr_free), row[0]))
        return self.get(name)

    def add_committed(self, name: str, parent: str, labels: dict[str, str], layer: str,
                      digest: str, *, xattr_free: bool = False) -> Snapshot:
        """A committed snapshot made from a layer file that exists already (the remote-snapshot
        protocol: a client converted the layer, containerd never unpacks it)."""
        check_labels(labels)
        now = time.time_ns()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                raise AlreadyExists(f"snapshot {name} already exists")
            parent_id = self._committed_id(db, parent) if parent else None
            db.execute(
                "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns, "
                "layer, digest, xattr_free) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, parent_id, int(Kind.COMMITTED), json.dumps(labels), now, now, layer,
                 digest, int(xattr_free)))
        return self.get(name)

    @staticmethod
    def _committed_id(db: sqlite3.Connection, key: str) -> int:
        p = db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (key,)).fetchone()
        if p is None:
            raise NotFound(f"parent snapshot {key} does not exist")
        if p[1] != Kind.COMMITTED:
            raise FailedPrecondition(f"parent snapshot {key} is not committed")
        assert isinstance(p[0], int)
        return p[0]

    def committed_with_ref(self, ref: str, parent: str) -> Snapshot | None:
        """The committed snapshot labelled ``containerd.io/snapshot.ref`` = ``ref`` whose
        parent is ``parent`` (a key, "" for none), as containerd looks it up after our
        ALREADY_EXISTS; None if there is none."""
        row = self.db.execute(
            self._SELECT + " WHERE s.kind = ? AND COALESCE(p.key, '') = ? AND "
            "json_extract(s.labels, '$.\"' || ? || '\"') = ? ORDER BY s.id LIMIT 1",
            (int(Kind.COMMITTED), parent, REF_LABEL, ref)).fetchone()
        return None if row is None else self._row(row)

    def layer_digest(self, layer: str) -> tuple[str, bool] | None:
        """The fs-verity digest recorded for the layer file ``layer`` by any snapshot, and
        whether any snapshot knows it to be xattr-free."""
        row = self.db.execute("SELECT digest, max(xattr_free) FROM snapshots WHERE layer = ? "
                              "AND digest IS NOT NULL GROUP BY layer", (layer,)).fetchone()
        return None if row is None else (str(row[0]), bool(row[1]))

    def layer_users(self, layer: str) -> int:
        """How many snapshots use the layer file ``layer`` (a path relative to the root)."""
        (n,) = self.db.execute("SELECT count(*) FROM snapshots WHERE layer = ?",
                               (layer,)).fetchone()
        assert isinstance(n, int)
        return n

    def layers(self) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT layer FROM snapshots WHERE layer IS NOT NULL")}

    def remove(self, key: str) -> Snapshot:
        with self.transaction() as db:
            row = db.execute(self._SELECT + " WHERE s.key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            snap = self._row(row)
            (n,) = db.execute("SELECT count(*) FROM snapshots WHERE parent_id = ?",
                              (snap.id,)).fetchone()
            if n:
                raise FailedPrecondition(f"cannot remove snapshot {key}: it has {n} children")
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Replace all labels (``paths`` empty) or only ``labels.K`` / ``labels`` paths."""
        check_labels(labels)
        with self.transaction() as db:
            row = db.execute("SELECT labels FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            current: dict[str, str] = json.loads(row[0])
            if not paths:
                new = dict(labels)
            else:
                new = dict(current)
                for path in paths:
                    if path == "labels":
                        new = dict(labels)
                    elif path.startswith("labels."):
                        name = path[len("labels."):]
                        if name in labels:
                            new[name] = labels[name]
                        else:
                            new.pop(name, None)
                    else:
                        raise InvalidArgument(f"cannot update field {path!r} of a snapshot")
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?",
                       (json.dumps(new), time.time_ns(), key))
        return self.get(key)
