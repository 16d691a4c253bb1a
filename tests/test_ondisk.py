"""The on-disk declarations: every named layout has one field per value its struct packs."""

from __future__ import annotations

import os

import pytest

from erofs_fuse.erofs import ondisk as d


@pytest.mark.parametrize("layout,raw", d.NAMED_LAYOUTS, ids=lambda x: getattr(x, "__name__", ""))
def test_named_fields_match_the_struct(layout: object, raw: type) -> None:
    import struct

    assert isinstance(layout, struct.Struct)
    data = os.urandom(layout.size)
    values = layout.unpack(data)
    assert len(raw._fields) == len(values)  # type: ignore[attr-defined]
    assert layout.pack(*raw(*values)) == data
