/* slimswarm native decode step: one call runs the whole Llama-family decoder for M <= 8 rows (one new token each).
 *
 * At 135M parameters a PyTorch-dispatched decode pays ~200 kernel calls plus the small aten ops of norms, RoPE and
 * attention per token; that fixed cost, not the weight reads, bounds it. Here one call does: embedding lookup,
 * every layer (RMSNorm, Q/K/V, RoPE, attention over the caller's KV cache [rows, kv, slots, hd] with per-row slot and
 * padding, o_proj + residual, gate/up + SiLU, down + residual), final norm and the LM head, logits into the caller's
 * buffer. Weights are read where Python keeps them (fp32, bf16, uint8 codes, 4-bit codes two a byte), plus per-row
 * LoRA slots from the adapter bank's stacked A/B.
 *
 * Threads: a persistent pool (workers spin a little, then sleep on a condition variable between calls); inside a
 * call all threads run the layer loop together and meet at a spin barrier after each phase. Every thread prepares
 * each matmul input privately (norm, int8 quantization, nibble-order permutation: O(M*K), cheap), so the only
 * barriers are the ones the data flow needs (5 a layer). The pool is reset in a forked child and rebuilt lazily.
 *
 * The same source is built per ISA (AVX2+FMA, AVX-512 VNNI, AVX-VNNI); Python picks one from the CPU flags. */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXM 32 /* rows of x per call (decode rows, or prefill positions) */
#define KM 8    /* rows of x per pass of a matmul loop: larger calls go KM rows at a time */
#define MAXT 64

enum { F_F32 = 0, F_BF16 = 1, F_Q8 = 2, F_Q4 = 3 };
enum { C_F32 = 0, C_BF16 = 1, C_F16 = 2, C_I8 = 3 }; /* KV cache storage */

typedef struct {
    int32_t fmt, lora_bf16;       /* lora_bf16: the adapter stacks below hold bf16 (else fp32) */
    int64_t N, K, gs;             /* out, in, group size (quantized) */
    const void *w;                /* fp32 / bf16 [N,K]; uint8 codes [N,K] (Q8) or [N,K/2] low nibble = even column */
    const float *scale, *zero;    /* quantized: fp32 [N, K/gs]; w = (q - zero) * scale */
    const float *bias;            /* [N] or NULL */
    const void *lora_a, *lora_b;  /* A [slots*R, K], B transposed [slots*R, N] (scaling folded in) or NULL */
    int64_t lora_ld;              /* the row stride of B^T (N) */
    /* 4-bit codes repacked for the int8-activation loop (q4_i8_rows8), or NULL: blocks of 8 rows x 8 columns, 32
     * bytes each, [N/8][K/8][8 rows][4]: byte 4r + j holds column 8b + j (low nibble) and 8b + 4 + j (high) of row
     * r; scale/zero per 8-row block [N/8][G][8] */
    const uint8_t *wr;
    const float *scr, *zpr;
} ss_lin;

typedef struct {
    int32_t n_heads, n_kv;
    int64_t inter;
    const float *ln1, *ln2; /* fp32 [H] */
    void *kc, *vc;          /* cache [rows, n_kv, cache_len, hd] */
    ss_lin q, k, v, o, gate, up, down;
    float *ks, *vs;         /* int8 cache: fp32 scale of each (row, head, slot) [rows, n_kv, cache_len]; else NULL */
} ss_layer;

typedef struct {
    int64_t vocab, hidden, head_dim, n_layers;
    int64_t max_k;      /* the largest matmul input width */
    int64_t max_q;      /* the largest n_heads*head_dim */
    int64_t max_kv;     /* the largest n_kv*head_dim */
    int64_t cache_rows, cache_len;
    int32_t cache_dtype, lora_r;
    int32_t act_int8, pad_;
    float eps, pad2_;
    const float *inv_freq; /* [head_dim/2] */
    const float *norm;     /* [H] */
    ss_lin embed, head;
    ss_layer *layers;
} ss_model;

/* ------------------------------------------------------------------ thread pool */
typedef void (*job_fn)(void *arg, int tid, int nth);

static struct {
    pthread_t th[MAXT];
    int nth; /* threads including the caller; 0 or 1: no workers */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int gen, done, stop;
    job_fn fn;
    void *arg;
    int sleeping;
    int atfork;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

#define SPIN_IDLE 20000
#define SPIN_BARRIER 2000

static void *worker(void *p) {
    int tid = (int)(intptr_t)p;
    int seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&P.gen, memory_order_acquire) == seen) {
            if (++spins < SPIN_IDLE) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&P.mu);
            P.sleeping++;
            while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
            P.sleeping--;
            pthread_mutex_unlock(&P.mu);
        }
        seen = atomic_load_explicit(&P.gen, memory_order_acquire);
        if (atomic_load(&P.stop)) return NULL;
        P.fn(P.arg, tid, P.nth);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
    }
}

static void pool_stop(void) {
    if (P.nth <= 1) {
        P.nth = 0;
        return;
    }
    pthread_mutex_lock(&P.mu);
    atomic_store(&P.stop, 1);
    atomic_fetch_add(&P.gen, 1);
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 1; i < P.nth; i++) pthread_join(P.th[i], NULL);
    atomic_store(&P.stop, 0);
    atomic_store(&P.gen, 0);
    P.nth = 0;
}

static void after_fork_child(void) {
    /* the workers do not exist in the child: forget them, the next call starts new ones */
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    atomic_store(&P.gen, 0);
    atomic_store(&P.done, 0);
    atomic_store(&P.stop, 0);
    P.sleeping = 0;
    P.nth = 0;
}

/* (Re)start the pool with nth threads (the caller counts as one). Returns the thread count. */
int ss_pool_init(int nth) {
    if (nth < 1) nth = 1;
    if (nth > MAXT) nth = MAXT;
    if (!P.atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        P.atfork = 1;
    }
    if (P.nth == nth) return nth;
    pool_stop();
    atomic_store(&P.gen, 0);
    P.nth = nth;
    for (int i = 1; i < nth; i++) {
        if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
            P.nth = i; /* run with the threads we got */
            break;
        }
    }
    return P.nth;
}

int ss_pool_threads(void) { return P.nth; }

static void pool_run(job_fn fn, void *arg, int nth) {
    if (P.nth != nth) ss_pool_init(nth);
    if (P.nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    P.fn = fn;
    P.arg = arg;
    atomic_store(&P.done, 0);
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    if (P.sleeping) pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    fn(arg, 0, P.nth);
    int spins = 0;
    while (atomic_load_explicit(&P.done, memory_order_acquire) < P.nth - 1) {
        if (++spins > SPIN_BARRIER) {
            sched_yield();
            spins = 0;
        } else
            _mm_pause();
    }
}

typedef struct {
    atomic_int count, sense;
} barrier_t;

static void barrier(barrier_t *b, int nth, int *local) {
    if (nth <= 1) return;
    int s = !*local;
    *local = s;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->sense, s, memory_order_release);
    } else {
        int spins = 0;
        while (atomic_load_explicit(&b->sense, memory_order_acquire) != s) {
            if (++spins > SPIN_BARRIER) { /* the machine is oversubscribed: let the late thread run */
                sched_yield();
                spins = 0;
            } else
                _mm_pause();
        }
    }
}

/* ------------------------------------------------------------------ small vector helpers */
static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

static inline float bf16f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

static inline float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load_bf16(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load_bf16(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load_bf16(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n; k++) s += bf16f(w[k]) * x[k];
    return s;
}

/* u8 (a) x s8 (b) products, summed in fours into int32 lanes */
static inline __m256i dot_u8s8(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#else /* a <= 15 here (4-bit codes): the int16 pair sums of maddubs cannot saturate */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

/* full-range u8 codes x s8: VNNI directly, AVX2 through int16 (maddubs would saturate at 255*127*2) */
static inline __m256i dot_u8s8_wide(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
    __m256i a0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)), a1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1));
    __m256i b0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b)), b1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a0, b0), _mm256_madd_epi16(a1, b1)));
#endif
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------ matmul inputs, prepared once per thread */
typedef struct {
    const float *x; /* the input this was prepared from (identity check) */
    int fmt, i8, nat; /* nat: 4-bit input in natural column order (the repacked loop), not the nibble order */
    int64_t K, gs, M;
    float *xp;    /* Q4: x permuted so a 32-byte block's low nibbles meet xp[0..32) and high ones xp[32..64) */
    float *xs;    /* [M, G] group sums of x (fp32 path) */
    int8_t *xq;   /* int8 path: quantized x (permuted like xp for Q4) */
    int32_t *xqs; /* [M, A] sums of xq over each activation group */
    float *xqsf;  /* [M, G] sum of the de-quantized x over each weight group (the zero-point term's input) */
    float *sxa;   /* [M, A] the scale of each activation group */
    int64_t bpg, A; /* activation blocks per weight group, and per row (see act_width) */
} prep_t;

/* Columns that share one int8 scale of x ("activation blocks"), within each weight group: 32 columns for 8-bit
 * codes; for 4-bit codes the blocks of the nibble order (64 columns, and a last one of 32 in groups of 96, 160...);
 * one per weight group where the group is not a multiple of 32 (the general loop). One scale per row (the first
 * version) cost SmolLM2 +4.5% perplexity at w8 (KL 0.045): a few outlier channels set the scale of all 576 columns;
 * one per 96-128 columns +1.7% (KL 0.010); per 32 columns +0.8% (KL 0.004), close to llama.cpp's Q8_0 activations. */
static inline int64_t act_width(int64_t gs, int q4, int64_t c) { /* width of the block starting at column c of a group */
    if (gs % 32) return gs;
    if (!q4) return 32;
    return c + 64 <= gs ? 64 : 32;
}

static inline int64_t act_blocks(int64_t gs, int q4) { /* blocks per weight group */
    if (gs % 32) return 1;
    return q4 ? gs / 64 + (gs % 64 ? 1 : 0) : gs / 32;
}

/* Position of column c (within a group of gs) in the permuted order: 64-column blocks, then one 32-column block,
 * then columns in place. Block of 2B columns: byte i holds columns 2i, 2i+1 -> slots i and B+i. */
static void permute_group(const float *src, float *dst, int64_t gs) {
    int64_t c = 0;
    for (; c + 64 <= gs; c += 64)
        for (int i = 0; i < 32; i++) {
            dst[c + i] = src[c + 2 * i];
            dst[c + 32 + i] = src[c + 2 * i + 1];
        }
    if (c + 32 <= gs) {
        for (int i = 0; i < 16; i++) {
            dst[c + i] = src[c + 2 * i];
            dst[c + 16 + i] = src[c + 2 * i + 1];
        }
        c += 32;
    }
    for (; c < gs; c++) dst[c] = src[c];
}

/* One activation block of w columns to int8: scale = max |x| / 127 over amax_src (the block's columns, in any order),
 * codes = round(src / scale) half to even (a true division, as torch.round(x / s); the vector division and
 * cvtps's default rounding give the same bits as the scalar lrintf), their sum returned in *sum. */
static inline float quant_block(const float *amax_src, const float *src, int64_t w, int8_t *dst, int32_t *sum) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vm = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= w; i += 8) vm = _mm256_max_ps(vm, _mm256_and_ps(absm, _mm256_loadu_ps(amax_src + i)));
    float amax = hsum_max(vm);
    for (; i < w; i++) amax = fmaxf(amax, fabsf(amax_src[i]));
    const float sx = amax > 0.f ? amax / 127.f : 1.f;
    const __m256 vs = _mm256_set1_ps(sx);
    __m256i vsum = _mm256_setzero_si256();
    i = 0;
    for (; i + 8 <= w; i += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(src + i), vs));
        vsum = _mm256_add_epi32(vsum, q);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(dst + i), _mm_packs_epi16(q16, q16)); /* |q| <= 127: no saturation */
    }
    int32_t s = hsum_i32(vsum);
    for (; i < w; i++) {
        dst[i] = (int8_t)lrintf(src[i] / sx);
        s += dst[i];
    }
    *sum = s;
    return sx;
}

static void prepare(prep_t *p, const ss_lin *L, const float *x, int64_t M, int i8) {
    const int fmt = L->fmt;
    if (fmt == F_F32 || fmt == F_BF16) return;
    const int use8 = i8 && (fmt == F_Q8 || fmt == F_Q4);
    const int nat = use8 && L->wr != NULL;
    if (p->x == x && p->fmt == fmt && p->gs == L->gs && p->K == L->K && p->i8 == use8 && p->M == M && p->nat == nat)
        return;
    p->x = x, p->fmt = fmt, p->gs = L->gs, p->K = L->K, p->i8 = use8, p->M = M, p->nat = nat;
    const int64_t K = L->K, gs = L->gs, G = K / gs;
    p->bpg = act_blocks(gs, fmt == F_Q4);
    p->A = G * p->bpg;
    const int perm = fmt == F_Q4 && !nat; /* the original 4-bit layout reads x in the nibble order */
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *xp = p->xp + m * K;
        if (perm)
            for (int64_t g = 0; g < G; g++) permute_group(xr + g * gs, xp + g * gs, gs);
        else if (!use8)
            memcpy(xp, xr, sizeof(float) * K);
        if (!use8) {
            for (int64_t g = 0; g < G; g++) {
                float s = 0.f;
                for (int64_t i = 0; i < gs; i++) s += xr[g * gs + i];
                p->xs[m * G + g] = s;
            }
            continue;
        }
        const float *src = perm ? xp : xr;
        const int64_t A = p->A, r = p->bpg;
        const int q4 = fmt == F_Q4;
        int8_t *xq = p->xq + m * K;
        for (int64_t a = 0, c0 = 0; a < A; a++) {
            /* a block's columns are the same set in x and in its permuted copy */
            const int64_t w = act_width(gs, q4, c0 % gs);
            p->sxa[m * A + a] = quant_block(xr + c0, src + c0, w, xq + c0, &p->xqs[m * A + a]);
            c0 += w;
        }
        for (int64_t g = 0; g < G; g++) {
            float f = 0.f;
            for (int64_t a = g * r; a < (g + 1) * r; a++) f += p->sxa[m * A + a] * (float)p->xqs[m * A + a];
            p->xqsf[m * G + g] = f;
        }
    }
}

/* 32 4-bit codes of 16 bytes as low|high nibble bytes of one 256-bit vector (matches the 32-column permutation) */
static inline __m256i nib16(const uint8_t *q) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

static inline void nib_to_ps(__m128i b, __m256 *f0, __m256 *f1) {
    *f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    *f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
}

/* sum_g scale[g] * zero[g] * xqs[g] over one weight row: the zero-point term of the int8 path, 8 groups a step */
static inline float zero_term(const float *sc, const float *zp, const float *xq, int64_t G) {
    __m256 a = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8)
        a = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), _mm256_loadu_ps(zp + g)), _mm256_loadu_ps(xq + g), a);
    float s = hsum(a);
    for (; g < G; g++) s += sc[g] * zp[g] * xq[g];
    return s;
}

/* The int8-activation fast paths: groups of a multiple of 32 columns (4 and 8 bits).
 * Each weight block is loaded and unpacked once and meets every row of x; the int32 dot of a group becomes float
 * once (one cvt + one fma a group and row). Inlined with M as a constant for M == 1 (decode of one sequence). */
static inline __attribute__((always_inline)) void q_i8_fast(const ss_lin *L, const prep_t *p, const int64_t M,
                                                          int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    const int64_t K = L->K, gs = L->gs, G = K / gs;
    const int q4 = L->fmt == F_Q4;
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const int64_t rbytes = q4 ? K / 2 : K;
    for (int64_t n = n0; n < n1; n++) {
        const float *sc = L->scale + n * G, *zp = L->zero + n * G;
        const uint8_t *qr = (const uint8_t *)L->w + n * rbytes;
        if (q4) { /* software prefetch 1 KB ahead: +5-12% streamed from DRAM on one core (it hurt the 8-bit head) */
            const char *pf = (const char *)qr + 1024;
            for (int64_t o = 0; o < rbytes; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
            _mm_prefetch((const char *)(sc + 8 * G), _MM_HINT_T0);
            _mm_prefetch((const char *)(zp + 8 * G), _MM_HINT_T0);
        }
        __m256 acc[KM];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        const float *sxa = p->sxa;
        const int64_t A = p->A;
        int64_t a = 0; /* activation block: one int32 dot, one cvt and one fma per block and row */
        for (int64_t g = 0; g < G; g++) {
            const float sg = sc[g];
            if (q4) {
                const uint8_t *qg = qr + g * gs / 2;
                int64_t c = 0;
                for (; c + 64 <= gs; c += 64, a++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(qg + c / 2));
                    const __m256i lo = _mm256_and_si256(w, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4);
                    for (int64_t m = 0; m < M; m++) {
                        const int8_t *xg = p->xq + m * K + g * gs + c;
                        __m256i d = dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)xg));
                        d = dot_u8s8(d, hi, _mm256_loadu_si256((const __m256i *)(xg + 32)));
                        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sg * sxa[m * A + a]), acc[m]);
                    }
                }
                if (c < gs) { /* a last block of 32 columns (groups of 96, 160, ...) */
                    const __m256i w = nib16(qg + c / 2);
                    for (int64_t m = 0; m < M; m++) {
                        const __m256i d = dot_u8s8(_mm256_setzero_si256(), w,
                                                   _mm256_loadu_si256((const __m256i *)(p->xq + m * K + g * gs + c)));
                        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sg * sxa[m * A + a]), acc[m]);
                    }
                    a++;
                }
            } else {
                const uint8_t *qg = qr + g * gs;
                for (int64_t c = 0; c < gs; c += 32, a++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(qg + c));
                    for (int64_t m = 0; m < M; m++) {
                        const __m256i d = dot_u8s8_wide(_mm256_setzero_si256(), w,
                                                        _mm256_loadu_si256((const __m256i *)(p->xq + m * K + g * gs + c)));
                        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sg * sxa[m * A + a]), acc[m]);
                    }
                }
            }
        }
        const float b = L->bias ? L->bias[n] : 0.f;
        for (int64_t m = 0; m < M; m++) {
            const float o = hsum(acc[m]) - zero_term(sc, zp, p->xqsf + m * G, G) + b;
            if (add)
                y[m * ys + n] += o;
            else
                y[m * ys + n] = o;
        }
    }
}

/* Four weight rows' int32 block dots folded into one vector (lanes: rows 0-3 | rows 0-3) and accumulated with the
 * rows' weight scales (sw, in both halves) times the block's activation scale sx. */
static inline __m256 fold4(__m256 acc, const __m256i *d, __m256 sw, float sx) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(sw, _mm256_set1_ps(sx)), acc);
}

/* Four weight rows at a time (int8 activations, groups of a multiple of 32 columns, 4 and 8 bits).
 * Each activation block is loaded once for the four rows; the four rows' int32 dots of a block are folded into one
 * vector by two horizontal adds (lanes: rows 0-3 of the block's low half | rows 0-3 of its high half), so one cvt and
 * one fma serve four rows; the per-row horizontal sums and zero-point terms become one 4-wide vector op each. */
static inline __attribute__((always_inline)) void q_i8_rows4(const ss_lin *L, const prep_t *p, const int64_t M,
                                                           int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    const int64_t K = L->K, gs = L->gs, G = K / gs;
    const int q4 = L->fmt == F_Q4;
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const int64_t rbytes = q4 ? K / 2 : K;
    const float *sxa = p->sxa;
    const int64_t A = p->A;
    for (int64_t n = n0; n < n1; n += 4) {
        const float *sc = L->scale + n * G, *zp = L->zero + n * G;
        const uint8_t *qr = (const uint8_t *)L->w + n * rbytes;
        { /* the next four rows (measured: without it the 8-bit rows ran at half speed; two blocks ahead was slower) */
            const char *pf = (const char *)qr + 4 * rbytes;
            for (int64_t o = 0; o < 4 * rbytes; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        __m256 acc[KM];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        int64_t a = 0;
        for (int64_t g = 0; g < G; g++) {
            const __m128 s4 = _mm_set_ps(sc[3 * G + g], sc[2 * G + g], sc[G + g], sc[g]);
            const __m256 sw = _mm256_set_m128(s4, s4);
            if (q4) {
                const uint8_t *qg = qr + g * gs / 2;
                int64_t c = 0;
                for (; c + 64 <= gs; c += 64, a++) {
                    __m256i lo[4], hi[4];
                    for (int r = 0; r < 4; r++) {
                        const __m256i w = _mm256_loadu_si256((const __m256i *)(qg + r * rbytes + c / 2));
                        lo[r] = _mm256_and_si256(w, lo4);
                        hi[r] = _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4);
                    }
                    for (int64_t m = 0; m < M; m++) {
                        const int8_t *xg = p->xq + m * K + g * gs + c;
                        const __m256i x0 = _mm256_loadu_si256((const __m256i *)xg);
                        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xg + 32));
                        __m256i d[4];
                        for (int r = 0; r < 4; r++) d[r] = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo[r], x0), hi[r], x1);
                        acc[m] = fold4(acc[m], d, sw, sxa[m * A + a]);
                    }
                }
                if (c < gs) { /* a last block of 32 columns (groups of 96, 160, ...) */
                    __m256i w[4];
                    for (int r = 0; r < 4; r++) w[r] = nib16(qg + r * rbytes + c / 2);
                    for (int64_t m = 0; m < M; m++) {
                        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p->xq + m * K + g * gs + c));
                        __m256i d[4];
                        for (int r = 0; r < 4; r++) d[r] = dot_u8s8(_mm256_setzero_si256(), w[r], x0);
                        acc[m] = fold4(acc[m], d, sw, sxa[m * A + a]);
                    }
                    a++;
                }
            } else {
                const uint8_t *qg = qr + g * gs;
                for (int64_t c = 0; c < gs; c += 32, a++) {
                    __m256i w[4];
                    for (int r = 0; r < 4; r++) w[r] = _mm256_loadu_si256((const __m256i *)(qg + r * rbytes + c));
                    for (int64_t m = 0; m < M; m++) {
                        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p->xq + m * K + g * gs + c));
                        __m256i d[4];
                        for (int r = 0; r < 4; r++) d[r] = dot_u8s8_wide(_mm256_setzero_si256(), w[r], x0);
                        acc[m] = fold4(acc[m], d, sw, sxa[m * A + a]);
                    }
                }
            }
        }
        /* zero-point terms of the four rows: sum_g scale * zero * (sum of the de-quantized x over group g) */
        __m128 z[KM];
        for (int64_t m = 0; m < M; m++) z[m] = _mm_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            const __m128 sz = _mm_mul_ps(_mm_set_ps(sc[3 * G + g], sc[2 * G + g], sc[G + g], sc[g]),
                                         _mm_set_ps(zp[3 * G + g], zp[2 * G + g], zp[G + g], zp[g]));
            for (int64_t m = 0; m < M; m++) z[m] = _mm_fmadd_ps(sz, _mm_set1_ps(p->xqsf[m * G + g]), z[m]);
        }
        const __m128 b4 = L->bias ? _mm_loadu_ps(L->bias + n) : _mm_setzero_ps();
        for (int64_t m = 0; m < M; m++) {
            __m128 o = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
            o = _mm_add_ps(_mm_sub_ps(o, z[m]), b4);
            float *yr = y + m * ys + n;
            if (add) o = _mm_add_ps(o, _mm_loadu_ps(yr));
            _mm_storeu_ps(yr, o);
        }
    }
}

/* Several rows of x, each count a constant of its own copy: with a run-time M the per-row accumulators lived on the
 * stack (A/B at 8 rows, one thread: gate/up 8.9 -> 6.0 ms, the 8-bit head 6.4 -> 3.3 ms a step). */
#define SS_ROWS_SWITCH(fn, M, ...)                                                                                 \
    switch (M) {                                                                                                   \
    case 1: fn(L, p, 1, __VA_ARGS__); break;                                                                       \
    case 2: fn(L, p, 2, __VA_ARGS__); break;                                                                       \
    case 3: fn(L, p, 3, __VA_ARGS__); break;                                                                       \
    case 4: fn(L, p, 4, __VA_ARGS__); break;                                                                       \
    case 5: fn(L, p, 5, __VA_ARGS__); break;                                                                       \
    case 6: fn(L, p, 6, __VA_ARGS__); break;                                                                       \
    case 7: fn(L, p, 7, __VA_ARGS__); break;                                                                       \
    case 8: fn(L, p, 8, __VA_ARGS__); break;                                                                       \
    default: fn(L, p, M, __VA_ARGS__); break;                                                                      \
    }

static __attribute__((noinline)) void q_i8_rows4_m(const ss_lin *L, const prep_t *p, int64_t M, int64_t n0, int64_t n1,
                                                   float *y, int64_t ys, int add) {
    SS_ROWS_SWITCH(q_i8_rows4, M, n0, n1, y, ys, add)
}

static void q_i8_fast_m1(const ss_lin *L, const prep_t *p, int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    q_i8_fast(L, p, 1, n0, n1, y, ys, add);
}

static __attribute__((noinline)) void q_i8_fast_m(const ss_lin *L, const prep_t *p, int64_t M, int64_t n0, int64_t n1,
                                                  float *y, int64_t ys, int add) {
    SS_ROWS_SWITCH(q_i8_fast, M, n0, n1, y, ys, add)
}

/* The end of an 8-row block of the repacked loops: minus the zero-point terms (sum_g scale * zero * the group's sum
 * of de-quantized x), plus the bias, stored or added into y[m, n..n+8). */
static inline __attribute__((always_inline)) void rows8_out(const ss_lin *L, const prep_t *p, const int64_t M,
                                                          int64_t G, int64_t n, const float *sc, const float *zp,
                                                          const __m256 *acc, float *y, int64_t ys, int add) {
    const __m256 b8 = L->bias ? _mm256_loadu_ps(L->bias + n) : _mm256_setzero_ps();
    for (int64_t m = 0; m < M; m++) {
        __m256 z = _mm256_setzero_ps();
        const float *xs = p->xqsf + m * G;
        for (int64_t g = 0; g < G; g++)
            z = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g * 8), _mm256_loadu_ps(zp + g * 8)),
                                _mm256_set1_ps(xs[g]), z);
        __m256 o = _mm256_add_ps(_mm256_sub_ps(acc[m], z), b8);
        float *yr = y + m * ys + n;
        if (add) o = _mm256_add_ps(o, _mm256_loadu_ps(yr));
        _mm256_storeu_ps(yr, o);
    }
}

/* The int8-activation loop over repacked 4-bit codes (ss_lin.wr), eight weight rows at a time: each 32-byte block
 * holds 8 rows x 8 columns; its low nibbles meet x's columns c..c+3 and its high nibbles c+4..c+7, each as one
 * broadcast 4-byte word, so VNNI's per-lane 4-products land one weight row per int32 lane (no horizontal sums,
 * no input permutation). Every activation block (64 or 32 columns) is summed in int32 and meets its scales once:
 * one cvt and one fma for 8 rows. Rows n0..n1 are a multiple of 8. */
static inline __attribute__((always_inline)) void q4_i8_rows8(const ss_lin *L, const prep_t *p, const int64_t M,
                                                            int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    const int64_t K = L->K, gs = L->gs, G = K / gs;
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const float *sxa = p->sxa;
    const int64_t A = p->A;
    for (int64_t n = n0; n < n1; n += 8) {
        const int64_t nb = n / 8;
        const uint8_t *wq = L->wr + nb * (K / 2) * 8; /* this block: K/8 blocks of 32 bytes */
        const float *sc = L->scr + nb * G * 8, *zp = L->zpr + nb * G * 8;
        {
            const char *pf = (const char *)wq + 4 * K; /* the next 8 rows */
            for (int64_t o = 0; o < 4 * K; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        __m256 acc[KM];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        int64_t a = 0;
        for (int64_t g = 0; g < G; g++) {
            const __m256 sw = _mm256_loadu_ps(sc + g * 8);
            for (int64_t c = 0; c < gs;) {
                const int64_t w = act_width(gs, 1, c);
                __m256i d[KM];
                for (int64_t m = 0; m < M; m++) d[m] = _mm256_setzero_si256();
                if (M == 1) { /* one row of x: four independent accumulator chains (VNNI's latency, not its width,
                               * would bound one chain of two dependent ops per 32 bytes) */
                    __m256i e0 = _mm256_setzero_si256(), e1 = e0, e2 = e0, e3 = e0;
                    const int8_t *xm = p->xq + g * gs + c;
                    const uint8_t *wb = wq + (g * gs + c) * 4;
                    int64_t j = 0;
                    for (; j + 16 <= w; j += 16) {
                        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wb + j * 4));
                        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wb + j * 4 + 32));
                        int32_t x[4];
                        memcpy(x, xm + j, 16);
                        e0 = dot_u8s8(e0, _mm256_and_si256(v0, lo4), _mm256_set1_epi32(x[0]));
                        e1 = dot_u8s8(e1, _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo4), _mm256_set1_epi32(x[1]));
                        e2 = dot_u8s8(e2, _mm256_and_si256(v1, lo4), _mm256_set1_epi32(x[2]));
                        e3 = dot_u8s8(e3, _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo4), _mm256_set1_epi32(x[3]));
                    }
                    for (; j < w; j += 8) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + j * 4));
                        int32_t x[2];
                        memcpy(x, xm + j, 8);
                        e0 = dot_u8s8(e0, _mm256_and_si256(v, lo4), _mm256_set1_epi32(x[0]));
                        e1 = dot_u8s8(e1, _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4), _mm256_set1_epi32(x[1]));
                    }
                    d[0] = _mm256_add_epi32(_mm256_add_epi32(e0, e1), _mm256_add_epi32(e2, e3));
                } else
                    for (int64_t j = 0; j < w; j += 8) {
                        const int64_t col = g * gs + c + j;
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + col * 4));
                        const __m256i lo = _mm256_and_si256(v, lo4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
                        for (int64_t m = 0; m < M; m++) {
                            const int8_t *xm = p->xq + m * K + col;
                            int32_t x0, x1;
                            memcpy(&x0, xm, 4);
                            memcpy(&x1, xm + 4, 4);
                            d[m] = dot_u8s8(d[m], lo, _mm256_set1_epi32(x0));
                            d[m] = dot_u8s8(d[m], hi, _mm256_set1_epi32(x1));
                        }
                    }
                for (int64_t m = 0; m < M; m++)
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), _mm256_mul_ps(sw, _mm256_set1_ps(sxa[m * A + a])),
                                             acc[m]);
                a++;
                c += w;
            }
        }
        rows8_out(L, p, M, G, n, sc, zp, acc, y, ys, add);
    }
}

static void q4_i8_rows8_m1(const ss_lin *L, const prep_t *p, int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    q4_i8_rows8(L, p, 1, n0, n1, y, ys, add);
}

static __attribute__((noinline)) void q4_i8_rows8_m(const ss_lin *L, const prep_t *p, int64_t M, int64_t n0,
                                                    int64_t n1, float *y, int64_t ys, int add) {
    SS_ROWS_SWITCH(q4_i8_rows8, M, n0, n1, y, ys, add)
}

/* The same for 8-bit codes (ss_lin.wr: [N/8][K/4][8 rows][4 columns]); built only with VNNI, whose u8 x s8
 * products do not saturate (AVX2's maddubs would, at 255 * 127 * 2). Activation blocks are 32 columns. */
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
static inline __attribute__((always_inline)) void q8_i8_rows8(const ss_lin *L, const prep_t *p, const int64_t M,
                                                            int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    const int64_t K = L->K, gs = L->gs, G = K / gs;
    const float *sxa = p->sxa;
    const int64_t A = p->A;
    for (int64_t n = n0; n < n1; n += 8) {
        const int64_t nb = n / 8;
        const uint8_t *wq = L->wr + nb * K * 8;
        const float *sc = L->scr + nb * G * 8, *zp = L->zpr + nb * G * 8;
        {
            const char *pf = (const char *)wq + 8 * K;
            for (int64_t o = 0; o < 8 * K; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
        }
        __m256 acc[KM];
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        int64_t a = 0;
        for (int64_t g = 0; g < G; g++) {
            const __m256 sw = _mm256_loadu_ps(sc + g * 8);
            for (int64_t c = 0; c < gs; c += 32, a++) {
                __m256i d[KM];
                for (int64_t m = 0; m < M; m++) d[m] = _mm256_setzero_si256();
                for (int64_t j = 0; j < 32; j += 4) {
                    const int64_t col = g * gs + c + j;
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wq + col * 8));
                    for (int64_t m = 0; m < M; m++) {
                        int32_t x0;
                        memcpy(&x0, p->xq + m * K + col, 4);
                        d[m] = dot_u8s8_wide(d[m], v, _mm256_set1_epi32(x0));
                    }
                }
                for (int64_t m = 0; m < M; m++)
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m]), _mm256_mul_ps(sw, _mm256_set1_ps(sxa[m * A + a])),
                                             acc[m]);
            }
        }
        rows8_out(L, p, M, G, n, sc, zp, acc, y, ys, add);
    }
}

static __attribute__((noinline)) void q8_i8_rows8_m(const ss_lin *L, const prep_t *p, int64_t M, int64_t n0,
                                                    int64_t n1, float *y, int64_t ys, int add) {
    SS_ROWS_SWITCH(q8_i8_rows8, M, n0, n1, y, ys, add)
}
#endif

int ss_has_vnni(void) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return 1;
#else
    return 0;
#endif
}

/* 8-bit codes [N, K] -> [N/8][K/4][8][4] (ss_lin.wr of an 8-bit linear); N multiple of 8, K of 4 */
void ss_repack_q8(const uint8_t *codes, int64_t N, int64_t K, uint8_t *out) {
    for (int64_t nb = 0; nb < N / 8; nb++)
        for (int64_t kb = 0; kb < K / 4; kb++)
            for (int r = 0; r < 8; r++) memcpy(out + ((nb * (K / 4) + kb) * 8 + r) * 4, codes + (nb * 8 + r) * K + kb * 4, 4);
}

/* 4-bit codes [N, K/2] (low nibble: even column) -> the repacked layout of ss_lin.wr; N and K multiples of 8 */
void ss_repack_q4(const uint8_t *codes, int64_t N, int64_t K, uint8_t *out) {
    for (int64_t nb = 0; nb < N / 8; nb++)
        for (int64_t kb = 0; kb < K / 8; kb++) {
            uint8_t *o = out + (nb * (K / 8) + kb) * 32;
            for (int r = 0; r < 8; r++) {
                const uint8_t *row = codes + (nb * 8 + r) * (K / 2);
                for (int j = 0; j < 4; j++) {
                    const int64_t c0 = kb * 8 + j, c1 = c0 + 4;
                    const uint8_t lo = (row[c0 / 2] >> ((c0 & 1) * 4)) & 15, hi = (row[c1 / 2] >> ((c1 & 1) * 4)) & 15;
                    o[4 * r + j] = (uint8_t)(lo | (hi << 4));
                }
            }
        }
}

/* Tile shape and prefetch of wf_rows, chosen in a one-off C microbenchmark (not kept; gate/up shapes, 60 matrices of
 * 1536 x 576 fp32 streamed from memory, 8 rows of x, one thread, Zen 4): per-(row, row of x) dot products 32 ms; 4 x 4
 * tiles 30 ms with no prefetch, 27-32 ms prefetching one tile ahead into L1, 17.6-18.1 ms two tiles ahead into L2
 * (2 x 8 and 3 x 8 tiles: 17-19 ms; the same tiles with the weights in cache: 10-11 ms). Without AVX-512VL there are
 * 16 vector registers: 4 x 2 tiles (8 accumulators) keep them out of the stack. The kept measurement: SmolLM2 fp32,
 * 8 rows, 2 threads, 51.6 -> 30.1 ms a step (benchmarks/native_profile.py --only-rows8 --rows8-weights fp32). */
#define WF_PF_TILES 2
#define WF_PF_HINT _MM_HINT_T1
#define WF_NR 4
#if defined(__AVX512VL__)
#define WF_MR 4
#else
#define WF_MR 2
#endif
/* fp32 (or bf16) weights, several rows of x: a tile of NR weight rows x MR rows of x in NR * MR accumulators, so each
 * weight vector loaded serves MR rows of x and each x vector NR weight rows (dot_f32 per (row, row of x) loaded two
 * vectors for each FMA and was load-bound). NR and MR are constants at every call (always_inline): the accumulators
 * stay in registers. o[r][m] = row r of w . row m of x. */
static inline __attribute__((always_inline)) void wf_tile(const void *w, int bf, int64_t K, const int NR,
                                                          const float *x, const int MR, float o[4][4], const char *pf) {
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MR; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    const int64_t pstep = NR * (bf ? 2 : 4); /* bytes of the next tile's rows per column: prefetched at this pace */
    for (; k + 8 <= K; k += 8) {
        if (pf) {
            const char *q = pf + k * pstep;
            _mm_prefetch(q, WF_PF_HINT);
            if (pstep * 8 > 64) _mm_prefetch(q + 64, WF_PF_HINT);
        }
        __m256 wv[4];
        for (int r = 0; r < NR; r++)
            wv[r] = bf ? load_bf16((const uint16_t *)w + r * K + k) : _mm256_loadu_ps((const float *)w + r * K + k);
        for (int m = 0; m < MR; m++) {
            const __m256 xv = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < NR; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MR; m++) {
            float s = hsum(acc[r][m]);
            for (int64_t c = k; c < K; c++)
                s += (bf ? bf16f(((const uint16_t *)w)[r * K + c]) : ((const float *)w)[r * K + c]) * x[m * K + c];
            o[r][m] = s;
        }
}

static inline __attribute__((always_inline)) void wf_tile_any(const void *w, int bf, int64_t K, const int NR,
                                                              const float *x, int mr, float o[4][4], const char *pf) {
    switch (mr) {
    case 4: wf_tile(w, bf, K, NR, x, 4, o, pf); break;
    case 3: wf_tile(w, bf, K, NR, x, 3, o, pf); break;
    case 2: wf_tile(w, bf, K, NR, x, 2, o, pf); break;
    default: wf_tile(w, bf, K, NR, x, 1, o, pf); break;
    }
}

/* lin_rows_k's float path for M > 1: weight rows in fours (then one by one), rows of x in WF_MRs (then the rest) */
static void wf_rows(const ss_lin *L, const float *x, int64_t M, int64_t n0, int64_t n1, float *y, int64_t ys, int add) {
    const int64_t K = L->K;
    const int bf = L->fmt == F_BF16;
    const size_t es = bf ? 2 : 4;
    for (int64_t n = n0; n < n1;) {
        const int nr = n + WF_NR <= n1 ? WF_NR : 1;
        const char *w = (const char *)L->w + (size_t)n * K * es;
        for (int64_t m0 = 0; m0 < M; m0 += WF_MR) {
            const int mr = M - m0 < WF_MR ? (int)(M - m0) : WF_MR;
            float o[4][4];
            /* the rows WF_PF_TILES tiles ahead, prefetched into L2 during the first pass over these (the hardware's
             * stream prefetcher follows one long stream well, several short interleaved ones poorly); past n1 too:
             * lin_rows calls this on ~32 KB pieces of rows, whose next piece then arrives in time */
            const char *pf = m0 == 0 && n + WF_NR * (1 + WF_PF_TILES) <= L->N ? w + WF_NR * WF_PF_TILES * K * es : NULL;
            if (nr == WF_NR)
                wf_tile_any(w, bf, K, WF_NR, x + m0 * K, mr, o, pf);
            else
                wf_tile_any(w, bf, K, 1, x + m0 * K, mr, o, NULL);
            for (int r = 0; r < nr; r++) {
                const float b = L->bias ? L->bias[n + r] : 0.f;
                for (int m = 0; m < mr; m++) {
                    float *d = y + (m0 + m) * ys + n + r;
                    *d = (add ? *d : 0.f) + o[r][m] + b;
                }
            }
        }
        n += nr;
    }
}

/* y[m, n] (+)= row n of L times prepared input, for n in [n0, n1), M <= KM rows of x. ys: row stride of y. */
static void lin_rows_k(const ss_lin *L, const prep_t *p, const float *x, int64_t M, int64_t n0, int64_t n1, float *y,
                       int64_t ys, int add) {
    const int64_t K = L->K;
    const int fmt = L->fmt;
    if (p->i8 && p->nat && L->wr) { /* repacked (the step only repacks when gs % 32 == 0, N and K % 8 == 0) */
        if (fmt == F_Q4) {
            if (M == 1)
                q4_i8_rows8_m1(L, p, n0, n1, y, ys, add);
            else
                q4_i8_rows8_m(L, p, M, n0, n1, y, ys, add);
            return;
        }
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
        /* 8-bit: only for several rows of x (A/B, one thread: 8 rows' LM head 8.8 -> 6.0 ms; one row 2.0 -> 2.6 ms,
         * where q_i8_fast's one-row loop on the original layout is faster) */
        if (fmt == F_Q8 && M > 1) {
            q8_i8_rows8_m(L, p, M, n0, n1, y, ys, add);
            return;
        }
#endif
    }
    if (p->i8 && (fmt == F_Q4 || fmt == F_Q8) && L->gs % 32 == 0) {
        /* Several rows of x: 4-bit rows of up to 512 bytes in blocks of four weight rows, then the rest one by one.
         * Measured (A/B in one process, SmolLM2 w4g128 with int8 activations, 8 rows, one thread): gate/up and q/k/v
         * (576 columns, groups of 96) 1.3-1.4x faster; down (1536 columns) 0.9x and the 8-bit head 1.0x, so those
         * and one row of x (where the one-row loop's single accumulator chain is already cheap) keep q_i8_fast. */
        if (M == 1) {
            q_i8_fast_m1(L, p, n0, n1, y, ys, add);
        } else if (fmt == F_Q4 && K <= 1024) {
            const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
            q_i8_rows4_m(L, p, M, n0, n4, y, ys, add);
            q_i8_fast_m(L, p, M, n4, n1, y, ys, add);
        } else {
            q_i8_fast_m(L, p, M, n0, n1, y, ys, add);
        }
        return;
    }
    if ((fmt == F_F32 || fmt == F_BF16) && M > 1) {
        wf_rows(L, x, M, n0, n1, y, ys, add);
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        float out[KM];
        if (fmt == F_F32) {
            const float *w = (const float *)L->w + n * K;
            for (int64_t m = 0; m < M; m++) out[m] = dot_f32(w, x + m * K, K);
        } else if (fmt == F_BF16) {
            const uint16_t *w = (const uint16_t *)L->w + n * K;
            for (int64_t m = 0; m < M; m++) out[m] = dot_bf16(w, x + m * K, K);
        } else {
            const int64_t gs = L->gs, G = K / gs;
            const float *sc = L->scale + n * G, *zp = L->zero + n * G;
            const int q4 = fmt == F_Q4;
            const uint8_t *qr = (const uint8_t *)L->w + n * (q4 ? K / 2 : K);
            if (p->i8) {
                __m256 acc[KM];
                float corr[KM];
                for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps(), corr[m] = 0.f;
                for (int64_t g = 0; g < G; g++) {
                    const uint8_t *qg = qr + (q4 ? g * gs / 2 : g * gs);
                    for (int64_t m = 0; m < M; m++) {
                        const int8_t *xg = p->xq + m * K + g * gs;
                        __m256i d = _mm256_setzero_si256();
                        int32_t tail = 0;
                        int64_t c = 0;
                        if (q4) {
                            const __m256i lo4 = _mm256_set1_epi8(0x0F);
                            for (; c + 64 <= gs; c += 64) {
                                __m256i w = _mm256_loadu_si256((const __m256i *)(qg + c / 2));
                                d = dot_u8s8(d, _mm256_and_si256(w, lo4), _mm256_loadu_si256((const __m256i *)(xg + c)));
                                d = dot_u8s8(d, _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4),
                                             _mm256_loadu_si256((const __m256i *)(xg + c + 32)));
                            }
                            if (c + 32 <= gs) {
                                d = dot_u8s8(d, nib16(qg + c / 2), _mm256_loadu_si256((const __m256i *)(xg + c)));
                                c += 32;
                            }
                            for (; c < gs; c += 2) {
                                uint8_t b = qg[c / 2];
                                tail += (b & 15) * xg[c] + (b >> 4) * xg[c + 1];
                            }
                        } else {
                            for (; c + 32 <= gs; c += 32)
                                d = dot_u8s8_wide(d, _mm256_loadu_si256((const __m256i *)(qg + c)),
                                                  _mm256_loadu_si256((const __m256i *)(xg + c)));
                            for (; c < gs; c++) tail += qg[c] * xg[c];
                        }
                        if (tail) d = _mm256_add_epi32(d, _mm256_setr_epi32(tail, 0, 0, 0, 0, 0, 0, 0));
                        /* gs is not a multiple of 32 here: one activation scale per weight group (p->A == G) */
                        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sc[g] * p->sxa[m * G + g]), acc[m]);
                        corr[m] += sc[g] * zp[g] * p->xqsf[m * G + g];
                    }
                }
                for (int64_t m = 0; m < M; m++) out[m] = hsum(acc[m]) - corr[m];
            } else {
                float acc[KM], corr[KM];
                for (int64_t m = 0; m < M; m++) acc[m] = corr[m] = 0.f;
                for (int64_t g = 0; g < G; g++) {
                    const uint8_t *qg = qr + (q4 ? g * gs / 2 : g * gs);
                    for (int64_t m = 0; m < M; m++) {
                        const float *xg = p->xp + m * K + g * gs;
                        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                        float tail = 0.f;
                        int64_t c = 0;
                        if (q4) {
                            const __m128i lo4 = _mm_set1_epi8(0x0F);
                            /* 16 bytes of a 64-column block (half h = 0 or 1): low nibbles meet xp[blk + 16h ..],
                             * high ones xp[blk + 32 + 16h ..]; a lone 32-column block: xp[c ..] and xp[c + 16 ..] */
                            for (; c + 32 <= gs; c += 32) {
                                const int64_t blk = c - c % 64;
                                const int in64 = blk + 64 <= gs;
                                const float *xl = in64 ? xg + blk + (c % 64) / 2 : xg + c;
                                const float *xh = in64 ? xl + 32 : xl + 16;
                                __m128i b = _mm_loadu_si128((const __m128i *)(qg + c / 2));
                                __m256 l0, l1, h0, h1;
                                nib_to_ps(_mm_and_si128(b, lo4), &l0, &l1);
                                nib_to_ps(_mm_and_si128(_mm_srli_epi16(b, 4), lo4), &h0, &h1);
                                a0 = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xl), a0);
                                a1 = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xl + 8), a1);
                                a2 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xh), a2);
                                a3 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xh + 8), a3);
                            }
                            for (; c < gs; c += 2) {
                                uint8_t b = qg[c / 2];
                                tail += (float)(b & 15) * xg[c] + (float)(b >> 4) * xg[c + 1];
                            }
                        } else {
                            for (; c + 16 <= gs; c += 16) {
                                __m128i b = _mm_loadu_si128((const __m128i *)(qg + c));
                                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_loadu_ps(xg + c), a0);
                                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))),
                                                     _mm256_loadu_ps(xg + c + 8), a1);
                            }
                            for (; c < gs; c++) tail += (float)qg[c] * xg[c];
                        }
                        acc[m] += sc[g] * (hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail);
                        corr[m] += sc[g] * zp[g] * p->xs[m * G + g];
                    }
                }
                for (int64_t m = 0; m < M; m++) out[m] = acc[m] - corr[m];
            }
        }
        const float b = L->bias ? L->bias[n] : 0.f;
        for (int64_t m = 0; m < M; m++) {
            if (add)
                y[m * ys + n] += out[m] + b;
            else
                y[m * ys + n] = out[m] + b;
        }
    }
}

/* The prepared input of rows m0.. of x (for a pass over KM of them) */
static inline prep_t prep_rows(const prep_t *p, int fmt, int64_t m0) {
    prep_t q = *p;
    if (fmt == F_F32 || fmt == F_BF16) return q;
    const int64_t K = p->K, G = K / p->gs, A = p->A;
    q.xp = p->xp + m0 * K, q.xq = p->xq + m0 * K;
    q.xs = p->xs + m0 * G, q.xqsf = p->xqsf + m0 * G;
    q.xqs = p->xqs + m0 * A, q.sxa = p->sxa + m0 * A;
    return q;
}

/* lin_rows_k for any M <= MAXM: weight rows in pieces of ~32 KB, each met by every KM rows of x while it is in
 * L1/L2 (a prefill of 32 positions streams the weights once, not four times) */
static void lin_rows(const ss_lin *L, const prep_t *p, const float *x, int64_t M, int64_t n0, int64_t n1, float *y,
                     int64_t ys, int add) {
    if (M <= KM) {
        lin_rows_k(L, p, x, M, n0, n1, y, ys, add);
        return;
    }
    const int64_t K = L->K;
    const int fmt = L->fmt;
    const int64_t row_bytes = fmt == F_F32 ? 4 * K : fmt == F_BF16 ? 2 * K : fmt == F_Q8 ? K : K / 2;
    int64_t piece = 32768 / (row_bytes > 0 ? row_bytes : 1) / 8 * 8;
    if (piece < 8) piece = 8;
    for (int64_t a = n0; a < n1; a += piece) {
        const int64_t b = a + piece < n1 ? a + piece : n1;
        for (int64_t m0 = 0; m0 < M; m0 += KM) {
            const int64_t mc = M - m0 < KM ? M - m0 : KM;
            const prep_t q = prep_rows(p, fmt, m0);
            lin_rows_k(L, &q, x + m0 * K, mc, a, b, y + m0 * ys, ys, add);
        }
    }
}

/* ------------------------------------------------------------------ one decode call */
typedef struct {
    const ss_model *md;
    int64_t M, row0;
    int32_t rows;     /* the most rows of x a call may have (the buffers' size) */
    int32_t n_head;         /* with head_rows: how many rows of x get logits (0: none) */
    const int64_t *crow;    /* the cache row of each row of x (prefill: positions of sequences), or NULL: row0 + m */
    const int32_t *head_rows; /* the rows of x whose logits are written, in order ([n_head, vocab]), or NULL: all */
    const int64_t *tok, *slot, *pad;
    const int32_t *lslot; /* per-row LoRA slot (0: none) or NULL */
    float *logits;
    float *x, *q, *k, *v, *att, *h, *h2; /* shared activations */
    float *cs, *sn; /* [M, head_dim/2] RoPE cos/sin of each row's position (the same in every layer) */
    barrier_t bar;
    /* per thread */
    struct thread_buf {
        float *xn, *xp, *xs, *lt, *sc;
        int8_t *xq;
        int32_t *xqs;
        float *xqsf, *sxa;
        prep_t prep;
    } tb[MAXT];
} ss_ctx;

static void *amalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, (n + 63) / 64 * 64 + 64)) return NULL;
    memset(p, 0, n);
    return p;
}

void ss_ctx_free(ss_ctx *c);

/* Buffers for calls of up to `rows` rows of x (1..MAXM; a model that never takes more than 8 keeps them small) */
ss_ctx *ss_ctx_new(const ss_model *md, int nth, int rows) {
    if (nth > MAXT) nth = MAXT;
    if (rows < 1 || rows > MAXM) rows = MAXM;
    const int64_t RM = rows;
    ss_ctx *c = (ss_ctx *)calloc(1, sizeof(ss_ctx));
    if (!c) return NULL;
    c->rows = rows;
    const int64_t H = md->hidden, KX = md->max_k, R = md->lora_r > 0 ? md->lora_r : 1;
    c->x = amalloc(sizeof(float) * RM * H);
    c->q = amalloc(sizeof(float) * RM * (md->max_q + 8));
    c->k = amalloc(sizeof(float) * RM * (md->max_kv + 8));
    c->v = amalloc(sizeof(float) * RM * (md->max_kv + 8));
    c->att = amalloc(sizeof(float) * RM * (md->max_q + 8));
    c->h = amalloc(sizeof(float) * RM * (KX + 8));
    c->h2 = amalloc(sizeof(float) * RM * (KX + 8));
    c->cs = amalloc(sizeof(float) * RM * (md->head_dim + 8));
    c->sn = amalloc(sizeof(float) * RM * (md->head_dim + 8));
    int ok = c->x && c->q && c->k && c->v && c->att && c->h && c->h2 && c->cs && c->sn;
    for (int t = 0; t < nth && ok; t++) {
        struct thread_buf *b = &c->tb[t];
        b->xn = amalloc(sizeof(float) * RM * (KX + 8));
        b->xp = amalloc(sizeof(float) * RM * (KX + 64));
        b->xs = amalloc(sizeof(float) * RM * (KX + 8));
        b->xq = amalloc(RM * (KX + 64));
        b->xqs = amalloc(sizeof(int32_t) * RM * (KX + 8));
        b->xqsf = amalloc(sizeof(float) * RM * (KX + 8));
        b->sxa = amalloc(sizeof(float) * RM * (KX + 8));
        b->lt = amalloc(sizeof(float) * RM * R);
        /* scores of every query head of a kv group (a pruned layer may have one kv head for all its heads) */
        b->sc = amalloc(sizeof(float) * (md->max_q / md->head_dim + 1) * (md->cache_len + 16) + sizeof(float) * 8 * md->head_dim);
        ok = b->xn && b->xp && b->xs && b->xq && b->xqs && b->xqsf && b->sxa && b->lt && b->sc;
    }
    if (!ok) {
        ss_ctx_free(c);
        return NULL;
    }
    return c;
}

void ss_ctx_free(ss_ctx *c) {
    if (!c) return;
    free(c->x), free(c->q), free(c->k), free(c->v), free(c->att), free(c->h), free(c->h2), free(c->cs), free(c->sn);
    for (int t = 0; t < MAXT; t++) {
        struct thread_buf *b = &c->tb[t];
        free(b->xn), free(b->xp), free(b->xs), free(b->xq), free(b->xqs), free(b->xqsf), free(b->sxa), free(b->lt), free(b->sc);
    }
    free(c);
}

static inline void slice(int64_t N, int tid, int nth, int64_t *n0, int64_t *n1) {
    /* contiguous slices, cut on multiples of 8 rows so threads do not share cache lines of y */
    int64_t blocks = (N + 7) / 8;
    *n0 = blocks * tid / nth * 8;
    *n1 = blocks * (tid + 1) / nth * 8;
    if (*n0 > N) *n0 = N;
    if (*n1 > N) *n1 = N;
}

static void rmsnorm(const float *x, const float *w, float *y, int64_t M, int64_t H, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        /* the sum of squares in column order (a vectorized order moved the tests' random models across int8
         * rounding boundaries; 0.7 us a row) */
        float ss = 0.f;
        for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        const __m256 vr = _mm256_set1_ps(r);
        int64_t i = 0;
        for (; i + 8 <= H; i += 8)
            _mm256_storeu_ps(y + m * H + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), vr)));
        for (; i < H; i++) y[m * H + i] = w[i] * (xr[i] * r);
    }
}

static void job(void *arg, int tid, int nth);

/* Run one decode step: tokens [M] at cache slots slot[M] (pad[M] leading padded slots or NULL) of cache rows
 * row0..row0+M-1; logits [M, vocab]. Returns 0, or -1 for bad arguments. */
static int step(ss_ctx *c, const ss_model *md, int64_t M, const int64_t *tok, const int64_t *slot, const int64_t *pad,
                int64_t row0, const int64_t *crow, int n_head, const int32_t *head_rows, const int32_t *lslot,
                float *logits, int nth) {
    if (M < 1 || M > c->rows || row0 < 0 || (!crow && row0 + M > md->cache_rows)) return -1;
    for (int64_t m = 0; crow && m < M; m++)
        if (crow[m] < 0 || crow[m] >= md->cache_rows) return -1;
    for (int64_t m = 0; m < M; m++)
        if (slot[m] < 0 || slot[m] >= md->cache_len || tok[m] < 0 || tok[m] >= md->vocab) return -1;
    if (nth > MAXT) nth = MAXT;
    for (int t = 0; t < nth; t++)
        if (!c->tb[t].xn) nth = t; /* the context was made for fewer threads */
    if (nth < 1) nth = 1;
    c->md = md, c->M = M, c->row0 = row0, c->tok = tok, c->slot = slot, c->pad = pad, c->lslot = lslot;
    c->crow = crow, c->n_head = n_head, c->head_rows = head_rows;
    c->logits = logits;
    for (int t = 0; t < nth; t++) c->tb[t].prep.x = NULL;
    /* embedding rows (cheap; done by the caller before the threads start) */
    const int64_t H = md->hidden;
    const ss_lin *E = &md->embed;
    for (int64_t m = 0; m < M; m++) {
        float *xr = c->x + m * H;
        const int64_t t = tok[m];
        if (E->fmt == F_F32)
            memcpy(xr, (const float *)E->w + t * H, sizeof(float) * H);
        else if (E->fmt == F_BF16)
            for (int64_t i = 0; i < H; i++) xr[i] = bf16f(((const uint16_t *)E->w)[t * H + i]);
        else {
            const int64_t gs = E->gs, G = H / gs;
            const float *sc = E->scale + t * G, *zp = E->zero + t * G;
            const uint8_t *q = (const uint8_t *)E->w + t * (E->fmt == F_Q4 ? H / 2 : H);
            for (int64_t i = 0; i < H; i++) {
                const int code = E->fmt == F_Q4 ? ((q[i / 2] >> ((i & 1) * 4)) & 15) : q[i];
                xr[i] = ((float)code - zp[i / gs]) * sc[i / gs];
            }
        }
    }
    const int64_t half = md->head_dim / 2;
    for (int64_t m = 0; m < M; m++) {
        const int64_t p = slot[m] - (pad ? pad[m] : 0);
        const float pos = (float)(p < 0 ? 0 : p);
        for (int64_t i = 0; i < half; i++) {
            const float f = pos * md->inv_freq[i]; /* fp32 product, as the Python path computes it */
            c->cs[m * half + i] = cosf(f);
            c->sn[m * half + i] = sinf(f);
        }
    }
    atomic_store(&c->bar.count, 0);
    pool_run(job, c, nth);
    return 0;
}

int ss_decode(ss_ctx *c, const ss_model *md, int64_t M, const int64_t *tok, const int64_t *slot, const int64_t *pad,
              int64_t row0, const int32_t *lslot, float *logits, int nth) {
    return step(c, md, M, tok, slot, pad, row0, NULL, 0, NULL, lslot, logits, nth);
}

/* The prefill of S sequences: sequence i's lens[i] tokens (tok holds them one sequence after another) at slots
 * slot0[i].. of cache row rows[i] (pad: each one's leading padded slots, positions count from there, or NULL;
 * lslot: each one's LoRA slot, 0 none, or NULL). Positions are packed across sequences into calls of up to the
 * context's rows (a short uncached suffix shares a call with the next sequence's instead of streaming the weights
 * alone), every call's keys and values written before any is read (causal inside it); the LM head only for each
 * sequence's last position: logits [S, vocab]. Returns 0, or -1 for bad arguments (nothing written). */
int ss_prefill_rows(ss_ctx *c, const ss_model *md, int64_t S, const int64_t *lens, const int64_t *tok,
                    const int64_t *slot0, const int64_t *pad, const int64_t *rows, const int32_t *lslot, float *logits,
                    int nth) {
    if (S < 1) return -1;
    int64_t total = 0;
    for (int64_t i = 0; i < S; i++) {
        const int64_t p = pad ? pad[i] : 0;
        if (lens[i] < 1 || slot0[i] < 0 || p < 0 || p > slot0[i] || slot0[i] + lens[i] > md->cache_len || rows[i] < 0 ||
            rows[i] >= md->cache_rows)
            return -1;
        total += lens[i];
    }
    for (int64_t i = 0; i < total; i++)
        if (tok[i] < 0 || tok[i] >= md->vocab) return -1;
    const int64_t per = c->rows;
    int64_t ttok[MAXM], tslot[MAXM], tpad[MAXM], tcrow[MAXM];
    int32_t tls[MAXM], hrows[MAXM];
    int64_t seq = 0, off = 0, base = 0; /* the sequence being packed, its next position, its first token in tok */
    while (seq < S) {
        int64_t M = 0, first = -1;
        int n_head = 0;
        while (M < per && seq < S) {
            const int64_t take = lens[seq] - off < per - M ? lens[seq] - off : per - M;
            for (int64_t i = 0; i < take; i++) {
                ttok[M + i] = tok[base + off + i], tslot[M + i] = slot0[seq] + off + i;
                tpad[M + i] = pad ? pad[seq] : 0, tcrow[M + i] = rows[seq], tls[M + i] = lslot ? lslot[seq] : 0;
            }
            M += take, off += take;
            if (off == lens[seq]) { /* this sequence ends in this call: its last position gets logits */
                if (first < 0) first = seq;
                hrows[n_head++] = (int32_t)(M - 1);
                base += lens[seq], seq++, off = 0;
            }
        }
        if (step(c, md, M, ttok, tslot, pad ? tpad : NULL, 0, tcrow, n_head, hrows, lslot ? tls : NULL,
                 logits + (first < 0 ? 0 : first) * md->vocab, nth) != 0)
            return -1;
    }
    return 0;
}

/* The first index of the largest value (torch.argmax's choice among equal maxima; a NaN counts as the largest). */
static int64_t argmax_f32(const float *x, int64_t n) {
    int64_t best = 0;
    float bv = x[0];
    if (bv != bv) return 0;
    for (int64_t i = 1; i < n; i++) {
        const float v = x[i];
        if (v != v) return i;
        if (v > bv) bv = v, best = i;
    }
    return best;
}

/* out[m] = argmax of row m of x [M, n] (what the engine's greedy rows take; a torch.argmax there opens an OpenMP
 * region whose spinning workers then compete with this pool's for the cores) */
void ss_argmax_rows(const float *x, int64_t M, int64_t n, int64_t *out) {
    for (int64_t m = 0; m < M; m++) out[m] = argmax_f32(x + m * n, n);
}

/* Greedy decoding of M rows in one call: step i decodes tok[m] at slot[m] + i, and each row's argmax becomes its next
 * token. A row is done after it produced one of eos[0..n_eos) (not kept) or limit[m] tokens; a done row feeds pad_tok,
 * as generate_ids does. out[m * steps + i]: row m's i-th new token; count[m]: how many it kept. Stops when every row
 * is done. Returns the number of decode steps run, or -1 for bad arguments (nothing decoded). The caller's
 * count[m] and limit[m] say how many tokens a row already has and may have in all (a row with count >= limit is
 * done before it starts). */
int64_t ss_decode_greedy(ss_ctx *c, const ss_model *md, int64_t M, const int64_t *tok0, const int64_t *slot0,
                         const int64_t *pad, int64_t row0, const int32_t *lslot, float *logits, int nth, int64_t steps,
                         const int64_t *eos, int64_t n_eos, int64_t pad_tok, const int64_t *limit, int64_t *out,
                         int64_t *count) {
    if (M < 1 || M > c->rows || steps < 0) return -1;
    int64_t tok[MAXM], slot[MAXM];
    int done[MAXM], live = 0;
    for (int64_t m = 0; m < M; m++) {
        tok[m] = tok0[m], slot[m] = slot0[m];
        done[m] = count[m] >= limit[m];
        live += !done[m];
    }
    int64_t i = 0;
    for (; i < steps && live; i++) {
        if (ss_decode(c, md, M, tok, slot, pad, row0, lslot, logits, nth) != 0) return i ? i : -1;
        for (int64_t m = 0; m < M; m++) {
            slot[m]++;
            if (done[m]) {
                tok[m] = pad_tok;
                continue;
            }
            const int64_t t = argmax_f32(logits + m * md->vocab, md->vocab);
            int stop = 0;
            for (int64_t e = 0; e < n_eos; e++) stop |= eos[e] == t;
            if (stop) {
                done[m] = 1, live--;
                tok[m] = pad_tok;
                continue;
            }
            out[m * steps + i] = t;
            tok[m] = t;
            if (++count[m] >= limit[m]) done[m] = 1, live--;
        }
    }
    return i;
}

/* 8 floats of a LoRA B^T row (fp32 or bf16) */
static inline __m256 lora_ld8(const void *b, int bf, int64_t n) {
    return bf ? load_bf16((const uint16_t *)b + n) : _mm256_loadu_ps((const float *)b + n);
}

static inline float lora_ld1(const void *b, int bf, int64_t n) {
    return bf ? bf16f(((const uint16_t *)b)[n]) : ((const float *)b)[n];
}

/* the LoRA term of rows n0..n1 of L for every row m with a slot: y[m, n] += B[n, slot] . (A[slot] x_m); the stacks
 * in fp32 or bf16 (L->lora_bf16: half the bytes a step streams, converted to fp32 in registers) */
static void lora_add(const ss_ctx *c, const ss_lin *L, const float *x, float *lt, int64_t n0, int64_t n1, float *y,
                     int64_t ys) {
    if (!L->lora_a || !c->lslot) return;
    const int64_t R = c->md->lora_r, K = L->K, ld = L->lora_ld;
    const int bf = L->lora_bf16;
    const size_t esz = bf ? 2 : 4;
    int any = 0;
    for (int64_t m = 0; m < c->M; m++) {
        const int s = c->lslot[m];
        if (!s) continue;
        any = 1;
        for (int64_t r = 0; r < R; r++) {
            const char *a = (const char *)L->lora_a + (size_t)((s * R + r) * K) * esz;
            lt[m * R + r] = bf ? dot_bf16((const uint16_t *)a, x + m * K, K) : dot_f32((const float *)a, x + m * K, K);
        }
    }
    if (!any) return;
    /* y[m, n0:n1] += sum_r lt[m, r] * B^T[s*R + r, n0:n1]: contiguous axpys, four ranks per pass over y */
    for (int64_t m = 0; m < c->M; m++) {
        const int s = c->lslot[m];
        if (!s) continue;
        float *yr = y + m * ys;
        int64_t r = 0;
        for (; r + 4 <= R; r += 4) {
            const char *b0 = (const char *)L->lora_b + (size_t)((s * R + r) * ld) * esz, *b1 = b0 + ld * esz,
                       *b2 = b1 + ld * esz, *b3 = b2 + ld * esz;
            const float l0 = lt[m * R + r], l1 = lt[m * R + r + 1], l2 = lt[m * R + r + 2], l3 = lt[m * R + r + 3];
            const __m256 v0 = _mm256_set1_ps(l0), v1 = _mm256_set1_ps(l1), v2 = _mm256_set1_ps(l2), v3 = _mm256_set1_ps(l3);
            int64_t n = n0;
            for (; n + 8 <= n1; n += 8) {
                __m256 t = _mm256_mul_ps(v0, lora_ld8(b0, bf, n));
                t = _mm256_fmadd_ps(v1, lora_ld8(b1, bf, n), t);
                t = _mm256_fmadd_ps(v2, lora_ld8(b2, bf, n), t);
                t = _mm256_fmadd_ps(v3, lora_ld8(b3, bf, n), t);
                _mm256_storeu_ps(yr + n, _mm256_add_ps(_mm256_loadu_ps(yr + n), t));
            }
            for (; n < n1; n++)
                yr[n] += l0 * lora_ld1(b0, bf, n) + l1 * lora_ld1(b1, bf, n) + l2 * lora_ld1(b2, bf, n) +
                         l3 * lora_ld1(b3, bf, n);
        }
        for (; r < R; r++) {
            const char *b = (const char *)L->lora_b + (size_t)((s * R + r) * ld) * esz;
            const float l = lt[m * R + r];
            for (int64_t n = n0; n < n1; n++) yr[n] += l * lora_ld1(b, bf, n);
        }
    }
}

static void rope(float *v, int64_t hd, const float *cs, const float *sn) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i] + a * sn[i];
    }
}

/* one slot's K or V into the cache in its storage (int8: absmax/127 scale, round half to even as torch.round) */
static void cache_put(void *base, float *scales, int dt, int64_t slot, int64_t hd, const float *x) {
    const int64_t o = slot * hd;
    if (dt == C_F32)
        memcpy((float *)base + o, x, sizeof(float) * hd);
    else if (dt == C_BF16)
        for (int64_t d = 0; d < hd; d++) ((uint16_t *)base)[o + d] = f2bf16(x[d]);
    else if (dt == C_F16)
        for (int64_t d = 0; d < hd; d++) ((uint16_t *)base)[o + d] = _cvtss_sh(x[d], _MM_FROUND_TO_NEAREST_INT);
    else {
        float amax = 0.f;
        for (int64_t d = 0; d < hd; d++) amax = fmaxf(amax, fabsf(x[d]));
        float sc = amax / 127.f;
        if (!(sc > 0.f)) sc = 1.f;
        for (int64_t d = 0; d < hd; d++) {
            long q = lrintf(x[d] / sc);
            ((int8_t *)base)[o + d] = (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
        scales[slot] = sc;
    }
}

/* exp(x) for 8 lanes: x = n ln2 + r (|r| <= ln2/2, ln2 split in two for precision), e^r by a degree-6 polynomial,
 * 2^n through the exponent bits; relative error ~2e-7 on [-88, 88], 0 below. */
static inline __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* one cached K or V row as floats: the row itself (fp32) or its conversion into tmp */
static inline const float *cache_row(const char *base, const float *scales, int dt, int64_t j, int64_t hd, float *tmp) {
    if (dt == C_F32) return (const float *)base + j * hd;
    if (dt == C_BF16) {
        const uint16_t *r = (const uint16_t *)base + j * hd;
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8) _mm256_storeu_ps(tmp + d, load_bf16(r + d));
        for (; d < hd; d++) tmp[d] = bf16f(r[d]);
    } else if (dt == C_F16) {
        const uint16_t *r = (const uint16_t *)base + j * hd;
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8) _mm256_storeu_ps(tmp + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + d))));
        for (; d < hd; d++) tmp[d] = _cvtsh_ss(r[d]);
    } else { /* codes * scale in fp32, as the Python path de-quantizes */
        const int8_t *r = (const int8_t *)base + j * hd;
        const float sj = scales[j];
        const __m256 vs = _mm256_set1_ps(sj);
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(tmp + d, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                        _mm_loadl_epi64((const __m128i *)(r + d)))), vs));
        for (; d < hd; d++) tmp[d] = (float)r[d] * sj;
    }
    return tmp;
}

/* 8 sums of 8 vectors at once: lane r of the result = the sum of a[r]'s lanes */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Where row m's keys and values of kv head kvh live (its cache row: row0 + m, or row0 for every m when the rows are
 * positions of one sequence, the prefill) */
typedef struct {
    char *kb, *vb;
    float *ks, *vs;
    int64_t s, lo;
} att_at;

static inline att_at att_where(const ss_ctx *c, const ss_layer *L, int64_t m, int kvh) {
    const ss_model *md = c->md;
    const int64_t hd = md->head_dim, S = md->cache_len, nkv = L->n_kv;
    const int64_t row = c->crow ? c->crow[m] : c->row0 + m, p = c->pad ? c->pad[m] : 0;
    const int dt = md->cache_dtype;
    const int64_t base = (row * nkv + kvh) * S * hd, sbase = (row * nkv + kvh) * S;
    const size_t esz = dt == C_F32 ? 4 : dt == C_I8 ? 1 : 2;
    att_at a;
    a.kb = (char *)L->kc + base * esz, a.vb = (char *)L->vc + base * esz;
    a.ks = L->ks ? L->ks + sbase : NULL, a.vs = L->vs ? L->vs + sbase : NULL;
    a.s = c->slot[m];
    a.lo = p <= a.s ? p : a.s; /* a padded query sees only itself */
    return a;
}

/* RoPE on row m's key of kv head kvh and its group's queries; the key and value into the cache at the row's slot */
static void attn_write(const ss_ctx *c, const ss_layer *L, int64_t m, int kvh) {
    const ss_model *md = c->md;
    const int64_t hd = md->head_dim, nkv = L->n_kv, nh = L->n_heads, g = nh / nkv;
    const float *cs = c->cs + m * (hd / 2), *sn = c->sn + m * (hd / 2);
    float *kk = c->k + m * nkv * hd + kvh * hd, *vv = c->v + m * nkv * hd + kvh * hd;
    const att_at a = att_where(c, L, m, kvh);
    rope(kk, hd, cs, sn);
    cache_put(a.kb, a.ks, md->cache_dtype, a.s, hd, kk);
    cache_put(a.vb, a.vs, md->cache_dtype, a.s, hd, vv);
    for (int64_t qi = 0; qi < g; qi++) rope(c->q + m * nh * hd + (kvh * g + qi) * hd, hd, cs, sn);
}

/* Attention of row m's query heads of kv head kvh over its cached slots lo..s (attn_write has run for every row
 * whose slots it reads). Cached rows are read (converted into tmp when not fp32) eight slots at a time, once for
 * all the group's query heads (GQA: 3 per kv head in SmolLM2): eight scores come out of one transpose-sum, and the
 * weighted values accumulate eight slots per load and store of the output. */
static void attn_read(const ss_ctx *c, const ss_layer *L, int64_t m, int kvh, float *sc) {
    const ss_model *md = c->md;
    const int64_t hd = md->head_dim, S = md->cache_len, nkv = L->n_kv, nh = L->n_heads, g = nh / nkv;
    const int dt = md->cache_dtype;
    const att_at a = att_where(c, L, m, kvh);
    const int64_t s = a.s, lo = a.lo;
    const int64_t SP = S + 16; /* row stride of the per-head score rows in sc */
    float *tmp = sc + g * SP;  /* 8 converted cache rows */
    const float scale = 1.f / sqrtf((float)hd);
    const int vec = hd % 16 == 0;
    const float *qs[64];
    for (int64_t qi = 0; qi < g; qi++) qs[qi] = c->q + m * nh * hd + (kvh * g + qi) * hd;
    const float *rows[8];
    int64_t j = lo;
    if (vec)
        for (; j + 8 <= s + 1; j += 8) {
            for (int r = 0; r < 8; r++) rows[r] = cache_row(a.kb, a.ks, dt, j + r, hd, tmp + r * hd);
            for (int64_t qi = 0; qi < g; qi++) {
                __m256 acc[8];
                for (int r = 0; r < 8; r++) { /* each cached row read front to back (the prefetchers' order) */
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
                    for (int64_t d = 0; d < hd; d += 16) {
                        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[qi] + d), _mm256_loadu_ps(rows[r] + d), a0);
                        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qs[qi] + d + 8), _mm256_loadu_ps(rows[r] + d + 8), a1);
                    }
                    acc[r] = _mm256_add_ps(a0, a1);
                }
                _mm256_storeu_ps(sc + qi * SP + j, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
            }
        }
    for (; j <= s; j++) {
        const float *kr = cache_row(a.kb, a.ks, dt, j, hd, tmp);
        for (int64_t qi = 0; qi < g; qi++) sc[qi * SP + j] = dot_f32(qs[qi], kr, hd) * scale;
    }
    for (int64_t qi = 0; qi < g; qi++) { /* softmax over slots lo..s, in place */
        float *r = sc + qi * SP;
        __m256 vm = _mm256_set1_ps(-INFINITY);
        j = lo;
        for (; j + 8 <= s + 1; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(r + j));
        float mx = -INFINITY;
        {
            float t8[8];
            _mm256_storeu_ps(t8, vm);
            for (int i = 0; i < 8; i++) mx = t8[i] > mx ? t8[i] : mx;
        }
        for (; j <= s; j++) mx = r[j] > mx ? r[j] : mx;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        j = lo;
        for (; j + 8 <= s + 1; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(r + j), vmx));
            _mm256_storeu_ps(r + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (; j <= s; j++) {
            r[j] = expf(r[j] - mx);
            sum += r[j];
        }
        const __m256 vinv = _mm256_set1_ps(1.f / sum);
        const float inv = 1.f / sum;
        j = lo;
        for (; j + 8 <= s + 1; j += 8) _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_loadu_ps(r + j), vinv));
        for (; j <= s; j++) r[j] *= inv;
    }
    for (int64_t qi = 0; qi < g; qi++) {
        float *out = c->att + m * nh * hd + (kvh * g + qi) * hd;
        for (int64_t d = 0; d < hd; d++) out[d] = 0.f;
    }
    j = lo;
    if (vec)
        for (; j + 8 <= s + 1; j += 8) {
            for (int r = 0; r < 8; r++) rows[r] = cache_row(a.vb, a.vs, dt, j + r, hd, tmp + r * hd);
            for (int64_t qi = 0; qi < g; qi++) {
                float *out = c->att + m * nh * hd + (kvh * g + qi) * hd;
                const float *w = sc + qi * SP + j;
                __m256 wv[8];
                for (int r = 0; r < 8; r++) wv[r] = _mm256_set1_ps(w[r]);
                if (hd == 64) { /* the output in registers, each cached row read front to back */
                    __m256 o[8];
                    for (int k = 0; k < 8; k++) o[k] = _mm256_loadu_ps(out + 8 * k);
                    for (int r = 0; r < 8; r++)
                        for (int k = 0; k < 8; k++) o[k] = _mm256_fmadd_ps(wv[r], _mm256_loadu_ps(rows[r] + 8 * k), o[k]);
                    for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + 8 * k, o[k]);
                } else
                    for (int64_t d = 0; d < hd; d += 8) {
                        __m256 o0 = _mm256_loadu_ps(out + d), o1 = _mm256_setzero_ps();
                        for (int r = 0; r < 8; r += 2) {
                            o0 = _mm256_fmadd_ps(wv[r], _mm256_loadu_ps(rows[r] + d), o0);
                            o1 = _mm256_fmadd_ps(wv[r + 1], _mm256_loadu_ps(rows[r + 1] + d), o1);
                        }
                        _mm256_storeu_ps(out + d, _mm256_add_ps(o0, o1));
                    }
            }
        }
    for (; j <= s; j++) {
        const float *vr = cache_row(a.vb, a.vs, dt, j, hd, tmp);
        for (int64_t qi = 0; qi < g; qi++) {
            float *out = c->att + m * nh * hd + (kvh * g + qi) * hd;
            const __m256 w = _mm256_set1_ps(sc[qi * SP + j]);
            int64_t d = 0;
            for (; d + 8 <= hd; d += 8)
                _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(out + d)));
            for (; d < hd; d++) out[d] += sc[qi * SP + j] * vr[d];
        }
    }
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* h[n] = silu(h[n]) * h2[n] for n in [n0, n1): 8 lanes through exp8 (relative error ~2e-7 against expf) */
static void silu_mul(float *h, const float *h2, int64_t n0, int64_t n1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
        const __m256 v = _mm256_loadu_ps(h + n);
        const __m256 e = exp8(_mm256_sub_ps(zero, v));
        _mm256_storeu_ps(h + n, _mm256_mul_ps(_mm256_div_ps(v, _mm256_add_ps(one, e)), _mm256_loadu_ps(h2 + n)));
    }
    for (; n < n1; n++) h[n] = silu(h[n]) * h2[n];
}

/* Built with -DSS_PROFILE (benchmarks/native_profile.py): thread 0 adds the seconds of each phase to ss_prof[]:
 * 0 q/k/v, 1 attention, 2 o_proj, 3 gate/up + SiLU, 4 down, 5 final norm + LM head, 7 waiting at barriers. */
#ifdef SS_PROFILE
#include <time.h>
double ss_prof[8];
static inline double pnow(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#define PT(i)                                                                                                      \
    do {                                                                                                           \
        if (tid == 0) {                                                                                            \
            const double t_ = pnow();                                                                              \
            ss_prof[i] += t_ - pt_;                                                                                \
            pt_ = t_;                                                                                              \
        }                                                                                                          \
    } while (0)
#else
#define PT(i) ((void)0)
#endif

static void job(void *arg, int tid, int nth) {
#ifdef SS_PROFILE
    double pt_ = pnow();
#endif
    ss_ctx *c = (ss_ctx *)arg;
    const ss_model *md = c->md;
    struct thread_buf *tb = &c->tb[tid];
    prep_t *p = &tb->prep;
    p->xp = tb->xp, p->xs = tb->xs, p->xq = tb->xq, p->xqs = tb->xqs, p->xqsf = tb->xqsf, p->sxa = tb->sxa;
    p->x = NULL;
    const int64_t M = c->M, H = md->hidden, hd = md->head_dim;
    const int i8 = md->act_int8;
    int sense = atomic_load(&c->bar.sense);
    int64_t n0, n1;
    for (int64_t li = 0; li < md->n_layers; li++) {
        const ss_layer *L = &md->layers[li];
        if (L->n_heads) { /* structured pruning may remove every head (or channel) of a layer */
            const int64_t nq = L->n_heads * hd, nkv = L->n_kv * hd;
            rmsnorm(c->x, L->ln1, tb->xn, M, H, md->eps);
            p->x = NULL; /* new content: prepare again */
            const ss_lin *ls[3] = {&L->q, &L->k, &L->v};
            float *outs[3] = {c->q, c->k, c->v};
            const int64_t ns[3] = {nq, nkv, nkv};
            for (int j = 0; j < 3; j++) {
                prepare(p, ls[j], tb->xn, M, i8);
                slice(ns[j], tid, nth, &n0, &n1);
                lin_rows(ls[j], p, tb->xn, M, n0, n1, outs[j], ns[j], 0);
                lora_add(c, ls[j], tb->xn, tb->lt, n0, n1, outs[j], ns[j]);
            }
            PT(0);
            barrier(&c->bar, nth, &sense);
            PT(7);
            const int64_t items = M * L->n_kv;
            if (c->crow) { /* positions of sequences: every key and value in the cache before any is read */
                for (int64_t it = tid; it < items; it += nth) attn_write(c, L, it / L->n_kv, (int)(it % L->n_kv));
                barrier(&c->bar, nth, &sense);
                for (int64_t it = tid; it < items; it += nth) attn_read(c, L, it / L->n_kv, (int)(it % L->n_kv), tb->sc);
            } else
                for (int64_t it = tid; it < items; it += nth) {
                    attn_write(c, L, it / L->n_kv, (int)(it % L->n_kv));
                    attn_read(c, L, it / L->n_kv, (int)(it % L->n_kv), tb->sc);
                }
            PT(1);
            barrier(&c->bar, nth, &sense);
            PT(7);
            p->x = NULL;
            prepare(p, &L->o, c->att, M, i8);
            slice(H, tid, nth, &n0, &n1);
            lin_rows(&L->o, p, c->att, M, n0, n1, c->x, H, 1); /* residual: x += o_proj(att) */
            lora_add(c, &L->o, c->att, tb->lt, n0, n1, c->x, H);
            PT(2);
            barrier(&c->bar, nth, &sense);
            PT(7);
        }
        if (L->inter) {
            const int64_t I = L->inter;
            rmsnorm(c->x, L->ln2, tb->xn, M, H, md->eps);
            p->x = NULL;
            slice(I, tid, nth, &n0, &n1);
            prepare(p, &L->gate, tb->xn, M, i8);
            lin_rows(&L->gate, p, tb->xn, M, n0, n1, c->h, I, 0);
            lora_add(c, &L->gate, tb->xn, tb->lt, n0, n1, c->h, I);
            prepare(p, &L->up, tb->xn, M, i8);
            lin_rows(&L->up, p, tb->xn, M, n0, n1, c->h2, I, 0);
            lora_add(c, &L->up, tb->xn, tb->lt, n0, n1, c->h2, I);
            for (int64_t m = 0; m < M; m++) silu_mul(c->h + m * I, c->h2 + m * I, n0, n1);
            PT(3);
            barrier(&c->bar, nth, &sense);
            PT(7);
            p->x = NULL;
            prepare(p, &L->down, c->h, M, i8);
            slice(H, tid, nth, &n0, &n1);
            lin_rows(&L->down, p, c->h, M, n0, n1, c->x, H, 1);
            lora_add(c, &L->down, c->h, tb->lt, n0, n1, c->x, H);
            PT(4);
            barrier(&c->bar, nth, &sense);
            PT(7);
        }
    }
    const int64_t hm = c->head_rows ? c->n_head : M;
    if (hm == 0) return; /* a prefill call in which no sequence ends: no logits */
    if (c->head_rows)
        for (int64_t i = 0; i < hm; i++) rmsnorm(c->x + c->head_rows[i] * H, md->norm, tb->xn + i * H, 1, H, md->eps);
    else
        rmsnorm(c->x, md->norm, tb->xn, M, H, md->eps);
    p->x = NULL;
    prepare(p, &md->head, tb->xn, hm, i8);
    slice(md->vocab, tid, nth, &n0, &n1);
    lin_rows(&md->head, p, tb->xn, hm, n0, n1, c->logits, md->vocab, 0);
    PT(5);
}
