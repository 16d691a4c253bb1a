"""Runtime integrity of layer blobs: lazy Merkle-tree verification of every byte read.

Design and measured facts: ``docs/integrity.md``. The modules, bottom up: ``formats`` (tree
parameters, geometry, fs-verity descriptor, veritysetup superblock), ``build`` (making a tree),
``trust`` (trusted values and the mount options naming them), ``blob`` (``VerifiedBlob``: lazy
checks of every block read), ``layer`` (opening a layer: its sidecar, its trust, its blob),
``objects`` (verifying an object of an object store: its stored tree, or one pass) and
``sealing`` (``seal``: writing a layer's sidecar; not named ``seal``, which would shadow the
function in this package's namespace once imported). None of them knows the command line:
errors are raised (``TrustError``, ``SealError``, ``FormatError``, ``IntegrityError``) and
worded by ``cli`` and ``mount``.

Trusted input (per layer file), strongest first:

* ``FsVerityDigest`` -- ``sha256:HEX`` exactly as ``fsverity digest LAYER`` prints it. It
  covers algorithm, block size, salt, data size and root, so the blob size is authenticated.
  Without a descriptor file the defaults (4096-byte blocks, no salt, the digest's algorithm)
  and the blob's size rebuild the descriptor; ``SIDECAR.desc`` (``--out-descriptor``) is used
  when it hashes to the digest.
* ``DmVerityRoot`` -- a dm-verity root *with its data block count* (and block sizes, default
  4096, and hash type, default 1): the root alone does not cover them. The algorithm follows
  from the root's length. Only the salt is taken from a veritysetup superblock, because
  changing it changes the root. The hash type is *not* taken from the superblock: with an
  all-zero salt (containerd's), a format-0 tree over data shifted by 32 bytes reproduces a
  format-1 root, so a forged superblock could pass off shifted blocks (see the tests).
* a containerd ``LAYER.dmverity`` JSON (``{"roothash", "hashoffset"}``, tree appended to the
  layer at ``hashoffset``): its root is trusted only with ``trust_dmverity_sidecar``; the block
  size then comes from the superblock but must equal the hash block size, which keeps a hash
  block from being passed off as data.

API for the mount code::

    specs = parse_trust_args(layers, verity=[...], verity_roots=[...], dm_verity=[...],
                             verity_sidecar=[...], trust_dmverity_sidecar=False)
    blobs = [open_layer_blob(path, spec, require=require_verity) for path, spec in ...]

``open_layer_blob`` returns a plain ``FileBlob`` when nothing is trusted (``IntegrityError``
if ``require``), else a ``VerifiedBlob`` whose ``size`` is the authenticated data size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

# Public names and the module of each. They are loaded on first use (PEP 562), so a module that
# needs one part (the mount: ``trust`` for its options, ``layer`` only for a trusted layer) does
# not import the others: a mount without verification imports none of this package.
_EXPORTS = {
    "FormatError": "formats", "HashParams": "formats",
    "BuiltTree": "build", "build_tree": "build",
    "Anchor": "trust", "ContainerdVerity": "trust", "DmVerityRoot": "trust",
    "FsVerityDigest": "trust", "IntegrityError": "trust", "TrustError": "trust",
    "TrustSpec": "trust", "parse_trust_args": "trust", "read_digests_file": "trust",
    "read_dmverity_json": "trust",
    "DEFAULT_TREE_CACHE_BYTES": "blob", "MerkleTree": "blob", "VerifiedBlob": "blob",
    "containerd_trust": "layer", "dmverity_tree": "layer", "fsverity_tree": "layer",
    "open_layer_blob": "layer",
    "ProgressBar": "sealing", "SealError": "sealing", "SealResult": "sealing", "seal": "sealing",
}

if TYPE_CHECKING:
    from .blob import DEFAULT_TREE_CACHE_BYTES, MerkleTree, VerifiedBlob
    from .build import BuiltTree, build_tree
    from .formats import FormatError, HashParams
    from .layer import containerd_trust, dmverity_tree, fsverity_tree, open_layer_blob
    from .sealing import ProgressBar, SealError, SealResult, seal
    from .trust import (
        Anchor,
        ContainerdVerity,
        DmVerityRoot,
        FsVerityDigest,
        IntegrityError,
        TrustError,
        TrustSpec,
        parse_trust_args,
        read_digests_file,
        read_dmverity_json,
    )

__all__ = [
    "DEFAULT_TREE_CACHE_BYTES", "Anchor", "BuiltTree", "ContainerdVerity", "DmVerityRoot",
    "FormatError", "FsVerityDigest", "HashParams", "IntegrityError", "MerkleTree",
    "ProgressBar", "SealError", "SealResult", "TrustError", "TrustSpec", "VerifiedBlob",
    "build_tree", "containerd_trust", "dmverity_tree", "fsverity_tree", "open_layer_blob",
    "parse_trust_args", "read_digests_file", "read_dmverity_json", "seal",
]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
