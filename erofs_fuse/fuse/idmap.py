"""Id mapping: which owner and group the mount reports for the ids stored in the layers.

The options and their meaning are fuse-overlayfs's (``-o uidmapping=``, ``gidmapping=``,
``squash_to_root``, ``squash_to_uid=``, ``squash_to_gid=``), so a runtime that drives
fuse-overlayfs can drive erofs-fuse the same way.

Direction. A layer stores the ids of the container's view of its files (0 is the container's
root). A mapping list is written like the container's ``/proc/PID/uid_map`` put on one line:
triples ``CONTAINER:HOST:COUNT`` joined by ``:`` (``0:1000:1:1:100000:65536``). The mount
reports the HOST id for each stored CONTAINER id. The kernel reads the ids a FUSE daemon reports
in the user namespace of whoever mounted it, so a mount made outside the container with the
container's own map shows every file, inside the container, with the id stored in the layer;
without a map, a file stored as 0 would show there as the overflow id (nobody). (fuse-overlayfs's
source names the first field "host", meaning the id on the host's disk; its manual writes
``UID:MAPPED-UID:LEN`` and gives a ``uid_map`` as the example: the same direction as here.)

The rows are tried in order; the first that applies decides:

==================================  ===============================================================
option (``-o`` form)                the owner (group) reported for id ID stored in the layer
==================================  ===============================================================
``--squash-to-uid U``               U, for every entry (``--squash-to-gid G``: G for every group);
(``squash_to_uid=U``)               the lists are not consulted
``--squash-to-root``                0, for owners (groups) not squashed by the row above
(``squash_to_root``)
``--uidmap LIST``                   HOST + (ID - CONTAINER), for the triple whose
(``uidmapping=LIST``)               CONTAINER <= ID < CONTAINER + COUNT (``--gidmap`` for groups)
... with ID in no triple            the overflow id (``/proc/sys/kernel/overflowuid``,
                                    ``overflowgid``; 65534 by default)
no option of that kind              ID (what the layer stores)
==================================  ===============================================================

Owners and groups are mapped independently: a list for uids only leaves groups as stored. The
named entries of POSIX ACLs (``system.posix_acl_access``/``default``) are mapped by the same
lists (squashing concerns the owner, not the ACL), so the kernel's ACL checks agree with the
reported owners.

A list is refused unless each triple has a COUNT of at least 1 and stays below 2**32 - 1 (which
is "no id") and no two triples overlap, in either column: the rules the kernel applies to
``uid_map``. Every lookup is pure and cheap (a bisection over at most ``MAX_RANGES`` triples).
"""

from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

NO_ID = 0xFFFFFFFF  # (uid_t) -1: never a valid id
DEFAULT_OVERFLOW_ID = 65534
MAX_RANGES = 340  # the kernel's limit of lines in a uid_map
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
# posix_acl_xattr format (include/uapi/linux/posix_acl_xattr.h): a version, then entries
_ACL_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")  # e_tag, e_perm, e_id
_ACL_USER = 0x02
_ACL_GROUP = 0x08


class IdMapError(ValueError):
    """A mapping list or squash id that cannot be used; the message says why."""


class IdRange(NamedTuple):
    """One triple: ``length`` ids from ``container`` (stored) are reported from ``host`` on."""

    container: int
    host: int
    length: int


def _check_id(value: int, what: str) -> int:
    if not 0 <= value < NO_ID:
        raise IdMapError(f"{what} {value} is outside 0..{NO_ID - 1}")
    return value


def parse_id(text: str, what: str = "id") -> int:
    """A decimal uid or gid (for ``--squash-to-uid`` and the like)."""
    if not re.fullmatch(r"[0-9]+", text.strip()):
        raise IdMapError(f"{what} {text!r} is not a decimal number")
    return _check_id(int(text), what)


def parse_mapping(text: str) -> tuple[IdRange, ...]:
    """``CONTAINER:HOST:COUNT[:CONTAINER:HOST:COUNT...]`` (``,`` may also separate fields)."""
    fields = [f.strip() for f in re.split(r"[:,]", text)]
    if not text.strip() or len(fields) % 3 or not all(re.fullmatch(r"[0-9]+", f) for f in fields):
        raise IdMapError(f"{text!r}: expected CONTAINER:HOST:COUNT triples of decimal numbers, "
                         "joined by ':'")
    numbers = [int(f) for f in fields]
    return tuple(IdRange(*numbers[k:k + 3]) for k in range(0, len(numbers), 3))


def check_ranges(ranges: Sequence[IdRange], what: str = "mapping") -> tuple[IdRange, ...]:
    """The ranges sorted by container id, after the kernel's checks on a uid_map."""
    if len(ranges) > MAX_RANGES:
        raise IdMapError(f"{what}: {len(ranges)} ranges; at most {MAX_RANGES} are allowed")
    for r in ranges:
        if r.length < 1:
            raise IdMapError(f"{what}: {r.container}:{r.host}:{r.length}: COUNT must be at least 1")
        for start, name in ((r.container, "container"), (r.host, "host")):
            if start + r.length > NO_ID:
                raise IdMapError(f"{what}: {r.container}:{r.host}:{r.length}: the {name} range "
                                 f"ends above {NO_ID - 1}")
    for column in (0, 1):
        spans = sorted((r[column], r[column] + r.length, r) for r in ranges)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                name = "container" if column == 0 else "host"
                raise IdMapError(f"{what}: {a.container}:{a.host}:{a.length} and "
                                 f"{b.container}:{b.host}:{b.length} overlap in the {name} ids")
    return tuple(sorted(ranges))


@dataclass(frozen=True)
class _Table:
    """One direction of one kind of id: sorted ranges and the id for ids in none of them."""

    ranges: tuple[IdRange, ...]
    overflow: int
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", [r.container for r in self.ranges])

    def __call__(self, stored: int) -> int:
        if not self.ranges:
            return stored
        k = bisect.bisect_right(self._starts, stored) - 1
        if k >= 0:
            r = self.ranges[k]
            if stored < r.container + r.length:
                return r.host + (stored - r.container)
        return self.overflow


@dataclass(frozen=True)
class IdMap:
    """Owner and group translation for reported attributes; the default maps nothing."""

    uid_ranges: tuple[IdRange, ...] = ()
    gid_ranges: tuple[IdRange, ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None
    overflow_uid: int = DEFAULT_OVERFLOW_ID
    overflow_gid: int = DEFAULT_OVERFLOW_ID
    _uid: _Table = field(init=False, repr=False, compare=False)
    _gid: _Table = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uid_ranges", check_ranges(self.uid_ranges, "uid mapping"))
        object.__setattr__(self, "gid_ranges", check_ranges(self.gid_ranges, "gid mapping"))
        for value, what in ((self.squash_uid, "squash uid"), (self.squash_gid, "squash gid")):
            if value is not None:
                _check_id(value, what)
        object.__setattr__(self, "_uid", _Table(self.uid_ranges, self.overflow_uid))
        object.__setattr__(self, "_gid", _Table(self.gid_ranges, self.overflow_gid))

    @classmethod
    def from_options(
        cls,
        uidmap: Sequence[str] = (),
        gidmap: Sequence[str] = (),
        *,
        squash_to_root: bool = False,
        squash_to_uid: int | None = None,
        squash_to_gid: int | None = None,
        overflow: tuple[int, int] = (DEFAULT_OVERFLOW_ID, DEFAULT_OVERFLOW_ID),
    ) -> IdMap:
        """The map the options ask for; several lists of one kind are concatenated."""
        return cls(
            uid_ranges=tuple(r for text in uidmap for r in parse_mapping(text)),
            gid_ranges=tuple(r for text in gidmap for r in parse_mapping(text)),
            squash_uid=squash_to_uid if squash_to_uid is not None else (
                0 if squash_to_root else None),
            squash_gid=squash_to_gid if squash_to_gid is not None else (
                0 if squash_to_root else None),
            overflow_uid=overflow[0],
            overflow_gid=overflow[1],
        )

    @property
    def is_identity(self) -> bool:
        return (not self.uid_ranges and not self.gid_ranges
                and self.squash_uid is None and self.squash_gid is None)

    def uid(self, stored: int) -> int:
        """The owner reported for a file whose layer stores owner ``stored``."""
        return self.squash_uid if self.squash_uid is not None else self._uid(stored)

    def gid(self, stored: int) -> int:
        """The group reported for a file whose layer stores group ``stored``."""
        return self.squash_gid if self.squash_gid is not None else self._gid(stored)

    def acl(self, value: bytes) -> bytes:
        """A POSIX ACL xattr value with its named user and group entries mapped.

        A value that is not a well-formed version-2 ACL is returned as it is: the kernel rejects
        it on its own, and a malformed value is no reason to fail the request here.
        """
        if not (self.uid_ranges or self.gid_ranges):
            return value
        if (len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size
                or _ACL_HEADER.unpack_from(value)[0] != _ACL_VERSION):
            return value
        out = bytearray(value)
        for pos in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
            tag, perm, id_ = _ACL_ENTRY.unpack_from(value, pos)
            if tag == _ACL_USER:
                _ACL_ENTRY.pack_into(out, pos, tag, perm, self._uid(id_))
            elif tag == _ACL_GROUP:
                _ACL_ENTRY.pack_into(out, pos, tag, perm, self._gid(id_))
        return bytes(out)


IDENTITY = IdMap()


def kernel_overflow_ids() -> tuple[int, int]:
    """The kernel's overflow uid and gid (what an unmapped id shows as), or 65534 each."""
    ids = []
    for kind in ("uid", "gid"):
        try:
            with open(f"/proc/sys/kernel/overflow{kind}", encoding="ascii") as f:
                ids.append(_check_id(int(f.read().strip()), f"overflow {kind}"))
        except (OSError, ValueError):
            ids.append(DEFAULT_OVERFLOW_ID)
    return ids[0], ids[1]
