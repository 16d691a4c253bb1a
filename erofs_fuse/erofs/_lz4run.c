/*
 * Decoding of consecutive LZ4 pclusters in one call (erofs_fuse.erofs.decompress.lz4_run).
 *
 * A compressed read of an lz4hc layer made with 4 KiB pclusters decodes one pcluster per
 * 4-8 KiB of file: through ctypes, each cost about 4 us of calls and copies besides the
 * decoding itself, as much again as the decoding. Here a whole run of pclusters (the bytes of
 * one read of the layer) is decoded into one output, with the GIL released.
 *
 * liblz4 is opened at import with dlopen (the runtime library only: no headers needed to
 * build), as the ctypes path does; below 1.9.2 its partial decoder reads out of bounds, and the
 * module refuses to load. The output is zeroed before decoding: liblz4 accepts match offset 0,
 * which copies output bytes onto themselves, and must find zeros there, never stale heap.
 * LZ4_decompress_safe never reads before its dst, so one pcluster cannot reach into the output
 * of the one before it.
 *
 * This file parses nothing of the format: it is handed offsets, lengths and flags that the
 * Python reader has mapped and checked, and checks each range against its buffers again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>

typedef int (*lz4_safe_fn)(const char *src, char *dst, int src_size, int dst_capacity);
typedef int (*lz4_partial_fn)(const char *src, char *dst, int src_size, int target,
                              int dst_capacity);
typedef int (*lz4_version_fn)(void);

static lz4_safe_fn lz4_safe;
static lz4_partial_fn lz4_partial;

/* the most output of one call: the reads it serves are at most a few MiB */
#define MAX_OUTPUT (64L << 20)

typedef struct {
    Py_ssize_t offset, length, out_length;
    int partial;
} job_t;

/* what went wrong with job `index`, for the ValueError the caller turns into its own error */
static PyObject *job_error(Py_ssize_t index, const char *message, int code)
{
    PyObject *text = code != 0 ? PyUnicode_FromFormat("%s (liblz4 error %d)", message, code)
                               : PyUnicode_FromString(message);
    if (text == NULL)
        return NULL;
    PyObject *args = Py_BuildValue("(nN)", index, text);
    if (args != NULL) {
        PyErr_SetObject(PyExc_ValueError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int parse_jobs(PyObject *seq, Py_ssize_t src_len, job_t **out, Py_ssize_t *count,
                      Py_ssize_t *total)
{
    PyObject *fast = PySequence_Fast(seq, "jobs must be a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    job_t *jobs = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(job_t));
    if (jobs == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t sum = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        job_t *j = &jobs[i];
        if (!PyArg_ParseTuple(item, "nnnp", &j->offset, &j->length, &j->out_length,
                              &j->partial))
            goto fail;
        if (j->offset < 0 || j->length <= 0 || j->offset > src_len - j->length
                || j->length > INT_MAX) {
            job_error(i, "pcluster outside the bytes read", 0);
            goto fail;
        }
        if (j->out_length <= 0 || j->out_length > INT_MAX || j->out_length > MAX_OUTPUT - sum) {
            job_error(i, "output length out of range", 0);
            goto fail;
        }
        sum += j->out_length;
    }
    Py_DECREF(fast);
    *out = jobs;
    *count = n;
    *total = sum;
    return 0;
fail:
    Py_DECREF(fast);
    PyMem_Free(jobs);
    return -1;
}

/* 0, or -(index + 1) of the failing job with *why and *code set */
static Py_ssize_t decode_all(const char *src, char *dst, const job_t *jobs, Py_ssize_t n,
                             const char **why, int *code)
{
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const job_t *j = &jobs[i];
        const char *p = src + j->offset;
        Py_ssize_t len = j->length;
        while (len > 0 && *p == 0) {  /* the stream is stored after its zero padding */
            p++;
            len--;
        }
        if (len == 0) {
            *why = "pcluster holds only zeros";
            *code = 0;
            return -(i + 1);
        }
        int out = (int)j->out_length;
        int got = j->partial ? lz4_partial(p, dst + at, (int)len, out, out)
                             : lz4_safe(p, dst + at, (int)len, out);
        if (got < 0) {
            *why = "invalid stream";
            *code = got;
            return -(i + 1);
        }
        if (got != out) {
            *why = "decoded to fewer bytes than the extent has";
            *code = 0;
            return -(i + 1);
        }
        at += out;
    }
    return 0;
}

static PyObject *lz4_run(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer src;
    PyObject *jobs_seq;
    if (!PyArg_ParseTuple(args, "y*O", &src, &jobs_seq))
        return NULL;
    job_t *jobs = NULL;
    Py_ssize_t n = 0, total = 0;
    PyObject *result = NULL;
    if (parse_jobs(jobs_seq, src.len, &jobs, &n, &total) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    char *dst = PyBytes_AS_STRING(result);
    const char *why = NULL;
    int code = 0;
    Py_ssize_t failed;
    Py_BEGIN_ALLOW_THREADS
    memset(dst, 0, (size_t)total);
    failed = decode_all((const char *)src.buf, dst, jobs, n, &why, &code);
    Py_END_ALLOW_THREADS
    if (failed < 0) {
        Py_CLEAR(result);
        job_error(-failed - 1, why, code);
    }
done:
    PyMem_Free(jobs);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"lz4_run", lz4_run, METH_VARARGS,
     "lz4_run(src, jobs) -> bytes: each job (offset, length, out_length, partial) is an LZ4\n"
     "pcluster of src (zero padding first) that decodes to exactly out_length bytes; the\n"
     "outputs, one after the other. ValueError(index, message) names the first that fails."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lz4run",
    "Decoding of consecutive LZ4 pclusters in one call (see the C source).", -1, methods,
};

PyMODINIT_FUNC PyInit__lz4run(void)
{
    void *lib = dlopen("liblz4.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        PyErr_SetString(PyExc_ImportError, "liblz4.so.1 not found");
        return NULL;
    }
    lz4_version_fn version = (lz4_version_fn)dlsym(lib, "LZ4_versionNumber");
    lz4_safe = (lz4_safe_fn)dlsym(lib, "LZ4_decompress_safe");
    lz4_partial = (lz4_partial_fn)dlsym(lib, "LZ4_decompress_safe_partial");
    if (version == NULL || lz4_safe == NULL || lz4_partial == NULL || version() < 10902) {
        PyErr_SetString(PyExc_ImportError, "liblz4 older than 1.9.2 or incomplete");
        return NULL;
    }
    return PyModule_Create(&module);
}
