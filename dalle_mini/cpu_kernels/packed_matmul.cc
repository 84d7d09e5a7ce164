// x (M, K) @ w (K, N) for few rows (M) and large weights, with w prepacked in panels of 32
// columns, P = ceil(N / 32), columns past N zero. XLA FFI custom calls for the CPU, built by
// dalle_mini/cpu_kernels/__init__.py with -mavx512f -mfma -mavx512bf16:
//   float32:  panels (P, K, 32);         x float32, out float32.
//   bfloat16: panels (P, ceil(K/2), 64), row j holding rows 2j and 2j+1 of w interleaved
//             column by column (w[2j][c], w[2j+1][c], ...), as the AVX-512 BF16 dot product
//             of pairs reads them; x bfloat16; products summed in float32, out float32.
//
// Why: a sampling step multiplies 2 rows per image by every decoder matrix. XLA:CPU's matrix
// products copy (pack) the weight matrix on every call, which for so few rows costs more than
// the arithmetic; packed once at load time, each panel is one contiguous stream, read once
// per tile of rows while its accumulators stay in registers.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;     // columns per panel: two 16-float vectors
constexpr int kTileRows = 9;   // rows per tile: 18 accumulators + 2 weight vectors in registers
constexpr int kPrefetch = 24;  // panel rows ahead to prefetch

// A tile's sums (R rows of 32 columns: lo, hi) into out's first `cols` columns.
template <int R>
inline void StoreTile(const __m512* lo, const __m512* hi, float* out, int64_t ldo, int cols) {
  const __mmask16 mask_lo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 mask_hi =
      cols >= 32 ? 0xFFFF : (cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1));
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + r * ldo, mask_lo, lo[r]);
    _mm512_mask_storeu_ps(out + r * ldo + 16, mask_hi, hi[r]);
  }
}

// Rows [0, R) of x (row stride k) times one panel, into out's 32 columns (or `cols` < 32).
template <int R>
void Tile(const float* x, int64_t k, const float* panel, float* out, int64_t ldo, int cols) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    const float* row = panel + i * kPanel;
    const __m512 w0 = _mm512_loadu_ps(row);
    const __m512 w1 = _mm512_loadu_ps(row + 16);
    _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * kPanel + 16), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + i]);
      lo[r] = _mm512_fmadd_ps(xr, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(xr, w1, hi[r]);
    }
  }
  StoreTile<R>(lo, hi, out, ldo, cols);
}

using TileFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr,  Tile<1>, Tile<2>, Tile<3>, Tile<4>,
                                          Tile<5>,  Tile<6>, Tile<7>, Tile<8>, Tile<9>};

// The bfloat16 tile: pairs of x's columns (k odd: the last pair's second value is 0) against
// a panel's pairs of rows, each dot product of pairs summed into float32 lanes.
template <int R>
void TileBf16(const uint16_t* x, int64_t k, const uint16_t* panel, float* out, int64_t ldo,
              int cols) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const int64_t pairs = k / 2;
  for (int64_t j = 0; j < (k + 1) / 2; ++j) {
    const uint16_t* row = panel + j * 2 * kPanel;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(row);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + 32);
    _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kPrefetch * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kPrefetch * kPanel + 32), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = x + r * k + 2 * j;
      const uint32_t pair = j < pairs ? static_cast<uint32_t>(xr[0]) |
                                            (static_cast<uint32_t>(xr[1]) << 16)
                                      : static_cast<uint32_t>(xr[0]);
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      lo[r] = _mm512_dpbf16_ps(lo[r], xp, w0);
      hi[r] = _mm512_dpbf16_ps(hi[r], xp, w1);
    }
  }
  StoreTile<R>(lo, hi, out, ldo, cols);
}

using TileBf16Fn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t, int);
constexpr TileBf16Fn kTilesBf16[kTileRows + 1] = {
    nullptr,         TileBf16<1>, TileBf16<2>, TileBf16<3>, TileBf16<4>,
    TileBf16<5>,     TileBf16<6>, TileBf16<7>, TileBf16<8>, TileBf16<9>};

template <typename T>
struct Kernel;  // the tiles and a panel's size in elements, per input type

template <>
struct Kernel<float> {
  static constexpr const TileFn* tiles = kTiles;
  static int64_t PanelSize(int64_t k) { return k * kPanel; }
};

template <>
struct Kernel<uint16_t> {
  static constexpr const TileBf16Fn* tiles = kTilesBf16;
  static int64_t PanelSize(int64_t k) { return (k + 1) / 2 * 2 * kPanel; }
};

// Panels [first, last) for every row of x.
template <typename T>
void Panels(const T* x, const T* w, float* out, int64_t m, int64_t k, int64_t n, int64_t first,
            int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const T* panel = w + p * Kernel<T>::PanelSize(k);
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, n - p * kPanel));
    for (int64_t r = 0; r < m; r += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - r));
      Kernel<T>::tiles[rows](x + r * k, k, panel, out + r * n + p * kPanel, n, cols);
    }
  }
}

// body(first, last) over [0, count), shared between the calling thread and tasks on XLA's
// intra-op pool (alone below `min_count` items or with one thread): chunks are claimed from a
// counter, and the call returns once every claimed chunk is done. A task that starts after all
// chunks are claimed finds nothing to do (the state outlives the call; `body` is not called).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t min_count, Body body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || count < min_count) {
    body(0, count);
    return;
  }
  struct State {
    explicit State(Body b) : body(std::move(b)) {}
    Body body;
    int64_t count = 0, chunk = 0, chunks = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>(std::move(body));
  state->count = count;
  state->chunk = std::max<int64_t>(1, count / (4 * threads));
  state->chunks = (count + state->chunk - 1) / state->chunk;
  auto work = [state] {
    for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks;) {
      state->body(c * state->chunk, std::min(state->count, (c + 1) * state->chunk));
      if (state->done.fetch_add(1) + 1 == state->chunks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == state->chunks; });
}

// x (..., K) times panels into out (..., N), on the calling thread and XLA's intra-op pool.
template <ffi::DataType D>
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D, 3> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  using T = ffi::NativeType<D>;
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const auto out_dims = out->dimensions();
  if (x_dims.size() < 1 || out_dims.size() != x_dims.size()) {
    return ffi::Error::InvalidArgument("packed_matmul: x and out need the same rank >= 1");
  }
  const int64_t k = x_dims.back();
  const int64_t n = out_dims.back();
  const int64_t panels = w_dims[0];
  if (w_dims[1] * w_dims[2] != Kernel<T>::PanelSize(k) || panels * kPanel < n ||
      (panels - 1) * kPanel >= n) {
    return ffi::Error::InvalidArgument("packed_matmul: panels do not match x and out");
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x_dims.size(); ++i) {
    if (x_dims[i] != out_dims[i]) {
      return ffi::Error::InvalidArgument("packed_matmul: x and out rows differ");
    }
    m *= x_dims[i];
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(out->typed_data(), out->typed_data() + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const T* xs = x.typed_data();
  const T* ws = w.typed_data();
  float* os = out->typed_data();
  ParallelFor(pool, panels, 8, [=](int64_t first, int64_t last) {
    Panels<T>(xs, ws, os, m, k, n, first, last);
  });
  return ffi::Error::Success();
}


// -- one query per row against a key/value cache: the attention of a sampling step -------------
// q (B, H, D) float32, already scaled; keys, values (B, H, S, D) float32, or bfloat16 held as
// uint16 bits (XLA:CPU converts a bfloat16 array to float32 and back to update one position of
// it, but updates a uint16 one in place), of which the first `length` positions are filled;
// out (B, H, D) float32 = softmax(q . k) v over them.

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {  // bfloat16 -> float32: the 16 bits on top
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
void AttendRow(const float* q, const T* keys, const T* values, float* out, int64_t length,
               int64_t depth, float* scores) {
  float best = -INFINITY;
  for (int64_t s = 0; s < length; ++s) {
    const T* key = keys + s * depth;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < depth; d += 16) {
      sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), Load16(key + d), sum);
    }
    scores[s] = _mm512_reduce_add_ps(sum);
    best = std::max(best, scores[s]);
  }
  float total = 0.0f;
  for (int64_t s = 0; s < length; ++s) total += (scores[s] = std::exp(scores[s] - best));
  const float inverse = 1.0f / total;
  __m512 acc[16];  // depth <= 256
  for (int64_t d = 0; d < depth; d += 16) acc[d / 16] = _mm512_setzero_ps();
  for (int64_t s = 0; s < length; ++s) {
    const __m512 weight = _mm512_set1_ps(scores[s]);
    const T* value = values + s * depth;
    for (int64_t d = 0; d < depth; d += 16) {
      acc[d / 16] = _mm512_fmadd_ps(weight, Load16(value + d), acc[d / 16]);
    }
  }
  for (int64_t d = 0; d < depth; d += 16) {
    _mm512_storeu_ps(out + d, _mm512_mul_ps(acc[d / 16], _mm512_set1_ps(inverse)));
  }
}

template <ffi::DataType D>
ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> q,
                           ffi::Buffer<D, 4> keys, ffi::Buffer<D, 4> values,
                           ffi::Buffer<ffi::S32, 0> length, ffi::ResultBuffer<ffi::F32, 3> out) {
  using T = ffi::NativeType<D>;
  const auto dims = keys.dimensions();  // (B, H, S, D)
  const int64_t rows = dims[0] * dims[1], positions = dims[2], depth = dims[3];
  const auto q_dims = q.dimensions();
  if (q_dims[0] != dims[0] || q_dims[1] != dims[1] || q_dims[2] != depth ||
      !std::equal(dims.begin(), dims.end(), values.dimensions().begin()) || depth % 16 != 0 ||
      depth > 256) {
    return ffi::Error::InvalidArgument(
        "cached_attention: q (B, H, D) and keys/values (B, H, S, D) with D a multiple of 16 "
        "up to 256");
  }
  const int64_t filled = std::min<int64_t>(positions, std::max<int32_t>(1, *length.typed_data()));
  const float* qs = q.typed_data();
  const T* ks = keys.typed_data();
  const T* vs = values.typed_data();
  float* os = out->typed_data();
  auto run = [=](int64_t first, int64_t last) {
    std::unique_ptr<float[]> scores(new float[positions]);
    for (int64_t r = first; r < last; ++r) {
      AttendRow<T>(qs + r * depth, ks + r * positions * depth, vs + r * positions * depth,
                   os + r * depth, filled, depth, scores.get());
    }
  };
  ParallelFor(pool, rows, 16, run);
  return ffi::Error::Success();
}

}  // namespace

// aliases: the handler macro splits its arguments on commas
using RowsF32 = ffi::Buffer<ffi::F32>;  // x (..., K), out (..., N)
using PanelsF32 = ffi::Buffer<ffi::F32, 3>;
using RowsBf16 = ffi::Buffer<ffi::BF16>;
using PanelsBf16 = ffi::Buffer<ffi::BF16, 3>;
constexpr auto PackedMatmulF32 = PackedMatmul<ffi::F32>;
constexpr auto PackedMatmulBf16 = PackedMatmul<ffi::BF16>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleMiniPackedMatmul, PackedMatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<RowsF32>()
                                  .Arg<PanelsF32>()
                                  .Ret<RowsF32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleMiniPackedMatmulBf16, PackedMatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<RowsBf16>()
                                  .Arg<PanelsBf16>()
                                  .Ret<RowsF32>());

using Queries = ffi::Buffer<ffi::F32, 3>;
using CacheF32 = ffi::Buffer<ffi::F32, 4>;
using CacheBf16 = ffi::Buffer<ffi::U16, 4>;  // bfloat16 bits: XLA:CPU updates it in place
using Length = ffi::Buffer<ffi::S32, 0>;
using Context = ffi::Buffer<ffi::F32, 3>;
constexpr auto CachedAttentionF32 = CachedAttention<ffi::F32>;
constexpr auto CachedAttentionBf16 = CachedAttention<ffi::U16>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleMiniCachedAttention, CachedAttentionF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Queries>()
                                  .Arg<CacheF32>()
                                  .Arg<CacheF32>()
                                  .Arg<Length>()
                                  .Ret<Context>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DalleMiniCachedAttentionBf16, CachedAttentionBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Queries>()
                                  .Arg<CacheBf16>()
                                  .Arg<CacheBf16>()
                                  .Arg<Length>()
                                  .Ret<Context>());
