/* keras_gemma's int8 weight-only product for decoding one token on a CPU
 * (PyTorch; see int8_cpu_kernel.py):
 *
 *     y[a, b] = sum_c x[c] * w[a, c, b]     x float32 [C], w int8 [A, C, B]
 *
 * Every Gemma kernel has this form with its contracted axes contiguous:
 * feed-forward [1, D, F], query/key/value [heads, D, H], attention output
 * [1, heads * H, D], the vocabulary table [V, D, 1]. Each int8 value is
 * read once and converted in registers; no float copy of w is made.
 * Threads: OpenMP (the runtime PyTorch itself loads).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* B == 1 (the vocabulary table): one dot product per row of w, four rows
 * at a time for independent accumulator chains. */
static void rows_dot_x(const float* x, const int8_t* w, float* y, long A, long C) {
  long A4 = A - A % 4;
#pragma omp parallel for schedule(static)
  for (long a = 0; a < A4; a += 4) {
    const int8_t *r0 = w + a * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
    long c = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#ifdef __AVX512F__
    __m512 v0 = _mm512_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
    for (; c + 16 <= C; c += 16) {
      __m512 xc = _mm512_loadu_ps(x + c);
#define INT8X16(r) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((r) + c))))
      v0 = _mm512_fmadd_ps(xc, INT8X16(r0), v0);
      v1 = _mm512_fmadd_ps(xc, INT8X16(r1), v1);
      v2 = _mm512_fmadd_ps(xc, INT8X16(r2), v2);
      v3 = _mm512_fmadd_ps(xc, INT8X16(r3), v3);
#undef INT8X16
    }
    s0 = _mm512_reduce_add_ps(v0);
    s1 = _mm512_reduce_add_ps(v1);
    s2 = _mm512_reduce_add_ps(v2);
    s3 = _mm512_reduce_add_ps(v3);
#endif
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (long k = c; k < C; k++) {
      s0 += x[k] * (float)r0[k];
      s1 += x[k] * (float)r1[k];
      s2 += x[k] * (float)r2[k];
      s3 += x[k] * (float)r3[k];
    }
    y[a] = s0;
    y[a + 1] = s1;
    y[a + 2] = s2;
    y[a + 3] = s3;
  }
  for (long a = A4; a < A; a++) {
    float s = 0.f;
    for (long c = 0; c < C; c++) s += x[c] * (float)w[a * C + c];
    y[a] = s;
  }
}

/* B > 1: y[a] += x[c] * w[a, c] row by row (contiguous reads). Each thread
 * takes a slice of the c rows into its own partial sums, added at the end.
 * Returns -1 if the partial sums cannot be allocated. */
static int x_times_rows(const float* x, const int8_t* w, float* y, long A, long C, long B) {
  int T = omp_get_max_threads();
  float* partial = (float*)calloc((size_t)T * A * B, sizeof(float));
  if (partial == NULL) return -1;
#pragma omp parallel
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    long c0 = C * t / n, c1 = C * (t + 1) / n;
    for (long a = 0; a < A; a++) {
      float* acc = partial + ((size_t)t * A + a) * B;
      const int8_t* rows = w + a * C * B;
      long c = c0;
      for (; c + 4 <= c1; c += 4) { /* Four rows per pass over acc. */
        const int8_t *r0 = rows + c * B, *r1 = r0 + B, *r2 = r1 + B, *r3 = r2 + B;
        float x0 = x[c], x1 = x[c + 1], x2 = x[c + 2], x3 = x[c + 3];
#pragma omp simd
        for (long b = 0; b < B; b++)
          acc[b] += x0 * (float)r0[b] + x1 * (float)r1[b] + x2 * (float)r2[b] + x3 * (float)r3[b];
      }
      for (; c < c1; c++) {
        const int8_t* r0 = rows + c * B;
        float x0 = x[c];
#pragma omp simd
        for (long b = 0; b < B; b++) acc[b] += x0 * (float)r0[b];
      }
    }
  }
  for (long i = 0; i < A * B; i++) {
    float s = 0.f;
    for (int t = 0; t < T; t++) s += partial[(size_t)t * A * B + i];
    y[i] = s;
  }
  free(partial);
  return 0;
}

int keras_gemma_int8_product(const float* x, const int8_t* w, float* y, long A, long C, long B) {
  if (B == 1) {
    rows_dot_x(x, w, y, A, C);
    return 0;
  }
  return x_times_rows(x, w, y, A, C, B);
}
