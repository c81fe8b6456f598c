/* Decode attention that reads a paged KV cache in place (CPU).
 *
 * One query per sequence; a KV head's query heads are folded together (GQA), two
 * at a time, so each key and value row is read once for every two of them. Keys and values are read
 * tile by tile (16 positions of one block) straight from the cache through each
 * sequence's block table: no context is copied into a slab.
 *
 * The key cache is laid out [kv_heads, blocks, dim, block_size] (each block's keys
 * transposed), so the scores of a tile's 16 keys are the 16 lanes of one vector,
 * made by `dim` multiply-adds, with no horizontal sums; values stay
 * [kv_heads, blocks, block_size, dim], and a tile's weighted values are `dim`-wide
 * multiply-adds. Scores go through an online softmax (a running maximum and sum
 * per query head). The log-sum-exp of each query head's scores is returned too,
 * so that results over disjoint key ranges can be merged (split contexts).
 *
 * Vectors are GCC/Clang vector extensions of 16 floats: one AVX-512 register,
 * two AVX2 ones, four SSE ones. The hot function is compiled for each of those
 * (target_clones) and the loader picks what the CPU has, so a build made on one
 * x86-64 machine runs on another. The loop over (sequence, KV head) runs on
 * torch's OpenMP runtime (same soname, already loaded when this library is).
 */

#include "vectors.h"

INLINE float from_bf16(uint16_t value)
{
    uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* 16 floats from `at` (a row of the cache, float32 or bfloat16) */
INLINE v16 load16(const char *at, int bf16)
{
    if (!bf16) return *(const v16u *)at;
    v16 out;
    const uint16_t *half = (const uint16_t *)at;
    for (int i = 0; i < TILE; i++) out[i] = from_bf16(half[i]);
    return out;
}

/* One sequence, one KV head: q [group, dim] already scaled; keys [start, end) of its context;
 * keys [blocks, dim, block_size] and values [blocks, block_size, dim] of this head. Inlined once
 * per common head size, so that each copy's loops over `dim` have a constant length and a query
 * head's accumulator stays in registers. */
INLINE void attend_head_of(const float *restrict q, const char *keys, const char *values, int bf16,
                           const int64_t *table, int64_t start, int64_t end, int64_t group,
                           int64_t dim, int64_t block_size, float softcap, float *restrict out,
                           float *restrict lse)
{
    const int64_t chunks = dim / TILE, element = bf16 ? 2 : 4;
    const v16i lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 minus_infinity = (v16){0} - INFINITY;
    /* per query head: its output so far (unnormalised), the largest score so far, the sum of
     * the weights so far */
    v16 acc[group * chunks];
    float top[group], total[group];
    for (int64_t i = 0; i < group * chunks; i++) acc[i] = (v16){0};
    for (int64_t j = 0; j < group; j++) {
        top[j] = -INFINITY;
        total[j] = 0.0f;
    }
    for (int64_t tile = start - start % TILE; tile < end; tile += TILE) {
        int64_t block = table[tile / block_size], first = tile % block_size;
        const char *key_rows = keys + (block * dim * block_size + first) * element;
        const char *value_rows = values + (block * block_size + first) * dim * element;
        if (tile + TILE < end && first + TILE == block_size) {
            /* the next tile starts another block: unless it follows this one in memory, where the
             * hardware's prefetcher is already reading, ask for its rows now */
            int64_t next_block = table[(tile + TILE) / block_size];
            if (next_block != block + 1) {
                const char *next_keys = keys + next_block * dim * block_size * element;
                const char *next_values = values + next_block * block_size * dim * element;
                for (int64_t d = 0; d < dim; d++) __builtin_prefetch(next_keys + d * block_size * element);
                for (int64_t at = 0; at < TILE * dim * element; at += 64) __builtin_prefetch(next_values + at);
            }
        }
        int64_t low = start > tile ? start - tile : 0, high = end - tile < TILE ? end - tile : TILE;
        /* all ones in lanes [low, high), from sign bits (a vector comparison here crashes GCC 12
         * at -O3 when built for AVX-512) */
        v16i valid = ~((lanes - (int32_t)low) >> 31) & ((lanes - (int32_t)high) >> 31);
        /* each key row is read once for this call's query heads (one or two): their sums are
         * independent chains */
        v16 scores[group];
        for (int64_t j = 0; j < group; j++) scores[j] = (v16){0};
        for (int64_t d = 0; d < dim; d++) {
            v16 row = load16(key_rows + d * block_size * element, bf16);
            for (int64_t j = 0; j < group; j++) scores[j] += q[j * dim + d] * row;
        }
        v16 weights[group];
        for (int64_t j = 0; j < group; j++) {
            v16 s = scores[j];
            if (softcap > 0.0f)
                for (int t = 0; t < TILE; t++) s[t] = softcap * tanhf(s[t] / softcap);
            /* lanes outside [low, high) are -inf (even if their stale keys hold a NaN) */
            s = (v16)(((v16i)s & valid) | ((v16i)minus_infinity & ~valid));
            float tile_best = lane_max(s), best = tile_best > top[j] ? tile_best : top[j];
            if (best == -INFINITY) { /* no key in range yet (an empty range) */
                weights[j] = (v16){0};
                continue;
            }
            /* the running sums are rescaled only when the maximum grows, which after the first
             * tiles is rare (0 on the first tile: e^-inf) */
            if (best > top[j]) {
                float shrink = expf(top[j] - best);
                for (int64_t c = 0; c < chunks; c++) acc[j * chunks + c] *= shrink;
                total[j] *= shrink;
                top[j] = best;
            }
            weights[j] = (v16)((v16i)exp_nonpositive(s - best) & valid);
            total[j] += lane_sum(weights[j]);
        }
        /* only the rows in range: a stale row out of it may hold a NaN, and 0 * NaN is NaN */
        for (int64_t t = low; t < high; t++)
            for (int64_t c = 0; c < chunks; c++) {
                v16 row = load16(value_rows + (t * dim + c * TILE) * element, bf16);
                for (int64_t j = 0; j < group; j++) acc[j * chunks + c] += weights[j][t] * row;
            }
    }
    for (int64_t j = 0; j < group; j++) {
        float inverse = total[j] > 0.0f ? 1.0f / total[j] : 0.0f;
        for (int64_t c = 0; c < chunks; c++) *(v16u *)(out + j * dim + c * TILE) = acc[j * chunks + c] * inverse;
        if (lse) lse[j] = total[j] > 0.0f ? top[j] + logf(total[j]) : -INFINITY;
    }
}

/* The query heads of a KV head are taken two at a time: each copy of attend_head_of (one per
 * common head size, for one or two heads) then has loops of constant length and accumulators
 * that stay in registers, and a group of any size is served by a few copies (each further pair
 * reads the keys and values again, from the CPU's caches). */
CPU_CLONES static void attend_head(const float *q, const char *keys, const char *values, int bf16,
                                   const int64_t *table, int64_t start, int64_t end, int64_t group,
                                   int64_t dim, int64_t block_size, float softcap, float *out,
                                   float *lse)
{
    for (int64_t j = 0; j < group; j += 2) {
        const float *qj = q + j * dim;
        float *outj = out + j * dim, *lsej = lse ? lse + j : NULL;
        int pair = group - j >= 2;
#define HEADS(DIM, N)                                                                               \
    attend_head_of(qj, keys, values, bf16, table, start, end, N, DIM, block_size, softcap, outj, lsej)
#define PAIR(DIM)                                                                                   \
    if (pair)                                                                                       \
        HEADS(DIM, 2);                                                                              \
    else                                                                                            \
        HEADS(DIM, 1)
        switch (dim) {
        case 32: PAIR(32); break;
        case 64: PAIR(64); break;
        case 128: PAIR(128); break;
        case 256: PAIR(256); break;
        default: HEADS(dim, pair ? 2 : 1);
        }
#undef PAIR
#undef HEADS
    }
}

/* q [G, kv_heads, group, dim] float32; key_cache [kv_heads, num_blocks, dim, block_size] and
 * value_cache [kv_heads, num_blocks, block_size, dim], float32 or bfloat16 (bf16 != 0);
 * block_tables [G, table_width] (row stride table_width); key_start/key_end [G]: the keys each
 * sequence attends to, as positions in its context (an empty range gives zeros and lse -inf);
 * out [G, kv_heads, group, dim] float32; lse [G, kv_heads, group] float32, or NULL;
 * softcap <= 0: none. dim and block_size must be multiples of 16 (the caller checks). */
void paged_decode(const float *q, const void *key_cache, const void *value_cache, int bf16,
                  const int64_t *block_tables, int64_t table_width, const int64_t *key_start,
                  const int64_t *key_end, float *out, float *lse, int64_t sequences,
                  int64_t kv_heads, int64_t group, int64_t dim, int64_t num_blocks,
                  int64_t block_size, float scale, float softcap, int threads)
{
    size_t head_bytes = (size_t)num_blocks * block_size * dim * (bf16 ? 2 : 4);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t g = 0; g < sequences; g++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t at = (g * kv_heads + h) * group;
            float scaled[group * dim];
            for (int64_t i = 0; i < group * dim; i++) scaled[i] = q[at * dim + i] * scale;
            attend_head(scaled, (const char *)key_cache + h * head_bytes,
                        (const char *)value_cache + h * head_bytes, bf16,
                        block_tables + g * table_width, key_start[g], key_end[g], group, dim,
                        block_size, softcap, out + at * dim, lse ? lse + at : NULL);
        }
    }
}
