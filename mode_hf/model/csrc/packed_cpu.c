/* CPU kernels for mode-hf's packed experts (mode_hf/native.py builds this file with the system C compiler and loads
 * it with ctypes; no Python or torch headers).
 *
 * Weights of one width are stored as in mode_hf/packing.py and mode_hf/packed.py:
 *   qweight uint8   [slots, O, ceil(K / 8) * bits]  every run of 8 codes is `bits` little-endian bytes
 *   scales  float16 [slots, O, K / group]
 *   zeros   uint8   [slots, O, K / group]           W[o, k] = (code[o, k] - zero[o, k / group]) * scale[o, k / group]
 *
 * mode_gemv:    y[p, o] = sum_k W_e[o, k] x[p, k] for the few input rows p routed to each expert e (decode): every
 *               packed row is read once and unpacked block by block in registers (see "Blocked order"), never into
 *               memory, for up to MAX_ROWS input rows at a time; the zero point is applied per group through the
 *               group sums of x.
 * mode_dequant: W of the chosen slots as float32 or bfloat16 [n, O, K] (prefill: a matmul library multiplies them).
 * Both split the (expert, output row) pairs over OpenMP threads; float32 arithmetic throughout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exponent = 113;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint16_t float_to_bfloat16(float value) { /* round to nearest even (values here are finite) */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The codes of one packed row as floats, out[0 .. ceil(k / 8) * 8). */
static void unpack_row(const uint8_t *restrict row, int bits, int64_t k, float *restrict out) {
    const int64_t runs = (k + 7) / 8;
    switch (bits) {
    case 8:
        for (int64_t i = 0; i < runs * 8; i++) out[i] = (float)row[i];
        break;
    case 4:
        for (int64_t j = 0; j < runs * 4; j++) {
            const uint8_t b = row[j];
            out[2 * j] = (float)(b & 15u);
            out[2 * j + 1] = (float)(b >> 4);
        }
        break;
    case 2:
        for (int64_t j = 0; j < runs * 2; j++) {
            const uint8_t b = row[j];
            out[4 * j] = (float)(b & 3u);
            out[4 * j + 1] = (float)((b >> 2) & 3u);
            out[4 * j + 2] = (float)((b >> 4) & 3u);
            out[4 * j + 3] = (float)(b >> 6);
        }
        break;
    default: /* 3: 8 codes in a 24-bit little-endian word */
        for (int64_t n = 0; n < runs; n++) {
            const uint32_t w = (uint32_t)row[3 * n] | ((uint32_t)row[3 * n + 1] << 8) | ((uint32_t)row[3 * n + 2] << 16);
            for (int i = 0; i < 8; i++) out[8 * n + i] = (float)((w >> (3 * i)) & 7u);
        }
        break;
    }
}

static float *row_buffer(int64_t k) { /* room for a padded row of codes, 64-byte aligned */
    const size_t bytes = (size_t)((k + 7) / 8 * 8 + 16) * sizeof(float);
    return (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* Blocked order. A block is LANES bytes at 2, 4 and 8 bits (LANES * 8 / bits codes) and LANES runs of 3 bytes at
 * 3 bits (LANES * 8 codes). Within a block, entry p * LANES + i of the blocked input is the code that sits p-th in
 * byte (or run) i: code (8 / bits) * i + p, or 8 * i + p at 3 bits. Every block is then LANES independent lanes of
 * fixed-size loops, which the compiler turns into vector instructions (shifts, masks, conversions and fused
 * multiply-adds on 16 lanes) without writing the unpacked codes anywhere. `mode_hf.native.blocked` orders x so. */
#define LANES 16

/* A block's unit is a byte at 2, 4 and 8 bits and a run of 3 bytes at 3 bits; these are its codes and bytes. */
static inline int unit_codes(int bits) { return bits == 3 ? 8 : 8 / bits; }
static inline int unit_bytes(int bits) { return bits == 3 ? 3 : 1; }

#define MAX_ROWS 4 /* input rows multiplied per unpacked block */

/* The codes of one block as floats, plane-major: codes[p * LANES + i] = the code sitting p-th in byte (run) i. */
static inline __attribute__((always_inline)) void block_codes(const uint8_t *restrict src, int bits, float *restrict codes) {
    if (bits == 3) {
        uint32_t word[LANES];
        for (int i = 0; i < LANES - 1; i++) { /* 4-byte loads: the 4th byte belongs to the next run */
            uint32_t w;
            memcpy(&w, src + 3 * i, sizeof w);
            word[i] = w & 0xffffffu;
        }
        const uint8_t *last = src + 3 * (LANES - 1); /* the block's last run: no byte past it is read */
        word[LANES - 1] = (uint32_t)last[0] | ((uint32_t)last[1] << 8) | ((uint32_t)last[2] << 16);
        for (int p = 0; p < 8; p++)
            for (int i = 0; i < LANES; i++) codes[p * LANES + i] = (float)((word[i] >> (3 * p)) & 7u);
    } else {
        const uint32_t mask = (1u << bits) - 1u;
        for (int p = 0; p < unit_codes(bits); p++)
            for (int i = 0; i < LANES; i++) codes[p * LANES + i] = (float)(((uint32_t)src[i] >> (bits * p)) & mask);
    }
}

/* result[j] = sum_k W[o, k] x_j[k] for `rows` (1 .. MAX_ROWS) input rows x_j = x + j * k in blocked order, with
 * their group sums xsum + j * groups; one packed row, unpacked once per block for all of them. */
static inline __attribute__((always_inline)) void row_dot_blocked(const uint8_t *restrict row, const uint16_t *scales,
                                                                 const uint8_t *zeros, const float *restrict x,
                                                                 const float *xsum, int64_t k, int64_t groups,
                                                                 int64_t group, int bits, int rows, float *result) {
    const int64_t codes_per_block = LANES * unit_codes(bits), bytes_per_block = LANES * unit_bytes(bits);
    const int64_t blocks = group / codes_per_block;
    float total[MAX_ROWS][LANES] = {{0}}, correction[MAX_ROWS] = {0};
    float codes[8 * LANES];
    for (int64_t g = 0; g < groups; g++) {
        float acc[MAX_ROWS][LANES] = {{0}};
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t first = (g * blocks + b) * codes_per_block;
            block_codes(row + (g * blocks + b) * bytes_per_block, bits, codes);
            for (int j = 0; j < rows; j++)
                for (int64_t c = 0; c < codes_per_block; c += LANES)
                    for (int i = 0; i < LANES; i++) acc[j][i] += codes[c + i] * x[j * k + first + c + i];
        }
        const float scale = half_to_float(scales[g]), zero = (float)zeros[g];
        for (int j = 0; j < rows; j++) {
            for (int i = 0; i < LANES; i++) total[j][i] += scale * acc[j][i];
            correction[j] += scale * zero * xsum[j * groups + g];
        }
    }
    for (int j = 0; j < rows; j++) {
        float sum = 0.0f;
        for (int i = 0; i < LANES; i++) sum += total[j][i];
        result[j] = sum - correction[j];
    }
}

/* The same in natural order, any K and group (rows padded to runs of 8 codes): unpacked into `codes` first. */
static float row_dot_natural(const uint8_t *restrict row, const uint16_t *scales, const uint8_t *zeros,
                             const float *restrict x, const float *xsum, int64_t k, int64_t groups, int64_t group,
                             int bits, float *restrict codes) {
    unpack_row(row, bits, k, codes);
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const float *c = codes + g * group, *xg = x + g * group;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < group; i++) dot += c[i] * xg[i];
        acc += half_to_float(scales[g]) * (dot - (float)zeros[g] * xsum[g]);
    }
    return acc;
}

/* y[p, :] = W_{slots[i]} x[p, :] for p in [starts[i], starts[i] + counts[i]), every item i. x float32 [P, K] in
 * blocked order when `blocked` (then the group size is a multiple of the block's codes), else natural order;
 * xsum float32 [P, K / group] (the sum of x over each group); y float32 [P, O]. Returns 0, or -1 when a buffer
 * cannot be allocated. */
int mode_gemv(int bits, int64_t out_dim, int64_t k, int64_t group, const uint8_t *qweight, const uint16_t *scales,
              const uint8_t *zeros, int64_t items, const int64_t *slots, const int64_t *starts, const int64_t *counts,
              const float *x, const float *xsum, float *y, int blocked, int threads) {
    const int64_t row_bytes = (k + 7) / 8 * bits, groups = k / group, total = items * out_dim;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *codes = blocked ? NULL : row_buffer(k);
        if (!blocked && !codes) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < total; t++) {
                const int64_t item = t / out_dim, o = t % out_dim, row = slots[item] * out_dim + o;
                const uint8_t *packed = qweight + row * row_bytes, *row_zeros = zeros + row * groups;
                const uint16_t *row_scales = scales + row * groups;
                const int64_t end = starts[item] + counts[item];
                if (!blocked) {
                    for (int64_t p = starts[item]; p < end; p++)
                        y[p * out_dim + o] = row_dot_natural(packed, row_scales, row_zeros, x + p * k, xsum + p * groups, k,
                                                             groups, group, bits, codes);
                    continue;
                }
                for (int64_t p = starts[item]; p < end; p += MAX_ROWS) {
                    const int rows = end - p < MAX_ROWS ? (int)(end - p) : MAX_ROWS;
                    const float *xp = x + p * k, *sums = xsum + p * groups;
                    float value[MAX_ROWS];
#define ROW_DOT(BITS, ROWS) row_dot_blocked(packed, row_scales, row_zeros, xp, sums, k, groups, group, BITS, ROWS, value)
#define BY_ROWS(BITS)                                                                                                   \
    switch (rows) {                                                                                                     \
    case 1: ROW_DOT(BITS, 1); break;                                                                                    \
    case 2: ROW_DOT(BITS, 2); break;                                                                                    \
    case 3: ROW_DOT(BITS, 3); break;                                                                                    \
    default: ROW_DOT(BITS, 4);                                                                                          \
    }
                    switch (bits) { /* constant widths and row counts: one specialized loop nest each */
                    case 2: BY_ROWS(2); break;
                    case 3: BY_ROWS(3); break;
                    case 4: BY_ROWS(4); break;
                    default: BY_ROWS(8);
                    }
#undef BY_ROWS
#undef ROW_DOT
                    for (int j = 0; j < rows; j++) y[(p + j) * out_dim + o] = value[j];
                }
            }
        }
        free(codes);
    }
    return failed ? -1 : 0;
}

/* The weights of one block, in natural order (out[0 .. codes in a block)), from its packed bytes. */
static inline __attribute__((always_inline)) void block_dequant(const uint8_t *restrict src, int bits, float scale,
                                                                float zero, float *restrict out) {
    float codes[8 * LANES];
    block_codes(src, bits, codes); /* plane-major; interleaved back below */
    const int per = unit_codes(bits);
    for (int i = 0; i < LANES; i++)
        for (int p = 0; p < per; p++) out[per * i + p] = (codes[p * LANES + i] - zero) * scale;
}

/* out[first .. first + n) = values, as float32 or (bfloat16 = 1) rounded to bfloat16. */
static inline void store_weights(const float *restrict values, int64_t n, int bfloat16, void *out, int64_t first) {
    if (bfloat16) {
        uint16_t *w = (uint16_t *)out + first;
        for (int64_t i = 0; i < n; i++) w[i] = float_to_bfloat16(values[i]);
    } else {
        memcpy((float *)out + first, values, (size_t)n * sizeof(float));
    }
}

/* One row of weights into out[at ..] (float32 or bfloat16), block by block; group a multiple of the block's codes. In
 * natural order, or with `permuted` in blocked order (the order of `mode_hf.native.blocked`: a matmul with inputs
 * permuted the same way gives the same product, and writing costs no interleaving). */
static inline __attribute__((always_inline)) void row_dequant_blocked(const uint8_t *restrict row, const uint16_t *scales,
                                                                     const uint8_t *zeros, int64_t groups, int64_t group,
                                                                     int bits, int bfloat16, int permuted, void *out,
                                                                     int64_t at) {
    const int64_t codes_per_block = LANES * unit_codes(bits), bytes_per_block = LANES * unit_bytes(bits);
    const int64_t blocks = group / codes_per_block;
    float values[8 * LANES];
    for (int64_t g = 0; g < groups; g++) {
        const float scale = half_to_float(scales[g]), zero = (float)zeros[g];
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t first = (g * blocks + b) * codes_per_block;
            const uint8_t *src = row + (g * blocks + b) * bytes_per_block;
            if (permuted) {
                block_codes(src, bits, values);
                for (int64_t i = 0; i < codes_per_block; i++) values[i] = (values[i] - zero) * scale;
            } else {
                block_dequant(src, bits, scale, zero, values);
            }
            store_weights(values, codes_per_block, bfloat16, out, at + first);
        }
    }
}

/* out[targets[i]] = W_{slots[i]} as float32 (bfloat16 = 0) or bfloat16 (bfloat16 = 1), out [n, O, K]; blocks when
 * the group size is a multiple of the block's codes (`blocked`; then in blocked order along K with `permuted`), else
 * row by row through unpack_row. Returns 0 or -1. */
int mode_dequant(int bits, int64_t out_dim, int64_t k, int64_t group, const uint8_t *qweight, const uint16_t *scales,
                 const uint8_t *zeros, int64_t items, const int64_t *slots, const int64_t *targets, void *out,
                 int bfloat16, int blocked, int permuted, int threads) {
    const int64_t row_bytes = (k + 7) / 8 * bits, groups = k / group, total = items * out_dim;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *codes = blocked ? NULL : row_buffer(k);
        if (!blocked && !codes) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < total; t++) {
                const int64_t item = t / out_dim, o = t % out_dim, row = slots[item] * out_dim + o;
                const uint8_t *packed = qweight + row * row_bytes, *row_zeros = zeros + row * groups;
                const uint16_t *row_scales = scales + row * groups;
                const int64_t at = (targets[item] * out_dim + o) * k;
                switch (blocked ? bits : 0) { /* constant widths and output types: specialized loop nests */
                case 2: row_dequant_blocked(packed, row_scales, row_zeros, groups, group, 2, bfloat16, permuted, out, at); continue;
                case 3: row_dequant_blocked(packed, row_scales, row_zeros, groups, group, 3, bfloat16, permuted, out, at); continue;
                case 4: row_dequant_blocked(packed, row_scales, row_zeros, groups, group, 4, bfloat16, permuted, out, at); continue;
                case 8: row_dequant_blocked(packed, row_scales, row_zeros, groups, group, 8, bfloat16, permuted, out, at); continue;
                default: break;
                }
                unpack_row(packed, bits, k, codes); /* natural order: the row's weights in place of its codes */
                for (int64_t g = 0; g < groups; g++) {
                    const float s = half_to_float(row_scales[g]), z = (float)row_zeros[g];
                    float *c = codes + g * group;
                    for (int64_t i = 0; i < group; i++) c[i] = (c[i] - z) * s;
                }
                store_weights(codes, k, bfloat16, out, at);
            }
        }
        free(codes);
    }
    return failed ? -1 : 0;
}
