"""containerd's filter expressions, enough of them for List: ``field==value``, ``!=``, ``~=``
(a regular expression) and a bare field (present), selectors AND-ed by ``,``, the list OR-ed.

Fields: ``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``) and
``labels.KEY`` (KEY may be quoted: ``labels."containerd.io/snapshot.ref"``). A filter we
cannot parse matches everything: containerd rechecks what we return (containerd.md §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .store import Kind, Snapshot

_FIELD = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z0-9_\-/]+')
_OP = re.compile(r"==|!=|~=")
_VALUE = re.compile(r'"(?:[^"\\]|\\.)*"|/(?:[^/\\]|\\.)*/|[^,]*')


@dataclass(frozen=True)
class Selector:
    field: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str


Filter = list[Selector]


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in '"/':
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def parse_filter(text: str) -> Filter | None:
    out: Filter = []
    pos = 0
    while True:
        field = []
        while True:
            m = _FIELD.match(text, pos)
            if m is None:
                return None
            field.append(_unquote(m.group()))
            pos = m.end()
            if not text.startswith(".", pos):
                break
            pos += 1
        op = value = ""
        m = _OP.match(text, pos)
        if m is not None:
            op = m.group()
            v = _VALUE.match(text, m.end())
            assert v is not None  # the last alternative matches the empty string
            value = _unquote(v.group())
            pos = v.end()
        out.append(Selector(tuple(field), op, value))
        if pos == len(text):
            return out
        if text[pos] != ",":
            return None
        pos += 1


def parse_filters(texts: list[str]) -> list[Filter] | None:
    """None (everything) for no filters or one we cannot read."""
    filters = []
    for text in texts:
        f = parse_filter(text)
        if f is None:
            return None
        filters.append(f)
    return filters or None


def _field(snap: Snapshot, field: tuple[str, ...]) -> str | None:
    if field == ("name",):
        return snap.key
    if field == ("parent",):
        return snap.parent
    if field == ("kind",):
        return {Kind.ACTIVE: "active", Kind.VIEW: "view",
                Kind.COMMITTED: "committed"}.get(snap.kind, "unknown")
    if len(field) >= 2 and field[0] == "labels":
        return snap.labels.get(".".join(field[1:]))
    return None


def _match(sel: Selector, snap: Snapshot) -> bool:
    v = _field(snap, sel.field)
    if sel.op == "":
        return v is not None
    if sel.op == "==":
        return v == sel.value
    if sel.op == "!=":
        return v != sel.value
    try:
        return v is not None and re.search(sel.value, v) is not None
    except re.error:
        return False


def matches(filters: list[Filter] | None, snap: Snapshot) -> bool:
    if filters is None:
        return True
    return any(all(_match(sel, snap) for sel in f) for f in filters)
