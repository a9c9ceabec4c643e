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
#include <cstdlib>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float vector
constexpr int kPanel = 64;
constexpr int kMaxRows = 6;  // accumulators: kMaxRows * 4 vectors + 4 weight vectors < 32 registers
constexpr int kPrefetchRows = 32;  // software prefetch: all 4 lines of the row 32 rows (8 KB) ahead

template <int R>
inline void panel_rows(const float* __restrict x, int64_t D, const float* __restrict w,
                       float* __restrict y, int64_t ldy) {
  v16 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = v16{};
  for (int64_t d = 0; d < D; ++d) {
    const float* wd = w + d * kPanel;
    for (int i = 0; i < 4; ++i) __builtin_prefetch(wd + kPrefetchRows * kPanel + 16 * i, 0, 3);
    v16 w0, w1, w2, w3;
    std::memcpy(&w0, wd, 64);
    std::memcpy(&w1, wd + 16, 64);
    std::memcpy(&w2, wd + 32, 64);
    std::memcpy(&w3, wd + 48, 64);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * D + d];
      acc[r][0] += w0 * xv;
      acc[r][1] += w1 * xv;
      acc[r][2] += w2 * xv;
      acc[r][3] += w3 * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) std::memcpy(y + r * ldy + c * 16, &acc[r][c], 64);
}

void panel(const float* x, int64_t M, int64_t D, const float* w, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const float* xr = x + r0 * D;
    float* yr = y + r0 * ldy;
    switch (std::min<int64_t>(M - r0, kMaxRows)) {
      case 1: panel_rows<1>(xr, D, w, yr, ldy); break;
      case 2: panel_rows<2>(xr, D, w, yr, ldy); break;
      case 3: panel_rows<3>(xr, D, w, yr, ldy); break;
      case 4: panel_rows<4>(xr, D, w, yr, ldy); break;
      case 5: panel_rows<5>(xr, D, w, yr, ldy); break;
      default: panel_rows<6>(xr, D, w, yr, ldy); break;
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

// Attention of a block of T queries per row over a prefix of the KV cache plus a small local K/V set.
//   q [B, T, H, hd]; kc, vc [B, KV, S, hd] (the cache: row b's query sees slots s < plen[b]);
//   kl, vl [B, KV, L, hd] (local keys: query t sees j where lmask[t, j] != 0); -> out [B, T, H, hd].
// Keys are visited in order (prefix slots, then local ones); each query's scores, softmax and
// weighted sum of values run alone, so a query's result does not depend on the other queries.
// A query with no visible key gets zeros.
inline float hsum(v16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// exp(x) for x <= 0 on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2; p: degree-6 Taylor
// (relative error < 2e-7); inputs below -87 give 0.
inline v16 exp16(v16 x) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const v16 lo = v16{} - 87.f;
  x = x < lo ? lo : x;
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
  return x <= lo ? v16{} : y;
}

template <int HD>
void attend_query(const float* q, const float* kc, const float* vc, int64_t plen, const float* kl,
                  const float* vl, const int8_t* lm, int64_t L, float scale, float* scores, float* out) {
  constexpr int NV = HD / 16;
  v16 qv[NV];
  for (int c = 0; c < NV; ++c) {
    std::memcpy(&qv[c], q + 16 * c, 64);
    qv[c] *= scale;
  }
  auto dot = [&](const float* k) {
    v16 acc = v16{};
    for (int c = 0; c < NV; ++c) {
      v16 kv;
      std::memcpy(&kv, k + 16 * c, 64);
      acc += qv[c] * kv;
    }
    return hsum(acc);
  };
  // scores of the visible keys, packed: prefix slots, then the visible local keys
  int64_t n = 0;
  float mx = -INFINITY;
  for (int64_t s = 0; s < plen; ++s, ++n) {
    scores[n] = dot(kc + s * HD);
    mx = std::max(mx, scores[n]);
  }
  for (int64_t j = 0; j < L; ++j)
    if (lm[j]) {
      scores[n] = dot(kl + j * HD);
      mx = std::max(mx, scores[n++]);
    }
  v16 acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = v16{};
  if (n == 0) {
    for (int c = 0; c < NV; ++c) std::memcpy(out + 16 * c, &acc[c], 64);
    return;
  }
  // exp(score - max) in blocks of 16 (padding lanes give exp(-87) -> 0 and are never read)
  const int64_t n16 = (n + 15) / 16 * 16;
  for (int64_t i = n; i < n16; ++i) scores[i] = -INFINITY;
  v16 vsum = v16{};
  for (int64_t i = 0; i < n16; i += 16) {
    v16 sc;
    std::memcpy(&sc, scores + i, 64);
    sc = exp16(sc - mx);
    vsum += sc;
    std::memcpy(scores + i, &sc, 64);
  }
  const float sum = hsum(vsum);
  auto add = [&](float p, const float* v) {
    for (int c = 0; c < NV; ++c) {
      v16 vv;
      std::memcpy(&vv, v + 16 * c, 64);
      acc[c] += vv * p;
    }
  };
  n = 0;
  for (int64_t s = 0; s < plen; ++s) add(scores[n++], vc + s * HD);
  for (int64_t j = 0; j < L; ++j)
    if (lm[j]) add(scores[n++], vl + j * HD);
  const float inv = 1.f / sum;
  for (int c = 0; c < NV; ++c) {
    v16 o = acc[c] * inv;
    std::memcpy(out + 16 * c, &o, 64);
  }
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
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float *qp = q.typed_data(), *kcp = kc.typed_data(), *vcp = vc.typed_data();
  const float *klp = kl.typed_data(), *vlp = vl.typed_data();
  const int32_t* pl = plen.typed_data();
  const int8_t* lm = lmask.typed_data();
  float* op = out->typed_data();
  // one unit per (row, kv head): the group's queries share that head's keys while they are in cache
  const int64_t units = B * KV;
  const int64_t work = B * T * H * (S + L);
  parallel_for(pool, units, work >= (1 << 16) ? 64 : 1, [=](int64_t u) {
    const int64_t b = u / KV, k = u % KV;
    const int64_t plen_b = std::min<int64_t>(std::max<int32_t>(pl[b], 0), S);
    std::unique_ptr<float[]> scores(new float[S + L + 16]);
    const float* kcb = kcp + ((b * KV + k) * S) * hd;
    const float* vcb = vcp + ((b * KV + k) * S) * hd;
    const float* klb = klp + ((b * KV + k) * L) * hd;
    const float* vlb = vlp + ((b * KV + k) * L) * hd;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = k * G + g;
        const float* qq = qp + ((b * T + t) * H + h) * hd;
        float* oo = op + ((b * T + t) * H + h) * hd;
        switch (hd) {
          case 16: attend_query<16>(qq, kcb, vcb, plen_b, klb, vlb, lm + t * L, L, scale, scores.get(), oo); break;
          case 32: attend_query<32>(qq, kcb, vcb, plen_b, klb, vlb, lm + t * L, L, scale, scores.get(), oo); break;
          case 64: attend_query<64>(qq, kcb, vcb, plen_b, klb, vlb, lm + t * L, L, scale, scores.get(), oo); break;
          default: attend_query<128>(qq, kcb, vcb, plen_b, klb, vlb, lm + t * L, L, scale, scores.get(), oo); break;
        }
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
