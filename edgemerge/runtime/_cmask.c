/* The mask kernels in C: out[i] = bit i of mask ? base[i] + vec[i] : base[i] (TALL), and the T-Switch
 * rule out[i] = presence bit i ? base[i] + (sign bit i ? -c : c) : base[i] (apply_sign).
 *
 * Built (optionally) with the package; edgemerge/runtime/kernel.py uses it when it imports and
 * falls back to numba / numpy otherwise. Bit order is numpy's 'big': element i is bit 7 - i % 8 of
 * byte i / 8. Same select, same float32 add as the reference: bit-identical (tests/test_kernel.py).
 *
 * On x86-64 CPUs with AVX2 the loop takes 8 elements at a time and writes them with non-temporal
 * stores: a switch writes θ_t once and does not read it back, so bypassing the cache saves the
 * read-for-ownership of every output line (~1/3 of the traffic) -- what a plain memcpy of large
 * arrays does too; the quantized delta (I8 / I4 codes times a row or column scale, every delta
 * codec but F16/BF16) the same way on float32 bases. Elsewhere (Jetson's ARM cores) a scalar loop
 * the compiler may vectorize.
 *
 * apply_f32(base, vec, mask, out, start, stop): buffers of float32 / uint8; releases the GIL, so
 * Python threads can split one array into ranges (kernel.py does). Every entry point is one job;
 * plan(jobs) checks many (a task's every param, each rule: the select, the half selects, the
 * T-Switch rule, quantized deltas, the scaled select of tall/ls and emr, corrections) once and lays
 * them end to end, and run_plan(plan, start, stop) runs any range of that element space: a switch
 * is one call per thread (runtime/codecs.py, SwitchPlan).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
/* The selection mask of lanes 0..7 of the group at i: bit i + k of a big-order plane, as all-ones /
   all-zeros floats. Takes the 16-bit window of bytes i/8 and i/8 + 1 (it exists while i + 16 <= e)
   and shifts lane k right by 15 - (i % 8) - k, so a group may start at any i. */
__attribute__((target("avx2")))
static inline __m256 window_sel(const uint8_t *m, Py_ssize_t i) {
    const __m256i lane = _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8), one = _mm256_set1_epi32(1);
    int w = (m[i >> 3] << 8) | m[(i >> 3) + 1];
    __m256i sh = _mm256_sub_epi32(lane, _mm256_set1_epi32((int)(i & 7)));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), sh), one), one));
}

__attribute__((target("avx2")))
static void span_avx2(const float *b, const float *v, const uint8_t *m, float *o,
                      Py_ssize_t s, Py_ssize_t e) {
    Py_ssize_t i = s;
    while (i < e && ((uintptr_t)(o + i) & 31))  /* scalar head up to a 32-byte aligned output */
        span_scalar(b, v, m, o, i, i + 1), i++;
    for (; i + 16 <= e; i += 8) {
        __m256 sel = window_sel(m, i);
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 r = _mm256_blendv_ps(bv, _mm256_add_ps(bv, _mm256_loadu_ps(v + i)), sel);
        _mm256_stream_ps(o + i, r);
    }
    _mm_sfence();
    span_scalar(b, v, m, o, i, e);
}
#endif

/* -- float16 / bfloat16 bases ---------------------------------------------------------------------
 * out[i] = R(bit ? W(b[i]) + V(v[i]) : W(b[i])): W widens the base to float32 (exact), V the vector
 * (float32, or the base's half type), R rounds once to the base's type, round-to-nearest-even --
 * the reference's np.where(mask, b32 + v32, b32).astype(dtype). NaN results follow numpy (float16:
 * the top payload bits, kept a NaN) and ml_dtypes (bfloat16: +-0x7FC0); the AVX2 loops hand any
 * group of 8 holding a NaN to the scalar code, because F16C sets the quiet bit where numpy does not. */
enum { K_F32 = 0, K_F16 = 1, K_BF16 = 2 };

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    if (!m) return bits_f32(sign);
    e = 113;  /* subnormal: shift the leading 1 into the implicit bit */
    while (!(m & 0x400u)) m <<= 1, e--;
    return bits_f32(sign | (e << 23) | ((m & 0x3ffu) << 13));
}

static inline uint16_t f2h(float x) {
    uint32_t f = f32_bits(x), a = f & 0x7fffffffu;
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    if (a > 0x7f800000u) {  /* NaN: keep the top payload bits, stay a NaN */
        uint16_t m = (uint16_t)((a & 0x7fffffu) >> 13);
        return (uint16_t)(sign | 0x7c00u | (m ? m : 1u));
    }
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* >= 65520 rounds to infinity */
    if (a >= 0x38800000u) {  /* a normal half: rebias the exponent, round at bit 13 */
        uint32_t r = a - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return sign;  /* below 2^-25: zero (2^-25 itself ties to even 0 below) */
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126u - e;  /* value * 2^24 = m >> shift */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += (rem > half) || (rem == half && (q & 1u));
    return (uint16_t)(sign | q);
}

static inline float bf2f(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f2bf(float x) {
    uint32_t f = f32_bits(x);
    if ((f & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((f >> 16) & 0x8000u) | 0x7fc0u);
    f += 0x7fffu + ((f >> 16) & 1u);
    return (uint16_t)(f >> 16);
}

static inline float widen(const void *p, Py_ssize_t i, int kind) {
    if (kind == K_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return kind == K_F16 ? h2f(h) : bf2f(h);
}

static void span_half_scalar(const uint16_t *b, const void *v, const uint8_t *m, uint16_t *o,
                             Py_ssize_t s, Py_ssize_t e, int bk, int vk) {
    for (Py_ssize_t i = s; i < e; i++) {
        float r = widen(b, i, bk);
        if ((m[i >> 3] >> (7 - (i & 7))) & 1) r += widen(v, i, vk);
        o[i] = bk == K_F16 ? f2h(r) : f2bf(r);
    }
}

#ifdef EM_AVX2
__attribute__((target("avx2,f16c")))
static inline __m256 load8(const void *p, Py_ssize_t i, int kind) {
    if (kind == K_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (kind == K_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,f16c")))
static inline __m256 select8(const uint16_t *b, const void *v, Py_ssize_t i, int bits8, int bk, int vk) {
    /* lanes 0..7 take bits 7..0 of bits8 (big bit order) */
    const __m256i pos = _mm256_setr_epi32(128, 64, 32, 16, 8, 4, 2, 1);
    __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits8), pos), pos);
    __m256 bv = load8(b, i, bk);
    return _mm256_blendv_ps(bv, _mm256_add_ps(bv, load8(v, i, vk)), _mm256_castsi256_ps(on));
}

__attribute__((target("avx2,f16c")))
static inline __m128i round8(__m256 r, int bk) {
    if (bk == K_F16) return _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* bfloat16: round to nearest even on the bit pattern, keep the high halves */
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    __m256i u = _mm256_castps_si256(r);
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

__attribute__((target("avx2,f16c")))
static void span_half_avx2(const uint16_t *b, const void *v, const uint8_t *m, uint16_t *o,
                           Py_ssize_t s, Py_ssize_t e, int bk, int vk) {
    Py_ssize_t i = s;
    /* scalar head up to an element that starts a mask byte and a 32-byte aligned output (the
       output address is even, so both line up within 128 elements) */
    while (i < e && ((i & 7) || ((uintptr_t)(o + i) & 31)))
        span_half_scalar(b, v, m, o, i, i + 1, bk, vk), i++;
    for (; i + 16 <= e; i += 16) {  /* 16 elements: two mask bytes, one NaN test, one 32-byte store */
        __m256 lo = select8(b, v, i, m[i >> 3], bk, vk), hi = select8(b, v, i + 8, m[(i >> 3) + 1], bk, vk);
        if (_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q), _mm256_cmp_ps(hi, hi, _CMP_UNORD_Q)))) {
            span_half_scalar(b, v, m, o, i, i + 16, bk, vk);  /* a NaN: numpy's rounding, scalar */
            continue;
        }
        __m256i out = _mm256_set_m128i(round8(hi, bk), round8(lo, bk));
        _mm256_stream_si256((__m256i *)(o + i), out);
    }
    _mm_sfence();
    span_half_scalar(b, v, m, o, i, e, bk, vk);
}
#endif

/* -- the T-Switch rule (docs/format.md §4.2) -----------------------------------------------------
 * out[i] = R(p_i ? W(b[i]) + (s_i ? -c : c) : W(b[i])): presence and sign planes in big bit order,
 * one float32 scale c per tensor, no shared vector. Same widening and rounding as above. */
static inline int bit_at(const uint8_t *m, Py_ssize_t i) { return (m[i >> 3] >> (7 - (i & 7))) & 1; }

static void sign_scalar(const void *b, const uint8_t *p, const uint8_t *sg, void *o, Py_ssize_t s, Py_ssize_t e,
                        float c, int bk) {
    for (Py_ssize_t i = s; i < e; i++) {
        float r = widen(b, i, bk);
        if (bit_at(p, i)) r += bit_at(sg, i) ? -c : c;
        if (bk == K_F32) ((float *)o)[i] = r;
        else ((uint16_t *)o)[i] = bk == K_F16 ? f2h(r) : f2bf(r);
    }
}

#ifdef EM_AVX2
__attribute__((target("avx2")))
static void sign_avx2(const float *b, const uint8_t *p, const uint8_t *sg, float *o, Py_ssize_t s, Py_ssize_t e, float c) {
    Py_ssize_t i = s;
    while (i < e && ((uintptr_t)(o + i) & 31))
        sign_scalar(b, p, sg, o, i, i + 1, c, K_F32), i++;
    const __m256 pos = _mm256_set1_ps(c), neg = _mm256_set1_ps(-c);
    for (; i + 16 <= e; i += 8) {  /* both planes' windows, as in span_avx2 */
        __m256 add = _mm256_blendv_ps(pos, neg, window_sel(sg, i));
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 r = _mm256_blendv_ps(bv, _mm256_add_ps(bv, add), window_sel(p, i));
        _mm256_stream_ps(o + i, r);
    }
    _mm_sfence();
    sign_scalar(b, p, sg, o, i, e, c, K_F32);
}
#endif

/* -- float32 bases with a float16 / bfloat16 vector (a delta stored in half precision) ---------- */
static void f32h_scalar(const float *b, const void *v, const uint8_t *m, float *o, Py_ssize_t s, Py_ssize_t e, int vk) {
    for (Py_ssize_t i = s; i < e; i++)
        o[i] = bit_at(m, i) ? b[i] + widen(v, i, vk) : b[i];
}

#ifdef EM_AVX2
__attribute__((target("avx2,f16c")))
static void f32h_avx2(const float *b, const void *v, const uint8_t *m, float *o, Py_ssize_t s, Py_ssize_t e, int vk) {
    Py_ssize_t i = s;
    while (i < e && ((uintptr_t)(o + i) & 31))  /* scalar head up to a 32-byte aligned output */
        f32h_scalar(b, v, m, o, i, i + 1, vk), i++;
    for (; i + 16 <= e; i += 8) {  /* any i: the mask window, as span_avx2 takes it */
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 r = _mm256_blendv_ps(bv, _mm256_add_ps(bv, load8(v, i, vk)), window_sel(m, i));
        _mm256_stream_ps(o + i, r);
    }
    _mm_sfence();
    f32h_scalar(b, v, m, o, i, e, vk);
}
#endif

/* -- the scaled select (tall with a least-squares scale): out[i] = R(bit ? W(b[i]) + c·V(v[i]) : W(b[i])),
 * the product rounded to float32 before the add (no FMA), any base and vector kind. */
static void scaled_scalar(const void *b, const void *v, const uint8_t *m, void *o, Py_ssize_t s, Py_ssize_t e,
                          float c, int bk, int vk) {
    for (Py_ssize_t i = s; i < e; i++) {
        float r = widen(b, i, bk);
        if (bit_at(m, i)) {
            float d = c * widen(v, i, vk);
            r = r + d;
        }
        if (bk == K_F32) ((float *)o)[i] = r;
        else ((uint16_t *)o)[i] = bk == K_F16 ? f2h(r) : f2bf(r);
    }
}

#ifdef EM_AVX2
__attribute__((target("avx2,f16c")))
static void scaled_avx2(const float *b, const void *v, const uint8_t *m, float *o, Py_ssize_t s, Py_ssize_t e, float c, int vk) {
    Py_ssize_t i = s;
    while (i < e && ((uintptr_t)(o + i) & 31))
        scaled_scalar(b, v, m, o, i, i + 1, c, K_F32, vk), i++;
    const __m256 cv = _mm256_set1_ps(c);
    for (; i + 16 <= e; i += 8) {
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 r = _mm256_blendv_ps(bv, _mm256_add_ps(bv, _mm256_mul_ps(cv, load8(v, i, vk))), window_sel(m, i));
        _mm256_stream_ps(o + i, r);
    }
    _mm_sfence();
    scaled_scalar(b, v, m, o, i, e, c, K_F32, vk);
}
#endif

/* -- a quantized delta: out[i] = R(W(b[i]) + (float)q[i] * sc[g]), g the row (axis 0) or column
 * (axis 1) of i in an [rows, cols] grid; the product is rounded to float32 before the add (no FMA:
 * built with -std=c99, which turns contraction off). float32 / float16 / bfloat16 bases. */
static int8_t nibble_lut[256][2];  /* byte -> its two I4 codes (high nibble first), filled at import */

#define Q8_CHUNK 1024

/* elements [c0, c1) of I4 storage (element 2j in the high nibble of byte j) as int8 codes */
static void decode_nibbles(const uint8_t *q, Py_ssize_t c0, Py_ssize_t c1, int8_t *buf) {
    Py_ssize_t t = c0;
    if (t < c1 && (t & 1))
        buf[0] = nibble_lut[q[t >> 1]][1], t++;
    /* whole bytes: the high nibble sign-extended by an arithmetic shift, the low one shifted up
       first (GCC and clang define both conversions); a loop the compiler vectorizes */
    int8_t *dst = buf + (t - c0);
    const uint8_t *src = q + (t >> 1);
    Py_ssize_t pairs = (c1 - t) / 2;
    for (Py_ssize_t k = 0; k < pairs; k++) {
        dst[2 * k] = (int8_t)((int8_t)src[k] >> 4);
        dst[2 * k + 1] = (int8_t)((int8_t)(uint8_t)(src[k] << 4) >> 4);
    }
    t += 2 * pairs;
    if (t < c1)
        buf[t - c0] = nibble_lut[q[t >> 1]][0];
}

/* chunks of up to Q8_CHUNK codes (I4 decoded into a buffer first), each cut into runs inside one
   row of the grid: a run shares one scale (axis 0) or takes consecutive column scales (axis 1),
   so the float32 loops vectorize whatever the row length */
static void q8_span(const void *b, const int8_t *q, const float *sc, void *o, Py_ssize_t s, Py_ssize_t e,
                    Py_ssize_t cols, int axis, int bk, int nib) {
    if (s >= e)
        return;  /* an empty range (an empty param may have cols = 0) */
    int8_t buf[Q8_CHUNK];
    Py_ssize_t row = s / cols, j = s % cols;  /* of element i, kept up to date without dividing */
    for (Py_ssize_t c0 = s; c0 < e; c0 += Q8_CHUNK) {
        Py_ssize_t c1 = c0 + Q8_CHUNK < e ? c0 + Q8_CHUNK : e;
        const int8_t *codes = q + c0;  /* codes[t - c0] is element t's code */
        if (nib) {
            decode_nibbles((const uint8_t *)q, c0, c1, buf);
            codes = buf;
        }
        for (Py_ssize_t i = c0; i < c1;) {
            Py_ssize_t n = cols - j < c1 - i ? cols - j : c1 - i;
            const int8_t *cq = codes + (i - c0);
            float k = axis == 0 ? sc[row] : 0.0f;
            const float *ks = sc + j;  /* axis 1: element i + t takes column j + t's scale */
            if (bk == K_F32) {
                const float *bf = (const float *)b + i;
                float *of = (float *)o + i;
                if (axis == 0)
                    for (Py_ssize_t t = 0; t < n; t++) {
                        float d = (float)cq[t] * k;
                        of[t] = bf[t] + d;
                    }
                else
                    for (Py_ssize_t t = 0; t < n; t++) {
                        float d = (float)cq[t] * ks[t];
                        of[t] = bf[t] + d;
                    }
            } else {
                for (Py_ssize_t t = 0; t < n; t++) {
                    float d = (float)cq[t] * (axis == 0 ? k : ks[t]);
                    float r = widen(b, i + t, bk) + d;
                    ((uint16_t *)o)[i + t] = bk == K_F16 ? f2h(r) : f2bf(r);
                }
            }
            i += n;
            if ((j += n) == cols)
                j = 0, row++;
        }
    }
}

#ifdef EM_AVX2
/* float32 bases, 8 elements at a time, streamed as the other loops: per chunk the codes (I4 decoded
   first) and a scale per element (a run of its row's scale, axis 0, or the columns' scales, axis 1)
   laid out, then the same float32 product and add as q8_span (no FMA in this target), so the two
   loops are bit-identical. The head up to a 32-byte aligned output and the tail run q8_span. */
__attribute__((target("avx2")))
static void q8_avx2(const float *b, const int8_t *q, const float *sc, float *o, Py_ssize_t s, Py_ssize_t e,
                    Py_ssize_t cols, int nib, int axis) {
    Py_ssize_t a = s;
    while (a < e && ((uintptr_t)(o + a) & 31))
        a++;
    if (e - a < 16) {
        q8_span(b, q, sc, o, s, e, cols, axis, K_F32, nib);
        return;
    }
    q8_span(b, q, sc, o, s, a, cols, axis, K_F32, nib);
    int8_t buf[Q8_CHUNK];
    float ks[Q8_CHUNK];
    Py_ssize_t row = a / cols, j = a % cols, stop = a + ((e - a) & ~(Py_ssize_t)7);
    for (Py_ssize_t c0 = a; c0 < stop; c0 += Q8_CHUNK) {
        Py_ssize_t c1 = c0 + Q8_CHUNK < stop ? c0 + Q8_CHUNK : stop;  /* c1 - c0: a multiple of 8 */
        const int8_t *codes = q + c0;
        if (nib) {
            decode_nibbles((const uint8_t *)q, c0, c1, buf);
            codes = buf;
        }
        for (Py_ssize_t i = c0; i < c1;) {
            Py_ssize_t n = cols - j < c1 - i ? cols - j : c1 - i;
            float *dst = ks + (i - c0);
            if (axis == 0) {
                float k = sc[row];
                for (Py_ssize_t t = 0; t < n; t++)
                    dst[t] = k;
            } else {
                memcpy(dst, sc + j, (size_t)n * sizeof(float));
            }
            i += n;
            if ((j += n) == cols)
                j = 0, row++;
        }
        for (Py_ssize_t i = c0; i < c1; i += 8) {
            __m128i c8 = _mm_loadl_epi64((const __m128i *)(codes + (i - c0)));
            __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8)), _mm256_loadu_ps(ks + (i - c0)));
            _mm256_stream_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(b + i), d));
        }
    }
    _mm_sfence();
    q8_span(b, q, sc, o, stop, e, cols, axis, K_F32, nib);
}
#endif

#ifdef EM_AVX2  /* __builtin_cpu_supports takes a string literal: a macro, not a function */
#define CPU_HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature))
#else
#define CPU_HAS(feature) 0
#endif

static int avx2 = 0, f16c = 0;

/* -- one rebuild, and plans of many ------------------------------------------------------------
 * A job is one param's rebuild: its op, buffers and parameters. Every entry point parses its
 * arguments into a job, checks it (job_check) and runs a range of it (job_span), so a single
 * rebuild and a plan of many run the same code. A correction is part of the job: after the op,
 * out[fi[k]] = R(W(out[fi[k]]) + fv[k]) for the positions fi (int64, strictly increasing) inside
 * the range -- the rule's `(out[idx].astype(float32) + value).astype(dtype)`. */
enum { OP_F32 = 0, OP_HALF = 1, OP_F32H = 2, OP_SIGN = 3, OP_Q8 = 4, OP_SCALED = 5 };

typedef struct {
    int op, bk, vk, axis, nib;
    float c;
    Py_ssize_t n, cols, start;  /* start: the job's first element in a plan's element space */
    Py_buffer b, x, y, o, fi, fv;  /* x, y: vector + mask (select ops), presence + sign, codes + scales */
    int nbuf;  /* buffers acquired, in the order b, x, y, o, fi, fv */
} job_t;

static void job_release(job_t *j) {
    Py_buffer *all[6] = {&j->b, &j->x, &j->y, &j->o, &j->fi, &j->fv};
    for (int k = 0; k < j->nbuf; k++)
        PyBuffer_Release(all[k]);
    j->nbuf = 0;
}

static int kind_ok(int k) { return k == K_F32 || k == K_F16 || k == K_BF16; }

/* sets j->n from the base; NULL when every size matches it, else what does not */
static const char *job_check(job_t *j) {
    Py_ssize_t bsize = (j->op == OP_HALF || ((j->op == OP_SIGN || j->op == OP_Q8 || j->op == OP_SCALED) && j->bk != K_F32)) ? 2 : 4;
    Py_ssize_t n = j->n = j->b.len / bsize, bits = (n + 7) / 8;
    if (j->b.len % bsize || j->o.len != j->b.len)
        return "base and out sizes do not match";
    switch (j->op) {
    case OP_F32:
        if (j->x.len != n * 4 || j->y.len != bits) return "vector or mask size does not match the base";
        break;
    case OP_HALF:
        if (!((j->bk == K_F16 || j->bk == K_BF16) && (j->vk == K_F32 || j->vk == j->bk)))
            return "kinds do not match";
        if (j->x.len != n * (j->vk == K_F32 ? 4 : 2) || j->y.len != bits) return "vector or mask size does not match the base";
        break;
    case OP_F32H:
        if (j->vk != K_F16 && j->vk != K_BF16) return "kind does not match";
        if (j->x.len != n * 2 || j->y.len != bits) return "vector or mask size does not match the base";
        break;
    case OP_SIGN:
        if (!kind_ok(j->bk)) return "kind does not match";
        if (j->x.len != bits || j->y.len != bits) return "presence or sign plane size does not match the base";
        break;
    case OP_Q8: {
        Py_ssize_t groups = j->cols > 0 ? (j->axis == 0 ? n / j->cols : j->cols) : 0;
        if (!kind_ok(j->bk) || (j->axis != 0 && j->axis != 1) || (j->nib != 0 && j->nib != 1)) return "kind or grid does not match";
        if (j->x.len != (j->nib ? (n + 1) / 2 : n) || (n && (j->cols <= 0 || n % j->cols || j->y.len != groups * 4)))
            return "codes, scales or grid do not match the base";
        break;
    }
    case OP_SCALED:
        if (!kind_ok(j->bk) || !kind_ok(j->vk)) return "kinds do not match";
        if (j->x.len != n * (j->vk == K_F32 ? 4 : 2) || j->y.len != bits) return "vector or mask size does not match the base";
        break;
    default:
        return "unknown op";
    }
    if (j->nbuf == 6) {  /* a correction */
        Py_ssize_t k = j->fi.len / 8;
        const int64_t *fi = j->fi.buf;
        if (j->fi.len % 8 || j->fv.len != k * 4) return "correction positions and values do not match";
        for (Py_ssize_t t = 0; t < k; t++)
            if (fi[t] < 0 || fi[t] >= n || (t && fi[t] <= fi[t - 1])) return "correction positions are not increasing positions of the base";
    }
    return NULL;
}

static void job_span(const job_t *j, Py_ssize_t s, Py_ssize_t e) {
    const void *b = j->b.buf, *x = j->x.buf, *y = j->y.buf;
    void *o = j->o.buf;
    switch (j->op) {
    case OP_F32:
#ifdef EM_AVX2
        if (avx2) { span_avx2(b, x, y, o, s, e); break; }
#endif
        span_scalar(b, x, y, o, s, e);
        break;
    case OP_HALF:
#ifdef EM_AVX2
        if (avx2 && f16c) { span_half_avx2(b, x, y, o, s, e, j->bk, j->vk); break; }
#endif
        span_half_scalar(b, x, y, o, s, e, j->bk, j->vk);
        break;
    case OP_F32H:
#ifdef EM_AVX2
        if (avx2 && f16c) { f32h_avx2(b, x, y, o, s, e, j->vk); break; }
#endif
        f32h_scalar(b, x, y, o, s, e, j->vk);
        break;
    case OP_SIGN:
#ifdef EM_AVX2
        if (avx2 && j->bk == K_F32) { sign_avx2(b, x, y, o, s, e, j->c); break; }
#endif
        sign_scalar(b, x, y, o, s, e, j->c, j->bk);
        break;
    case OP_Q8:
#ifdef EM_AVX2
        if (avx2 && j->bk == K_F32) { q8_avx2(b, x, y, o, s, e, j->cols, j->nib, j->axis); break; }
#endif
        q8_span(b, x, y, o, s, e, j->cols, j->axis, j->bk, j->nib);
        break;
    case OP_SCALED:
#ifdef EM_AVX2
        if (avx2 && f16c && j->bk == K_F32) { scaled_avx2(b, x, y, o, s, e, j->c, j->vk); break; }
#endif
        scaled_scalar(b, x, y, o, s, e, j->c, j->bk, j->vk);
        break;
    }
    if (j->nbuf == 6 && j->fi.len) {
        const int64_t *fi = j->fi.buf;
        const float *fv = j->fv.buf;
        Py_ssize_t lo = 0, hi = j->fi.len / 8;
        while (lo < hi) {  /* the first position >= s */
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (fi[mid] < s) lo = mid + 1; else hi = mid;
        }
        int fk = j->op == OP_F32 || j->op == OP_F32H ? K_F32 : j->bk;  /* the output's kind */
        for (Py_ssize_t t = lo; t < j->fi.len / 8 && fi[t] < e; t++) {
            float r = widen(o, fi[t], fk) + fv[t];
            if (fk == K_F32) ((float *)o)[fi[t]] = r;
            else ((uint16_t *)o)[fi[t]] = fk == K_F16 ? f2h(r) : f2bf(r);
        }
    }
}

/* check the job and the range [s, e), run it with the GIL released, release the buffers */
static PyObject *run_one(job_t *j, Py_ssize_t s, Py_ssize_t e, const char *name) {
    const char *err = job_check(j);
    if (!err && (s < 0 || e > j->n || s > e))
        err = "range does not match";
    if (err) {
        PyErr_Format(PyExc_ValueError, "%s: %s (buffer sizes, kinds or range do not match)", name, err);
        job_release(j);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    job_span(j, s, e);
    Py_END_ALLOW_THREADS
    job_release(j);
    Py_RETURN_NONE;
}

/* apply_f32(base, vec, mask, out, start, stop) / apply_half(..., base_kind, vec_kind): the select */
static PyObject *apply(PyObject *args, int half) {
    job_t j = {.op = half ? OP_HALF : OP_F32, .nbuf = 0};
    Py_ssize_t s, e;
    int ok = half ? PyArg_ParseTuple(args, "y*y*y*w*nnii", &j.b, &j.x, &j.y, &j.o, &s, &e, &j.bk, &j.vk)
                  : PyArg_ParseTuple(args, "y*y*y*w*nn", &j.b, &j.x, &j.y, &j.o, &s, &e);
    if (!ok)
        return NULL;
    j.nbuf = 4;
    return run_one(&j, s, e, half ? "apply_half" : "apply_f32");
}

/* apply_sign(base, presence, sign, out, start, stop, scale, kind): the T-Switch rule; kind 0 float32,
   1 float16, 2 bfloat16 (base and out). The AVX2 loop serves float32; half bases run the scalar loop. */
static PyObject *apply_sign(PyObject *self, PyObject *args) {
    job_t j = {.op = OP_SIGN, .nbuf = 0};
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnfi", &j.b, &j.x, &j.y, &j.o, &s, &e, &j.c, &j.bk))
        return NULL;
    j.nbuf = 4;
    return run_one(&j, s, e, "apply_sign");
}

/* apply_f32h(base, vec, mask, out, start, stop, vec_kind): float32 base and out, vector float16 (1) or bfloat16 (2). */
static PyObject *apply_f32h(PyObject *self, PyObject *args) {
    job_t j = {.op = OP_F32H, .nbuf = 0};
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nni", &j.b, &j.x, &j.y, &j.o, &s, &e, &j.vk))
        return NULL;
    j.nbuf = 4;
    return run_one(&j, s, e, "apply_f32h");
}

/* apply_q8(base, codes, scales, out, start, stop, cols, axis, base_kind, nibbles): a quantized delta
   (int8 codes, or I4 codes two per byte when nibbles is 1). */
static PyObject *apply_q8(PyObject *self, PyObject *args) {
    job_t j = {.op = OP_Q8, .nbuf = 0};
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnniii", &j.b, &j.x, &j.y, &j.o, &s, &e, &j.cols, &j.axis, &j.bk, &j.nib))
        return NULL;
    j.nbuf = 4;
    return run_one(&j, s, e, "apply_q8");
}

static PyObject *apply_f32(PyObject *self, PyObject *args) { return apply(args, 0); }
static PyObject *apply_half(PyObject *self, PyObject *args) { return apply(args, 1); }

/* A plan: many jobs laid end to end in one element space [0, total), so one call (or one per
   thread, on disjoint ranges) rebuilds every param of a task. It holds its buffers until freed. */
typedef struct {
    Py_ssize_t njobs, total;
    job_t jobs[];
} plan_t;

static const char *PLAN = "edgemerge.plan";

static void plan_free(PyObject *cap) {
    plan_t *p = PyCapsule_GetPointer(cap, PLAN);
    if (!p) return;
    for (Py_ssize_t k = 0; k < p->njobs; k++)
        job_release(&p->jobs[k]);
    PyMem_Free(p);
}

/* plan(jobs): each job (op, base, x, y, out, fix_index, fix_value, scale, base_kind, vec_kind, cols,
   axis, nibbles) with x, y as the entry point of that op takes them; fix_index (int64) and
   fix_value (float32) may be empty. Every job is checked here, once. */
static PyObject *plan(PyObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "plan: a sequence of jobs");
    if (!seq) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    plan_t *p = PyMem_Calloc(1, sizeof(plan_t) + (size_t)count * sizeof(job_t));
    if (!p) { Py_DECREF(seq); return PyErr_NoMemory(); }
    PyObject *cap = PyCapsule_New(p, PLAN, plan_free);
    if (!cap) { PyMem_Free(p); Py_DECREF(seq); return NULL; }
    for (Py_ssize_t k = 0; k < count; k++) {
        job_t *j = &p->jobs[k];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "iy*y*y*w*y*y*fiinii:plan",
                              &j->op, &j->b, &j->x, &j->y, &j->o, &j->fi, &j->fv, &j->c, &j->bk, &j->vk,
                              &j->cols, &j->axis, &j->nib))
            goto fail;
        j->nbuf = 6;
        p->njobs = k + 1;
        const char *err = job_check(j);
        if (err) {
            PyErr_Format(PyExc_ValueError, "plan: job %zd: %s", k, err);
            goto fail;
        }
        j->start = p->total;
        p->total += j->n;
    }
    Py_DECREF(seq);
    return cap;
fail:
    Py_DECREF(seq);
    Py_DECREF(cap);  /* frees the jobs parsed so far */
    return NULL;
}

static plan_t *get_plan(PyObject *cap) { return PyCapsule_GetPointer(cap, PLAN); }

/* run_plan(plan, start, stop): elements [start, stop) of the plan's space, GIL released */
static PyObject *run_plan(PyObject *self, PyObject *args) {
    PyObject *cap;
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "Onn", &cap, &s, &e))
        return NULL;
    plan_t *p = get_plan(cap);
    if (!p) return NULL;
    if (s < 0 || e > p->total || s > e) {
        PyErr_SetString(PyExc_ValueError, "run_plan: range outside the plan");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t lo = 0, hi = p->njobs;
    while (hi - lo > 1) {  /* the last job starting at or before s */
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (p->jobs[mid].start <= s) lo = mid; else hi = mid;
    }
    for (Py_ssize_t k = lo; k < p->njobs && p->jobs[k].start < e; k++) {
        const job_t *j = &p->jobs[k];
        Py_ssize_t a = s > j->start ? s - j->start : 0, z = e - j->start < j->n ? e - j->start : j->n;
        if (a < z) job_span(j, a, z);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *plan_size(PyObject *self, PyObject *cap) {
    plan_t *p = get_plan(cap);
    return p ? PyLong_FromSsize_t(p->total) : NULL;
}

static PyObject *simd(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(avx2 ? "avx2+stream" : "scalar");
}

static PyObject *use_simd(PyObject *self, PyObject *arg) {  /* tests: run the scalar loops too */
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    avx2 = on && CPU_HAS("avx2");
    f16c = on && CPU_HAS("f16c");
    Py_RETURN_NONE;
}

static PyObject *simd_half(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(avx2 && f16c ? "avx2+f16c+stream" : "scalar");
}

static PyMethodDef methods[] = {
    {"apply_f32", apply_f32, METH_VARARGS, "apply_f32(base, vec, mask, out, start, stop): the select, float32"},
    {"apply_half", apply_half, METH_VARARGS,
     "apply_half(base, vec, mask, out, start, stop, base_kind, vec_kind): the select for float16/bfloat16 bases "
     "(kinds: 0 float32, 1 float16, 2 bfloat16; the vector is float32 or the base's kind)"},
    {"apply_sign", apply_sign, METH_VARARGS,
     "apply_sign(base, presence, sign, out, start, stop, scale, kind): the T-Switch rule (kind 0 float32, 1 float16, 2 bfloat16)"},
    {"apply_f32h", apply_f32h, METH_VARARGS,
     "apply_f32h(base, vec, mask, out, start, stop, vec_kind): the select, float32 base, float16 (1) / bfloat16 (2) vector"},
    {"apply_q8", apply_q8, METH_VARARGS,
     "apply_q8(base, codes, scales, out, start, stop, cols, axis, base_kind, nibbles): base + code x its row (0) / "
     "column (1) scale; codes int8, or I4 two per byte (nibbles=1)"},
    {"plan", plan, METH_O, "plan(jobs): many rebuilds in one element space (see the source for a job's fields)"},
    {"run_plan", run_plan, METH_VARARGS, "run_plan(plan, start, stop): elements [start, stop) of a plan"},
    {"plan_size", plan_size, METH_O, "plan_size(plan): the plan's element count"},
    {"simd", simd, METH_NOARGS, "which loop runs on this CPU"},
    {"simd_half", simd_half, METH_NOARGS, "which loop apply_half runs on this CPU"},
    {"use_simd", use_simd, METH_O, "use_simd(flag): False runs the scalar loops (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cmask", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cmask(void) {
    for (int v = 0; v < 256; v++) {
        int hi = v >> 4, lo = v & 15;
        nibble_lut[v][0] = (int8_t)(hi > 7 ? hi - 16 : hi);
        nibble_lut[v][1] = (int8_t)(lo > 7 ? lo - 16 : lo);
    }
    avx2 = CPU_HAS("avx2");
    f16c = CPU_HAS("f16c");
    return PyModule_Create(&module);
}
