/* The mask kernel for float32 in C: out[i] = bit i of mask ? base[i] + vec[i] : base[i].
 *
 * Built (optionally) with the package; edgemerge/runtime/kernel.py uses it when it imports and
 * falls back to numba / numpy otherwise. Bit order is numpy's 'big': element i is bit 7 - i % 8 of
 * byte i / 8. Same select, same float32 add as the reference: bit-identical (tests/test_kernel.py).
 *
 * On x86-64 CPUs with AVX2 the loop takes 8 elements at a time and writes them with non-temporal
 * stores: a switch writes θ_t once and does not read it back, so bypassing the cache saves the
 * read-for-ownership of every output line (~1/3 of the traffic) -- what a plain memcpy of large
 * arrays does too. Elsewhere (Jetson's ARM cores) a scalar loop the compiler may vectorize.
 *
 * apply_f32(base, vec, mask, out, start, stop): buffers of float32 / uint8; releases the GIL, so
 * Python threads can split one array into ranges (kernel.py does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EM_AVX2 1
#endif

static inline void span_scalar(const float *b, const float *v, const uint8_t *m, float *o,
                               Py_ssize_t s, Py_ssize_t e) {
    for (Py_ssize_t i = s; i < e; i++)
        o[i] = ((m[i >> 3] >> (7 - (i & 7))) & 1) ? b[i] + v[i] : b[i];
}

#ifdef EM_AVX2
__attribute__((target("avx2")))
static void span_avx2(const float *b, const float *v, const uint8_t *m, float *o,
                      Py_ssize_t s, Py_ssize_t e) {
    Py_ssize_t i = s;
    while (i < e && ((uintptr_t)(o + i) & 31))  /* scalar head up to a 32-byte aligned output */
        span_scalar(b, v, m, o, i, i + 1), i++;
    /* lane k of the group at i needs bit (i + k): take the 16-bit window of bytes i/8 and i/8 + 1
       and shift lane k right by 15 - (i % 8) - k; the window's second byte exists while i + 16 <= e */
    const __m256i lane = _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8);
    const __m256i one = _mm256_set1_epi32(1);
    for (; i + 16 <= e; i += 8) {
        int w = (m[i >> 3] << 8) | m[(i >> 3) + 1];
        __m256i sh = _mm256_sub_epi32(lane, _mm256_set1_epi32((int)(i & 7)));
        __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), sh), one);
        __m256 sel = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, one));
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 r = _mm256_blendv_ps(bv, _mm256_add_ps(bv, _mm256_loadu_ps(v + i)), sel);
        _mm256_stream_ps(o + i, r);
    }
    _mm_sfence();
    span_scalar(b, v, m, o, i, e);
}
#endif

static int has_avx2(void) {
#ifdef EM_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

static int avx2 = 0;

static PyObject *apply_f32(PyObject *self, PyObject *args) {
    Py_buffer b, v, m, o;
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nn", &b, &v, &m, &o, &s, &e))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = b.len / 4;
    if (b.len % 4 || v.len != b.len || o.len != b.len || m.len != (n + 7) / 8 || s < 0 || e > n || s > e) {
        PyErr_SetString(PyExc_ValueError, "apply_f32: buffer sizes or range do not match");
    } else {
        Py_BEGIN_ALLOW_THREADS
#ifdef EM_AVX2
        if (avx2)
            span_avx2(b.buf, v.buf, m.buf, o.buf, s, e);
        else
#endif
            span_scalar(b.buf, v.buf, m.buf, o.buf, s, e);
        Py_END_ALLOW_THREADS
        res = Py_None;
        Py_INCREF(res);
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&v);
    PyBuffer_Release(&m);
    PyBuffer_Release(&o);
    return res;
}

static PyObject *simd(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(avx2 ? "avx2+stream" : "scalar");
}

static PyMethodDef methods[] = {
    {"apply_f32", apply_f32, METH_VARARGS, "apply_f32(base, vec, mask, out, start, stop): the select, float32"},
    {"simd", simd, METH_NOARGS, "which loop runs on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cmask", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cmask(void) {
    avx2 = has_avx2();
    return PyModule_Create(&module);
}
