"""The compiled parts. The two C extensions are optional: where one cannot be built (no C
compiler, no OpenSSL headers), the install goes on and Python does the same work with the same
results, slower.

- ``erofs_fuse.verity._blockhash``: the block hasher behind verity.build.hash_blocks (about
  2.5x faster on large reads);
- ``erofs_fuse.erofs._lz4run``: runs of LZ4 pclusters decoded in one call
  (``decompress.lz4_run``; liblz4 itself is opened at run time, so no headers are needed);
- the modules of the request path compiled by mypyc from their typed sources (the list and
  why: erofs_fuse/native.py). ``EROFS_FUSE_PURE=1`` at install time leaves them as Python.
"""

import ast
import os
from pathlib import Path

from setuptools import Extension, setup


def compiled_sources() -> list[str]:
    """native.COMPILED, read from the file's text: the package is not imported to build it."""
    tree = ast.parse(Path("erofs_fuse/native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            names = ast.literal_eval(node.value)
            return [f"erofs_fuse/{name.replace('.', '/')}.py" for name in names]
    raise SystemExit("setup.py: no COMPILED in erofs_fuse/native.py")


def mypyc_extensions() -> list[Extension]:
    if os.environ.get("EROFS_FUSE_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    # one group: calls between the modules stay direct C calls; the group's shared library
    # lives inside the package (erofs_fuse/_native__mypyc...so), so copies of the package work
    return mypycify(compiled_sources(), opt_level="3", group_name="erofs_fuse._native")


setup(ext_modules=[Extension(
    "erofs_fuse.verity._blockhash",
    ["erofs_fuse/verity/_blockhash.c", "erofs_fuse/verity/sha256ni.c"],
    depends=["erofs_fuse/verity/sha256ni.h"], libraries=["crypto"], optional=True),
    Extension("erofs_fuse.erofs._lz4run", ["erofs_fuse/erofs/_lz4run.c"], optional=True),
    *mypyc_extensions()])
