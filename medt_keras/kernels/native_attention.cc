// Axial softmax attention for inference on x86-64 CPUs with AVX-512, as XLA FFI handlers.
//
// The math is that of medt_keras/kernels/blocked_attention.py, per line (a "row" here) of
// L positions, with C query/key channels and V value channels per head:
//
//   s_ij = q_i . k_j + p_i . q_table[i, j] + r_j . k_table[j, i]
//   a_ij = softmax_j(s_ij)
//   y_i = sum_j a_ij v_j,    y_position_i = sum_j a_ij v_table[i, j]
//
// (without positional encodings only the first term and y). Why outside XLA: on the CPU,
// XLA runs the blocked kernel's loop as a chain of small operations, most on one thread
// (benchmarks/RESULTS.md). Here each query's logits, their maximum, the exponentials,
// their sum and the weighted sums are computed in one pass while its L logits sit in the
// first-level cache, and the rows are shared between XLA's own intra-op threads.
//
// Layouts (row-major, the key position j contiguous wherever it is summed over):
//   q, p: (rows, L, C)        k, r: (rows, C, L)        v: (rows, V, L)
//   q_table, k_table: (L, C, L), indexed [i][c][j] (k_table already transposed to
//   [query, key])             v_table: (L, V, L), [i][d][j]
//   y, y_position: (rows, L, V)
//
// The exponential is glibc's libmvec vector expf, 16 lanes at a time: it keeps NaN and
// infinity (-ffast-math would let the compiler assume neither exists), so a NaN input
// gives a NaN row, as in the XLA kernels. L must be a multiple of 16 and at most
// kMaxLength; the Python side checks before calling.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" __m512 _ZGVeN16v_expf(__m512);

namespace {

constexpr int64_t kMaxLength = 512;
constexpr int kLanes = 16;

struct Sizes {
  int64_t rows, length, channels, value_channels;
};

// One query's logits are in s (length floats); replaces them by exp(s - max) and returns
// 1 / sum.
inline float exponentiate(float* s, int64_t length) {
  __m512 top = _mm512_loadu_ps(s);
  for (int64_t j = kLanes; j < length; j += kLanes) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < length; j += kLanes) {
    const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
    _mm512_storeu_ps(s + j, e);
    total = _mm512_add_ps(total, e);
  }
  return 1.f / _mm512_reduce_add_ps(total);
}

// out[d] = scale * sum_j e[j] x[d * length + j] for d < count.
inline void weighted_sums(const float* e, const float* x, int64_t length, int64_t count, float scale,
                          float* out) {
  for (int64_t d = 0; d < count; ++d) {
    const float* xd = x + d * length;
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(e), _mm512_loadu_ps(xd));
    for (int64_t j = kLanes; j < length; j += kLanes)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(e + j), _mm512_loadu_ps(xd + j), acc);
    out[d] = _mm512_reduce_add_ps(acc) * scale;
  }
}

struct Positional {
  const float *p, *r, *q_table, *k_table, *v_table;
  float* y_position;
};

void attend_rows(const Sizes& n, int64_t first, int64_t last, const float* q, const float* k,
                 const float* v, float* y, const Positional* positional) {
  const int64_t L = n.length, C = n.channels, V = n.value_channels;
  alignas(64) float s[kMaxLength];
  for (int64_t row = first; row < last; ++row) {
    const float* qr = q + row * L * C;
    const float* kr = k + row * C * L;
    const float* vr = v + row * V * L;
    float* yr = y + row * L * V;
    for (int64_t i = 0; i < L; ++i) {
      const float* qi = qr + i * C;
      for (int64_t j = 0; j < L; j += kLanes) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(qi[c]), _mm512_loadu_ps(kr + c * L + j), acc);
        if (positional != nullptr) {
          const float* pi = positional->p + (row * L + i) * C;
          const float* rr = positional->r + row * C * L;
          const float* qt = positional->q_table + i * C * L;
          const float* kt = positional->k_table + i * C * L;
          for (int64_t c = 0; c < C; ++c) {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(pi[c]), _mm512_loadu_ps(qt + c * L + j), acc);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(rr + c * L + j), _mm512_loadu_ps(kt + c * L + j), acc);
          }
        }
        _mm512_store_ps(s + j, acc);
      }
      const float inverse = exponentiate(s, L);
      weighted_sums(s, vr, L, V, inverse, yr + i * V);
      if (positional != nullptr)
        weighted_sums(s, positional->v_table + i * V * L, L, V, inverse,
                      positional->y_position + (row * L + i) * V);
    }
  }
}

// Runs work(first, last) over [0, rows) in chunks, on the calling thread and on XLA's
// intra-op pool. The caller takes chunks too, so the call finishes even when every pool
// thread is busy (a task that starts after the last chunk is taken returns at once); the
// state the tasks touch is shared-owned, so it outlives a task that starts late.
void parallel_rows(ffi::ThreadPool& pool, int64_t rows, const std::function<void(int64_t, int64_t)>& work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0, rows = 0, per_chunk = 0;
    const std::function<void(int64_t, int64_t)>* work = nullptr;
    void run() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        const int64_t first = c * per_chunk;
        (*work)(first, std::min(rows, first + per_chunk));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto state = std::make_shared<State>();
  state->rows = rows;
  state->chunks = std::min<int64_t>(rows, threads * 4);
  state->per_chunk = (rows + state->chunks - 1) / state->chunks;
  state->chunks = (rows + state->per_chunk - 1) / state->per_chunk;
  state->work = &work;
  for (int64_t t = 1; t < std::min(threads, state->chunks); ++t) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < state->chunks) std::this_thread::yield();
}

ffi::Error check(bool ok, const std::string& message) {
  return ok ? ffi::Error::Success() : ffi::Error::InvalidArgument("medt native attention: " + message);
}

ffi::Error sizes_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Sizes* n) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions();
  if (dq.size() != 3 || dk.size() != 3 || dv.size() != 3) return check(false, "q, k and v must be 3-d");
  *n = Sizes{dq[0], dq[1], dq[2], dv[1]};
  if (ffi::Error e = check(n->length % kLanes == 0 && n->length <= kMaxLength,
                           "the length must be a multiple of 16, at most 512");
      e.failure())
    return e;
  return check(dk[0] == n->rows && dk[1] == n->channels && dk[2] == n->length && dv[0] == n->rows &&
                   dv[2] == n->length,
               "q (rows, L, C), k (rows, C, L) and v (rows, V, L) do not agree");
}

ffi::Error WithoutPositionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> y) {
  Sizes n;
  if (ffi::Error e = sizes_of(q, k, v, &n); e.failure()) return e;
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float* yd = y->typed_data();
  parallel_rows(pool, n.rows, [&](int64_t first, int64_t last) { attend_rows(n, first, last, qd, kd, vd, yd, nullptr); });
  return ffi::Error::Success();
}

ffi::Error PositionalImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> r,
                          ffi::Buffer<ffi::F32> q_table, ffi::Buffer<ffi::F32> k_table,
                          ffi::Buffer<ffi::F32> v_table, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32> y_position) {
  Sizes n;
  if (ffi::Error e = sizes_of(q, k, v, &n); e.failure()) return e;
  const int64_t L = n.length, C = n.channels, V = n.value_channels;
  if (ffi::Error e = check(p.element_count() == n.rows * L * C && r.element_count() == n.rows * C * L &&
                               q_table.element_count() == L * C * L && k_table.element_count() == L * C * L &&
                               v_table.element_count() == L * V * L,
                           "the positional inputs do not agree with q, k and v");
      e.failure())
    return e;
  const Positional positional{p.typed_data(),       r.typed_data(),       q_table.typed_data(),
                              k_table.typed_data(), v_table.typed_data(), y_position->typed_data()};
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float* yd = y->typed_data();
  parallel_rows(pool, n.rows,
                [&](int64_t first, int64_t last) { attend_rows(n, first, last, qd, kd, vd, yd, &positional); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionWithoutPosition, WithoutPositionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionPositional, PositionalImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
