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
 *
 * Opt-in int8 activations (see "Int8 activations" below): mode_quantize_int8 rounds each group of an input row to
 * int8 with one float scale, and mode_gemv_int8 multiplies the packed codes by them exactly in int32 (AVX-512
 * VNNI: 64 multiply-adds per instruction, codes unpacked with VBMI byte shuffles), then applies the two scales and
 * the zero point per group in float32. Built only where the compiler targets those instructions.
 * mode_gemv_bf16: the same loop on bfloat16 inputs as they are (2-4-bit codes made bfloat16(1 + code / 2^bits) by bit
 * operations, products exact, float32 sums with AVX512-BF16 vdpbf16ps): the float32 matvec's arithmetic up to the
 * rounding of the sums, twice as many products per instruction.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define MODE_INT8 1
#else
#define MODE_INT8 0
#endif
#if MODE_INT8 && defined(__AVX512BF16__)
#define MODE_BF16 1
#else
#define MODE_BF16 0
#endif

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

static inline float bfloat16_to_float(uint16_t value) { /* exact: the top half of a float32 */
    const uint32_t word = (uint32_t)value << 16;
    float out;
    memcpy(&out, &word, sizeof out);
    return out;
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

#if MODE_INT8
#define INT8_CHUNK 64 /* codes per VNNI step: one 512-bit register of bytes */
#define INT8_WROWS 4  /* weight rows per step: the input chunk is loaded once for all of them */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 12288 /* ahead of the rows being read: measured best of 2-24 KB at 30B shapes */
#endif

/* 64 codes from `bits` * 8 bytes of a packed row, natural order, one per byte: byte r * bits + j of the source goes
 * to byte 8 r + j (every 64-bit lane then holds one run of 8 codes), and output byte 8 r + j takes the bits at
 * offset bits * j of its lane. */
static inline __attribute__((always_inline)) __m512i int8_lanes(const uint8_t *src, int bits, __m512i index) {
    __m512i raw; /* exactly the chunk's bytes (plain loads: masked ones are slow from memory on some CPUs) */
    switch (bits) {
    case 8: return _mm512_loadu_si512(src);
    case 4: raw = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)src)); break;
    case 3: raw = _mm512_zextsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)src)),
                                                                 _mm_loadl_epi64((const __m128i *)(src + 16)), 1)); break;
    default: raw = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)src));
    }
    return _mm512_permutexvar_epi8(index, raw); /* every 64-bit lane: the bytes of one run of 8 codes, and more */
}

/* int8_lanes, where `wide` says that 32 bytes from `src` may be read: a 3-bit chunk (24 bytes) in one load. */
static inline __attribute__((always_inline)) __m512i chunk_lanes(const uint8_t *src, int bits, __m512i index, int wide) {
    if (bits == 3 && wide) return _mm512_permutexvar_epi8(index, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)src)));
    return int8_lanes(src, bits, index);
}

static inline __attribute__((always_inline)) __m512i int8_codes(const uint8_t *src, int bits, __m512i index, __m512i shifts,
                                                                __m512i mask, int wide) {
    return bits == 8 ? _mm512_loadu_si512(src) : _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, chunk_lanes(src, bits, index, wide)), mask);
}

/* The byte-shuffle tables of int8_codes at `bits`. */
static void int8_tables(int bits, __m512i *index, __m512i *shifts) {
    uint8_t index_bytes[64], shift_bytes[64];
    for (int r = 0; r < 8; r++)
        for (int j = 0; j < 8; j++) index_bytes[8 * r + j] = (uint8_t)(r * bits + j), shift_bytes[8 * r + j] = (uint8_t)(bits * j);
    *index = _mm512_loadu_si512(index_bytes);
    *shifts = _mm512_loadu_si512(shift_bytes);
}

/* The multishift tables of the bfloat16 matvec: the low byte of word i of every 64-bit lane takes the lane's code 2i
 * (even) or 2i + 1 (odd) at bits 7 - bits .. 6 (see rows_vnni); high bytes are left to the logic op. */
static void bf16_tables(int bits, __m512i *even, __m512i *odd) {
    uint8_t even_bytes[64] = {0}, odd_bytes[64] = {0};
    for (int r = 0; r < 8; r++)
        for (int i = 0; i < 4; i++) {
            even_bytes[8 * r + 2 * i] = (uint8_t)((bits * 2 * i - 7 + bits + 64) % 64);
            odd_bytes[8 * r + 2 * i] = (uint8_t)((bits * (2 * i + 1) - 7 + bits + 64) % 64);
        }
    *even = _mm512_loadu_si512(even_bytes);
    *odd = _mm512_loadu_si512(odd_bytes);
}

/* 16 float32 as bfloat16, rounded to nearest even exactly as float_to_bfloat16. */
static inline __m256i bfloat16_of(__m512 values) {
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* One row of weights in natural order into out[at ..], 64 codes per step (VBMI unpack, as the int8 matvec): group a
 * multiple of 64. (code - zero) * scale in float32, then one rounding, as everywhere. */
static inline __attribute__((always_inline)) void row_dequant_wide(const uint8_t *restrict row, const uint16_t *scales,
                                                                  const uint8_t *zeros, int64_t groups, int64_t group,
                                                                  int bits, int bfloat16, void *out, int64_t at,
                                                                  __m512i index, __m512i shifts) {
    const __m512i mask = _mm512_set1_epi8((char)((1u << bits) - 1u));
    for (int64_t g = 0; g < groups; g++) {
        const __m512 scale = _mm512_set1_ps(half_to_float(scales[g])), offset = _mm512_set1_ps(-(float)zeros[g] * half_to_float(scales[g]));
        for (int64_t c = 0; c < group; c += INT8_CHUNK) {
            const int64_t first = g * group + c;
            const __m512i codes = int8_codes(row + first / 8 * bits, bits, index, shifts, mask, 0);
            __m512 w[4];
            for (int part = 0; part < 4; part++) /* (code - zero) * scale = code * scale - zero * scale: exact, then one rounding */
                w[part] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, part))), scale, offset);
            for (int part = 0; part < 4; part++) {
                if (!bfloat16) {
                    _mm512_storeu_ps((float *)out + at + first + 16 * part, w[part]);
                    continue;
                }
#if MODE_BF16
                if (part % 2 == 0) { /* 32 at once, rounded to nearest even as float_to_bfloat16 (values are normal) */
                    _mm512_storeu_si512((uint16_t *)out + at + first + 16 * part, (__m512i)_mm512_cvtne2ps_pbh(w[part + 1], w[part]));
                }
#else
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at + first + 16 * part), bfloat16_of(w[part]));
#endif
            }
        }
    }
}
#endif

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
#if MODE_INT8
    const int wide = !permuted && group % INT8_CHUNK == 0; /* natural order, 64 codes per step */
    __m512i index, shifts;
    int8_tables(bits, &index, &shifts);
#endif
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
#if MODE_INT8
                if (wide) {
                    switch (bits) { /* constant widths: specialized loop nests */
                    case 2: row_dequant_wide(packed, row_scales, row_zeros, groups, group, 2, bfloat16, out, at, index, shifts); continue;
                    case 3: row_dequant_wide(packed, row_scales, row_zeros, groups, group, 3, bfloat16, out, at, index, shifts); continue;
                    case 4: row_dequant_wide(packed, row_scales, row_zeros, groups, group, 4, bfloat16, out, at, index, shifts); continue;
                    default: row_dequant_wide(packed, row_scales, row_zeros, groups, group, 8, bfloat16, out, at, index, shifts); continue;
                    }
                }
#endif
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

/* Int8 activations. An input row x is cut into the weight's groups; group g of row p becomes
 *   q[p, k] = round_half_even(x[p, k] / xscale[p, g]) in [-127, 127],  xscale[p, g] = max_k |x[p, k]| / 127,
 * and xsums[p, g] = sum_k q[p, k] (as float; exact). Then, for weight row o,
 *   y[p, o] = sum_g scale[o, g] * xscale[p, g] * (sum_k code[o, k] q[p, k] - zero[o, g] * xsums[p, g]),
 * where the inner sum is exact (int32) and the rest float32. A group of zeros has scale 0; a group holding a NaN or
 * an infinity gets a NaN scale, which makes every output it touches NaN (as the float32 matvec would). */
#if MODE_INT8
/* One group of 16 * n values, vectorized: the same numbers as the scalar loop below (IEEE division, round half to
 * even, the same clamp; the sums are of small integers, exact in any order). */
static void quantize_group_wide(const float *xg, int64_t group, int8_t *qg, float *xscale, float *xsums) {
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 amax = _mm512_setzero_ps();
    __mmask16 special = 0;
    for (int64_t i = 0; i < group; i += 16) {
        const __m512 v = _mm512_loadu_ps(xg + i);
        special |= _mm512_fpclass_ps_mask(v, 0x99); /* QNaN | SNaN | +inf | -inf */
        amax = _mm512_max_ps(amax, _mm512_and_ps(v, magnitude));
    }
    const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
    if (special || scale == 0.0f) {
        memset(qg, 0, (size_t)group);
        *xscale = special ? NAN : 0.0f;
        *xsums = 0.0f;
        return;
    }
    const __m512 divisor = _mm512_set1_ps(scale), top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < group; i += 16) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xg + i), divisor), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_max_ps(_mm512_min_ps(v, top), bottom);
        sum = _mm512_add_ps(sum, v);
        _mm_storeu_si128((__m128i *)(qg + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    *xscale = scale;
    *xsums = _mm512_reduce_add_ps(sum);
}
#endif

int mode_quantize_int8(int64_t rows, int64_t k, int64_t group, const float *x, int8_t *q, float *xscale, float *xsums) {
    const int64_t groups = k / group;
    for (int64_t t = 0; t < rows * groups; t++) {
        const float *xg = x + t * group;
        int8_t *qg = q + t * group;
#if MODE_INT8
        if (group % 16 == 0) {
            quantize_group_wide(xg, group, qg, xscale + t, xsums + t);
            continue;
        }
#endif
        float amax = 0.0f;
        int finite = 1;
        for (int64_t i = 0; i < group; i++) {
            const float a = fabsf(xg[i]);
            finite &= isfinite(a) != 0;
            amax = a > amax ? a : amax;
        }
        float scale = amax / 127.0f, sum = 0.0f;
        if (!finite) {
            scale = NAN;
            memset(qg, 0, (size_t)group);
        } else if (scale == 0.0f) {
            memset(qg, 0, (size_t)group);
        } else {
            for (int64_t i = 0; i < group; i++) {
                float v = nearbyintf(xg[i] / scale); /* the default rounding mode: half to even */
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                qg[i] = (int8_t)v;
                sum += v;
            }
        }
        xscale[t] = scale;
        xsums[t] = sum;
    }
    return 0;
}

int mode_int8_available(void) { return MODE_INT8; }

#if MODE_INT8
/* y[j * out_dim + r] for `nw` (1 .. INT8_WROWS) consecutive weight rows r and `nx` (1 .. MAX_ROWS) input rows j:
 * int8 inputs `x` with their scales `xscale` (bf16 = 0), or bfloat16 inputs with xscale NULL (bf16 = 1, 2-4 bits,
 * `x` in even/odd order, see bf16_even_odd); `xsums` their group sums.
 *
 * bfloat16 codes without a lookup: the word 0x3f80 | c << (7 - bits) is bfloat16(1 + c / 2^bits) exactly (the code in
 * the top mantissa bits of 1.0), so the products (1 + c / 2^bits) x are exact in float32 and
 * sum (c - zero) x = 2^bits sum (1 + c / 2^bits) x - 2^bits (1 + zero / 2^bits) sum x: the factor is scale * 2^bits and
 * the zero point 1 + zero / 2^bits (both exact). The float32 sums then carry the inputs' sum beside the codes' (at most
 * 2^bits times larger than the code part: a few bits of the float32 sums, far below the bfloat16 output). The 16-bit
 * words of two multishifts of the chunk's lanes (bf16_tables) give its even and its odd codes with one logic op each,
 * where zero-extending and looking up took four shuffles. */
static inline __attribute__((always_inline)) void rows_vnni(int bf16, int bits, int nw, int nx, int64_t k, int64_t groups, int64_t group,
                                                            int64_t row_bytes, const uint8_t *qweight, const uint16_t *scales,
                                                            const uint8_t *zeros, const void *x, const float *xscale,
                                                            const float *xsums, float *y, int64_t out_dim, __m512i index,
                                                            __m512i shifts, __m512i odd_shifts) {
    const __m512i mask = _mm512_set1_epi8((char)((1u << bits) - 1u));
    const __m512i word_mask = _mm512_set1_epi16((short)(((1u << bits) - 1u) << (7 - bits))), one = _mm512_set1_epi16(0x3f80);
    const __m512 unit = _mm512_set1_ps((float)(1u << bits)), per_unit = _mm512_set1_ps(1.0f / (float)(1u << bits));
    const int64_t chunks = group / INT8_CHUNK;
    __m512 total[INT8_WROWS][MAX_ROWS], correction[INT8_WROWS][MAX_ROWS];
    for (int w = 0; w < nw; w++)
        for (int j = 0; j < nx; j++) total[w][j] = correction[w][j] = _mm512_setzero_ps();
    for (int64_t window = 0; window < groups; window += 16) { /* 16 groups: their factors in one register each */
        const int64_t in_window = groups - window < 16 ? groups - window : 16;
        const __mmask16 lanes = (__mmask16)((1u << in_window) - 1u);
        float factor[INT8_WROWS][MAX_ROWS][16];
        for (int w = 0; w < nw; w++) {
            const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, scales + w * groups + window));
            const __m512 code_zero = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, zeros + w * groups + window)));
            const __m512 zero = bf16 ? _mm512_fmadd_ps(code_zero, per_unit, _mm512_set1_ps(1.0f)) : code_zero;
            for (int j = 0; j < nx; j++) {
                const __m512 f = _mm512_mul_ps(scale, bf16 ? unit : _mm512_maskz_loadu_ps(lanes, xscale + j * groups + window));
                _mm512_storeu_ps(factor[w][j], f);
                correction[w][j] = _mm512_fmadd_ps(_mm512_mul_ps(f, zero), _mm512_maskz_loadu_ps(lanes, xsums + j * groups + window), correction[w][j]);
            }
        }
        for (int64_t g = 0; g < in_window; g++) {
            __m512i acc[INT8_WROWS][MAX_ROWS];
            for (int w = 0; w < nw; w++)
                for (int j = 0; j < nx; j++) acc[w][j] = _mm512_setzero_si512();
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t at = (window + g) * group + c * INT8_CHUNK;
                __m512i xv[MAX_ROWS][2];
                for (int j = 0; j < nx; j++) {
                    if (bf16) { /* 64 bfloat16: two registers */
                        xv[j][0] = _mm512_loadu_si512((const uint16_t *)x + j * k + at);
                        xv[j][1] = _mm512_loadu_si512((const uint16_t *)x + j * k + at + 32);
                    } else {
                        xv[j][0] = _mm512_loadu_si512((const int8_t *)x + j * k + at);
                    }
                }
                for (int w = 0; w < nw; w++) {
                    const uint8_t *src = qweight + w * row_bytes + at / 8 * bits;
                    const int wide = w + 1 < nw || at / 8 * bits + 32 <= row_bytes; /* the 32 bytes lie in these rows */
                    _mm_prefetch((const char *)(src + PREFETCH_BYTES), _MM_HINT_T0); /* the rows read next */
                    if (bf16) {
#if MODE_BF16
                        const __m512i lanes = chunk_lanes(src, bits, index, wide);
                        const __m512i even = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shifts, lanes), word_mask, one, 0xEA);
                        const __m512i odd = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(odd_shifts, lanes), word_mask, one, 0xEA);
                        for (int j = 0; j < nx; j++) {
                            __m512 sum = _mm512_castsi512_ps(acc[w][j]);
                            sum = _mm512_dpbf16_ps(sum, (__m512bh)even, (__m512bh)xv[j][0]);
                            acc[w][j] = _mm512_castps_si512(_mm512_dpbf16_ps(sum, (__m512bh)odd, (__m512bh)xv[j][1]));
                        }
#endif
                    } else {
                        const __m512i codes = int8_codes(src, bits, index, shifts, mask, wide);
                        for (int j = 0; j < nx; j++) acc[w][j] = _mm512_dpbusd_epi32(acc[w][j], codes, xv[j][0]);
                    }
                }
            }
            for (int w = 0; w < nw; w++)
                for (int j = 0; j < nx; j++)
                    total[w][j] = _mm512_fmadd_ps(bf16 ? _mm512_castsi512_ps(acc[w][j]) : _mm512_cvtepi32_ps(acc[w][j]),
                                                  _mm512_set1_ps(factor[w][j][g]), total[w][j]);
        }
    }
    for (int w = 0; w < nw; w++)
        for (int j = 0; j < nx; j++)
            y[j * out_dim + w] = _mm512_reduce_add_ps(_mm512_sub_ps(total[w][j], correction[w][j]));
}
#endif

#if MODE_INT8
/* Every chunk of 64 bfloat16 of rows x [rows, K] as its 32 even elements, then its 32 odd ones: the order of the even
 * and odd code words of rows_vnni (K a multiple of 64). */
static void bf16_even_odd(const void *x, int64_t rows, int64_t k, uint16_t *out) {
    const uint16_t *in = x;
    for (int64_t at = 0; at < rows * k; at += INT8_CHUNK)
        for (int i = 0; i < INT8_CHUNK / 2; i++) out[at + i] = in[at + 2 * i], out[at + INT8_CHUNK / 2 + i] = in[at + 2 * i + 1];
}

/* The matvec loop of mode_gemv_int8 (bf16 = 0: x int8, xscale its scales) and mode_gemv_bf16 (bf16 = 1: x bfloat16,
 * xscale NULL; `ordered`: x already in even/odd order). Returns 0, or -1 when the reordered bfloat16 inputs find no
 * memory. */
static int gemv_vnni(int bf16, int bits, int64_t out_dim, int64_t k, int64_t group, const uint8_t *qweight,
                      const uint16_t *scales, const uint8_t *zeros, int64_t items, const int64_t *slots,
                      const int64_t *starts, const int64_t *counts, const void *x, const float *xscale, const float *xsums,
                      float *y, int threads, int ordered) {
    const int64_t row_bytes = (k + 7) / 8 * bits, groups = k / group, blocks = (out_dim + INT8_WROWS - 1) / INT8_WROWS;
    const int64_t total = items * blocks, element = bf16 ? 2 : 1;
    __m512i index, shifts, odd_shifts = _mm512_setzero_si512();
    int8_tables(bits, &index, &shifts);
    if (bf16) bf16_tables(bits, &shifts, &odd_shifts); /* even codes (shifts) and odd ones */
    uint16_t *even_odd = NULL; /* bfloat16 inputs in the order the codes come out, see bf16_even_odd */
    if (bf16 && !ordered) {
        int64_t rows = 0;
        for (int64_t i = 0; i < items; i++) rows = starts[i] + counts[i] > rows ? starts[i] + counts[i] : rows;
        even_odd = malloc((size_t)(rows * k) * sizeof *even_odd + 1);
        if (!even_odd) return -1;
        bf16_even_odd(x, rows, k, even_odd);
        x = even_odd;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < total; t++) {
        const int64_t item = t / blocks, o = t % blocks * INT8_WROWS, row = slots[item] * out_dim + o;
        const int nw = out_dim - o < INT8_WROWS ? (int)(out_dim - o) : INT8_WROWS;
        const uint8_t *packed = qweight + row * row_bytes, *row_zeros = zeros + row * groups;
        const uint16_t *row_scales = scales + row * groups;
        const int64_t end = starts[item] + counts[item];
        for (int64_t p = starts[item]; p < end; p += MAX_ROWS) {
            const int nx = end - p < MAX_ROWS ? (int)(end - p) : MAX_ROWS;
            const void *xp = (const char *)x + p * k * element;
            const float *sp = bf16 ? NULL : xscale + p * groups, *up = xsums + p * groups;
            float *yp = y + p * out_dim + o;
#define ROWS(BF16, BITS, NW, NX, W)                                                                                     \
    rows_vnni(BF16, BITS, NW, NX, k, groups, group, row_bytes, packed + (W) * row_bytes, row_scales + (W) * groups,     \
              row_zeros + (W) * groups, xp, sp, up, yp + (W), out_dim, index, shifts, odd_shifts)
#define BY_NX(BF16, BITS, NW, W)                                                                                        \
    switch (nx) {                                                                                                       \
    case 1: ROWS(BF16, BITS, NW, 1, W); break;                                                                          \
    case 2: ROWS(BF16, BITS, NW, 2, W); break;                                                                          \
    case 3: ROWS(BF16, BITS, NW, 3, W); break;                                                                          \
    default: ROWS(BF16, BITS, NW, 4, W);                                                                                \
    }
#define BY_NW(BF16, BITS)                                                                                               \
    if (nw == INT8_WROWS) {                                                                                             \
        BY_NX(BF16, BITS, INT8_WROWS, 0)                                                                                \
    } else {                                                                                                            \
        for (int w = 0; w < nw; w++) BY_NX(BF16, BITS, 1, w) /* the last rows of an odd output dim, one by one */      \
    }
            if (bf16) {
                switch (bits) { /* 2-4 bits (the callers' contract) */
                case 2: BY_NW(1, 2); break;
                case 3: BY_NW(1, 3); break;
                default: BY_NW(1, 4);
                }
            } else {
                switch (bits) {
                case 2: BY_NW(0, 2); break;
                case 3: BY_NW(0, 3); break;
                case 4: BY_NW(0, 4); break;
                default: BY_NW(0, 8);
                }
            }
#undef BY_NW
#undef BY_NX
#undef ROWS
        }
    }
    free(even_odd);
    return 0;
}
#endif

/* mode_gemv on int8 activations: y[p, o] for p in [starts[i], starts[i] + counts[i]) of every item i, from q int8
 * [P, K], xscale and xsums float32 [P, K / group] (mode_quantize_int8), natural order at every width; the group size
 * a multiple of 64. Returns 0, or -2 when this build has no int8 kernel (see mode_int8_available). */
int mode_gemv_int8(int bits, int64_t out_dim, int64_t k, int64_t group, const uint8_t *qweight, const uint16_t *scales,
                   const uint8_t *zeros, int64_t items, const int64_t *slots, const int64_t *starts, const int64_t *counts,
                   const int8_t *q, const float *xscale, const float *xsums, float *y, int threads) {
#if MODE_INT8
    return gemv_vnni(0, bits, out_dim, k, group, qweight, scales, zeros, items, slots, starts, counts, q, xscale, xsums, y, threads, 0);
#else
    (void)bits, (void)out_dim, (void)k, (void)group, (void)qweight, (void)scales, (void)zeros, (void)items, (void)slots;
    (void)starts, (void)counts, (void)q, (void)xscale, (void)xsums, (void)y, (void)threads;
    return -2;
#endif
}

int mode_bf16_available(void) { return MODE_BF16; }

/* mode_gemv on bfloat16 inputs x [P, K] in natural order (xsums: their float32 group sums), 2-4-bit weights, the
 * group size a multiple of 64: the float32 matvec's numbers up to the order of the float32 sums. Returns 0, -2 when
 * this build has no such kernel (mode_bf16_available), -3 for 8-bit weights. */
int mode_gemv_bf16(int bits, int64_t out_dim, int64_t k, int64_t group, const uint8_t *qweight, const uint16_t *scales,
                   const uint8_t *zeros, int64_t items, const int64_t *slots, const int64_t *starts, const int64_t *counts,
                   const uint16_t *x, const float *xsums, float *y, int threads) {
    if (bits == 8) return -3;
#if MODE_BF16
    return gemv_vnni(1, bits, out_dim, k, group, qweight, scales, zeros, items, slots, starts, counts, x, NULL, xsums, y, threads, 0);
#else
    (void)out_dim, (void)k, (void)group, (void)qweight, (void)scales, (void)zeros, (void)items, (void)slots;
    (void)starts, (void)counts, (void)x, (void)xsums, (void)y, (void)threads;
    return -2;
#endif
}

#if MODE_BF16
/* One bfloat16 row [k] in even/odd order into `out` and its float32 group sums into `sums`. */
static void prepare_row(const uint16_t *row, int64_t k, int64_t group, uint16_t *out, float *sums) {
    bf16_even_odd(row, 1, k, out);
    for (int64_t g = 0; g < k / group; g++) {
        float sum = 0.0f;
        for (int64_t i = 0; i < group; i++) sum += bfloat16_to_float(row[g * group + i]);
        sums[g] = sum;
    }
}

/* The matvec of one projection over every routed pair, width by width; the pairs sorted by expert (pair_expert). */
static int project(int64_t pairs, const int64_t *pair_expert, const int64_t *expert_bits, const int64_t *expert_slot,
                   int64_t out_dim, int64_t k, int64_t group, const uint8_t *const *qweight, const uint16_t *const *scales,
                   const uint8_t *const *zeros, const uint16_t *x, const float *xsums, float *y, int64_t *work, int threads) {
    int64_t *slots = work, *starts = work + pairs, *counts = work + 2 * pairs;
    for (int bits = 2; bits <= 4; bits++) {
        int64_t items = 0;
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t e = pair_expert[p];
            if (expert_bits[e] != bits) continue;
            if (items && slots[items - 1] == expert_slot[e] && starts[items - 1] + counts[items - 1] == p) {
                counts[items - 1]++;
            } else {
                slots[items] = expert_slot[e], starts[items] = p, counts[items] = 1, items++;
            }
        }
        if (items && gemv_vnni(1, bits, out_dim, k, group, qweight[bits], scales[bits], zeros[bits], items, slots, starts,
                               counts, x, NULL, xsums, y, threads, 1))
            return -1;
    }
    return 0;
}
#endif

/* One MoE block at decode on bfloat16 hidden states x [T, H]: the routed experts (top_k_index [T, top_k], weights
 * float32 [T, top_k]; ids outside [0, experts) are empty slots) at their own widths 2-4 (expert_bits, expert_slot
 * [experts]; qweight/scales/zeros of each projection indexed by width), gate/up, silu(gate) * up rounded to bfloat16
 * (as the 16-bit module rounds its activation), down, each output rounded to bfloat16 and summed with its routing
 * weight in float32 per token; out [T, H] bfloat16. Group sizes multiples of 64. Returns 0, -1 (no memory), -2 (no
 * bfloat16 matvec in this build). */
int mode_moe_bf16(int64_t tokens, int64_t top_k, int64_t hidden, int64_t inter, int64_t experts, int64_t group_up,
                  int64_t group_down, const uint16_t *x, const int64_t *top_k_index, const float *top_k_weights,
                  const int64_t *expert_bits, const int64_t *expert_slot, const uint8_t *const *up_q,
                  const uint16_t *const *up_s, const uint8_t *const *up_z, const uint8_t *const *down_q,
                  const uint16_t *const *down_s, const uint8_t *const *down_z, uint16_t *out, int threads) {
#if MODE_BF16
    const int64_t slots_total = tokens * top_k;
    int64_t *pair = malloc((size_t)(6 * slots_total + experts + 2) * sizeof *pair);
    uint16_t *xg = malloc((size_t)(slots_total * (hidden + inter) + 1) * sizeof *xg);
    float *sums = malloc((size_t)(slots_total * (hidden / group_up + inter / group_down) + 1) * sizeof *sums);
    float *y = malloc((size_t)(slots_total * (2 * inter + hidden) + tokens * hidden + 1) * sizeof *y);
    int status = pair && xg && sums && y ? 0 : -1;
    if (!status) {
        int64_t *pair_slot = pair, *pair_expert = pair + slots_total, *work = pair + 2 * slots_total;
        int64_t *first = pair + 5 * slots_total, pairs = 0; /* first[e]: where expert e's pairs start (counting sort) */
        for (int64_t e = 0; e <= experts; e++) first[e] = 0;
        for (int64_t s = 0; s < slots_total; s++)
            if (top_k_index[s] >= 0 && top_k_index[s] < experts) first[top_k_index[s] + 1]++, pairs++;
        for (int64_t e = 0; e < experts; e++) first[e + 1] += first[e];
        for (int64_t s = 0; s < slots_total; s++) /* stable: slot order within an expert */
            if (top_k_index[s] >= 0 && top_k_index[s] < experts) {
                const int64_t at = first[top_k_index[s]]++;
                pair_slot[at] = s, pair_expert[at] = top_k_index[s];
            }
        uint16_t *xu = xg, *xd = xg + pairs * hidden;
        float *su = sums, *sd = sums + pairs * (hidden / group_up);
        float *yu = y, *yd = y + pairs * 2 * inter, *acc = y + pairs * (2 * inter + hidden);
        for (int64_t p = 0; p < pairs; p++)
            prepare_row(x + pair_slot[p] / top_k * hidden, hidden, group_up, xu + p * hidden, su + p * (hidden / group_up));
        status = project(pairs, pair_expert, expert_bits, expert_slot, 2 * inter, hidden, group_up, up_q, up_s, up_z, xu,
                         su, yu, work, threads);
        if (!status) {
            uint16_t *h = (uint16_t *)(yd); /* the activation, natural order, before its even/odd copy (yd is free) */
            for (int64_t p = 0; p < pairs; p++) {
                for (int64_t i = 0; i < inter; i++) {
                    const float gate = yu[p * 2 * inter + i], up = yu[p * 2 * inter + inter + i];
                    h[i] = float_to_bfloat16(gate / (1.0f + expf(-gate)) * up);
                }
                prepare_row(h, inter, group_down, xd + p * inter, sd + p * (inter / group_down));
            }
            status = project(pairs, pair_expert, expert_bits, expert_slot, hidden, inter, group_down, down_q, down_s, down_z,
                             xd, sd, yd, work, threads);
        }
        if (!status) {
            for (int64_t i = 0; i < tokens * hidden; i++) acc[i] = 0.0f;
            for (int64_t p = 0; p < pairs; p++) {
                const float weight = top_k_weights[pair_slot[p]];
                float *row = acc + pair_slot[p] / top_k * hidden;
                for (int64_t i = 0; i < hidden; i++) row[i] += weight * bfloat16_to_float(float_to_bfloat16(yd[p * hidden + i]));
            }
            for (int64_t i = 0; i < tokens * hidden; i++) out[i] = float_to_bfloat16(acc[i]);
        }
    }
    free(pair), free(xg), free(sums), free(y);
    return status;
#else
    (void)tokens, (void)top_k, (void)hidden, (void)inter, (void)experts, (void)group_up, (void)group_down, (void)x;
    (void)top_k_index, (void)top_k_weights, (void)expert_bits, (void)expert_slot, (void)up_q, (void)up_s, (void)up_z;
    (void)down_q, (void)down_s, (void)down_z, (void)out, (void)threads;
    return -2;
#endif
}
