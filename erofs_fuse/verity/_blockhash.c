/* The digests of many equal-sized blocks, hashed outside the GIL and, for large buffers, on
 * two threads: the accelerator behind erofs_fuse.verity.build.hash_blocks.
 *
 * Why C: checking a read against its Merkle leaves hashes every 4 KiB block on its own.
 * hashlib releases the GIL only inside each 2.5 us hash, so Python threads cannot share the
 * work (they hand the GIL back and forth 256 times per MiB), and the per-block call costs
 * about a tenth on top. Here one call hashes the whole buffer with OpenSSL's EVP API (the
 * same library hashlib uses), the second half on a thread of its own when the buffer is large.
 * SHA-256, salted or not (fs-verity's defaults, erofs-fuse seal's trees, veritysetup's), goes
 * through sha256ni.c instead where the CPU has the SHA extensions: two blocks at a time on
 * each thread, 1.8x OpenSSL's speed on this project's AMD EPYC VM.
 * EROFS_FUSE_HASH=openssl (read at import) keeps OpenSSL for all, to compare.
 *
 * digests(alg, prefix, suffix, data, block_size, slot_size, threads) -> bytes
 *   For each block of `data` (a partial last block zero-padded to block_size), the digest of
 *   prefix || block || suffix, written into a slot of slot_size bytes (zero after the digest).
 *   Same result as build.hash_blocks in pure Python; the tests hold them to it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "sha256ni.h"

#define MAX_BLOCK (1 << 16)       /* formats.MAX_BLOCK_SIZE */
#define MAX_SLOT 128              /* a digest padded to a power of two (dm-verity), at most */
/* Below this a second thread saves nothing: starting and joining one costs 30-40 us on the
 * 2-CPU VM, and one thread hashes 256 KiB in about 150 us (SHA-256 with SHA-NI). */
#define TWO_THREADS_MIN (256 << 10)
/* The same with the SHA extensions, which hash 256 KiB in 81 us on one thread: two took 91 us
 * there, 115 against 121 at 384 KiB, 134 against 163 at 512 KiB. */
#define TWO_THREADS_MIN_NI (512 << 10)

static const unsigned char zeros[MAX_BLOCK];

typedef struct {
    EVP_MD *md;
    const unsigned char *prefix, *suffix, *data;
    size_t prefix_len, suffix_len, len, block, slot;
    size_t first, stop; /* this job's blocks: [first, stop) */
    unsigned char *out;
    int fast; /* whole blocks go through sha256ni_digests */
    int failed;
} Job;

static int sha_ni; /* the SHA extensions are there, and EROFS_FUSE_HASH does not say openssl */

static void *hash_range(void *arg)
{
    Job *job = arg;
    size_t b = job->first;
    if (job->fast) {
        size_t whole = job->len / job->block;
        size_t stop = job->stop < whole ? job->stop : whole;
        if (b < stop)
            sha256ni_digests(job->prefix, job->prefix_len, job->suffix, job->suffix_len,
                             job->data, job->block, b, stop, job->out, job->slot);
        if (stop > b)
            b = stop;
        if (b >= job->stop)
            return NULL;  /* no partial last block left for OpenSSL */
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        job->failed = 1;
        return NULL;
    }
    for (; b < job->stop; b++) {
        size_t pos = b * job->block;
        size_t n = job->len - pos < job->block ? job->len - pos : job->block;
        if (!EVP_DigestInit_ex(ctx, job->md, NULL)
            || (job->prefix_len && !EVP_DigestUpdate(ctx, job->prefix, job->prefix_len))
            || !EVP_DigestUpdate(ctx, job->data + pos, n)
            || (n < job->block && !EVP_DigestUpdate(ctx, zeros, job->block - n))
            || (job->suffix_len && !EVP_DigestUpdate(ctx, job->suffix, job->suffix_len))
            || !EVP_DigestFinal_ex(ctx, job->out + b * job->slot, NULL)) {
            job->failed = 1;
            break;
        }
    }
    EVP_MD_CTX_free(ctx);
    return NULL;
}

/* Fetched once per algorithm name: an implicit fetch on every EVP_DigestInit_ex costs more
 * than hashing a small block. */
static EVP_MD *cached_md[8];
static char cached_name[8][16];

static EVP_MD *md_named(const char *name)
{
    for (int k = 0; k < 8; k++) {
        if (cached_md[k] == NULL) {
            EVP_MD *md = EVP_MD_fetch(NULL, name, NULL);
            if (md == NULL || strlen(name) >= sizeof cached_name[k])
                return md;  /* not cached: a name we do not know stays unknown */
            strcpy(cached_name[k], name);
            cached_md[k] = md;
            return md;
        }
        if (strcmp(cached_name[k], name) == 0)
            return cached_md[k];
    }
    return EVP_MD_fetch(NULL, name, NULL);
}

static PyObject *digests(PyObject *self, PyObject *args)
{
    (void)self;
    const char *alg;
    Py_buffer prefix, suffix, data;
    Py_ssize_t block, slot;
    int threads;
    if (!PyArg_ParseTuple(args, "sy*y*y*nni", &alg, &prefix, &suffix, &data, &block, &slot,
                          &threads))
        return NULL;
    PyObject *result = NULL;
    EVP_MD *md = md_named(alg);
    if (md == NULL) {
        PyErr_Format(PyExc_ValueError, "unknown hash algorithm %s", alg);
        goto done;
    }
    int size = EVP_MD_get_size(md);
    if (block <= 0 || block > MAX_BLOCK || slot < size || slot > MAX_SLOT) {
        PyErr_SetString(PyExc_ValueError, "block size out of range or slot not digest-sized");
        goto done;
    }
    size_t count = ((size_t)data.len + (size_t)block - 1) / (size_t)block;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * (size_t)slot));
    if (result == NULL)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    if (slot > size)
        memset(out, 0, count * (size_t)slot);
    int fast = sha_ni && EVP_MD_get_type(md) == NID_sha256 && suffix.len <= SHA256NI_MAX_SUFFIX;
    Job jobs[2];
    for (int k = 0; k < 2; k++)
        jobs[k] = (Job){md, prefix.buf, suffix.buf, data.buf, (size_t)prefix.len,
                        (size_t)suffix.len, (size_t)data.len, (size_t)block, (size_t)slot,
                        0, count, out, fast, 0};
    size_t two_min = fast ? TWO_THREADS_MIN_NI : TWO_THREADS_MIN;
    int two = threads > 1 && (size_t)data.len >= two_min && count > 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_t helper;
    if (two) {
        jobs[0].stop = jobs[1].first = count / 2;
        if (pthread_create(&helper, NULL, hash_range, &jobs[1]) != 0) {
            two = 0;  /* no thread to be had: this one hashes all */
            jobs[0].stop = count;
        }
    }
    hash_range(&jobs[0]);
    if (two)
        pthread_join(helper, NULL);
    Py_END_ALLOW_THREADS
    if (jobs[0].failed || (two && jobs[1].failed)) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to hash a block");
    }
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&suffix);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"digests", digests, METH_VARARGS,
     "digests(alg, prefix, suffix, data, block_size, slot_size, threads) -> bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockhash", "Block digests outside the GIL (see the C source).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blockhash(void)
{
    const char *choice = getenv("EROFS_FUSE_HASH");
    sha_ni = sha256ni_available() && !(choice != NULL && strcmp(choice, "openssl") == 0);
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "SHA_NI", sha_ni) < 0)
        Py_CLEAR(m);
    return m;
}
