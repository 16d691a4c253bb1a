# The compiled block hasher (_blockhash.c); optional, see build.hash_blocks.
def digests(alg: str, prefix: bytes, suffix: bytes, data: bytes | memoryview, block_size: int,
            slot_size: int, threads: int) -> bytes: ...

# 1 where SHA-256 blocks are hashed on the x86 SHA extensions, two at a time (sha256ni.c)
SHA_NI: int
