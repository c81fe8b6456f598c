/* Sampling a batch's rows of logits (CPU): temperature, min-p, top-k, top-p and the draw, in a
 * few passes over each row, without sorting the vocabulary.
 *
 * Torch does it in a dozen operators over [rows, vocab]: each a pass at a few ns an element,
 * and top-p's sort of the vocabulary costs about 3 ms for 64 rows of 1,024 and 0.8 s for 64
 * rows of 152,000 here, more than the forward pass. A row here is: its maximum; its weights
 * e^((logit - max) / T) (the likeliest token's is 1, so min-p keeps weights >= min_p); top-k
 * and top-p as thresholds on the weights, found by selection as quickselect finds a median;
 * then one uniform number u walks the cumulative weights to the token whose interval holds
 * u * their sum (inverse-CDF sampling, as the torch path does). Ties at a threshold are all
 * kept. Tokens of weight 0 (a logit of -inf, or cut) are never drawn.
 *
 * Rows are independent: OpenMP over rows, on torch's runtime (see paged_decode.c).
 */

#include <float.h>
#include <stdlib.h>

#include "vectors.h"

/* Selection: the value at or above which `values` [n] hold `mass` (sum >= mass) with as few
 * values as possible (top-p); or, with mass < 0, the -mass-th largest value (top-k). `scratch`
 * holds n floats. Expected time linear in n. */
INLINE float select_threshold(const float *values, int64_t n, double mass, float *scratch)
{
    memmove(scratch, values, (size_t)n * sizeof(float));
    float *candidates = scratch;
    double needed = mass;                            /* top-p: mass still to cover */
    int64_t wanted = mass < 0 ? (int64_t)-mass : 0; /* top-k: values still to take */
    while (n > 0) {
        /* median of three as the pivot: sorted or peaked rows split well too */
        float a = candidates[0], b = candidates[n / 2], c = candidates[n - 1];
        float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        /* [0, above) > pivot, [above, below) == pivot, [below, n) < pivot */
        int64_t above = 0, at = 0, below = n;
        double above_sum = 0.0;
        while (at < below) {
            float value = candidates[at];
            if (value > pivot) {
                candidates[at] = candidates[above];
                candidates[above++] = value;
                above_sum += value;
                at++;
            } else if (value < pivot) {
                candidates[at] = candidates[--below];
                candidates[below] = value;
            } else {
                at++;
            }
        }
        int64_t equal = below - above;
        if (wanted) { /* top-k */
            if (above >= wanted) {
                n = above;
            } else if (above + equal >= wanted) {
                return pivot;
            } else {
                wanted -= above + equal;
                candidates += below;
                n -= below;
            }
            continue;
        }
        if (above_sum >= needed) { /* top-p: the threshold is above the pivot */
            n = above;
            continue;
        }
        double with_pivot = above_sum + (double)pivot * (double)equal;
        if (with_pivot >= needed) return pivot;
        needed -= with_pivot; /* everything at or above the pivot is kept: the rest lies below */
        candidates += below;
        n -= below;
    }
    return 0.0f; /* the candidates ran out (rounding, p near 1): every value is kept */
}

#define BUCKET_SHIFT 20 /* a weight's bucket: its top bits (exponent and 3 mantissa bits) */
#define BUCKETS (1 << (31 - BUCKET_SHIFT))

INLINE uint32_t bucket_of(float weight)
{
    uint32_t bits;
    memcpy(&bits, &weight, sizeof bits);
    return bits >> BUCKET_SHIFT; /* weights are >= 0: the sign bit is 0, and the order is kept */
}

#define HISTOGRAMS 4 /* weight i counts in histogram i % 4 (below) */

/* The threshold of `weights` [n] (>= 0), as select_threshold's (mass >= 0: top-p; < 0: top-k),
 * narrowed first by one pass of a histogram over buckets of the weights' top bits (branch-free,
 * unlike a partition), so that selection runs on the one bucket the threshold falls in.
 * `scratch` holds n floats. */
INLINE float threshold_of(const float *weights, int64_t n, double mass, float *scratch)
{
    /* Weights are e^x for x <= 0: at most 1, so the buckets above 1's are never used, and those
     * below the smallest positive weight's neither (weights of 0 all go to the one below it).
     * Four histograms, not one: in a flat row most weights fall in a few buckets, and adding
     * each to the bucket the one before it just changed waits for that change. */
    static _Thread_local double bucket_mass[HISTOGRAMS][BUCKETS];
    static _Thread_local int32_t bucket_count[HISTOGRAMS][BUCKETS];
    const uint32_t highest = bucket_of(1.0f);
    const v16 zero = (v16){0}; /* compared with a vector: GCC splits a compare with a scalar */
    v16 smallest16 = zero + 1.0f;
    int64_t i = 0;
    for (; i + TILE <= n; i += TILE) {
        v16 w = *(const v16u *)(weights + i);
        v16i positive = w > zero; /* (and of two compares GCC splits into scalar ones too) */
        v16 candidate = (v16)((positive & (v16i)w) | (~positive & (v16i)(zero + 1.0f)));
        v16i lower = candidate < smallest16;
        smallest16 = (v16)((lower & (v16i)candidate) | (~lower & (v16i)smallest16));
    }
    float smallest = -lane_max(-smallest16);
    for (; i < n; i++) smallest = weights[i] > 0.0f && weights[i] < smallest ? weights[i] : smallest;
    const uint32_t base = bucket_of(smallest) - 1; /* bucket_of(1e-38) >= 1: no wrap */
    const size_t used = highest - base + 1;
    const int top_k = mass < 0;
    for (int h = 0; h < HISTOGRAMS; h++) {
        if (top_k)
            memset(bucket_count[h], 0, used * sizeof(int32_t));
        else
            memset(bucket_mass[h], 0, used * sizeof(double));
    }
#define SLOT(w) (bucket_of(w) > base ? bucket_of(w) - base : 0)
    if (top_k) {
        for (i = 0; i + HISTOGRAMS <= n; i += HISTOGRAMS)
            for (int h = 0; h < HISTOGRAMS; h++) bucket_count[h][SLOT(weights[i + h])]++;
        for (; i < n; i++) bucket_count[0][SLOT(weights[i])]++;
    } else {
        for (i = 0; i + HISTOGRAMS <= n; i += HISTOGRAMS)
            for (int h = 0; h < HISTOGRAMS; h++) bucket_mass[h][SLOT(weights[i + h])] += weights[i + h];
        for (; i < n; i++) bucket_mass[0][SLOT(weights[i])] += weights[i];
    }
#undef SLOT
    double needed = mass;
    int64_t wanted = top_k ? (int64_t)-mass : 0;
    int64_t slot = (int64_t)used - 1;
    for (; slot > 0; slot--) { /* from the heaviest bucket down, to the one where the set is complete */
        double slot_mass = 0.0;
        int64_t slot_count = 0;
        for (int h = 0; h < HISTOGRAMS; h++) {
            if (top_k)
                slot_count += bucket_count[h][slot];
            else
                slot_mass += bucket_mass[h][slot];
        }
        if (top_k ? slot_count >= wanted : slot_mass >= needed) break;
        wanted -= slot_count;
        needed -= slot_mass;
    }
    if (slot == 0) return 0.0f; /* every positive weight is needed (rounding, p near 1) */
    const uint32_t b = base + (uint32_t)slot;
    int64_t m = 0;
    for (i = 0; i < n; i++) {
        scratch[m] = weights[i];
        m += bucket_of(weights[i]) == b;
    }
    /* the bucket's values, selected exactly (in place in scratch: select_threshold copies) */
    return select_threshold(scratch, m, top_k ? -(double)wanted : needed, scratch + m);
}

/* weights below `threshold` to 0 (a blend the compiler vectorises) */
INLINE void cut_below(float *weights, int64_t vocab, float threshold)
{
    for (int64_t i = 0; i < vocab; i++) weights[i] = weights[i] < threshold ? 0.0f : weights[i];
}

/* The sum of each tile of TILE weights (tiles [vocab / TILE], the last maybe short), and of all. */
INLINE double tile_sums(const float *weights, int64_t vocab, double *tiles)
{
    double total = 0.0;
    int64_t t = 0, i = 0;
    for (; i + TILE <= vocab; i += TILE, t++) {
        tiles[t] = lane_sum(*(const v16u *)(weights + i));
        total += tiles[t];
    }
    if (i < vocab) {
        double rest = 0.0;
        for (; i < vocab; i++) rest += weights[i];
        tiles[t] = rest;
        total += rest;
    }
    return total;
}

/* The largest of row [n]; *bad set when it holds NaN or a value above `ceiling` (FLT_MAX: +inf
 * is bad too; INFINITY: NaN alone). */
INLINE float row_maximum(const float *row, int64_t n, float ceiling, int *bad)
{
    const v16 largest = (v16){0} + ceiling;
    v16 best16 = (v16){0} - INFINITY;
    v16i bad16 = (v16i){0};
    int64_t i = 0;
    for (; i + TILE <= n; i += TILE) {
        v16 x = *(const v16u *)(row + i);
        /* NaN or above the ceiling: not <= it (written so, GCC keeps it one vector compare; x != x
         * or integer compares on the bits it splits into 16 scalar ones) */
        bad16 |= ~(x <= largest);
        v16i larger = x > best16;
        best16 = (v16)((larger & (v16i)x) | (~larger & (v16i)best16));
    }
    float best = lane_max(best16);
    for (int t = 0; t < TILE; t++) *bad |= bad16[t] != 0;
    for (; i < n; i++) {
        float value = row[i];
        *bad |= !(value <= ceiling);
        best = value > best ? value : best;
    }
    return best;
}

/* One row; -1 when it cannot be sampled (NaN or an infinite logit). `scratch` holds 2 * vocab
 * floats, `tiles` vocab / TILE + 1 doubles. */
CPU_CLONES static int64_t sample_row(const float *logits, int64_t vocab, float temperature, int64_t top_k,
                                     float top_p, float min_p, double uniform, float *weights, float *scratch,
                                     double *tiles)
{
    int bad = 0;
    float best = row_maximum(logits, vocab, FLT_MAX, &bad);
    if (bad) return -1;
    int64_t i;
    if (best == -INFINITY) return -1; /* nothing can be drawn */
    const float scale = 1.0f / temperature;
    const v16 floor_ = (v16){0} - 87.0f;
    for (i = 0; i + TILE <= vocab; i += TILE) {
        v16 x = (*(const v16u *)(logits + i) - best) * scale;
        /* below -87 (a logit of -inf among them) the weight is 0, not e^-87 */
        *(v16u *)(weights + i) = (v16)((v16i)exp_nonpositive(x) & (x >= floor_));
    }
    for (; i < vocab; i++) {
        float x = (logits[i] - best) * scale;
        weights[i] = x >= -87.0f ? expf(x) : 0.0f;
    }
    if (min_p > 0.0f) cut_below(weights, vocab, min_p); /* p / p_max is the weight */
    if (top_k > 0 && top_k < vocab) cut_below(weights, vocab, threshold_of(weights, vocab, -(double)top_k, scratch));
    double total = tile_sums(weights, vocab, tiles);
    if (top_p < 1.0f) {
        cut_below(weights, vocab, threshold_of(weights, vocab, (double)top_p * total, scratch));
        total = tile_sums(weights, vocab, tiles);
    }
    /* the draw: the tile whose interval holds u * total, then the token within it */
    double target = uniform * total, running = 0.0;
    int64_t tiles_count = (vocab + TILE - 1) / TILE, t = 0, last = -1;
    for (; t < tiles_count; t++) {
        if (tiles[t] > 0.0) last = t;
        if (running + tiles[t] > target && tiles[t] > 0.0) break;
        running += tiles[t];
    }
    if (t == tiles_count) t = last; /* rounding left the target at the very end */
    if (t < 0) return -1;
    int64_t end = (t + 1) * TILE < vocab ? (t + 1) * TILE : vocab, chosen = -1;
    for (i = t * TILE; i < end; i++) {
        if (weights[i] <= 0.0f) continue;
        chosen = i;
        running += weights[i];
        if (running > target) break;
    }
    return chosen;
}

/* A greedy row's token: the first of its largest logits (as torch's argmax), -1 if it holds NaN. */
CPU_CLONES static int64_t greedy_row(const float *logits, int64_t vocab)
{
    int bad = 0;
    const float best = row_maximum(logits, vocab, INFINITY, &bad);
    if (bad) return -1;
    int64_t i = 0;
    while (i < vocab - 1 && logits[i] != best) i++;
    return i;
}

/* --- penalties and log-probabilities: the other passes over a row the sampler needs ----------- */

/* vLLM's penalties, in place, on rows[r] of logits [*, vocab], from row counts_rows[r] of
 * output_counts [*, vocab] (float) and prompt_mask [*, vocab] (bool): a token in the prompt or
 * the output has its logit divided by the repetition penalty if positive, multiplied if not;
 * then it loses the frequency penalty per time generated and the presence penalty once.
 * penalties [rows, 3]: repetition, frequency, presence. */
/* One row of apply_penalties (below), compiled for each vector width like the sampler. */
CPU_CLONES static void penalise_row(float *row, int64_t vocab, const float *counts, const uint8_t *prompt,
                                    float repetition, float frequency, float presence)
{
    for (int64_t i = 0; i < vocab; i++) {
        float value = row[i], count = counts[i];
        int generated = count > 0.0f;
        float repeated = value > 0.0f ? value / repetition : value * repetition;
        value = prompt[i] | generated ? repeated : value;
        row[i] = value - frequency * count - (generated ? presence : 0.0f);
    }
}

/* A grammar's token bitmask (xgrammar's layout: bit i % 32 of word i / 32 set for an allowed
 * token), in place: every token it does not allow gets -inf. */
CPU_CLONES static void mask_row(float *row, int64_t vocab, const int32_t *mask)
{
    for (int64_t word = 0; word * 32 < vocab; word++) {
        const uint32_t bits = (uint32_t)mask[word];
        if (bits == 0xFFFFFFFFu) continue;
        const int64_t end = vocab - word * 32 < 32 ? vocab - word * 32 : 32;
        float *at = row + word * 32;
        for (int64_t b = 0; b < end; b++) at[b] = (bits >> b) & 1u ? at[b] : -INFINITY;
    }
}

void apply_penalties(float *logits, int64_t rows, int64_t vocab, const int64_t *logit_rows,
                     const float *output_counts, const uint8_t *prompt_mask, const int64_t *counts_rows,
                     const float *penalties, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; r++)
        penalise_row(logits + logit_rows[r] * vocab, vocab, output_counts + counts_rows[r] * vocab,
                     prompt_mask + counts_rows[r] * vocab, penalties[3 * r], penalties[3 * r + 1],
                     penalties[3 * r + 2]);
}

typedef struct {
    float value;
    int64_t index;
} ranked;

#define SMALL_TOP 32 /* up to this many likeliest tokens are kept by insertion, not selection */

static int by_value_descending(const void *a, const void *b)
{
    float x = ((const ranked *)a)->value, y = ((const ranked *)b)->value;
    int64_t i = ((const ranked *)a)->index, j = ((const ranked *)b)->index;
    return x > y ? -1 : x < y ? 1 : (i > j) - (i < j); /* ties: the lower id first, as topk */
}

/* log(sum(e^row)), the log-softmax's normaliser, with the weights e^(row - max) in `weights`
 * [vocab] (row_top reads them). */
INLINE float row_log_total(const float *row, int64_t vocab, float *weights)
{
    int bad = 0;
    const float most = row_maximum(row, vocab, INFINITY, &bad); /* a NaN makes the logprobs NaN anyway */
    const v16 floor_ = (v16){0} - 87.0f;
    double total = 0.0;
    v16 partial = (v16){0};
    int64_t i = 0;
    for (; i + TILE <= vocab; i += TILE) {
        v16 x = *(const v16u *)(row + i) - most;
        v16 w = (v16)((v16i)exp_nonpositive(x) & (x >= floor_));
        *(v16u *)(weights + i) = w;
        partial += w;
        if ((i / TILE) % 8 == 7) { /* into the double sum every 128 weights: few lane sums */
            total += lane_sum(partial);
            partial = (v16){0};
        }
    }
    total += lane_sum(partial);
    for (; i < vocab; i++) {
        float x = row[i] - most;
        weights[i] = x >= -87.0f ? expf(x) : 0.0f;
        total += weights[i];
    }
    return most + (float)log(total);
}

/* The row's `top` likeliest tokens, best first, into best[0, top) (ties: the lower id first);
 * their count (fewer than top only where fewer tokens are possible at all). `weights` as
 * row_log_total left them; `scratch` holds 2 * vocab floats; best holds vocab entries when top >
 * SMALL_TOP, else top. */
INLINE int64_t row_top(const float *row, int64_t vocab, int64_t top, const float *weights, float *scratch,
                       ranked *best)
{
    int64_t found = 0, i;
    if (top <= 0) return 0;
    if (top <= SMALL_TOP || top >= vocab) {
        /* a few: one pass keeps the best so far in order; once there are `top` of them, a tile
         * whose largest logit does not beat the last is skipped whole (most are) */
        for (i = 0; i < vocab; i++) {
            if (found == top && i % TILE == 0 && i + TILE <= vocab &&
                !(lane_max(*(const v16u *)(row + i)) > best[top - 1].value)) {
                i += TILE - 1;
                continue;
            }
            if (found == top && !(row[i] > best[top - 1].value)) continue;
            int64_t at = found < top ? found++ : top - 1;
            while (at > 0 && row[i] > best[at - 1].value) {
                best[at] = best[at - 1];
                at--;
            }
            best[at] = (ranked){row[i], i};
        }
        return found;
    }
    /* many: the top-th largest weight by selection (0 if fewer are above e^-87: then all of
     * them), the tokens at or above it sorted by logit */
    float threshold = threshold_of(weights, vocab, -(double)top, scratch);
    for (i = 0; i < vocab; i++)
        if (weights[i] >= threshold) best[found++] = (ranked){row[i], i};
    qsort(best, (size_t)found, sizeof(ranked), by_value_descending);
    return found < top ? found : top;
}

/* Row r's top list into top_ids, top_logprobs [*, width] (-inf past what was found). */
INLINE void write_top(const ranked *best, int64_t found, float log_total, int64_t width, int64_t r,
                      int64_t *top_ids, float *top_logprobs)
{
    for (int64_t k = 0; k < width; k++) {
        top_ids[r * width + k] = k < found ? best[k].index : 0;
        top_logprobs[r * width + k] = k < found ? best[k].value - log_total : -INFINITY;
    }
}

/* The log-probability and rank (1: the likeliest) of `token` in the row. */
INLINE void token_score(const float *row, int64_t vocab, int64_t token, float log_total, float *logprob,
                        int64_t *rank)
{
    const float mine = row[token];
    v16i above16 = (v16i){0};
    int64_t i = 0;
    for (; i + TILE <= vocab; i += TILE) above16 -= *(const v16u *)(row + i) > mine;
    int64_t above = 0;
    for (int t = 0; t < TILE; t++) above += above16[t];
    for (; i < vocab; i++) above += row[i] > mine;
    *logprob = mine - log_total;
    *rank = above + 1;
}

/* Log-probabilities of rows of logits [rows, vocab] (log-softmax), without writing them out:
 * for row r, the log-probability and rank (1: the likeliest) of tokens[r], and its `top`
 * likeliest tokens with theirs (top_ids, top_logprobs [rows, top]), found by selection. */
CPU_CLONES void token_logprobs(const float *logits, int64_t rows, int64_t vocab, const int64_t *tokens, int64_t top,
                               float *chosen, int64_t *rank, int64_t *top_ids, float *top_logprobs, int threads)
{
#pragma omp parallel num_threads(threads) if (threads > 1 && rows > 1)
    {
        float *weights = malloc(3 * (size_t)vocab * sizeof(float)); /* and threshold_of's scratch */
        ranked *best = malloc((size_t)vocab * sizeof(ranked));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *row = logits + r * vocab;
            if (weights == NULL || best == NULL) {
                chosen[r] = NAN;
                continue;
            }
            const float log_total = row_log_total(row, vocab, weights);
            token_score(row, vocab, tokens[r], log_total, chosen + r, rank + r);
            int64_t found = row_top(row, vocab, top, weights, weights + vocab, best);
            write_top(best, found, log_total, top, r, top_ids, top_logprobs);
        }
        free(weights);
        free(best);
    }
}

/* --- a step's rows, all that a row's sampling does in one call --------------------------------- */

#define PARAMS 8 /* float64 a row in sample_rows' params */

/* One row of sample_rows, scored (logprob non-NULL) into row `scored` of top_ids and
 * top_logprobs; `buffers` holds 4 * vocab floats, `best` vocab entries, `tiles` vocab / TILE + 1
 * doubles. */
CPU_CLONES static void choose_row(float *row, int64_t vocab, const double *p, double uniform, int has_uniform,
                                  const float *counts, const uint8_t *prompt, const int32_t *mask, int64_t *token,
                                  float *logprob,
                                  int64_t *rank, int64_t *top_ids, float *top_logprobs, int64_t width,
                                  int64_t scored, float *buffers, ranked *best, double *tiles)
{
    const int64_t top = logprob == NULL ? -1 : (int64_t)p[4];
    const float *raw = row;
    float log_total = 0.0f;
    if (top >= 0) { /* from the raw logits, before the penalties change them */
        log_total = row_log_total(row, vocab, buffers);
        write_top(best, row_top(row, vocab, top, buffers, buffers + vocab, best), log_total, width, scored,
                  top_ids, top_logprobs);
        if (counts != NULL || mask != NULL) { /* the raw row, kept for the token's score */
            memcpy(buffers + 3 * vocab, row, (size_t)vocab * sizeof(float));
            raw = buffers + 3 * vocab;
        }
    }
    if (mask != NULL) mask_row(row, vocab, mask);
    if (counts != NULL) penalise_row(row, vocab, counts, prompt, (float)p[5], (float)p[6], (float)p[7]);
    if (p[0] <= 0.0)
        *token = greedy_row(row, vocab);
    else if (!has_uniform)
        *token = -1;
    else
        *token = sample_row(row, vocab, (float)p[0], (int64_t)p[1], (float)p[2], (float)p[3], uniform, buffers,
                            buffers + vocab, tiles);
    if (top >= 0 && *token >= 0) token_score(raw, vocab, *token, log_total, logprob, rank);
}

/* A whole step's tokens in one call: for each row of logits [rows, vocab] (float32, changed in
 * place), the log-probabilities of its raw logits, its grammar's mask, its penalties, and its
 * token, greedy or drawn.
 * params [rows, PARAMS] float64: temperature (0: greedy), top_k (0: none), top_p (1: none),
 * min_p (0: none), logprobs (the likeliest to report; < 0: none), repetition, frequency and
 * presence penalties. counts_rows [rows] (NULL: none penalised): the row of output_counts [*,
 * vocab] (float) and prompt_mask [*, vocab] (bool) holding the row's counts, < 0 for a row not
 * penalised. mask_rows [rows] (NULL: no grammar): the row of masks [*, words] (int32, words =
 * vocab / 32 rounded up; see mask_row) of the row's grammar, < 0 for a row without one.
 * uniform [uniforms]: a number in [0, 1) for each sampled row, in row order.
 * tokens [rows]: the token, or -1 for a row that cannot be chosen from (NaN; for a sampled row
 * +inf too, or no number left for it). With chosen non-NULL, the k-th row that asks for logprobs
 * gets its token's (chosen, rank [k]) and its likeliest (top_ids, top_logprobs [k, width]). */
void sample_rows(float *logits, int64_t rows, int64_t vocab, const double *params, const int64_t *counts_rows,
                 const float *output_counts, const uint8_t *prompt_mask, const int64_t *mask_rows,
                 const int32_t *masks, const double *uniform, int64_t uniforms,
                 int64_t *tokens, float *chosen, int64_t *rank, int64_t *top_ids, float *top_logprobs,
                 int64_t width, int threads)
{
    /* row -> its uniform number, and its place among the rows scored (-1: none) */
    int64_t *uniform_of = malloc(2 * (size_t)(rows > 0 ? rows : 1) * sizeof(int64_t));
    if (uniform_of == NULL) {
        for (int64_t r = 0; r < rows; r++) tokens[r] = -1;
        return;
    }
    int64_t *scored_of = uniform_of + rows;
    for (int64_t r = 0, drawn = 0, scored = 0; r < rows; r++) {
        uniform_of[r] = params[PARAMS * r] > 0.0 ? drawn++ : -1;
        scored_of[r] = chosen != NULL && params[PARAMS * r + 4] >= 0.0 ? scored++ : -1;
    }
#pragma omp parallel num_threads(threads) if (threads > 1 && rows > 1)
    {
        float *buffers = malloc(4 * (size_t)vocab * sizeof(float));
        ranked *best = malloc((size_t)(width > SMALL_TOP ? vocab : SMALL_TOP) * sizeof(ranked));
        double *tiles = malloc(((size_t)vocab / TILE + 1) * sizeof(double));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t counted = counts_rows == NULL ? -1 : counts_rows[r];
            const int64_t masked = mask_rows == NULL ? -1 : mask_rows[r];
            if (buffers == NULL || best == NULL || tiles == NULL) {
                tokens[r] = -1;
                continue;
            }
            const int has_uniform = uniform_of[r] >= 0 && uniform_of[r] < uniforms;
            choose_row(logits + r * vocab, vocab, params + PARAMS * r, has_uniform ? uniform[uniform_of[r]] : 0.0,
                       has_uniform, counted < 0 ? NULL : output_counts + counted * vocab,
                       counted < 0 ? NULL : prompt_mask + counted * vocab,
                       masked < 0 ? NULL : masks + masked * ((vocab + 31) / 32), tokens + r,
                       scored_of[r] < 0 ? NULL : chosen + scored_of[r], scored_of[r] < 0 ? NULL : rank + scored_of[r],
                       top_ids, top_logprobs, width, scored_of[r], buffers, best, tiles);
        }
        free(buffers);
        free(best);
        free(tiles);
    }
    free(uniform_of);
}
