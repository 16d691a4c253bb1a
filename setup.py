"""The two compiled parts, each optional: where one cannot be built (no C compiler, no OpenSSL
headers), the install goes on and Python does the same work with the same results, slower.

- ``erofs_fuse.verity._blockhash``: the block hasher behind verity.build.hash_blocks (about
  2.5x faster on large reads);
- ``erofs_fuse.erofs._lz4run``: runs of LZ4 pclusters decoded in one call
  (``decompress.lz4_run``; liblz4 itself is opened at run time, so no headers are needed)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "erofs_fuse.verity._blockhash",
    ["erofs_fuse/verity/_blockhash.c", "erofs_fuse/verity/sha256ni.c"],
    depends=["erofs_fuse/verity/sha256ni.h"], libraries=["crypto"], optional=True),
    Extension("erofs_fuse.erofs._lz4run", ["erofs_fuse/erofs/_lz4run.c"], optional=True)])
