/* slimswarm CPU kernels: small-batch (M <= 8) linear layers that stream each weight row once.
 *
 * Decode at batch 1..8 is bound by reading weights. MKL's sgemv reaches ~10 GB/s on the 2-core
 * machines we target; these loops read each row of W once for all M inputs, dequantize in
 * registers (bf16, int8, int4 with per-group scale and zero point) and accumulate in fp32.
 * AVX2 + FMA only, so it runs on any x86-64-v3 CPU. Threads split the output rows. */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define MAXM 8

/* GNU OpenMP cannot run a team in a forked child (the parent's pool threads are gone and the first parallel
 * region waits for them forever): after fork these kernels run on the calling thread only. */
static volatile int forked_child = 0;
static void mark_forked_child(void) { forked_child = 1; }
__attribute__((constructor)) static void register_atfork(void) { pthread_atfork(NULL, NULL, mark_forked_child); }
#define THREADS(n) (forked_child ? 1 : (n))

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* y[M,N] = x[M,K] @ w[N,K]^T (+ bias). wbits: 32 = fp32 rows, 16 = bf16 rows. */
void ss_linear_float(const float *x, const void *w, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int wbits, int nth) {
#pragma omp parallel for num_threads(THREADS(nth)) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t k = 0;
            float s = 0.f;
            if (wbits == 32) {
                const float *wr = (const float *)w + n * K;
                for (; k + 32 <= K; k += 32) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
                }
                for (; k + 8 <= K; k += 8)
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
                s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for (; k < K; k++) s += wr[k] * xr[k];
            } else {
                const uint16_t *wr = (const uint16_t *)w + n * K;
                for (; k + 32 <= K; k += 32) {
                    a0 = _mm256_fmadd_ps(load_bf16(wr + k), _mm256_loadu_ps(xr + k), a0);
                    a1 = _mm256_fmadd_ps(load_bf16(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
                    a2 = _mm256_fmadd_ps(load_bf16(wr + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
                    a3 = _mm256_fmadd_ps(load_bf16(wr + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
                }
                for (; k + 8 <= K; k += 8)
                    a0 = _mm256_fmadd_ps(load_bf16(wr + k), _mm256_loadu_ps(xr + k), a0);
                s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for (; k < K; k++) {
                    uint32_t b = (uint32_t)wr[k] << 16;
                    float f;
                    __builtin_memcpy(&f, &b, 4);
                    s += f * xr[k];
                }
            }
            y[m * N + n] = s + (bias ? bias[n] : 0.f);
        }
    }
}

/* Quantized rows: w = (q - zero[g]) * scale[g] for each group g of `gs` input columns.
 * bits 8: one code a byte. bits 4: two codes a byte, low nibble = even column.
 * Needs K % gs == 0 and gs % 16 == 0. Computes sum_g scale*(q.x - zero*sum(x)) so that
 * the zero point costs one scalar per group, not one op per weight.
 * x is re-laid per group as [even columns | odd columns] so that a byte's two nibbles meet
 * their inputs with plain vector loads. M == 1 (decode) has its own loop with four independent
 * accumulator chains; M > 1 unpacks each code block once and reuses it for every row of x. */

static inline void group_codes4(const uint8_t *qg, int64_t i, __m256 *lo0, __m256 *hi0, __m256 *lo1, __m256 *hi1) {
    const __m256i low4 = _mm256_set1_epi32(0xF);
    __m128i b = _mm_loadu_si128((const __m128i *)(qg + i)); /* 16 bytes = 32 codes */
    __m256i v0 = _mm256_cvtepu8_epi32(b);
    __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    *lo0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low4));
    *hi0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    *lo1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low4));
    *hi1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

void ss_linear_quant(const float *x, const uint8_t *q, const float *scale, const float *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t gs,
                     int bits, int nth) {
    const int64_t G = K / gs;
    float *xe = (float *)aligned_alloc(64, sizeof(float) * ((M * K + 15) / 16 * 16 + 16));
    float *xs = (float *)malloc(sizeof(float) * M * G);
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *dst = xe + m * K;
        if (bits == 4) {
            for (int64_t g = 0; g < G; g++)
                for (int64_t i = 0; i < gs / 2; i++) {
                    dst[g * gs + i] = xr[g * gs + 2 * i];
                    dst[g * gs + gs / 2 + i] = xr[g * gs + 2 * i + 1];
                }
        } else {
            for (int64_t k = 0; k < K; k++) dst[k] = xr[k];
        }
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int64_t i = 0; i < gs; i++) s += xr[g * gs + i];
            xs[m * G + g] = s;
        }
    }
    const int64_t half = gs / 2;
    if (M == 1 && bits == 4) {
#pragma omp parallel for num_threads(THREADS(nth)) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *qr = q + n * (K / 2);
            __m256 acc = _mm256_setzero_ps();
            float corr = 0.f;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t *qg = qr + g * half;
                const float *xg = xe + g * gs;
                __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
                int64_t i = 0;
                for (; i + 16 <= half; i += 16) {
                    __m256 lo0, hi0, lo1, hi1;
                    group_codes4(qg, i, &lo0, &hi0, &lo1, &hi1);
                    p0 = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(xg + i), p0);
                    p1 = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xg + half + i), p1);
                    p2 = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xg + i + 8), p2);
                    p3 = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xg + half + i + 8), p3);
                }
                for (; i < half; i += 8) { /* gs % 32 == 16: one block of 8 bytes left */
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + i)));
                    p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF))),
                                         _mm256_loadu_ps(xg + i), p0);
                    p1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xg + half + i), p1);
                }
                const float sc = scale[n * G + g];
                acc = _mm256_fmadd_ps(_mm256_set1_ps(sc), _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)), acc);
                corr += sc * zero[n * G + g] * xs[g];
            }
            y[n] = hsum(acc) - corr + (bias ? bias[n] : 0.f);
        }
        free(xe);
        free(xs);
        return;
    }
    const __m256i low4 = _mm256_set1_epi32(0xF);
#pragma omp parallel for num_threads(THREADS(nth)) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        __m256 acc[MAXM];
        float corr[MAXM];
        for (int64_t m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); corr[m] = 0.f; }
        const uint8_t *qr = q + n * (bits == 4 ? K / 2 : K);
        for (int64_t g = 0; g < G; g++) {
            __m256 part[MAXM];
            for (int64_t m = 0; m < M; m++) part[m] = _mm256_setzero_ps();
            if (bits == 4) {
                const uint8_t *qg = qr + g * half;
                for (int64_t i = 0; i < half; i += 8) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + i)));
                    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low4));
                    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                    for (int64_t m = 0; m < M; m++) {
                        const float *xg = xe + m * K + g * gs;
                        part[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + i), part[m]);
                        part[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + half + i), part[m]);
                    }
                }
            } else {
                const uint8_t *qg = qr + g * gs;
                for (int64_t i = 0; i < gs; i += 8) {
                    __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + i))));
                    for (int64_t m = 0; m < M; m++)
                        part[m] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xe + m * K + g * gs + i), part[m]);
                }
            }
            const float sc = scale[n * G + g], zp = zero[n * G + g];
            const __m256 vs = _mm256_set1_ps(sc);
            for (int64_t m = 0; m < M; m++) {
                acc[m] = _mm256_fmadd_ps(vs, part[m], acc[m]);
                corr[m] += sc * zp * xs[m * G + g];
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]) - corr[m] + (bias ? bias[n] : 0.f);
    }
    free(xe);
    free(xs);
}
