/* SHA-256 with the x86 SHA extensions, two messages at a time (sha256ni.c). */
#ifndef EROFS_FUSE_SHA256NI_H
#define EROFS_FUSE_SHA256NI_H

#include <stddef.h>
#include <stdint.h>

/* The longest suffix (a dm-verity salt: veritysetup allows 256 bytes) sha256ni_digests takes. */
#define SHA256NI_MAX_SUFFIX 256

/* 1 if this CPU has the SHA extensions (and the SSSE3 and SSE4.1 they come with). */
int sha256ni_available(void);

/* The SHA-256 digests of prefix || block || suffix for blocks first .. stop-1 of `data`,
 * each `len` bytes long, block b at data + b * len, its digest (32 bytes) at out + b * slot.
 * Only where sha256ni_available() says so. */
void sha256ni_digests(const unsigned char *prefix, size_t prefix_len,
                      const unsigned char *suffix, size_t suffix_len,
                      const unsigned char *data, size_t len, size_t first, size_t stop,
                      unsigned char *out, size_t slot);

#endif
