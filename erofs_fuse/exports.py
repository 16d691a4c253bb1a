"""Packages whose names load their modules on first use (PEP 562), so that importing one
module of the package does not import the rest (``verity``: a mount without integrity options
loads no tree code; ``lazy``: a mount that only looks for ``lazy:`` layers loads no registry
client)."""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, MutableMapping


def lazy_exports(package: str, exports: Mapping[str, str],
                 namespace: MutableMapping[str, object]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: each name of ``exports`` (name -> module of
    the package) imported from its module on first use and kept in ``namespace``."""

    def getattr_(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value  # looked up once
        return value

    return getattr_
