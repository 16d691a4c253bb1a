"""The one compiled part: the block hasher behind verity.build.hash_blocks (see its C source).
Optional: where it cannot be built (no C compiler or no OpenSSL headers), the install goes on
and hash_blocks hashes in Python, with the same results, about 2.5x slower on large reads."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "erofs_fuse.verity._blockhash",
    ["erofs_fuse/verity/_blockhash.c", "erofs_fuse/verity/sha256ni.c"],
    depends=["erofs_fuse/verity/sha256ni.h"], libraries=["crypto"], optional=True)])
