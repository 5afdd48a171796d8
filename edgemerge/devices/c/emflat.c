/* emflat.c -- reference applier for edgemerge flat images (docs/format.md, "Flat image").
 *
 * C99, no dependencies beyond libc. Parses an image with every field bound-checked, then
 * rebuilds theta_t = theta_0 + m_t (.) tau for one task, bit-exactly as the numpy reference does:
 *   out[i] = bit_i ? base[i] + vec[i] : base[i]     (float32; Q16 values are q * 2^-f, exact)
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
#define TASK_SIZE 8u
#define MAX_DIMS 8u
#define NONE 0xFFFFFFFFu
enum { KIND_BASE = 0, KIND_VECTOR = 1, KIND_MASK = 2, KIND_PRIVATE = 3 };
enum { DT_F32 = 0, DT_F16 = 1, DT_Q16 = 2, DT_U8 = 3 };
#define N_DTYPES 14u  /* codes 0-13, docs/format.md */
static const uint32_t ITEMSIZE[N_DTYPES] = {4, 2, 2, 1, 8, 4, 8, 1, 1, 2, 2, 2, 4, 8};

typedef struct {
    uint32_t kind, dtype, task, param;
    uint64_t offset, nbytes, numel;
    int32_t frac;
    uint32_t ndim, name_off, name_len;
    uint32_t dims[MAX_DIMS];
} entry_t;

typedef struct {
    const uint8_t *img;
    uint64_t size, names_off, names_len;
    uint32_t align, n, n_tasks;
    entry_t *entries;
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

/* Parse and validate; on success img->entries is malloc'ed (caller frees). */
static int parse(image_t *im, const uint8_t *img, uint64_t size, char *err, size_t cap) {
    static const uint8_t magic[8] = {'E', 'M', 'F', 'L', 'A', 'T', 0, 1};
    uint64_t table_off, tasks_off, i, j;
    im->img = img; im->size = size; im->entries = NULL;
    if (size < HEADER_SIZE) return fail(err, cap, "file shorter than the 64-byte header", NONE);
    if (memcmp(img, magic, 8) != 0) return fail(err, cap, "bad magic: not an edgemerge flat image", NONE);
    if (rd32(img + 8) != 1 || rd32(img + 12) != HEADER_SIZE) return fail(err, cap, "unsupported version or header size", NONE);
    im->align = rd32(img + 16); im->n = rd32(img + 20); im->n_tasks = rd32(img + 24);
    table_off = rd64(img + 32); im->names_off = rd64(img + 40); im->names_len = rd64(img + 48);
    if (im->align != 64 && im->align != 4096) return fail(err, cap, "alignment must be 64 or 4096", NONE);
    if (rd64(img + 56) != size) return fail(err, cap, "declared size does not match the file (truncated?)", NONE);
    if (table_off != HEADER_SIZE || im->n > (1u << 20) || im->n_tasks > (1u << 16))
        return fail(err, cap, "tensor table out of bounds", NONE);
    tasks_off = table_off + (uint64_t)ENTRY_SIZE * im->n;
    if (tasks_off + (uint64_t)TASK_SIZE * im->n_tasks != im->names_off || im->names_off > size ||
        im->names_len > size - im->names_off)
        return fail(err, cap, "task table or names blob out of bounds", NONE);
    for (i = 0; i < im->n_tasks; i++) {
        uint32_t off = rd32(img + tasks_off + TASK_SIZE * i), len = rd32(img + tasks_off + TASK_SIZE * i + 4);
        if (len == 0 || (uint64_t)off + len > im->names_len) return fail(err, cap, "task name out of bounds", NONE);
        if (memchr(img + im->names_off + off, 0, len)) return fail(err, cap, "task name holds a NUL byte", NONE);
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
        if (e->kind > 3 || e->dtype >= N_DTYPES || e->ndim > MAX_DIMS) return fail(err, cap, "bad kind, dtype or ndim", (uint32_t)i);
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
        if ((e->task != NONE && e->task >= im->n_tasks) || ((e->kind == KIND_MASK || e->kind == KIND_PRIVATE) != (e->task != NONE)))
            return fail(err, cap, "task index invalid for its kind", (uint32_t)i);
        if (e->frac < 0 || e->frac > 30) return fail(err, cap, "fraction bits out of range", (uint32_t)i);
    }
    for (i = 0; i < im->n; i++) {
        entry_t *e = &im->entries[i];
        if (e->kind == KIND_VECTOR || e->kind == KIND_MASK) {
            entry_t *b;
            if (e->param >= im->n || im->entries[e->param].kind != KIND_BASE)
                return fail(err, cap, "param index does not point at a base entry", (uint32_t)i);
            b = &im->entries[e->param];
            if (e->name_len != b->name_len || memcmp(name_of(im, e), name_of(im, b), e->name_len) != 0)
                return fail(err, cap, "name differs from its base's", (uint32_t)i);
            if (e->kind == KIND_VECTOR && (e->numel != b->numel || !is_float(e->dtype) || !is_float(b->dtype)))
                return fail(err, cap, "vector does not match its base (same element count, F32/F16/Q16 both)", (uint32_t)i);
            if (e->kind == KIND_MASK && (e->dtype != DT_U8 || e->nbytes != (b->numel + 7) / 8))
                return fail(err, cap, "mask length is not ceil(numel / 8) of its base", (uint32_t)i);
        }
    }
    return check_unique(im, err, cap);
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

static int by_param_task(const void *a, const void *b) {  /* vectors and masks, by (kind, param, task) */
    const entry_t *x = &sort_im->entries[*(const uint32_t *)a], *y = &sort_im->entries[*(const uint32_t *)b];
    if (x->kind != y->kind) return x->kind < y->kind ? -1 : 1;
    if (x->param != y->param) return x->param < y->param ? -1 : 1;
    return x->task < y->task ? -1 : x->task > y->task;
}

static int by_task_name(const void *a, const void *b) {  /* task table rows, by name */
    const uint8_t *t = sort_im->img + HEADER_SIZE + (uint64_t)ENTRY_SIZE * sort_im->n;
    uint32_t i = *(const uint32_t *)a, j = *(const uint32_t *)b;
    return bytes_cmp(sort_im->img + sort_im->names_off + rd32(t + TASK_SIZE * i), rd32(t + TASK_SIZE * i + 4),
                     sort_im->img + sort_im->names_off + rd32(t + TASK_SIZE * j), rd32(t + TASK_SIZE * j + 4));
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
    for (m = 0, k = 0; k < im->n; k++) if (im->entries[k].kind == KIND_VECTOR || im->entries[k].kind == KIND_MASK) idx[m++] = k;
    qsort(idx, m, sizeof *idx, by_param_task);
    for (k = 1; k < m && !problem; k++) if (by_param_task(&idx[k - 1], &idx[k]) == 0) problem = "a param has two vectors, or two masks for one task";
    for (k = 0; k < im->n_tasks; k++) idx[k] = k;
    qsort(idx, im->n_tasks, sizeof *idx, by_task_name);
    for (k = 1; k < im->n_tasks && !problem; k++) if (by_task_name(&idx[k - 1], &idx[k]) == 0) problem = "two tasks share a name";
    free(idx);
    return problem ? fail(err, cap, problem, NONE) : 0;
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

static float value(const image_t *im, const entry_t *e, uint64_t i) {
    const uint8_t *p = im->img + e->offset;
    if (e->dtype == DT_F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    if (e->dtype == DT_F16) { uint16_t h; memcpy(&h, p + 2 * i, 2); return half_to_float(h); }
    {   /* Q16: int16 * 2^-frac, exact in float32 */
        int16_t q; uint32_t bits = (uint32_t)(127 - e->frac) << 23; float scale;
        memcpy(&q, p + 2 * i, 2); memcpy(&scale, &bits, 4);
        return (float)q * scale;
    }
}

/* Rebuild theta_t of every merged param (table order) into out[0..out_cap). */
int emflat_rebuild(const uint8_t *img, uint64_t size, const char *task, float *out, uint64_t out_cap,
                   uint64_t *out_len, char *err, size_t cap) {
    image_t im;
    uint64_t i, k, t, pos = 0, tasks_off;
    int found = -1;
    if (parse(&im, img, size, err, cap) != 0) { free(im.entries); return -1; }
    tasks_off = HEADER_SIZE + (uint64_t)ENTRY_SIZE * im.n;
    for (t = 0; t < im.n_tasks; t++) {
        uint32_t off = rd32(img + tasks_off + TASK_SIZE * t), len = rd32(img + tasks_off + TASK_SIZE * t + 4);
        if (strlen(task) == len && memcmp(img + im.names_off + off, task, len) == 0) found = (int)t;
    }
    if (found < 0) {  /* name the valid ones, as far as the message buffer holds them */
        size_t used = (size_t)snprintf(err, cap, "unknown task '%s'; valid:", task);
        for (t = 0; t < im.n_tasks && used < cap; t++) {
            uint32_t off = rd32(img + tasks_off + TASK_SIZE * t), len = rd32(img + tasks_off + TASK_SIZE * t + 4);
            used += (size_t)snprintf(err + used, cap - used, " %.*s", (int)len, (const char *)(img + im.names_off + off));
        }
        free(im.entries);
        return -1;
    }
    /* each base's vector and this task's mask, found in one pass (parse made them unique) */
    uint32_t *vec_of = (uint32_t *)malloc(sizeof(uint32_t) * (im.n + 1)), *mask_of = (uint32_t *)malloc(sizeof(uint32_t) * (im.n + 1));
    if (!vec_of || !mask_of) { free(vec_of); free(mask_of); free(im.entries); return fail(err, cap, "out of memory", NONE); }
    for (k = 0; k < im.n; k++) vec_of[k] = mask_of[k] = NONE;
    for (k = 0; k < im.n; k++) {
        const entry_t *e = &im.entries[k];
        if (e->kind == KIND_VECTOR) vec_of[e->param] = (uint32_t)k;
        if (e->kind == KIND_MASK && e->task == (uint32_t)found) mask_of[e->param] = (uint32_t)k;
    }
    for (i = 0; i < im.n; i++) {
        const entry_t *b = &im.entries[i], *v, *m;
        if (b->kind != KIND_BASE || vec_of[i] == NONE) continue;  /* a param without a vector is carried */
        v = &im.entries[vec_of[i]];
        m = mask_of[i] == NONE ? NULL : &im.entries[mask_of[i]];
        if (b->numel > out_cap - pos) {
            free(vec_of); free(mask_of); free(im.entries);
            return fail(err, cap, "output buffer too small", (uint32_t)i);
        }
        for (k = 0; k < b->numel; k++) {
            float base = value(&im, b, k);
            int bit = m ? (im.img[m->offset + (k >> 3)] >> (7 - (k & 7))) & 1 : 1;
            out[pos + k] = bit ? base + value(&im, v, k) : base;
        }
        pos += b->numel;
    }
    *out_len = pos;
    free(vec_of); free(mask_of); free(im.entries);
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
    /* every merged element costs >= 4 bytes of image (base + vector, 2 bytes each at least), so
       theta_t as float32 fits in size bytes; emflat_rebuild checks the bound anyway */
    out = (float *)malloc((size_t)size + 4);
    if (!out) { fprintf(stderr, "emflat: out of memory\n"); free(img); return 1; }
    if (emflat_rebuild(img, (uint64_t)size, argv[2], out, ((uint64_t)size + 4) / 4, &n, err, sizeof err) != 0) {
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
