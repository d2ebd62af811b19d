/* The cpu kernel's loops in C: elect and the continual step over blocks of one chunk.
 *
 * The same loops as the numba backend (fusion/kernels/cpu_numba.py), block for block, and the
 * same numerics as fusion.reference: masks, signs and unified values bit for bit; the L1 and
 * fidelity sums in float64, per block, compared to a tolerance. Built when the package is installed
 * (setuptools' build_ext, declared in pyproject.toml) into a shared library beside
 * fusion/kernels/cpu_native.py, which loads it with ctypes: a process starts it in milliseconds,
 * where numba needs its import and its cached code (0.7 s).
 *
 * Numerics: compiled with -ffp-contract=off and without fast-math, so every float32 operation
 * rounds as written (no fused multiply-adds); only the float64 sums (SUMS) may be reordered.
 *
 * CPU dispatch: on x86-64 with glibc, every function with a loop is compiled for several levels of
 * the x86-64 instruction set and the dynamic loader picks the one this CPU runs when the library
 * loads (function multiversioning, through ifunc), so one build serves every x86-64 machine: with
 * GCC 12 or later x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), x86-64-v3 (AVX2, FMA, BMI2) and the
 * baseline; elsewhere AVX2 and the baseline. (On the development machine, an AVX-512 Xeon shared
 * with other work, the v4 version took 5-30% less CPU time than a -march=native build, and plain
 * "avx512f" clones, whose byte masks lack AVX-512 BW, 20-50% more.) A function without
 * CONDU_CLONES that the compiler does not inline runs the baseline code in every version. Each
 * version rounds every float32 operation as written, so all give the same bits; `-DCONDU_CLONES=`
 * builds the baseline alone, which the tests compare with each level built alone.
 *
 * Threads: every thread calling condu_unify takes the next `step` blocks from a shared counter
 * until none is left. Results are per block, so they do not depend on which thread took which.
 */

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef CONDU_CLONES
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && !defined(__clang__) && __GNUC__ >= 12
#define CONDU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif __has_attribute(target_clones)
#define CONDU_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#endif
#ifndef CONDU_CLONES
#define CONDU_CLONES
#endif

#define NOT_MEASURED (-1)
#define OWN_ROW (-2)
#define NUM_SUMS 5

/* One chunk's pass; the layout is mirrored by fusion/kernels/cpu_native.py (_Pass). */
typedef struct {
    int64_t n, block, num_old, num_new, num_blocks;
    const float *stored_u;         /* (n,) the stored unified delta (num_old > 0) */
    const uint8_t *stored_packed;  /* (num_old, ceil(n/8)) the stored tasks' packed masks */
    const float *lam;              /* (num_old,) float32(lambda) */
    const void *src;               /* (num_new, n) float32 rows, or uint16 codes when table */
    const float *table;            /* float32 value of every 16-bit code, or NULL */
    const float *base;             /* (n,) theta0, subtracted from the rows; or NULL */
    const float *orig;             /* (R, n) kept tasks' originals (weights when base) */
    const int64_t *index;          /* (T,) NOT_MEASURED, OWN_ROW or a row of orig */
    int64_t rounding;              /* u's storage form: 0 float32, 1 float16, 2 bfloat16, 3 int8 and 4 int4 blocks */
    const float *f16_table;        /* float32 value of every float16 code */
    int64_t quant_block;           /* elements per quantization block (rounding 3, 4); the pass's block is a multiple */
    float *scales;                 /* (ceil(n / quant_block),) out: the blocks' scales (rounding 3, 4), or NULL */
    float *unified;                /* (n,) out */
    uint8_t *packed;               /* (T, ceil(n/8)) out */
    double *delta_l1, *masked_l1;  /* (num_blocks, T) out */
    double *fidelity;              /* (num_blocks, T, 5) out: A, E, D, Z, C */
    double *drift;                 /* (num_blocks, T, 5) out: the same against each task's own row; or NULL */
    _Atomic int64_t next_block;    /* the shared counter of blocks handed out */
} Pass;

static inline uint32_t bits_of(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }
static inline float float_of(uint32_t b) { float x; memcpy(&x, &b, 4); return x; }

/* Element j of a stored task's row: u * lam where its mask bit is set, else +0.0; the select is a
 * bitwise and with the bit spread to a word, so the loop has no branch. */
static inline float rebuilt(float u, float scale, uint32_t bit) {
    return float_of(bits_of(u * scale) & (0u - bit));
}

/* stage[i, :m] = where(bit i of element lo+j, u[lo+j] * lam[i], 0) for every stored task i, a mask
 * byte (eight elements, one vector) at a time. */
CONDU_CLONES static void rebuild_block(const Pass *p, int64_t lo, int64_t m, float *restrict stage) {
    const int64_t bytes = (p->n + 7) / 8, full = m / 8;
    const float *restrict u = p->stored_u + lo;
    for (int64_t i = 0; i < p->num_old; i++) {
        const uint8_t *restrict bits = p->stored_packed + i * bytes + lo / 8;
        const float scale = p->lam[i];
        float *restrict row = stage + i * p->block;
        for (int64_t k = 0; k < full; k++) {
            const uint32_t byte = bits[k];
            for (int b = 0; b < 8; b++) row[8 * k + b] = rebuilt(u[8 * k + b], scale, (byte >> b) & 1u);
        }
        for (int64_t j = 8 * full; j < m; j++) row[j] = rebuilt(u[j], scale, (bits[full] >> (j & 7)) & 1u);
    }
}

/* stage[num_old + t, :m] = row t on [lo, lo+m) as float32, minus base when given (one rounding). */
CONDU_CLONES static void stage_rows(const Pass *p, int64_t lo, int64_t m, float *restrict stage) {
    const float *restrict base = p->base ? p->base + lo : NULL;
    for (int64_t t = 0; t < p->num_new; t++) {
        float *restrict out = stage + (p->num_old + t) * p->block;
        if (p->table) {
            const uint16_t *restrict codes = (const uint16_t *)p->src + t * p->n + lo;
            const float *restrict table = p->table;
            if (base) for (int64_t j = 0; j < m; j++) out[j] = table[codes[j]] - base[j];
            else for (int64_t j = 0; j < m; j++) out[j] = table[codes[j]];
        } else {
            const float *restrict row = (const float *)p->src + t * p->n + lo;
            if (base) for (int64_t j = 0; j < m; j++) out[j] = row[j] - base[j];
            else memcpy(out, row, (size_t)m * sizeof(float));
        }
    }
}

/* sign[:m] = +1 where the sequential float32 sum over tasks is > 0, else -1 (the reference's rule). */
CONDU_CLONES static void elect_sign(const float *restrict stage, int64_t tasks, int64_t block, int64_t m,
                                    float *restrict sign) {
    memcpy(sign, stage, (size_t)m * sizeof(float));
    for (int64_t t = 1; t < tasks; t++) {
        const float *row = stage + t * block;
        for (int64_t j = 0; j < m; j++) sign[j] += row[j];
    }
    for (int64_t j = 0; j < m; j++) sign[j] = sign[j] > 0.0f ? 1.0f : -1.0f;
}

/* magnitude[:m] = the largest |value| that agrees strictly with sign, else +0.0: x * sign is
 * exact (sign is +-1) and equals |x| where x agrees, <= 0 elsewhere; a NaN never wins. */
CONDU_CLONES static void magnitude_of(const float *restrict stage, int64_t tasks, int64_t block, int64_t m,
                         const float *restrict sign, float *restrict magnitude) {
    for (int64_t j = 0; j < m; j++) magnitude[j] = 0.0f;
    for (int64_t t = 0; t < tasks; t++) {
        const float *row = stage + t * block;
        for (int64_t j = 0; j < m; j++) {
            const float agreeing = row[j] * sign[j];
            magnitude[j] = agreeing > magnitude[j] ? agreeing : magnitude[j];
        }
    }
}

/* float32 bits -> float16 bits, rounded to nearest, ties to even (numpy's astype(float16)). */
static uint32_t f16_bits(uint32_t bits) {
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const int64_t exponent = (int64_t)((bits >> 23) & 0xFFu) - 127 + 15;
    int64_t mantissa = (int64_t)(bits & 0x7FFFFFu);
    if (exponent >= 31) return sign | 0x7C00u; /* beyond float16's range: infinity, caught by the pass */
    if (exponent <= 0) {                        /* a float16 subnormal, or zero */
        if (exponent < -10) return sign;
        mantissa |= 0x800000;
        const int64_t shift = 14 - exponent;
        const int64_t half = (int64_t)1 << (shift - 1);
        return sign | (uint32_t)((mantissa + half - 1 + ((mantissa >> shift) & 1)) >> shift);
    }
    const int64_t rounded = (mantissa + 0xFFF + ((mantissa >> 13) & 1)) >> 13; /* may carry into the exponent */
    return sign | (uint32_t)((exponent << 10) + rounded);
}

/* u[:m] rounded to the store's dtype and widened back, so the sums see what is stored. */
CONDU_CLONES static void round_block(float *u, int64_t m, int64_t rounding, const float *f16_table) {
    if (rounding == 2) {
        for (int64_t j = 0; j < m; j++) {
            const uint32_t b = bits_of(u[j]);
            u[j] = float_of(((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16) << 16);
        }
    } else if (rounding == 1) {
        for (int64_t j = 0; j < m; j++) u[j] = f16_table[f16_bits(bits_of(u[j]))];
    }
}

/* u[:m] block-quantized and dequantized in place (fusion.reference.quantize_blocks), m from a block
 * boundary: per block of qb elements scale = float(max |u| / qmax), 0 where that is below the smallest
 * normal float (the block is then stored as zeros), code = rint(u / scale) clamped to +-qmax, and
 * u = code * scale; scales[k] is block k's scale. rint rounds half to even by adding and subtracting
 * 1.5 * 2**23, exact for |x| < 2**22 (a code is at most qmax): it makes +0.0 of a zero code, as the
 * reference's integer codes do. A NaN never wins the maximum; a block with NaN or Inf makes a
 * non-finite u, which the pass refuses. */
CONDU_CLONES static void quantize_block(float *restrict u, int64_t m, int64_t qb, float qmax, float *restrict scales) {
    const float magic = 12582912.0f;
    for (int64_t lo = 0, k = 0; lo < m; lo += qb, k++) {
        const int64_t end = lo + qb < m ? lo + qb : m;
        float amax = 0.0f;
        for (int64_t j = lo; j < end; j++) {
            const float a = fabsf(u[j]);
            amax = a > amax ? a : amax;
        }
        float scale = amax / qmax;
        if (!(scale >= 0x1p-126f)) scale = 0.0f;
        scales[k] = scale;
        if (scale == 0.0f) {
            for (int64_t j = lo; j < end; j++) u[j] = 0.0f;
            continue;
        }
        for (int64_t j = lo; j < end; j++) {
            float code = (u[j] / scale + magic) - magic;
            code = code > qmax ? qmax : (code < -qmax ? -qmax : code);
            u[j] = code * scale;
        }
    }
}

/* The float64 sums may be reordered to vectorise (they are compared to a tolerance), and only they:
 * the functions marked SUMS are compiled with reassociation, everything else as written. (GCC keeps
 * `omp simd reduction` lanes of seven sums in memory, 40x slower; hand-made lanes did not vectorise.)
 * The masks computed beside the sums are comparisons of exact products, which no flag here changes. */
#if defined(__clang__)
#define SUMS CONDU_CLONES __attribute__((noinline))
#define REORDER_SUMS _Pragma("clang fp reassociate(on) contract(fast)")
#else
#define SUMS CONDU_CLONES __attribute__((noinline, optimize("associative-math", "no-signed-zeros", "no-trapping-math", \
                                                "fp-contract=fast", "unroll-loops")))
#define REORDER_SUMS
#endif

/* The fidelity terms of element j (fusion.fidelity) added to the five sums a, e, d, z, c: u and o
 * widened to float64 (their products are exact there), each term selected by `on`. A macro, as
 * MASKED_SIZE below. */
#define ADD_FIDELITY_TERMS(u_, o_, on_)                                    \
    do {                                                                   \
        const double uj_ = (double)(u_), oj_ = (double)(o_);               \
        const double diff_ = uj_ - oj_, oo_ = oj_ * oj_;                   \
        a += (on_) ? uj_ * uj_ : 0.0;                                      \
        e += (on_) ? uj_ * diff_ : 0.0;                                    \
        d += (on_) ? diff_ * diff_ : 0.0;                                  \
        z += (on_) ? 0.0 : oo_;                                            \
        c += oo_;                                                          \
    } while (0)

static void add_sums(double *out, double a, double e, double d, double z, double c) {
    out[0] += a;
    out[1] += e;
    out[2] += d;
    out[3] += z;
    out[4] += c;
}

/* |u| where `on`, else +0.0: u's float32 bits and'ed with the sign cleared and `on` spread to a word
 * (faster than a select on the widened value, and the same number). A macro: a function would not
 * be inlined into the SUMS functions, whose options differ, and the loop would not vectorise. */
#define MASKED_SIZE(value, on, out)                                          \
    do {                                                                     \
        uint32_t bits_;                                                      \
        memcpy(&bits_, &(value), 4);                                         \
        bits_ &= 0x7FFFFFFFu & (0u - (uint32_t)(on));                        \
        memcpy(&(out), &bits_, 4);                                           \
    } while (0)

/* One task's block without fidelity: its mask bytes, the L1 of its delta and of u under its mask.
 * Every value is loaded and computed, then selected: a load under a condition would not vectorise. */
SUMS static void task_sums(const float *restrict row, const float *restrict sign, const float *restrict u,
                           int64_t m, uint8_t *restrict mask, double *l1, double *masked) {
    REORDER_SUMS
    double delta_l1 = 0.0, masked_l1 = 0.0;
    for (int64_t j = 0; j < m; j++) {
        const float x = row[j];
        const int on = x * sign[j] > 0.0f;
        mask[j] = (uint8_t)on;
        delta_l1 += fabs((double)x);
        float size;
        MASKED_SIZE(u[j], on, size);
        masked_l1 += (double)size;
    }
    *l1 = delta_l1;
    *masked = masked_l1;
}

/* task_sums, and the fidelity sums A, E, D, Z, C of u against `original` (minus `base` when given:
 * the reference's float32 rounding) added to sums, in the same loop. */
SUMS static void task_sums_fidelity(const float *restrict row, const float *restrict sign, const float *restrict u,
                                    int64_t m, uint8_t *restrict mask, const float *restrict original,
                                    const float *restrict base, double *l1, double *masked, double *sums) {
    REORDER_SUMS
    double delta_l1 = 0.0, masked_l1 = 0.0, a = 0.0, e = 0.0, d = 0.0, z = 0.0, c = 0.0;
    for (int64_t j = 0; j < m; j++) {
        const float x = row[j];
        const int on = x * sign[j] > 0.0f;
        mask[j] = (uint8_t)on;
        delta_l1 += fabs((double)x);
        masked_l1 += on ? fabs((double)u[j]) : 0.0;
        ADD_FIDELITY_TERMS(u[j], base ? original[j] - base[j] : original[j], on); /* the float32 rounding */
    }
    *l1 = delta_l1;
    *masked = masked_l1;
    add_sums(sums, a, e, d, z, c);
}

/* out += A, E, D, Z, C of u against `original` under the byte mask (0/1) `mask`, over n elements. */
SUMS void condu_fidelity_sums(const float *restrict u, const uint8_t *restrict mask, const float *restrict original,
                              int64_t n, double *out);

/* Byte masks (0/1) -> bits, element 8k+b at bit b of byte k: eight mask bytes as one
 * little-endian word, times 0x0102040810204080, hold the packed byte in their top eight bits. */
CONDU_CLONES static void pack_mask(const uint8_t *mask, int64_t m, uint8_t *out) {
    const int64_t full = m / 8;
    for (int64_t k = 0; k < full; k++) {
        uint64_t word;
        memcpy(&word, mask + 8 * k, 8);
        out[k] = (uint8_t)((word * 0x0102040810204080ull) >> 56);
    }
    if (m % 8) { /* the chunk's last, partial byte: missing elements are 0 bits */
        uint8_t byte = 0;
        for (int64_t b = 0; b < m % 8; b++) byte |= (uint8_t)(mask[8 * full + b] << b);
        out[full] = byte;
    }
}

typedef struct {
    float *stage, *sign, *magnitude;
    uint8_t *masks;
} Scratch;

CONDU_CLONES static void elect_block(const Pass *p, int64_t b, Scratch *s) {
    const int64_t tasks = p->num_old + p->num_new, lo = b * p->block;
    const int64_t m = p->n - lo < p->block ? p->n - lo : p->block;
    const int64_t bytes = (p->n + 7) / 8;
    rebuild_block(p, lo, m, s->stage);
    stage_rows(p, lo, m, s->stage);
    elect_sign(s->stage, tasks, p->block, m, s->sign);
    magnitude_of(s->stage, tasks, p->block, m, s->sign, s->magnitude);
    float *u = p->unified + lo;
    for (int64_t j = 0; j < m; j++) u[j] = s->sign[j] * s->magnitude[j];
    if (p->rounding >= 3) quantize_block(u, m, p->quant_block, p->rounding == 3 ? 127.0f : 7.0f,
                                         p->scales + lo / p->quant_block);
    else round_block(u, m, p->rounding, p->f16_table);
    for (int64_t t = 0; t < tasks; t++) {
        const float *row = s->stage + t * p->block;
        const int64_t r = p->index[t];
        uint8_t *mask = s->masks + t * p->block;
        double *l1 = p->delta_l1 + b * tasks + t, *masked = p->masked_l1 + b * tasks + t;
        double *sums = p->fidelity + (b * tasks + t) * NUM_SUMS;
        double *drift = p->drift ? p->drift + (b * tasks + t) * NUM_SUMS : NULL;
        if (r == OWN_ROW) { /* a new task: its own delta is the original */
            task_sums_fidelity(row, s->sign, u, m, mask, row, NULL, l1, masked, sums);
            if (drift) memcpy(drift, sums, NUM_SUMS * sizeof(double)); /* its row is its original */
        } else if (r >= 0) { /* a kept task: its fine-tuned weights minus theta0, or its delta */
            task_sums_fidelity(row, s->sign, u, m, mask, p->orig + r * p->n + lo, p->base ? p->base + lo : NULL, l1,
                               masked, sums);
            if (drift) condu_fidelity_sums(u, mask, row, m, drift);
        } else if (drift) { /* against its own row: a stored task's rebuild from the stored generation */
            task_sums_fidelity(row, s->sign, u, m, mask, row, NULL, l1, masked, drift);
        } else {
            task_sums(row, s->sign, u, m, mask, l1, masked);
        }
        pack_mask(mask, m, p->packed + t * bytes + lo / 8);
    }
}

/* sizeof(Pass): the loader refuses a library whose struct differs from its mirror (_Pass). */
int64_t condu_pass_size(void) { return (int64_t)sizeof(Pass); }

/* The sha256 of this file as it was built (setup.py passes it in): the loader refuses a library
 * built from another version of the cpu_native.c beside it, a checkout edited since its install. */
#ifndef CONDU_SOURCE_SHA256
#define CONDU_SOURCE_SHA256 ""
#endif
const char *condu_source_sha256(void) { return CONDU_SOURCE_SHA256; }

/* Called by every thread of a pass: blocks `step` at a time from the shared counter. 0, or -1
 * when the scratch could not be allocated (then the thread does nothing; the caller raises). */
CONDU_CLONES int condu_unify(Pass *p, int64_t step) {
    const int64_t tasks = p->num_old + p->num_new;
    Scratch s;
    s.stage = malloc((size_t)(tasks * p->block) * sizeof(float));
    s.sign = malloc((size_t)p->block * sizeof(float));
    s.magnitude = malloc((size_t)p->block * sizeof(float));
    s.masks = malloc((size_t)(tasks * p->block));
    const int ok = s.stage && s.sign && s.magnitude && s.masks;
    for (;;) {
        if (!ok) break;
        const int64_t first = atomic_fetch_add(&p->next_block, step);
        if (first >= p->num_blocks) break;
        const int64_t last = first + step < p->num_blocks ? first + step : p->num_blocks;
        for (int64_t b = first; b < last; b++) elect_block(p, b, &s);
    }
    free(s.stage);
    free(s.sign);
    free(s.magnitude);
    free(s.masks);
    return ok ? 0 : -1;
}

/* out += A, E, D, Z, C of u against `original` under the byte mask (0/1) `mask`, over n elements. */
SUMS void condu_fidelity_sums(const float *restrict u, const uint8_t *restrict mask, const float *restrict original,
                              int64_t n, double *out) {
    REORDER_SUMS
    double a = 0.0, e = 0.0, d = 0.0, z = 0.0, c = 0.0;
    for (int64_t j = 0; j < n; j++) ADD_FIDELITY_TERMS(u[j], original[j], mask[j] != 0);
    add_sums(out, a, e, d, z, c);
}

/* float32 -> bfloat16 bits as fusion.dtypes rounds: to nearest even, any NaN the quiet NaN 0x7FC0. */
static inline uint16_t bf16_bits(float x) {
    const uint32_t b = bits_of(x);
    return x != x ? 0x7FC0u : (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* float32 -> float16 bits as numpy casts (npy_floatbits_to_halfbits): to nearest even, overflow to
 * inf, a NaN keeps its sign and the top of its payload (and stays a NaN). */
static inline uint16_t f16_bits_of(float x) {
    const uint32_t f = bits_of(x), f_exp = f & 0x7f800000u;
    const uint16_t sign = (uint16_t)((f & 0x80000000u) >> 16);
    uint32_t sig = f & 0x007fffffu;
    if (f_exp >= 0x47800000u) {
        if (f_exp == 0x7f800000u && sig) {
            const uint16_t nan = (uint16_t)(0x7c00u + (sig >> 13));
            return (uint16_t)(sign + (nan == 0x7c00u ? nan + 1 : nan));
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {
        if (f_exp < 0x33000000u) return sign;
        sig = (0x00800000u + sig) >> (113 - (f_exp >> 23));
        if ((sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu)) sig += 0x00001000u;
        return (uint16_t)(sign + (sig >> 13));
    }
    if ((sig & 0x00003fffu) != 0x00001000u) sig += 0x00001000u;
    return (uint16_t)(sign + ((f_exp - 0x38000000u) >> 13) + (sig >> 13));
}

#define REBUILD_LOOP(STORE)                                                                                      \
    for (int64_t k = 0; k < full; k++) {                                                                         \
        const uint32_t byte = packed[k];                                                                         \
        for (int b = 0; b < 8; b++) {                                                                            \
            const int64_t j = 8 * k + b;                                                                         \
            STORE(j, base[j] + rebuilt(u[j], scale, (byte >> b) & 1u));                                          \
        }                                                                                                        \
    }                                                                                                            \
    for (int64_t j = 8 * full; j < n; j++) STORE(j, base[j] + rebuilt(u[j], scale, (packed[full] >> (j & 7)) & 1u));

#define STORE_F32(j, x) ((float *)out)[j] = (x)
#define STORE_BF16(j, x) ((uint16_t *)out)[j] = bf16_bits(x)
#define STORE_F16(j, x) ((uint16_t *)out)[j] = f16_bits_of(x)

/* Decouple's rebuild (fusion.reference.rebuild) as an output dtype: theta = base + where(M, u * scale,
 * +0.0) over n elements, M from the packed bits, a mask byte (eight elements) at a time, stored as
 * `kind` says (0 float32, 1 bfloat16 bits, 2 float16 bits, rounded as fusion.dtypes.from_float32):
 * one pass where numpy needs five, and eight more for a 16-bit output. `out` may be `u` or `base`
 * (each element is read before it is written), so those three are not restrict. */
CONDU_CLONES
void condu_rebuild_as(const float *base, const float *u, const uint8_t *restrict packed, float scale, int64_t n,
                      void *out, int64_t kind) {
    const int64_t full = n / 8;
    if (kind == 1) {
        REBUILD_LOOP(STORE_BF16)
    } else if (kind == 2) {
        REBUILD_LOOP(STORE_F16)
    } else {
        REBUILD_LOOP(STORE_F32)
    }
}
