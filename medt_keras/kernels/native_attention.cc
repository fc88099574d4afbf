// Axial softmax attention on x86-64 CPUs with AVX-512, or AVX2 and FMA, forward and
// backward, as XLA FFI handlers.
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
// (benchmarks/RESULTS.md). Here a line's logits, their maxima, the exponentials, their sums
// and the weighted sums are computed in one pass while they sit in the first-level cache,
// and the rows are shared between XLA's own intra-op threads.
//
// One source for both instruction sets: the algorithm is written once against the vector
// operations below (Vec, Mask, load, fmadd, ...), which the compiler flags pick (-mavx512f:
// kLanes = 16; -mavx2 -mfma: kLanes = 8). The forward pass puts kLanes queries in the lanes
// of a vector and walks over the keys, so the softmax's maximum and sum and every weighted
// sum are lane-wise (no sums across lanes); the backward pass puts kLanes keys in the lanes
// and walks over the queries, so the gradients of the keys, the values and the tables are
// lane-wise and only those of the queries are sums across lanes. Per-line inputs are
// channels-first, so that either position is contiguous; a scalar of the other position is
// a strided read.
//
// Layouts (row-major):
//   q, k, p, r: (rows, C, L)      v: (rows, V, L)      log_sum_exp: (rows, L)
//   forward tables, [c][j][i] (query position i contiguous): q_table and k_table (C, L, L),
//     v_table (V, L, L)
//   backward tables, [i][c][j] (key position j contiguous): q_table and k_table (L, C, L),
//     v_table (L, V, L)
//   y, y_position: (rows, V, L)     dy, dy_position: (rows, L, V)
//   every gradient of a per-line input: (rows, C or V, L); of a table: its backward layout.
//
// The forward pass also returns each query's log-sum-exp of logits; the backward pass
// recomputes the weights a_ij = exp(s_ij - log_sum_exp_i) from it, as flash attention does
// (no (L, L) map is stored between the passes), and computes, per query:
//
//   dW_ij = dy_i . v_j + dy_position_i . v_table[i, j]
//   dS_ij = a_ij (dW_ij - sum_j' a_ij' dW_ij')
//   dq_i = sum_j dS_ij k_j,  dk_j += dS_ij q_i,  dv_j += a_ij dy_i,
//   dp_i = sum_j dS_ij q_table[i, j],  dr_j += dS_ij k_table[j, i],
//   dq_table[i, j] += dS_ij p_i,  dk_table[j, i] += dS_ij r_j,  dv_table[i, j] += a_ij dy_position_i
//
// the tables' sums running over all rows: each chunk of rows adds into its own copy, and
// the copies are added at the end, so the result does not depend on which thread ran what.
//
// The exponential is glibc's libmvec vector expf, kLanes at a time (_ZGVeN16v_expf or
// _ZGVdN8v_expf): it keeps NaN and infinity (-ffast-math would let the compiler assume
// neither exists), so a NaN input gives a NaN row, as in the XLA kernels. L is at most
// kMaxLength and C and V at most kMaxChannels; the Python side checks before calling.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Lines whose length is not a multiple of kLanes end in a partial vector, read and written
// under a Mask from lanes(): its missing lanes read as 0 and are never written, and where
// they would enter a sum across positions (the backward's logits) they are set to -inf, so
// their weights are 0. Reading them as 0 rather than as the memory after the line matters:
// that memory is the next channel or row, and a NaN or infinity there times a weight of 0
// would still be NaN.
#if defined(__AVX512F__)

extern "C" __m512 _ZGVeN16v_expf(__m512);
extern "C" __m512 _ZGVeN16v_logf(__m512);

namespace {

constexpr int kLanes = 16;
using Vec = __m512;
using Mask = __mmask16;

inline Mask lanes(int64_t j, int64_t length) {
  const int64_t left = length - j;
  return left >= kLanes ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << left) - 1u);
}
inline Vec load(const float* x, Mask m) { return _mm512_maskz_loadu_ps(m, x); }
inline void store(float* x, Mask m, Vec value) { _mm512_mask_storeu_ps(x, m, value); }
// value in the lanes of m, outside elsewhere.
inline Vec where(Mask m, Vec value, Vec outside) { return _mm512_mask_blend_ps(m, outside, value); }

// The kernel's own scratch, whole vectors on 64-byte boundaries.
inline Vec load_aligned(const float* x) { return _mm512_load_ps(x); }
inline void store_aligned(float* x, Vec value) { _mm512_store_ps(x, value); }

inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec maximum(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec reciprocal(Vec x) { return _mm512_div_ps(_mm512_set1_ps(1.f), x); }
inline Vec exponential(Vec x) { return _ZGVeN16v_expf(x); }
inline Vec logarithm(Vec x) { return _ZGVeN16v_logf(x); }
inline float sum_of(Vec x) { return _mm512_reduce_add_ps(x); }

}  // namespace

#elif defined(__AVX2__) && defined(__FMA__)

extern "C" __m256 _ZGVdN8v_expf(__m256);
extern "C" __m256 _ZGVdN8v_logf(__m256);

namespace {

constexpr int kLanes = 8;
using Vec = __m256;

// AVX2 has no mask registers: the lanes are an integer vector, -1 where inside, for
// vmaskmov and vblendv. `full` lets whole vectors take plain loads and stores: masked stores
// are slow on AMD CPUs (on an AMD EPYC the backward pass, which adds into its gradients
// under masks, took 2-3 times as long with masked loads and stores throughout).
struct Mask {
  __m256i bits;
  bool full;
};

inline Mask lanes(int64_t j, int64_t length) {
  const int64_t left = length - j;
  if (left >= kLanes) return {_mm256_set1_epi32(-1), true};
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), index), false};
}
inline Vec load(const float* x, Mask m) { return m.full ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, m.bits); }
inline void store(float* x, Mask m, Vec value) {
  if (m.full)
    _mm256_storeu_ps(x, value);
  else
    _mm256_maskstore_ps(x, m.bits, value);
}
// value in the lanes of m, outside elsewhere.
inline Vec where(Mask m, Vec value, Vec outside) {
  return _mm256_blendv_ps(outside, value, _mm256_castsi256_ps(m.bits));
}

// The kernel's own scratch, whole vectors on 64-byte boundaries.
inline Vec load_aligned(const float* x) { return _mm256_load_ps(x); }
inline void store_aligned(float* x, Vec value) { _mm256_store_ps(x, value); }

inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec maximum(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec reciprocal(Vec x) { return _mm256_div_ps(_mm256_set1_ps(1.f), x); }
inline Vec exponential(Vec x) { return _ZGVdN8v_expf(x); }
inline Vec logarithm(Vec x) { return _ZGVdN8v_logf(x); }
inline float sum_of(Vec x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

#else
#error "native_attention.cc needs AVX-512 (-mavx512f -mfma) or AVX2 and FMA (-mavx2 -mfma)"
#endif

namespace {

constexpr int64_t kMaxLength = 512;
constexpr int64_t kMaxChannels = 64;
// The scratch rows below hold whole vectors.
static_assert(kMaxLength % kLanes == 0, "kMaxLength must be a multiple of kLanes");

// The inputs in the kernel's layouts (the forward or the backward tables); the positional
// ones are null without positional terms.
struct Inputs {
  int64_t rows = 0, length = 0, channels = 0, value_channels = 0;
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  const float *p = nullptr, *r = nullptr, *q_table = nullptr, *k_table = nullptr, *v_table = nullptr;
  bool positional() const { return p != nullptr; }
};

// s[j] = s_ij, the logits of query i of a row, keys in lanes (backward tables).
inline void logits(const Inputs& in, int64_t row, int64_t i, float* s) {
  const int64_t L = in.length, C = in.channels;
  const float* qr = in.q + row * C * L;
  const float* kr = in.k + row * C * L;
  for (int64_t j = 0; j < L; j += kLanes) {
    const Mask m = lanes(j, L);
    Vec acc = zero();
    for (int64_t c = 0; c < C; ++c) acc = fmadd(broadcast(qr[c * L + i]), load(kr + c * L + j, m), acc);
    if (in.positional()) {
      const float* pr = in.p + row * C * L;
      const float* rr = in.r + row * C * L;
      const float* qt = in.q_table + i * C * L;
      const float* kt = in.k_table + i * C * L;
      for (int64_t c = 0; c < C; ++c) {
        acc = fmadd(broadcast(pr[c * L + i]), load(qt + c * L + j, m), acc);
        acc = fmadd(load(rr + c * L + j, m), load(kt + c * L + j, m), acc);
      }
    }
    store_aligned(s + j, where(m, acc, broadcast(-INFINITY)));
  }
}

// out[d] = scale * sum_j e[j] x[d * length + j] for d < count.
inline void weighted_sums(const float* e, const float* x, int64_t length, int64_t count, float scale,
                          float* out) {
  for (int64_t d = 0; d < count; ++d) {
    const float* xd = x + d * length;
    Vec acc = mul(load_aligned(e), load(xd, lanes(0, length)));
    for (int64_t j = kLanes; j < length; j += kLanes)
      acc = fmadd(load_aligned(e + j), load(xd + j, lanes(j, length)), acc);
    out[d] = sum_of(acc) * scale;
  }
}

// x[d * length + j] += e[j] * scale[d] for d < count.
inline void add_scaled(const float* e, const float* scale, int64_t length, int64_t count, float* x) {
  for (int64_t d = 0; d < count; ++d) {
    const Vec sd = broadcast(scale[d]);
    float* xd = x + d * length;
    for (int64_t j = 0; j < length; j += kLanes) {
      const Mask m = lanes(j, length);
      store(xd + j, m, fmadd(load_aligned(e + j), sd, load(xd + j, m)));
    }
  }
}

struct Outputs {
  float *y = nullptr, *y_position = nullptr, *log_sum_exp = nullptr;
};

// Queries i0 .. i0 + kLanes - 1 of a row in the lanes (forward tables): for each key j the
// kLanes logits, then their maxima, exponentials and sums over j, and the weighted sums, all
// lane-wise. e holds the (L, kLanes) block of logits, then of exponentials.
void forward_block(const Inputs& in, const Outputs& out, int64_t row, int64_t i0, float* e) {
  const int64_t L = in.length, C = in.channels, V = in.value_channels;
  const Mask m = lanes(i0, L);
  Vec q[kMaxChannels], p[kMaxChannels];
  for (int64_t c = 0; c < C; ++c) {
    q[c] = load(in.q + (row * C + c) * L + i0, m);
    if (in.positional()) p[c] = load(in.p + (row * C + c) * L + i0, m);
  }
  const float* kr = in.k + row * C * L;
  const float* rr = in.positional() ? in.r + row * C * L : nullptr;
  Vec top = broadcast(-INFINITY);
  for (int64_t j = 0; j < L; ++j) {
    Vec acc = zero();
    for (int64_t c = 0; c < C; ++c) acc = fmadd(q[c], broadcast(kr[c * L + j]), acc);
    if (rr != nullptr)
      for (int64_t c = 0; c < C; ++c) {
        acc = fmadd(p[c], load(in.q_table + (c * L + j) * L + i0, m), acc);
        acc = fmadd(broadcast(rr[c * L + j]), load(in.k_table + (c * L + j) * L + i0, m), acc);
      }
    store_aligned(e + j * kLanes, acc);
    top = maximum(top, acc);
  }
  Vec total = zero();
  for (int64_t j = 0; j < L; ++j) {
    const Vec x = exponential(sub(load_aligned(e + j * kLanes), top));
    store_aligned(e + j * kLanes, x);
    total = add(total, x);
  }
  const Vec inverse = reciprocal(total);
  const float* vr = in.v + row * V * L;
  for (int64_t d = 0; d < V; ++d) {
    Vec acc = zero();
    for (int64_t j = 0; j < L; ++j) acc = fmadd(load_aligned(e + j * kLanes), broadcast(vr[d * L + j]), acc);
    store(out.y + (row * V + d) * L + i0, m, mul(acc, inverse));
  }
  if (in.positional())
    for (int64_t d = 0; d < V; ++d) {
      Vec acc = zero();
      for (int64_t j = 0; j < L; ++j)
        acc = fmadd(load_aligned(e + j * kLanes), load(in.v_table + (d * L + j) * L + i0, m), acc);
      store(out.y_position + (row * V + d) * L + i0, m, mul(acc, inverse));
    }
  store(out.log_sum_exp + row * L + i0, m, add(top, logarithm(total)));
}

void forward_rows(const Inputs& in, const Outputs& out, int64_t first, int64_t last) {
  alignas(64) float e[kMaxLength * kLanes];
  for (int64_t row = first; row < last; ++row)
    for (int64_t i0 = 0; i0 < in.length; i0 += kLanes) forward_block(in, out, row, i0, e);
}

struct Gradients {
  // (rows, C or V, L), as q, k, v, p, r.
  float *dq = nullptr, *dk = nullptr, *dv = nullptr, *dp = nullptr, *dr = nullptr;
};

// tables: this chunk's sums of the table gradients, (L, C, L) + (L, C, L) + (L, V, L) for
// q_table, k_table, v_table, starting at zero.
void backward_rows(const Inputs& in, const float* log_sum_exp, const float* dy, const float* dy_position,
                   const Gradients& g, float* tables, int64_t first, int64_t last) {
  const int64_t L = in.length, C = in.channels, V = in.value_channels;
  float* d_q_table = tables;
  float* d_k_table = tables + L * C * L;
  float* d_v_table = tables + 2 * L * C * L;
  alignas(64) float a[kMaxLength];
  alignas(64) float ds[kMaxLength];
  for (int64_t row = first; row < last; ++row) {
    const float* kr = in.k + row * C * L;
    const float* vr = in.v + row * V * L;
    float* dk = g.dk + row * C * L;
    float* dv = g.dv + row * V * L;
    float* dr = in.positional() ? g.dr + row * C * L : nullptr;
    std::fill(dk, dk + C * L, 0.f);
    std::fill(dv, dv + V * L, 0.f);
    if (dr != nullptr) std::fill(dr, dr + C * L, 0.f);
    for (int64_t i = 0; i < L; ++i) {
      const float* dyi = dy + (row * L + i) * V;
      const float* dypi = in.positional() ? dy_position + (row * L + i) * V : nullptr;
      float qi[kMaxChannels], pi[kMaxChannels], dqi[kMaxChannels], dpi[kMaxChannels];
      for (int64_t c = 0; c < C; ++c) {
        qi[c] = in.q[(row * C + c) * L + i];
        if (in.positional()) pi[c] = in.p[(row * C + c) * L + i];
      }
      logits(in, row, i, a);
      const Vec lse = broadcast(log_sum_exp[row * L + i]);
      Vec dot = zero();
      for (int64_t j = 0; j < L; j += kLanes) {
        const Mask m = lanes(j, L);
        const Vec weight = exponential(sub(load_aligned(a + j), lse));
        store_aligned(a + j, weight);
        Vec dw = zero();
        for (int64_t d = 0; d < V; ++d) dw = fmadd(broadcast(dyi[d]), load(vr + d * L + j, m), dw);
        if (dypi != nullptr) {
          const float* vt = in.v_table + i * V * L;
          for (int64_t d = 0; d < V; ++d) dw = fmadd(broadcast(dypi[d]), load(vt + d * L + j, m), dw);
        }
        store_aligned(ds + j, dw);
        dot = fmadd(weight, dw, dot);
      }
      const Vec row_dot = broadcast(sum_of(dot));
      for (int64_t j = 0; j < L; j += kLanes)
        store_aligned(ds + j, mul(load_aligned(a + j), sub(load_aligned(ds + j), row_dot)));
      weighted_sums(ds, kr, L, C, 1.f, dqi);
      for (int64_t c = 0; c < C; ++c) g.dq[(row * C + c) * L + i] = dqi[c];
      add_scaled(ds, qi, L, C, dk);
      add_scaled(a, dyi, L, V, dv);
      if (in.positional()) {
        weighted_sums(ds, in.q_table + i * C * L, L, C, 1.f, dpi);
        for (int64_t c = 0; c < C; ++c) g.dp[(row * C + c) * L + i] = dpi[c];
        // dr_cj += ds_j k_table[i][c][j]; dk_table[i][c][j] += ds_j r_cj
        const float* kt = in.k_table + i * C * L;
        const float* rr = in.r + row * C * L;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t j = 0; j < L; j += kLanes) {
            const Mask m = lanes(j, L);
            const Vec dsj = load_aligned(ds + j);
            float* drc = dr + c * L + j;
            float* dkt = d_k_table + (i * C + c) * L + j;
            store(drc, m, fmadd(dsj, load(kt + c * L + j, m), load(drc, m)));
            store(dkt, m, fmadd(dsj, load(rr + c * L + j, m), load(dkt, m)));
          }
        add_scaled(ds, pi, L, C, d_q_table + i * C * L);
        add_scaled(a, dypi, L, V, d_v_table + i * V * L);
      }
    }
  }
}

// Runs work(chunk, first, last) over [0, rows) in `chunks` chunks, on the calling thread
// and on XLA's intra-op pool. The caller takes chunks too, so the call finishes even when
// every pool thread is busy (a task that starts after the last chunk is taken returns at
// once); the state the tasks touch is shared-owned, so it outlives a task that starts late.
using Work = std::function<void(int64_t, int64_t, int64_t)>;

int64_t chunk_count(ffi::ThreadPool& pool, int64_t rows) {
  // Four chunks per thread: rows cost the same, but threads may start late.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(rows, threads * 4));
}

void parallel_rows(ffi::ThreadPool& pool, int64_t rows, int64_t chunks, const Work& work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0, rows = 0;
    const Work* work = nullptr;
    void run() {
      for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
        (*work)(c, rows * c / chunks, rows * (c + 1) / chunks);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->rows = rows;
  state->chunks = chunks;
  state->work = &work;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < state->chunks) std::this_thread::yield();
}

using Buffer = ffi::Buffer<ffi::F32>;
using Result = ffi::ResultBuffer<ffi::F32>;

ffi::Error invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("medt native attention: " + message);
}

// Reads the sizes from q (rows, C, L) and v (rows, V, L) and checks every other input.
ffi::Error read_inputs(Buffer& q, Buffer& k, Buffer& v, Inputs* in) {
  auto dq = q.dimensions(), dv = v.dimensions();
  if (dq.size() != 3 || dv.size() != 3) return invalid("q and v must be 3-d");
  in->rows = dq[0], in->channels = dq[1], in->length = dq[2], in->value_channels = dv[1];
  const int64_t L = in->length, C = in->channels, V = in->value_channels;
  if (L < 1 || L > kMaxLength) return invalid("the length must be 1 to 512");
  if (C < 1 || C > kMaxChannels || V < 1 || V > kMaxChannels) return invalid("channels must be 1 to 64");
  auto dk = k.dimensions();
  if (dk.size() != 3 || dk[0] != in->rows || dk[1] != C || dk[2] != L || dv[0] != in->rows || dv[2] != L)
    return invalid("q and k (rows, C, L) and v (rows, V, L) do not agree");
  in->q = q.typed_data(), in->k = k.typed_data(), in->v = v.typed_data();
  return ffi::Error::Success();
}

ffi::Error read_positional(Buffer& p, Buffer& r, Buffer& q_table, Buffer& k_table, Buffer& v_table, Inputs* in) {
  const int64_t L = in->length, C = in->channels, V = in->value_channels;
  if (p.element_count() != in->rows * L * C || r.element_count() != in->rows * C * L ||
      q_table.element_count() != L * C * L || k_table.element_count() != L * C * L ||
      v_table.element_count() != L * V * L)
    return invalid("the positional inputs do not agree with q, k and v");
  in->p = p.typed_data(), in->r = r.typed_data();
  in->q_table = q_table.typed_data(), in->k_table = k_table.typed_data(), in->v_table = v_table.typed_data();
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool& pool, const Inputs& in, const Outputs& out) {
  parallel_rows(pool, in.rows, chunk_count(pool, in.rows),
                [&](int64_t, int64_t first, int64_t last) { forward_rows(in, out, first, last); });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool& pool, const Inputs& in, const float* log_sum_exp, const float* dy,
                    const float* dy_position, const Gradients& g, float* d_q_table, float* d_k_table,
                    float* d_v_table) {
  const int64_t L = in.length, C = in.channels, V = in.value_channels;
  const int64_t table_size = in.positional() ? 2 * L * C * L + L * V * L : 0;
  // Fewer chunks where their copies of the tables would pass 256 MiB (long lines, many
  // channels).
  const int64_t chunks = std::min(chunk_count(pool, in.rows),
                                  std::max<int64_t>(1, (int64_t{1} << 26) / std::max<int64_t>(1, table_size)));
  std::vector<float> tables;
  try {
    tables.assign(static_cast<size_t>(chunks * table_size), 0.f);
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("medt native attention: out of memory for the table gradients");
  }
  parallel_rows(pool, in.rows, chunks, [&](int64_t chunk, int64_t first, int64_t last) {
    backward_rows(in, log_sum_exp, dy, dy_position, g, tables.data() + chunk * table_size, first, last);
  });
  if (!in.positional()) return ffi::Error::Success();
  float* targets[3] = {d_q_table, d_k_table, d_v_table};
  const int64_t offsets[4] = {0, L * C * L, 2 * L * C * L, table_size};
  for (int t = 0; t < 3; ++t) {
    std::fill(targets[t], targets[t] + (offsets[t + 1] - offsets[t]), 0.f);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* source = tables.data() + chunk * table_size + offsets[t];
      for (int64_t e = 0; e < offsets[t + 1] - offsets[t]; ++e) targets[t][e] += source[e];
    }
  }
  return ffi::Error::Success();
}

ffi::Error ForwardWithoutPosition(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, Result y,
                                  Result log_sum_exp) {
  Inputs in;
  if (ffi::Error e = read_inputs(q, k, v, &in); e.failure()) return e;
  Outputs out;
  out.y = y->typed_data(), out.log_sum_exp = log_sum_exp->typed_data();
  return forward(pool, in, out);
}

ffi::Error ForwardPositional(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, Buffer p, Buffer r,
                             Buffer q_table, Buffer k_table, Buffer v_table, Result y, Result y_position,
                             Result log_sum_exp) {
  Inputs in;
  if (ffi::Error e = read_inputs(q, k, v, &in); e.failure()) return e;
  if (ffi::Error e = read_positional(p, r, q_table, k_table, v_table, &in); e.failure()) return e;
  Outputs out;
  out.y = y->typed_data(), out.y_position = y_position->typed_data();
  out.log_sum_exp = log_sum_exp->typed_data();
  return forward(pool, in, out);
}

ffi::Error BackwardWithoutPosition(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, Buffer log_sum_exp,
                                   Buffer dy, Result dq, Result dk, Result dv) {
  Inputs in;
  if (ffi::Error e = read_inputs(q, k, v, &in); e.failure()) return e;
  if (log_sum_exp.element_count() != in.rows * in.length || dy.element_count() != v.element_count())
    return invalid("log_sum_exp or dy does not agree with q and v");
  Gradients g;
  g.dq = dq->typed_data(), g.dk = dk->typed_data(), g.dv = dv->typed_data();
  return backward(pool, in, log_sum_exp.typed_data(), dy.typed_data(), nullptr, g, nullptr, nullptr, nullptr);
}

ffi::Error BackwardPositional(ffi::ThreadPool pool, Buffer q, Buffer k, Buffer v, Buffer p, Buffer r,
                              Buffer q_table, Buffer k_table, Buffer v_table, Buffer log_sum_exp, Buffer dy,
                              Buffer dy_position, Result dq, Result dk, Result dv, Result dp, Result dr,
                              Result d_q_table, Result d_k_table, Result d_v_table) {
  Inputs in;
  if (ffi::Error e = read_inputs(q, k, v, &in); e.failure()) return e;
  if (ffi::Error e = read_positional(p, r, q_table, k_table, v_table, &in); e.failure()) return e;
  if (log_sum_exp.element_count() != in.rows * in.length || dy.element_count() != v.element_count() ||
      dy_position.element_count() != v.element_count())
    return invalid("log_sum_exp, dy or dy_position does not agree with q and v");
  Gradients g;
  g.dq = dq->typed_data(), g.dk = dk->typed_data(), g.dv = dv->typed_data();
  g.dp = dp->typed_data(), g.dr = dr->typed_data();
  return backward(pool, in, log_sum_exp.typed_data(), dy.typed_data(), dy_position.typed_data(), g,
                  d_q_table->typed_data(), d_k_table->typed_data(), d_v_table->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionWithoutPosition, ForwardWithoutPosition,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionPositional, ForwardPositional,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionWithoutPositionBackward, BackwardWithoutPosition,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedtNativeAttentionPositionalBackward, BackwardPositional,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Arg<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>()
                                  .Ret<Buffer>());
