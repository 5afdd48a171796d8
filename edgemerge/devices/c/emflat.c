/* emflat.c -- reference applier for edgemerge flat images (docs/format.md, "Flat image").
 *
 * C99, no dependencies beyond libc. Parses an image (version 1 or 2) with every field
 * bound-checked, then rebuilds theta_t for one task by its codec's rule, bit-exactly as the numpy
 * reference does, every step one float32 operation (Q16 values are q * 2^-f, exact):
 *   tall         out[i] = m_i ? base[i] + vec[i] : base[i]         (version 1: the only codec)
 *   tall-scaled  out[i] = m_i ? base[i] + s * vec[i] : base[i]
 *   emr          out[i] = m_i ? base[i] + s * elected[i] : base[i]
 *   tswitch      out[i] = m_i ? base[i] + (sign_i ? -c : c) : base[i]
 *   delta        out[i] = base[i] + d[i]    (d: F32/F16/BF16, or I8/I4 codes times their row's scale)
 *   out[i] = R(out[i]), then a correction, where the task has one: out[p_j] = R(out[p_j] + v_j),
 *   R rounding to the base entry's "round" dtype (F16 / BF16; version 2; none for float32 models)
 *
 *   cc -std=c99 -O2 -ffp-contract=off -o emflat_apply emflat.c
 *   ./emflat_apply IMAGE TASK OUT      writes every merged parameter's theta_t, in table order,
 *                                      as little-endian float32 to OUT; exit 1 with a message
 *                                      on a malformed image or an unknown task.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_SIZE 64u
#define ENTRY_SIZE 96u
#define MAX_DIMS 8u
#define NONE 0xFFFFFFFFu
enum { KIND_BASE = 0, KIND_VECTOR = 1, KIND_MASK = 2, KIND_PRIVATE = 3,                   /* version 1 */
       KIND_ELECTED = 4, KIND_SIGN = 5, KIND_SCALE = 6, KIND_DELTA = 7, KIND_FIXPOS = 8, KIND_FIXVAL = 9, N_KINDS = 10 };
enum { DT_F32 = 0, DT_F16 = 1, DT_Q16 = 2, DT_U8 = 3, DT_I8 = 7, DT_BF16 = 10, DT_U64 = 13, DT_I4 = 14 /* task records only */ };
enum { C_TALL = 0, C_TALL_SCALED = 1, C_TSWITCH = 2, C_DELTA = 3, C_EMR = 4 };
#define N_DTYPES 14u  /* codes 0-13, docs/format.md */
static const uint32_t ITEMSIZE[N_DTYPES] = {4, 2, 2, 1, 8, 4, 8, 1, 1, 2, 2, 2, 4, 8};
static int per_task(uint32_t k) { return k == KIND_MASK || k == KIND_PRIVATE || k >= KIND_SIGN; }
static int linked(uint32_t k) { return k != KIND_BASE && k != KIND_PRIVATE; }  /* points at a base entry */

typedef struct {
    uint32_t kind, dtype, task, param;
    uint64_t offset, nbytes, numel;
    int32_t frac;
    uint32_t ndim, name_off, name_len;
    uint32_t dims[MAX_DIMS];
    uint32_t round;  /* v2 merged base: theta_t rounded to F16 / BF16 (0: F32, none) */
} entry_t;

typedef struct {
    const uint8_t *img;
    uint64_t size, names_off, names_len, tasks_off;
    uint32_t version, task_size, align, n, n_tasks;
    entry_t *entries;
    uint32_t *codec, *dcode;  /* per task: codec and delta dtype code (version 1: tall, NONE) */
} image_t;

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }  /* host is little-endian */
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int fail(char *err, size_t cap, const char *msg, uint32_t index) {
    if (index == NONE) snprintf(err, cap, "%s", msg);
    else snprintf(err, cap, "entry %u: %s", index, msg);
    return -1;
}

static const uint8_t *name_of(const image_t *im, const entry_t *e) { return im->img + im->names_off + e->name_off; }
static int is_float(uint32_t dtype) { return dtype == DT_F32 || dtype == DT_F16 || dtype == DT_Q16; }
static int check_unique(image_t *im, char *err, size_t cap);
static int check_codecs(image_t *im, char *err, size_t cap);
static void free_image(image_t *im) { free(im->entries); free(im->codec); free(im->dcode); }

/* Parse and validate; on success img->entries is malloc'ed (caller frees). */
static int parse(image_t *im, const uint8_t *img, uint64_t size, char *err, size_t cap) {
    static const uint8_t magic[8] = {'E', 'M', 'F', 'L', 'A', 'T', 0, 1};
    uint64_t table_off, tasks_off, i, j;
    im->img = img; im->size = size; im->entries = NULL; im->codec = im->dcode = NULL;
    if (size < HEADER_SIZE) return fail(err, cap, "file shorter than the 64-byte header", NONE);
    if (memcmp(img, magic, 8) != 0) return fail(err, cap, "bad magic: not an edgemerge flat image", NONE);
    im->version = rd32(img + 8);
    if ((im->version != 1 && im->version != 2) || rd32(img + 12) != HEADER_SIZE)
        return fail(err, cap, "unsupported version or header size (this applier reads versions 1 and 2)", NONE);
    im->task_size = im->version == 1 ? 8u : 16u;
    im->align = rd32(img + 16); im->n = rd32(img + 20); im->n_tasks = rd32(img + 24);
    table_off = rd64(img + 32); im->names_off = rd64(img + 40); im->names_len = rd64(img + 48);
    if (im->align != 64 && im->align != 4096) return fail(err, cap, "alignment must be 64 or 4096", NONE);
    if (rd64(img + 56) != size) return fail(err, cap, "declared size does not match the file (truncated?)", NONE);
    if (table_off != HEADER_SIZE || im->n > (1u << 20) || im->n_tasks > (1u << 16))
        return fail(err, cap, "tensor table out of bounds", NONE);
    tasks_off = im->tasks_off = table_off + (uint64_t)ENTRY_SIZE * im->n;
    if (tasks_off + (uint64_t)im->task_size * im->n_tasks != im->names_off || im->names_off > size ||
        im->names_len > size - im->names_off)
        return fail(err, cap, "task table or names blob out of bounds", NONE);
    im->codec = (uint32_t *)malloc(sizeof(uint32_t) * (im->n_tasks + 1));
    im->dcode = (uint32_t *)malloc(sizeof(uint32_t) * (im->n_tasks + 1));
    if (!im->codec || !im->dcode) return fail(err, cap, "out of memory", NONE);
    for (i = 0; i < im->n_tasks; i++) {
        const uint8_t *row = img + tasks_off + (uint64_t)im->task_size * i;
        uint32_t off = rd32(row), len = rd32(row + 4), c, d;
        if (len == 0 || (uint64_t)off + len > im->names_len) return fail(err, cap, "task name out of bounds", NONE);
        if (memchr(img + im->names_off + off, 0, len)) return fail(err, cap, "task name holds a NUL byte", NONE);
        c = im->version == 1 ? C_TALL : rd32(row + 8);
        d = im->version == 1 ? NONE : rd32(row + 12);
        if (c > C_EMR || (c == C_DELTA) != (d == DT_F32 || d == DT_F16 || d == DT_BF16 || d == DT_I8 || d == DT_I4) ||
            (c != C_DELTA && d != NONE))
            return fail(err, cap, "task record names an unknown codec or delta dtype", NONE);
        im->codec[i] = c; im->dcode[i] = d;
    }
    im->entries = (entry_t *)calloc(im->n ? im->n : 1, sizeof(entry_t));
    if (!im->entries) return fail(err, cap, "out of memory", NONE);
    for (i = 0; i < im->n; i++) {
        const uint8_t *p = img + table_off + ENTRY_SIZE * i;
        entry_t *e = &im->entries[i];
        uint64_t numel = 1;
        e->kind = rd32(p); e->dtype = rd32(p + 4); e->task = rd32(p + 8); e->param = rd32(p + 12);
        e->offset = rd64(p + 16); e->nbytes = rd64(p + 24); e->numel = rd64(p + 32);
        e->frac = (int32_t)rd32(p + 40); e->ndim = rd32(p + 44); e->name_off = rd32(p + 48); e->name_len = rd32(p + 52);
        for (j = 0; j < MAX_DIMS; j++) e->dims[j] = rd32(p + 56 + 4 * j);
        e->round = im->version == 2 ? rd32(p + 88) : 0;  /* v1 readers never looked at these bytes */
        if (e->kind > (im->version == 1 ? 3u : 9u) || e->dtype >= N_DTYPES || e->ndim > MAX_DIMS) return fail(err, cap, "bad kind, dtype or ndim", (uint32_t)i);
        if ((uint64_t)e->name_off + e->name_len > im->names_len) return fail(err, cap, "name out of bounds", (uint32_t)i);
        for (j = 0; j < e->ndim; j++) {
            if (e->dims[j] && numel > UINT64_MAX / e->dims[j]) return fail(err, cap, "shape overflows", (uint32_t)i);
            numel *= e->dims[j];
        }
        if (numel != e->numel || e->numel > UINT64_MAX / 8 || e->numel * ITEMSIZE[e->dtype] != e->nbytes)
            return fail(err, cap, "shape, element count and byte count disagree", (uint32_t)i);
        if (e->offset % im->align || e->offset < im->names_off + im->names_len || e->offset > size ||
            e->nbytes > size - e->offset)
            return fail(err, cap, "data misaligned or outside the file", (uint32_t)i);
        if ((e->task != NONE && e->task >= im->n_tasks) || (per_task(e->kind) != (e->task != NONE)))
            return fail(err, cap, "task index invalid for its kind", (uint32_t)i);
        if (e->frac < 0 || e->frac > 30) return fail(err, cap, "fraction bits out of range", (uint32_t)i);
        if ((e->round != 0 && e->round != DT_F16 && e->round != DT_BF16) || (e->round && e->kind != KIND_BASE))
            return fail(err, cap, "rounding code: a base entry may round to F16 or BF16, nothing else", (uint32_t)i);
    }
    for (i = 0; i < im->n; i++) {
        entry_t *e = &im->entries[i];
        if (linked(e->kind)) {
            entry_t *b;
            if (e->param >= im->n || im->entries[e->param].kind != KIND_BASE)
                return fail(err, cap, "param index does not point at a base entry", (uint32_t)i);
            b = &im->entries[e->param];
            if (e->name_len != b->name_len || memcmp(name_of(im, e), name_of(im, b), e->name_len) != 0)
                return fail(err, cap, "name differs from its base's", (uint32_t)i);
            if ((e->kind == KIND_VECTOR || e->kind == KIND_ELECTED) &&
                (e->numel != b->numel || !is_float(e->dtype) || !is_float(b->dtype)))
                return fail(err, cap, "vector does not match its base (same element count, F32/F16/Q16 both)", (uint32_t)i);
            if ((e->kind == KIND_MASK || e->kind == KIND_SIGN) && (e->dtype != DT_U8 || e->nbytes != (b->numel + 7) / 8))
                return fail(err, cap, "mask length is not ceil(numel / 8) of its base", (uint32_t)i);
            if ((e->kind == KIND_SCALE && e->dtype != DT_F32) || (e->kind == KIND_FIXPOS && e->dtype != DT_U64) ||
                (e->kind == KIND_FIXVAL && e->dtype != DT_F16))
                return fail(err, cap, "a scale is F32, a fix position U64, a fix value F16", (uint32_t)i);
        }
    }
    if (check_unique(im, err, cap) != 0) return -1;
    return im->version == 2 ? check_codecs(im, err, cap) : 0;
}

/* -- the rules that compare entries with each other, in O(n log n) (sorting), not O(n^2) -------- */
static const image_t *sort_im;  /* the image the comparators read; the tool is single-threaded */

static int by_offset(const void *a, const void *b) {
    const entry_t *x = &sort_im->entries[*(const uint32_t *)a], *y = &sort_im->entries[*(const uint32_t *)b];
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int bytes_cmp(const uint8_t *a, uint32_t la, const uint8_t *b, uint32_t lb) {
    int c = memcmp(a, b, la < lb ? la : lb);
    return c ? c : (la > lb) - (la < lb);
}

static int by_name(const void *a, const void *b) {  /* base entries, by name */
    const entry_t *x = &sort_im->entries[*(const uint32_t *)a], *y = &sort_im->entries[*(const uint32_t *)b];
    return bytes_cmp(name_of(sort_im, x), x->name_len, name_of(sort_im, y), y->name_len);
}

static int by_param_task(const void *a, const void *b) {  /* linked entries, by (kind, param, task) */
    const entry_t *x = &sort_im->entries[*(const uint32_t *)a], *y = &sort_im->entries[*(const uint32_t *)b];
    if (x->kind != y->kind) return x->kind < y->kind ? -1 : 1;
    if (x->param != y->param) return x->param < y->param ? -1 : 1;
    return x->task < y->task ? -1 : x->task > y->task;
}

static int by_task_name(const void *a, const void *b) {  /* task table rows, by name */
    const uint8_t *t = sort_im->img + sort_im->tasks_off;
    uint64_t i = *(const uint32_t *)a * (uint64_t)sort_im->task_size, j = *(const uint32_t *)b * (uint64_t)sort_im->task_size;
    return bytes_cmp(sort_im->img + sort_im->names_off + rd32(t + i), rd32(t + i + 4),
                     sort_im->img + sort_im->names_off + rd32(t + j), rd32(t + j + 4));
}

/* Sections never overlap (empty ones hold no bytes and may sit anywhere); task names, base names,
   a param's vector and a (param, task)'s mask are each unique. */
static int check_unique(image_t *im, char *err, size_t cap) {
    uint32_t *idx = (uint32_t *)malloc(sizeof(uint32_t) * ((im->n > im->n_tasks ? im->n : im->n_tasks) + 1));
    uint32_t k, m = 0;
    const char *problem = NULL;
    if (!idx) return fail(err, cap, "out of memory", NONE);
    sort_im = im;
    for (k = 0; k < im->n; k++) if (im->entries[k].nbytes) idx[m++] = k;
    qsort(idx, m, sizeof *idx, by_offset);
    for (k = 1; k < m && !problem; k++) {
        const entry_t *a = &im->entries[idx[k - 1]], *b = &im->entries[idx[k]];
        if (b->offset < a->offset + a->nbytes) problem = "sections overlap";
    }
    for (m = 0, k = 0; k < im->n; k++) if (im->entries[k].kind == KIND_BASE) idx[m++] = k;
    qsort(idx, m, sizeof *idx, by_name);
    for (k = 1; k < m && !problem; k++) if (by_name(&idx[k - 1], &idx[k]) == 0) problem = "two base entries share a name";
    for (m = 0, k = 0; k < im->n; k++) if (linked(im->entries[k].kind)) idx[m++] = k;
    qsort(idx, m, sizeof *idx, by_param_task);
    for (k = 1; k < m && !problem; k++) if (by_param_task(&idx[k - 1], &idx[k]) == 0) problem = "a param has two vectors, or two masks for one task";
    for (k = 0; k < im->n_tasks; k++) idx[k] = k;
    qsort(idx, im->n_tasks, sizeof *idx, by_task_name);
    for (k = 1; k < im->n_tasks && !problem; k++) if (by_task_name(&idx[k - 1], &idx[k]) == 0) problem = "two tasks share a name";
    free(idx);
    return problem ? fail(err, cap, problem, NONE) : 0;
}

/* -- version 2: every merged param has exactly the entries each task's codec takes ---------------- */
static uint32_t needs(uint32_t codec, uint32_t dcode) {  /* per-task kinds a codec needs, as bits */
    switch (codec) {
    case C_TALL: return 0;
    case C_TALL_SCALED: return 1u << KIND_SCALE;
    case C_TSWITCH: return 1u << KIND_MASK | 1u << KIND_SIGN | 1u << KIND_SCALE;
    case C_EMR: return 1u << KIND_MASK | 1u << KIND_SCALE;
    default: return 1u << KIND_DELTA | (dcode == DT_I8 || dcode == DT_I4 ? 1u << KIND_SCALE : 0);
    }
}

static uint32_t allows(uint32_t codec, uint32_t dcode) {  /* needs, plus what it may have */
    uint32_t fix = 1u << KIND_FIXPOS | 1u << KIND_FIXVAL;
    return needs(codec, dcode) | fix | (codec == C_TALL || codec == C_TALL_SCALED ? 1u << KIND_MASK : 0);
}

static uint64_t qrows(const entry_t *b) { return b->ndim >= 2 ? b->dims[0] : 1; }

static int by_param_task_kind(const void *a, const void *b) {
    const entry_t *x = &sort_im->entries[*(const uint32_t *)a], *y = &sort_im->entries[*(const uint32_t *)b];
    if (x->param != y->param) return x->param < y->param ? -1 : 1;
    if (x->task != y->task) return x->task < y->task ? -1 : 1;
    return x->kind < y->kind ? -1 : x->kind > y->kind;
}

static int check_codecs(image_t *im, char *err, size_t cap) {
    uint32_t k, t, m = 0, n_merged = 0, need_vec = 0, need_ele = 0;
    uint8_t *merged = (uint8_t *)calloc(im->n + 1, 1), *has_vec = (uint8_t *)calloc(im->n + 1, 1), *has_ele = (uint8_t *)calloc(im->n + 1, 1);
    uint64_t *count = (uint64_t *)calloc((uint64_t)im->n_tasks * N_KINDS + 1, sizeof(uint64_t));
    uint32_t *idx = (uint32_t *)malloc(sizeof(uint32_t) * (im->n + 1));
    const char *problem = NULL;
    uint32_t where = NONE;
    if (!merged || !has_vec || !has_ele || !count || !idx) problem = "out of memory";
    for (t = 0; t < im->n_tasks && !problem; t++) {
        need_vec |= im->codec[t] == C_TALL || im->codec[t] == C_TALL_SCALED;
        need_ele |= im->codec[t] == C_EMR;
    }
    for (k = 0; k < im->n && !problem; k++) {  /* a base any entry links to is merged */
        const entry_t *e = &im->entries[k];
        if (!linked(e->kind)) continue;
        merged[e->param] = 1;
        if (e->kind == KIND_VECTOR) has_vec[e->param] = 1;
        if (e->kind == KIND_ELECTED) has_ele[e->param] = 1;
    }
    for (k = 0; k < im->n && !problem; k++) {
        const entry_t *b = &im->entries[k];
        if (!merged[k]) continue;
        n_merged++;
        if (!is_float(b->dtype)) { problem = "a merged param must be F32/F16/Q16"; where = k; }
        else if ((need_vec && !has_vec[k]) || (need_ele && !has_ele[k])) { problem = "a task's codec needs a shared vector this param lacks"; where = k; }
    }
    for (k = 0; k < im->n && !problem; k++) {  /* each per-task entry: one its task's codec takes, of the right size */
        const entry_t *e = &im->entries[k], *b;
        uint32_t c, d;
        if (!linked(e->kind) || e->task == NONE) continue;
        b = &im->entries[e->param]; c = im->codec[e->task]; d = im->dcode[e->task];
        where = k;
        if (!(allows(c, d) >> e->kind & 1)) problem = "an entry its task's codec does not take";
        else if (e->kind == KIND_SCALE && e->numel != (c == C_DELTA ? qrows(b) : 1)) problem = "wrong number of scales for its task's codec";
        else if (e->kind == KIND_DELTA && (d == DT_I4 ? e->dtype != DT_U8 || e->numel != (b->numel + 1) / 2
                                                      : e->dtype != d || e->numel != b->numel))
            problem = "delta dtype or length does not match its task's codec";
        else count[(uint64_t)e->task * N_KINDS + e->kind]++;
    }
    for (t = 0; t < im->n_tasks && !problem; t++)  /* entries are unique per (kind, param, task): a count is a presence */
        for (k = 0; k < N_KINDS && !problem; k++)
            if ((needs(im->codec[t], im->dcode[t]) >> k & 1) && count[(uint64_t)t * N_KINDS + k] != n_merged) {
                problem = "a merged param lacks an entry its task's codec needs"; where = NONE;
            }
    if (!problem) {  /* fix positions and values come in pairs of one count; positions increase inside the param */
        sort_im = im;
        for (k = 0; k < im->n; k++) if (im->entries[k].kind == KIND_FIXPOS || im->entries[k].kind == KIND_FIXVAL) idx[m++] = k;
        qsort(idx, m, sizeof *idx, by_param_task_kind);
        for (k = 0; k < m && !problem; k += 2) {
            const entry_t *p = &im->entries[idx[k]], *v = k + 1 < m ? &im->entries[idx[k + 1]] : NULL;
            uint64_t j, prev = 0;
            where = idx[k];
            if (p->kind != KIND_FIXPOS || !v || v->kind != KIND_FIXVAL || v->param != p->param || v->task != p->task ||
                v->numel != p->numel) { problem = "fix positions and fix values differ in count"; break; }
            for (j = 0; j < p->numel; j++) {
                uint64_t pos = rd64(im->img + p->offset + 8 * j);
                if (pos >= im->entries[p->param].numel || (j && pos <= prev)) { problem = "fix positions are not strictly increasing inside the param"; break; }
                prev = pos;
            }
        }
    }
    free(merged); free(has_vec); free(has_ele); free(count); free(idx);
    return problem ? fail(err, cap, problem, where) : 0;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    float f;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);            /* inf / nan */
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);   /* normal */
    else if (man == 0) bits = sign;                                       /* zero */
    else {                                                                /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static float value(const image_t *im, const entry_t *e, uint64_t i) {  /* F32, F16, Q16, BF16, I8 as float32 */
    const uint8_t *p = im->img + e->offset;
    if (e->dtype == DT_F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    if (e->dtype == DT_F16) { uint16_t h; memcpy(&h, p + 2 * i, 2); return half_to_float(h); }
    if (e->dtype == DT_BF16) { uint16_t h; uint32_t bits; float f; memcpy(&h, p + 2 * i, 2); bits = (uint32_t)h << 16; memcpy(&f, &bits, 4); return f; }
    if (e->dtype == DT_I8) return (float)(int8_t)p[i];
    {   /* Q16: int16 * 2^-frac, exact in float32 */
        int16_t q; uint32_t bits = (uint32_t)(127 - e->frac) << 23; float scale;
        memcpy(&q, p + 2 * i, 2); memcpy(&scale, &bits, 4);
        return (float)q * scale;
    }
}

/* float32 -> F16 / BF16, nearest with ties to even, overflow to inf, and back to float32; every
   NaN becomes the canonical quiet NaN 0x7FC00000 (so NaN payloads never depend on the platform). */
static float round_to(float x, uint32_t code) {
    uint32_t b, sign, m, h, rem, half, shift;
    int32_t e;
    float f;
    if (code == 0) return x;
    if (x != x) { b = 0x7FC00000u; memcpy(&f, &b, 4); return f; }
    memcpy(&b, &x, 4);
    if (code == DT_BF16) {
        b = ((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16) << 16;
        memcpy(&f, &b, 4);
        return f;
    }
    sign = (b >> 16) & 0x8000u; m = b & 0x7FFFFFu; e = (int32_t)((b >> 23) & 0xFF) - 112;  /* F16 exponent field */
    if (e >= 0x1F) h = 0x7C00u;                                        /* inf, or too large: inf */
    else if (e <= 0) {                                                 /* F16 subnormal, or zero */
        if (e < -10) h = 0;
        else {
            m |= 0x800000u; shift = (uint32_t)(14 - e);
            h = m >> shift; rem = m & ((1u << shift) - 1); half = 1u << (shift - 1);
            if (rem > half || (rem == half && (h & 1))) h++;
        }
    } else {
        h = ((uint32_t)e << 10) | (m >> 13); rem = m & 0x1FFFu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;       /* a carry into the exponent is right */
    }
    return half_to_float((uint16_t)(sign | h));
}

static int bit(const image_t *im, const entry_t *m, uint64_t k) {  /* a packed plane, big bit order; none: set */
    return m ? (im->img[m->offset + (k >> 3)] >> (7 - (k & 7))) & 1 : 1;
}

static float nibble(const image_t *im, const entry_t *e, uint64_t k) {  /* I4: 2j high nibble, 2j+1 low; two's complement */
    uint8_t byte = im->img[e->offset + (k >> 1)];
    int q = (k & 1) ? byte & 15 : byte >> 4;
    return (float)(q > 7 ? q - 16 : q);
}

/* theta_t of one merged param by the task's codec; link[kind] is that param's entry of each kind
   (the shared ones, and this task's), or NULL. */
static void rebuild_param(const image_t *im, const entry_t *b, const entry_t *const *link, uint32_t codec, uint32_t dcode, float *out) {
    const entry_t *mask = link[KIND_MASK], *scale = link[KIND_SCALE], *delta = link[KIND_DELTA];
    const entry_t *vec = link[codec == C_EMR ? KIND_ELECTED : KIND_VECTOR];
    uint64_t k, cols = b->numel ? b->numel / qrows(b) : 1;
    for (k = 0; k < b->numel; k++) {
        float base = value(im, b, k);
        if (codec == C_TALL) out[k] = bit(im, mask, k) ? base + value(im, vec, k) : base;
        else if (codec == C_TALL_SCALED || codec == C_EMR) out[k] = bit(im, mask, k) ? base + value(im, scale, 0) * value(im, vec, k) : base;
        else if (codec == C_TSWITCH) {
            float c = value(im, scale, 0);
            out[k] = bit(im, mask, k) ? base + (bit(im, link[KIND_SIGN], k) ? -c : c) : base;
        } else if (dcode == DT_I8 || dcode == DT_I4) out[k] = base + (dcode == DT_I4 ? nibble(im, delta, k) : value(im, delta, k)) * value(im, scale, k / cols);
        else out[k] = base + value(im, delta, k);
        out[k] = round_to(out[k], b->round);
    }
    if (link[KIND_FIXPOS])  /* parse checked: strictly increasing positions inside the param, one value each */
        for (k = 0; k < link[KIND_FIXPOS]->numel; k++) {
            uint64_t pos = rd64(im->img + link[KIND_FIXPOS]->offset + 8 * k);
            out[pos] = round_to(out[pos] + value(im, link[KIND_FIXVAL], k), b->round);
        }
}

/* Rebuild theta_t of every merged param (table order) into out[0..out_cap). */
int emflat_rebuild(const uint8_t *img, uint64_t size, const char *task, float *out, uint64_t out_cap,
                   uint64_t *out_len, char *err, size_t cap) {
    image_t im;
    uint64_t i, k, t, pos = 0;
    int found = -1;
    uint32_t *link[N_KINDS];
    if (parse(&im, img, size, err, cap) != 0) { free_image(&im); return -1; }
    for (t = 0; t < im.n_tasks; t++) {
        const uint8_t *row = img + im.tasks_off + (uint64_t)im.task_size * t;
        uint32_t off = rd32(row), len = rd32(row + 4);
        if (strlen(task) == len && memcmp(img + im.names_off + off, task, len) == 0) found = (int)t;
    }
    if (found < 0) {  /* name the valid ones, as far as the message buffer holds them */
        size_t used = (size_t)snprintf(err, cap, "unknown task '%s'; valid:", task);
        for (t = 0; t < im.n_tasks && used < cap; t++) {
            const uint8_t *row = img + im.tasks_off + (uint64_t)im.task_size * t;
            used += (size_t)snprintf(err + used, cap - used, " %.*s", (int)rd32(row + 4), (const char *)(img + im.names_off + rd32(row)));
        }
        free_image(&im);
        return -1;
    }
    /* each base's entry of every kind -- shared, or this task's -- found in one pass (parse made them unique) */
    for (k = 0; k < N_KINDS; k++) link[k] = (uint32_t *)malloc(sizeof(uint32_t) * (im.n + 1));
    for (k = 0; k < N_KINDS; k++)
        if (!link[k]) {
            for (k = 0; k < N_KINDS; k++) free(link[k]);
            free_image(&im);
            return fail(err, cap, "out of memory", NONE);
        }
    for (k = 0; k < N_KINDS; k++) for (i = 0; i < im.n; i++) link[k][i] = NONE;
    for (k = 0; k < im.n; k++) {
        const entry_t *e = &im.entries[k];
        if (linked(e->kind) && (e->task == NONE || e->task == (uint32_t)found)) link[e->kind][e->param] = (uint32_t)k;
    }
    for (i = 0; i < im.n; i++) {
        const entry_t *b = &im.entries[i], *got[N_KINDS];
        int any = 0;
        for (k = 0; k < N_KINDS; k++) {
            got[k] = link[k][i] == NONE ? NULL : &im.entries[link[k][i]];
            any |= got[k] != NULL;
        }
        if (b->kind != KIND_BASE || !any || (im.version == 1 && !got[KIND_VECTOR])) continue;  /* v1: no vector, carried */
        if (b->numel > out_cap - pos) {
            for (k = 0; k < N_KINDS; k++) free(link[k]);
            free_image(&im);
            return fail(err, cap, "output buffer too small", (uint32_t)i);
        }
        rebuild_param(&im, b, got, im.codec[found], im.dcode[found], out + pos);
        pos += b->numel;
    }
    *out_len = pos;
    for (k = 0; k < N_KINDS; k++) free(link[k]);
    free_image(&im);
    return 0;
}

#ifndef EMFLAT_NO_MAIN
int main(int argc, char **argv) {
    FILE *f;
    uint8_t *img;
    float *out;
    long size;
    uint64_t n = 0;
    char err[256];
    if (argc != 4) { fprintf(stderr, "usage: %s IMAGE TASK OUT\n", argv[0]); return 2; }
    f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "emflat: cannot open %s\n", argv[1]); return 1; }
    fseek(f, 0, SEEK_END); size = ftell(f); fseek(f, 0, SEEK_SET);
    img = (uint8_t *)malloc(size > 0 ? (size_t)size : 1);
    if (!img || fread(img, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "emflat: cannot read %s\n", argv[1]);
        free(img); fclose(f);
        return 1;
    }
    fclose(f);
    /* every merged element costs >= 2 bytes of image (its base value), so theta_t as float32 fits
       in 2 * size bytes; emflat_rebuild checks the bound anyway */
    out = (float *)malloc(2 * (size_t)size + 4);
    if (!out) { fprintf(stderr, "emflat: out of memory\n"); free(img); return 1; }
    if (emflat_rebuild(img, (uint64_t)size, argv[2], out, (uint64_t)size / 2 + 1, &n, err, sizeof err) != 0) {
        fprintf(stderr, "emflat: %s: %s\n", argv[1], err);
        free(img); free(out);
        return 1;
    }
    f = fopen(argv[3], "wb");
    if (!f || fwrite(out, 4, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "emflat: cannot write %s\n", argv[3]);
        if (f) fclose(f);
        free(img); free(out);
        return 1;
    }
    fclose(f);
    free(img); free(out);
    return 0;
}
#endif
