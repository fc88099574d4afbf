// Probe: how fast could a native (C, outside XLA) inference kernel run MedT's largest
// attention layer on this CPU, with an exponential that keeps NaN and infinity?
//
// Not part of the package: a measurement for the lever "a kernel outside XLA" in
// benchmarks/RESULTS.md ("Not done yet"). The layer: MedT at 128x128, batch 8, the global
// branch's 64-pixel attention: 8 x 64 lines x 8 heads = 4096 rows of 64 queries, 2 query
// and 2 positional-query channels, 4 value and 4 positional-value channels, per query i:
//
//   s_ij = q_i.k_j + p_i.q_table[i,j] + r_j.k_table[j,i]
//   y_i = sum_j softmax_j(s_ij) v_j,   y_position_i = sum_j softmax_j(s_ij) v_table[i,j]
//
// Rows are split across the cores (OpenMP); each query's logits, maximum, exponentials,
// sum and both weighted sums are computed in one pass while its 64 logits sit in
// registers. Build and run (x86-64 with AVX-512, glibc's libmvec):
//
//   gcc -O3 -march=native -fopenmp -DVECTOR_EXP native_attention.c -o probe -lmvec -lm
//   OMP_NUM_THREADS=2 ./probe
//
// VECTOR_EXP: 16 exponentials at a time with libmvec's _ZGVeN16v_expf (NaN in, NaN out)
// and the row maximum with vector max; without it, scalar expf (GCC does not vectorise
// it without -ffast-math). -ffast-math calls the same libmvec function, but it lets the
// compiler assume that no value is NaN or infinite (it even folds this probe's own isnan
// check away), so a kernel that must pass NaN and infinity through cannot be built with
// it. The probe reports whether a NaN query still gives a NaN row.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef VECTOR_EXP
__m512 _ZGVeN16v_expf(__m512);
#endif

enum { L = 64, C = 2, V = 4 };

// Layouts chosen so that the key position j is contiguous everywhere it is summed over:
// q, p (rows, L, C); k, r (rows, C, L); q_table, k_table (L, C, L) indexed [i][c][j]
// (k_table already transposed to [query, key]); v (rows, V, L); v_table (L, V, L)
// [i][d][j]; y, y_position (rows, L, V).
static void attend(int rows, const float *q, const float *k, const float *p, const float *r,
                   const float *q_table, const float *k_table, const float *v, const float *v_table,
                   float *y, float *y_position) {
#pragma omp parallel for schedule(static)
  for (int row = 0; row < rows; ++row) {
    const float *qr = q + (size_t)row * L * C, *pr = p + (size_t)row * L * C;
    const float *kr = k + (size_t)row * C * L, *rr = r + (size_t)row * C * L;
    const float *vr = v + (size_t)row * V * L;
    float *yr = y + (size_t)row * L * V, *ypr = y_position + (size_t)row * L * V;
    for (int i = 0; i < L; ++i) {
      float s[L] __attribute__((aligned(64)));
      for (int j = 0; j < L; ++j) s[j] = 0.f;
      for (int c = 0; c < C; ++c) {
        float qi = qr[i * C + c], pi = pr[i * C + c];
        const float *kc = kr + c * L, *rc = rr + c * L;
        const float *qtc = q_table + (i * C + c) * L, *ktc = k_table + (i * C + c) * L;
#pragma omp simd
        for (int j = 0; j < L; ++j) s[j] += qi * kc[j] + pi * qtc[j] + rc[j] * ktc[j];
      }
      float sum = 0.f;
#ifdef VECTOR_EXP
      __m512 top = _mm512_load_ps(s);
      for (int j = 16; j < L; j += 16) top = _mm512_max_ps(top, _mm512_load_ps(s + j));
      __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
      for (int j = 0; j < L; j += 16) {
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_load_ps(s + j), shift));
        _mm512_store_ps(s + j, e);
        total = _mm512_add_ps(total, e);
      }
      sum = _mm512_reduce_add_ps(total);
#else
      float m = -INFINITY;
      for (int j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
      for (int j = 0; j < L; ++j) {
        s[j] = expf(s[j] - m);
        sum += s[j];
      }
#endif
      float inverse = 1.f / sum;
      for (int d = 0; d < V; ++d) {
        const float *vd = vr + d * L, *vtd = v_table + (i * V + d) * L;
        float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
        for (int j = 0; j < L; ++j) {
          a += s[j] * vd[j];
          b += s[j] * vtd[j];
        }
        yr[i * V + d] = a * inverse;
        ypr[i * V + d] = b * inverse;
      }
    }
  }
}

// The same row in double precision, one term at a time: the probe's reference.
static void reference_row(int row, const float *q, const float *k, const float *p, const float *r,
                          const float *q_table, const float *k_table, const float *v, const float *v_table,
                          double *y, double *y_position) {
  double s[L], m = -INFINITY, sum = 0;
  for (int i = 0; i < L; ++i) {
    for (int j = 0; j < L; ++j) {
      s[j] = 0;
      for (int c = 0; c < C; ++c)
        s[j] += (double)q[((size_t)row * L + i) * C + c] * k[((size_t)row * C + c) * L + j] +
                (double)p[((size_t)row * L + i) * C + c] * q_table[(i * C + c) * L + j] +
                (double)r[((size_t)row * C + c) * L + j] * k_table[(i * C + c) * L + j];
    }
    m = -INFINITY, sum = 0;
    for (int j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < L; ++j) sum += (s[j] = exp(s[j] - m));
    for (int d = 0; d < V; ++d) {
      double a = 0, b = 0;
      for (int j = 0; j < L; ++j) {
        a += s[j] * v[((size_t)row * V + d) * L + j];
        b += s[j] * v_table[(i * V + d) * L + j];
      }
      y[i * V + d] = a / sum, y_position[i * V + d] = b / sum;
    }
  }
}

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float *uniform(size_t n, float low, float high) {
  float *x = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
  for (size_t i = 0; i < n; ++i) x[i] = low + (high - low) * (rand() / (float)RAND_MAX);
  return x;
}

int main(int argc, char **argv) {
  int rows = argc > 1 ? atoi(argv[1]) : 4096;
  size_t n = (size_t)rows * L;
  srand(1);
  float *q = uniform(n * C, -1, 1), *k = uniform(n * C, -1, 1), *p = uniform(n * C, -1, 1), *r = uniform(n * C, -1, 1);
  float *v = uniform(n * V, 0, 1), *y = uniform(n * V, 0, 0), *y_position = uniform(n * V, 0, 0);
  float *q_table = uniform(L * C * L, -1, 1), *k_table = uniform(L * C * L, -1, 1), *v_table = uniform(L * V * L, 0, 1);
  double best = 1e9;
  for (int t = 0; t < 30; ++t) {
    double start = seconds();
    attend(rows, q, k, p, r, q_table, k_table, v, v_table, y, y_position);
    double elapsed = seconds() - start;
    best = elapsed < best ? elapsed : best;
  }
  double worst = 0, want[L * V], want_position[L * V];
  for (int row = 0; row < rows; row += rows / 16) {
    reference_row(row, q, k, p, r, q_table, k_table, v, v_table, want, want_position);
    for (int e = 0; e < L * V; ++e) {
      double d1 = fabs(y[(size_t)row * L * V + e] - want[e]), d2 = fabs(y_position[(size_t)row * L * V + e] - want_position[e]);
      worst = d1 > worst ? d1 : worst, worst = d2 > worst ? d2 : worst;
    }
  }
  q[5 * C] = NAN;  // query 5 of row 0
  attend(rows, q, k, p, r, q_table, k_table, v, v_table, y, y_position);
  printf("%d threads: fastest of 30 %.2f ms; largest difference from float64 %.2e; NaN query gives a NaN row: %s, "
         "next query finite: %s\n",
         omp_get_max_threads(), best * 1e3, worst, isnan(y[5 * V]) ? "yes" : "NO", isfinite(y[6 * V]) ? "yes" : "NO");
  return 0;
}
