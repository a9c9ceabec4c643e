// Small-row matmul for CPU decoding, called from JAX through the XLA FFI.
//
//   y[M, P*64] = x[M, D] @ W,   W packed as panels wp[P, D, 64] (column n = 64 p + c).
//
// Decode and verification multiply a handful of rows (M = 1..8) by every weight
// matrix, so the cost is reading the weights once from memory. XLA:CPU's GEMM
// for M >= 2 repacks the weight on every call (a 2-row product over a 576 x 1536
// matrix costs ~2x a 1-row one); here the weights are packed once at load time
// and each 64-column panel is streamed once, all rows of a group at a time.
//
// Every output element is one fused-multiply-add chain (compiled with -ffp-contract=fast) over d = 0..D-1 from 0,
// whatever M, the row grouping or the thread that runs it, so row r of a
// T-row product equals the 1-row product of that row bit for bit.
//
// Threads: XLA's intra-op pool (the threads XLA:CPU runs its own ops on). Work
// units (runs of panels) are claimed from an atomic counter by the caller and by
// pool tasks; the caller runs units until none are left and then waits only for
// units already being run, so a late or absent pool thread cannot stall it.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cstdlib>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float vector
constexpr int kPanel = 64;
constexpr int kPrefetchRows = 32;  // software prefetch of the panel row 32 rows (8 KB) ahead

// The matmul's register blocking follows the vector width: with AVX-512 a 64-column panel row is 4
// registers and 6 rows of accumulators fit the 32 registers; with 256-bit vectors (AVX2: 16 registers)
// a single row takes the whole panel row in 8 registers, several rows take it in two passes of 32
// columns (4 registers a row), 3 rows at a time, so nothing spills. Either way each output element is
// the same FMA chain over d.
//
// The software prefetch runs for products of up to M2R2_PREFETCH_MAX_ROWS rows (default: all). With
// AVX-512 on an AMD EPYC several rows spend more cycles per weight byte than the prefetches hide
// (2-core EPYC, SmolLM2-135M: a 5-row verification's layer matmuls 20.7 ms with them, 16.1 ms
// without), so the build there passes 1 (kernels/__init__.py). The 256-bit blocking, which reads each
// panel in two passes, keeps them at every row count (a build without AVX-512 on the EPYC: 5 rows 80 ms
// with, 104 ms without).
#if defined(__AVX512F__)
constexpr int kW = 16;
constexpr int kMaxRows = 6;
#else
constexpr int kW = 8;
constexpr int kMaxRows = 3;
#endif
#if defined(M2R2_PREFETCH_MAX_ROWS) && defined(__AVX512F__)
constexpr int kPrefetchMaxRows = M2R2_PREFETCH_MAX_ROWS;
#else
constexpr int kPrefetchMaxRows = kMaxRows;
#endif
typedef float vreg __attribute__((vector_size(kW * 4), aligned(4)));  // one unaligned SIMD register

// R rows of x against one panel, NV registers of columns per pass (kPanel / (NV * kW) passes).
template <int R, int NV>
inline void panel_rows(const float* __restrict x, int64_t D, const float* __restrict w,
                       float* __restrict y, int64_t ldy) {
  constexpr int kCols = NV * kW;
  for (int c0 = 0; c0 < kPanel; c0 += kCols) {
    vreg acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NV; ++c) acc[r][c] = vreg{};
    for (int64_t d = 0; d < D; ++d) {
      const float* wd = w + d * kPanel + c0;
      if constexpr (R <= kPrefetchMaxRows)
        for (int i = 0; i < kCols / 16; ++i) __builtin_prefetch(wd + kPrefetchRows * kPanel + 16 * i, 0, 3);
      vreg wv[NV];
      for (int c = 0; c < NV; ++c) std::memcpy(&wv[c], wd + c * kW, kW * 4);
      for (int r = 0; r < R; ++r) {
        const float xv = x[r * D + d];
        for (int c = 0; c < NV; ++c) acc[r][c] += wv[c] * xv;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NV; ++c) std::memcpy(y + r * ldy + c0 + c * kW, &acc[r][c], kW * 4);
  }
}

void panel(const float* x, int64_t M, int64_t D, const float* w, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const float* xr = x + r0 * D;
    float* yr = y + r0 * ldy;
    switch (std::min<int64_t>(M - r0, kMaxRows)) {
#if defined(__AVX512F__)
      case 1: panel_rows<1, 4>(xr, D, w, yr, ldy); break;
      case 2: panel_rows<2, 4>(xr, D, w, yr, ldy); break;
      case 3: panel_rows<3, 4>(xr, D, w, yr, ldy); break;
      case 4: panel_rows<4, 4>(xr, D, w, yr, ldy); break;
      case 5: panel_rows<5, 4>(xr, D, w, yr, ldy); break;
      default: panel_rows<6, 4>(xr, D, w, yr, ldy); break;
#else
      case 1: panel_rows<1, 8>(xr, D, w, yr, ldy); break;  // one row: the whole 64-column row at once
      case 2: panel_rows<2, 4>(xr, D, w, yr, ldy); break;
      default: panel_rows<3, 4>(xr, D, w, yr, ldy); break;
#endif
    }
  }
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Runs fn(u) for u in [0, units) on the caller and up to threads - 1 pool tasks.
struct ParallelFor {
  std::function<void(int64_t)> fn;
  int64_t units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      fn(u);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel_for(ffi::ThreadPool& pool, int64_t units, int64_t max_threads, std::function<void(int64_t)> fn) {
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(max_threads, pool.num_threads()), units) - 1;
  if (helpers <= 0) {
    for (int64_t u = 0; u < units; ++u) fn(u);
    return;
  }
  auto job = std::make_shared<ParallelFor>();
  job->fn = std::move(fn);
  job->units = units;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->units) cpu_relax();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("m2r2_packed_matmul: expected x [M, D] and panels [P, D, 64]");
  const float* xp = x.typed_data();
  const float* w = wp.typed_data();
  float* out = y->typed_data();
  const int64_t M = xd[0], D = xd[1], P = wd[0];
  if (M == 0 || P == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~4 units per thread balances uneven panel counts; at least 1 panel per unit.
  const int64_t per_unit = std::max<int64_t>(1, (P + 4 * threads - 1) / (4 * threads));
  const int64_t units = (P + per_unit - 1) / per_unit;
  parallel_for(pool, units, threads, [=](int64_t u) {
    const int64_t p1 = std::min(P, (u + 1) * per_unit);
    for (int64_t p = u * per_unit; p < p1; ++p) panel(xp, M, D, w + p * D * kPanel, out + p * kPanel, P * kPanel);
  });
  return ffi::Error::Success();
}

// The index of each row's largest element of y = x @ W over columns [0, n), without writing y:
//   idx[M] (int32) = argmax_n (x[M, D] @ W)[:, n],   W packed as in PackedMatmul.
// Each panel's products are computed by `panel` exactly as PackedMatmul computes them (the same FMA chain
// per element), into a 64-column buffer that is scanned right away, so idx is bit for bit the argmax of
// PackedMatmul's output. Ties go to the lowest column and a NaN beats any number (the first NaN wins), as
// jnp.argmax does. A greedy verification needs only these M indices, not the M x V float32 logits.
struct Best {
  float v;
  int64_t i;  // -1: none yet
};

inline bool beats(float v, const Best& b) {
  if (b.i < 0) return true;
  if (b.v != b.v) return false;  // a NaN is never displaced
  return v != v || v > b.v;
}

ffi::Error PackedArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::S32> idx, int64_t n) {
  auto xd = x.dimensions();
  auto wd = wp.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("m2r2_packed_argmax: expected x [M, D] and panels [P, D, 64]");
  const int64_t M = xd[0], D = xd[1], P = wd[0];
  if (n < 1 || n > P * kPanel) return ffi::Error::InvalidArgument("m2r2_packed_argmax: n out of range");
  if (M == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* w = wp.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_unit = std::max<int64_t>(1, (P + 4 * threads - 1) / (4 * threads));
  const int64_t units = (P + per_unit - 1) / per_unit;
  std::vector<Best> best(static_cast<size_t>(units * M), Best{0.f, -1});  // per unit and row
  Best* bp = best.data();
  parallel_for(pool, units, threads, [=](int64_t u) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(M * kPanel)) buf.resize(M * kPanel);
    float* y = buf.data();
    Best* ub = bp + u * M;
    const int64_t p1 = std::min(P, (u + 1) * per_unit);
    for (int64_t p = u * per_unit; p < p1; ++p) {
      const int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
      if (cols <= 0) break;
      panel(xp, M, D, w + p * D * kPanel, y, kPanel);
      for (int64_t r = 0; r < M; ++r) {
        const float* yr = y + r * kPanel;
        Best b = ub[r];
        for (int64_t c = 0; c < cols; ++c)
          if (beats(yr[c], b)) b = Best{yr[c], p * kPanel + c};
        ub[r] = b;
      }
    }
  });
  int32_t* out = idx->typed_data();
  for (int64_t r = 0; r < M; ++r) {  // units in column order: a later unit wins only by beating
    Best b{0.f, -1};
    for (int64_t u = 0; u < units; ++u) {
      const Best& c = bp[u * M + r];
      if (c.i >= 0 && beats(c.v, b)) b = c;
    }
    out[r] = static_cast<int32_t>(b.i);
  }
  return ffi::Error::Success();
}

// Attention of a block of T queries per row over a prefix of the KV cache plus a small local K/V set.
//   q [B, T, H, hd]; kc, vc [B, KV, S, hd] (the cache: row b's query sees slots s < plen[b]);
//   kl, vl [B, KV, L, hd] (local keys: query t sees j where lmask[t, j] != 0); -> out [B, T, H, hd].
//
// The T * G queries that share a KV head (G = H / KV) sit in the 16 lanes of a vector, so each key
// and value is loaded once for all of them: scores (one FMA chain over d per lane), the max, exp and
// sum, and the weighted sum of values (one FMA chain over keys per lane, prefix slots then local
// keys in order) are all lane-wise. A key a query cannot see gets score -inf, weight exactly 0 and
// adds exactly 0. So a query's result does not depend on its lane, on the other queries in the call,
// or on whether a key was a prefix slot or a visible local one: a one-token decode and a T-token
// verification agree bit for bit. A query with no visible key gets zeros.
constexpr int kLanes = 16;
constexpr int kKeyBlock = 8;

// exp(x) for x <= 0 on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2; p: degree-6 Taylor
// (relative error < 2e-7); inputs at or below -87 (and -inf) give 0.
inline v16 exp16(v16 x) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const v16 lo = v16{} - 87.f;
  const auto low = !(x > lo);  // also true for NaN
  x = low ? lo : x;
  v16 n = x * 1.44269504088896341f;
  n = __builtin_convertvector(__builtin_convertvector(n + (n < 0 ? -0.5f : 0.5f), i16), v16);
  v16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16 p = v16{} + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, 64);
  v16 y = p * scale;
  return low ? v16{} : y;
}

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, 64);
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, 64); }

// scores of keys k[0..n) (rows of HD floats) against qt [HD][16] -> sc [n][16]; returns the lane max
template <int HD>
inline v16 score_keys(const float* __restrict qt, const float* __restrict k, int64_t n, float* __restrict sc,
                      v16 mx) {
  int64_t s = 0;
  for (; s + kKeyBlock <= n; s += kKeyBlock) {
    v16 acc[kKeyBlock];
    for (int j = 0; j < kKeyBlock; ++j) acc[j] = v16{};
    const float* kb = k + s * HD;
    for (int d = 0; d < HD; ++d) {
      const v16 qd = load16(qt + d * kLanes);
      for (int j = 0; j < kKeyBlock; ++j) acc[j] += qd * kb[j * HD + d];
    }
    for (int j = 0; j < kKeyBlock; ++j) {
      store16(sc + (s + j) * kLanes, acc[j]);
      mx = acc[j] > mx ? acc[j] : mx;
    }
  }
  for (; s < n; ++s) {
    v16 acc = v16{};
    const float* kb = k + s * HD;
    for (int d = 0; d < HD; ++d) acc += load16(qt + d * kLanes) * kb[d];
    store16(sc + s * kLanes, acc);
    mx = acc > mx ? acc : mx;
  }
  return mx;
}

// acc [HD][16] += sum over keys of weight p[i][lane] * v[i][d], keys in order
template <int HD>
inline void weigh_values(const float* __restrict p, const float* __restrict v, int64_t n, v16* __restrict acc) {
  for (int c = 0; c < HD / 16; ++c) {
    v16 a[16];
    for (int dd = 0; dd < 16; ++dd) a[dd] = acc[c * 16 + dd];
    for (int64_t i = 0; i < n; ++i) {
      const v16 pi = load16(p + i * kLanes);
      const float* vi = v + i * HD + c * 16;
      for (int dd = 0; dd < 16; ++dd) a[dd] += pi * vi[dd];
    }
    for (int dd = 0; dd < 16; ++dd) acc[c * 16 + dd] = a[dd];
  }
}

// One group of up to 16 queries sharing a KV head. qptr[l]: query rows (nullptr: unused lane);
// vis [L][16]: local key j visible to lane l; scratch: sc [(plen + L)][16].
template <int HD>
void attend_group(const float* const* qptr, int nq, const float* kc, const float* vc, int64_t plen,
                  const float* kl, const float* vl, const float* vis, int64_t L, float scale, float* sc,
                  float* const* optr) {
  alignas(64) float qt[HD * kLanes];
  for (int l = 0; l < kLanes; ++l)
    for (int d = 0; d < HD; ++d) qt[d * kLanes + l] = l < nq ? qptr[l][d] * scale : 0.f;
  const v16 ninf = v16{} - INFINITY;
  v16 mx = score_keys<HD>(qt, kc, plen, sc, ninf);
  float* scl = sc + plen * kLanes;
  score_keys<HD>(qt, kl, L, scl, ninf);  // local keys: the max is taken after masking
  for (int64_t j = 0; j < L; ++j) {
    v16 s = load16(scl + j * kLanes);
    s = load16(vis + j * kLanes) > 0.5f ? s : ninf;
    store16(scl + j * kLanes, s);
    mx = s > mx ? s : mx;
  }
  const int64_t n = plen + L;
  v16 sum = v16{};
  for (int64_t i = 0; i < n; ++i) {
    const v16 p = exp16(load16(sc + i * kLanes) - mx);
    sum += p;
    store16(sc + i * kLanes, p);
  }
  v16 acc[HD];
  for (int d = 0; d < HD; ++d) acc[d] = v16{};
  weigh_values<HD>(sc, vc, plen, acc);
  weigh_values<HD>(scl, vl, L, acc);
  const v16 inv = 1.f / sum;
  const auto none = !(mx > ninf);  // lanes that saw no key
  alignas(64) float o[HD * kLanes];
  for (int d = 0; d < HD; ++d) store16(o + d * kLanes, none ? v16{} : acc[d] * inv);
  for (int l = 0; l < nq; ++l)
    for (int d = 0; d < HD; ++d) optr[l][d] = o[d * kLanes + l];
}

ffi::Error BlockAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                          ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::S32> plen, ffi::Buffer<ffi::F32> kl,
                          ffi::Buffer<ffi::F32> vl, ffi::Buffer<ffi::S8> lmask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), cd = kc.dimensions(), ld = kl.dimensions(), md = lmask.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || ld.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("m2r2_block_attention: bad ranks");
  const int64_t B = qd[0], T = qd[1], H = qd[2], hd = qd[3], KV = cd[1], S = cd[2], L = ld[2];
  if (cd[0] != B || cd[3] != hd || ld[0] != B || ld[1] != KV || ld[3] != hd || md[0] != T || md[1] != L ||
      H % KV || (hd != 16 && hd != 32 && hd != 64 && hd != 128))
    return ffi::Error::InvalidArgument("m2r2_block_attention: shape mismatch (head_dim must be 16, 32, 64 or 128)");
  const int64_t G = H / KV;
  const int64_t NQ = T * G;  // queries per (row, KV head)
  const int64_t groups = (NQ + kLanes - 1) / kLanes;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float *qp = q.typed_data(), *kcp = kc.typed_data(), *vcp = vc.typed_data();
  const float *klp = kl.typed_data(), *vlp = vl.typed_data();
  const int32_t* pl = plen.typed_data();
  const int8_t* lm = lmask.typed_data();
  float* op = out->typed_data();
  // one unit per (row, KV head, lane group)
  const int64_t units = B * KV * groups;
  const int64_t work = B * T * H * (S + L);
  parallel_for(pool, units, work >= (1 << 17) ? 64 : 1, [=](int64_t u) {
    const int64_t b = u / (KV * groups), k = (u / groups) % KV, grp = u % groups;
    const int64_t plen_b = std::min<int64_t>(std::max<int32_t>(pl[b], 0), S);
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>((plen_b + L) * kLanes + L * kLanes + 16);
    if (scratch.size() < need) scratch.resize(need);
    float* vis = scratch.data();
    float* sc = scratch.data() + L * kLanes;
    const float* qptr[kLanes] = {};
    float* optr[kLanes] = {};
    const int nq = static_cast<int>(std::min<int64_t>(kLanes, NQ - grp * kLanes));
    for (int l = 0; l < kLanes; ++l) {
      if (l >= nq) {  // an unused lane sees every key (its result is never written)
        for (int64_t j = 0; j < L; ++j) vis[j * kLanes + l] = 1.f;
        continue;
      }
      const int64_t f = grp * kLanes + l, t = f / G, h = k * G + f % G;
      qptr[l] = qp + ((b * T + t) * H + h) * hd;
      optr[l] = op + ((b * T + t) * H + h) * hd;
      for (int64_t j = 0; j < L; ++j) vis[j * kLanes + l] = lm[t * L + j] ? 1.f : 0.f;
    }
    const float* kcb = kcp + ((b * KV + k) * S) * hd;
    const float* vcb = vcp + ((b * KV + k) * S) * hd;
    const float* klb = klp + ((b * KV + k) * L) * hd;
    const float* vlb = vlp + ((b * KV + k) * L) * hd;
    switch (hd) {
      case 16: attend_group<16>(qptr, nq, kcb, vcb, plen_b, klb, vlb, vis, L, scale, sc, optr); break;
      case 32: attend_group<32>(qptr, nq, kcb, vcb, plen_b, klb, vlb, vis, L, scale, sc, optr); break;
      case 64: attend_group<64>(qptr, nq, kcb, vcb, plen_b, klb, vlb, vis, L, scale, sc, optr); break;
      default: attend_group<128>(qptr, nq, kcb, vcb, plen_b, klb, vlb, vis, L, scale, sc, optr); break;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2R2PackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2R2PackedArgmax, PackedArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(M2R2BlockAttention, BlockAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
