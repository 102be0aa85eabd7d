// One-pass host AdamW update for a StrongHold layer.
//
// Per element, in one streaming pass over memory:
//   g  = float(grad) * grad_scale                      (bf16/fp16 -> fp32 in registers, then unscale/clip)
//   p *= 1 - lr * wd                                   (decoupled weight decay)
//   m  = lerp(m, g, 1 - beta1)
//   v  = beta2 * v + (1 - beta2) * g * g
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   weights_out = bf16/fp16(p)                         (round to nearest even, as Tensor.to())
//
// It replaces three passes of the torch path (grad -> fp32 scratch copy, torch fused AdamW,
// fp32 master -> compute-dtype weights copy): 28 bytes moved per parameter (bf16 grad and weights)
// instead of 40, the same 28 as torch's fused AdamW alone on an fp32 gradient. The weights go out
// through streaming stores (no read of the destination lines), else they would cost 30.
//
// Host-store layouts, with the bytes each moves per parameter (bf16 gradient, read once: 2):
//   fp32 master (r/w 8), fp32 moments (r/w 16), bf16 weights out (2)                        28
//   fp32 master (r/w 8), bf16 moments (r/w 8), bf16 weights out (2)                         20
//   remainder master: bf16 weights (r/w 4) + int16 remainder (r/w 4), fp32 moments (r/w 16)  26
//   remainder master (r/w 8), bf16 moments (r/w 8)                                          18
// The update is memory bound on a many-core host, so fewer bytes is a higher rate. A bf16 moment
// is widened to fp32, updated with the fp32 arithmetic below and stored rounded to nearest even
// (c10::BFloat16: NaN -> 0x7FC0). A remainder master is the exact fp32 master kept as its bf16
// weights (the tensor the GPU reads), its low 16 bits and a sorted list of ties
// (stronghold_ext/remainders.py): the kernel joins them, steps the fp32 value and splits it again,
// so the master after any number of steps is bit for bit that of the fp32-master layout. No fp32
// copy of a whole layer is made: the AVX-512 loop keeps each element in registers, the portable
// one works kTile elements at a time in L1-resident fp32 buffers.
//
// The arithmetic follows torch's CPU fused AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp,
// vectorised fp32 path) operation by operation: same constants (computed in double, used as
// float), lerp as one fma on the same branch, beta2 * v + (c2 * g) * g as one fma (torch's build
// contracts it), a division by sqrt(bias correction 2), param + (-step_size * m) / denom. Built
// with -ffp-contract=off so that nothing else is fused, the result is bitwise equal to torch's
// (tested on torch 2.13 x86; torch's scalar tails of a few elements per thread may differ by an ulp:
// its scalar loop rounds beta2 * v + (1 - beta2) * g * g differently). The other layouts are bitwise
// equal to their torch reference, stronghold_ext.adamw_step_torch, which for them runs every
// element through torch's vectorised loop.
//
// Parallelism: at::parallel_for (torch's intra-op pool, torch.get_num_threads() of the calling
// thread) over blocks of kBlock elements, so every thread streams one contiguous range. The loop
// is AVX-512 intrinsics where the compiler targets AVX-512 (-march=native on Skylake-SP, Sapphire
// Rapids, Zen 4), else plain C++ the compiler vectorises; both are exact, tests cover both
// (-DSTRONGHOLD_GENERIC builds the portable one; -DSTRONGHOLD_NO_STREAM drops streaming stores).
// The other layouts have loops of their own (layout_range, tiled_range), built the same two ways;
// the moments' dtypes are picked by branches that go the same way for a whole call. New ties are
// gathered per parallel range and concatenated in index order.

// Light headers on purpose (not torch/extension.h): the JIT build takes seconds, not a minute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 + at::Tensor / std::optional casters

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 64;    // elements: 256 B of fp32, 128 B of bf16, whole cache lines
constexpr int64_t kGrain = 256;   // blocks (16K elements) per task at least

struct Consts {
  float grad_scale;
  float decay;          // 1 - lr * wd
  float lerp_coeff;     // lerp(m, g, w) = fma(coeff, g - m, base)
  bool lerp_from_m;     // base = m when |w| < 0.5, else g (torch's two-sided lerp)
  float beta2;
  float c2;             // 1 - beta2
  float bc2_sqrt;       // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^t)
};

struct NoOut { using T = uint16_t; };  // weights_out = None

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// --- bf16 (stored as uint16_t) ---
inline float load_bf16(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }
inline uint16_t store_bf16(float f) {
  // c10::BFloat16 round_to_nearest_even
  uint32_t u = f32_to_bits(f);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return std::isnan(f) ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
}

// --- IEEE fp16 (stored as uint16_t): c10's fp16_ieee_{to,from}_fp32_value, branch-free ---
inline float load_fp16(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized));
  return bits_to_f32(r);
}
inline uint16_t store_fp16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

struct F32 { using T = float; static float load(float x) { return x; } };
struct BF16 { using T = uint16_t; static float load(uint16_t x) { return load_bf16(x); }
              static uint16_t store(float x) { return store_bf16(x); } };
struct FP16 { using T = uint16_t; static float load(uint16_t x) { return load_fp16(x); }
              static uint16_t store(float x) { return store_fp16(x); } };

// The update on n elements with an fp32 gradient.
template <typename W>
void adamw_core(float* __restrict p, float* __restrict m, float* __restrict v, const float* __restrict g,
                typename W::T* __restrict w, int64_t n, const Consts& c) {
  const float grad_scale = c.grad_scale, decay = c.decay, coeff = c.lerp_coeff, beta2 = c.beta2,
              c2 = c.c2, bc2_sqrt = c.bc2_sqrt, eps = c.eps, neg_step_size = c.neg_step_size;
  const bool from_m = c.lerp_from_m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    float pi = p[i] * decay;
    float mi = m[i];
    mi = std::fma(coeff, gi - mi, from_m ? mi : gi);
    const float vi = std::fma(c2 * gi, gi, v[i] * beta2);  // torch's build contracts this one
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    pi = pi + (neg_step_size * mi) / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (!std::is_same_v<W, NoOut>) w[i] = W::store(pi);
  }
}

// Copy n 16-bit values to dst with non-temporal (streaming) stores where dst is aligned: the
// weights are read next by the GPU's DMA, not by this CPU, and a streaming store does not first
// read the destination line into the cache (a normal store would: 2 more bytes per parameter).
inline void stream_copy_u16(uint16_t* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
#if (defined(__AVX512F__) || defined(__SSE2__)) && !defined(STRONGHOLD_NO_STREAM)  // (a benchmark switch)
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 32;  // 64 B
#else
  constexpr int64_t kLanes = 8;   // 16 B
#endif
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) % (2 * kLanes)) != 0; ++i) dst[i] = src[i];
  for (; i + kLanes <= n; i += kLanes) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
#endif
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores are weakly ordered: make them visible before the step returns
#endif
}

// The update runs a tile at a time: a 16-bit gradient is first widened into an L1-resident fp32
// buffer (gcc 12 does not vectorise one loop that loads and stores 16-bit data next to fp32 data),
// and the 16-bit weights are written to an L1 buffer and then streamed out.
constexpr int64_t kTile = 1024;

template <typename G, typename W>
void adamw_range_generic(float* p, float* m, float* v, const typename G::T* g, void* out, int64_t n, const Consts& c) {
  auto* w = static_cast<typename W::T*>(out);
  constexpr bool widen = !std::is_same_v<G, F32>, stream = !std::is_same_v<W, NoOut>;
  if constexpr (!widen && !stream) {
    adamw_core<W>(p, m, v, g, w, n, c);
  } else {
    alignas(64) float gbuf[widen ? kTile : 1];
    alignas(64) uint16_t wbuf[stream ? kTile : 1];
    for (int64_t s = 0; s < n; s += kTile) {
      const int64_t len = std::min(kTile, n - s);
      const float* gt;
      if constexpr (widen) {
        const typename G::T* __restrict gs = g + s;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) gbuf[i] = G::load(gs[i]);
        gt = gbuf;
      } else {
        gt = g + s;
      }
      if constexpr (stream) {
        adamw_core<W>(p + s, m + s, v + s, gt, wbuf, len, c);
        stream_copy_u16(w + s, wbuf, len);
      } else {
        adamw_core<W>(p + s, m + s, v + s, gt, nullptr, len, c);
      }
    }
    if constexpr (stream) stream_fence();
  }
}

#if defined(__AVX512F__) && !defined(STRONGHOLD_GENERIC)
// AVX-512 (Skylake-SP and later, Zen 4): one loop, 16 elements a step, the same operations in the
// same order as adamw_core; the 16-bit weights leave through streaming stores.
template <typename G> inline __m512 load16(const typename G::T* g) {
  if constexpr (std::is_same_v<G, F32>) {
    return _mm512_loadu_ps(g);
  } else if constexpr (std::is_same_v<G, BF16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
  }
}

template <typename W> inline __m256i pack16(__m512 x) {
  if constexpr (std::is_same_v<W, BF16>) {  // round to nearest even, NaN -> 0x7FC0 (c10::BFloat16)
    const __m512i u = _mm512_castps_si512(x);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                          _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  } else {  // IEEE half, round to nearest even
    return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

template <typename G, typename W>
void adamw_range(float* p, float* m, float* v, const typename G::T* g, void* out, int64_t n, const Consts& c) {
  constexpr bool has_out = !std::is_same_v<W, NoOut>;
  auto* w = static_cast<typename W::T*>(out);
  int64_t i = 0;
  if constexpr (has_out) {  // up to the first 32-byte aligned weight, for the streaming stores
    const int64_t head = std::min<int64_t>(n, ((32 - reinterpret_cast<uintptr_t>(w) % 32) % 32) / 2);
    adamw_range_generic<G, W>(p, m, v, g, w, head, c);
    i = head;
  }
  const __m512 grad_scale = _mm512_set1_ps(c.grad_scale), decay = _mm512_set1_ps(c.decay),
               coeff = _mm512_set1_ps(c.lerp_coeff), beta2 = _mm512_set1_ps(c.beta2), c2 = _mm512_set1_ps(c.c2),
               bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt), eps = _mm512_set1_ps(c.eps),
               neg_step_size = _mm512_set1_ps(c.neg_step_size);
  const __mmask16 base_is_m = c.lerp_from_m ? 0xFFFF : 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gi = _mm512_mul_ps(load16<G>(g + i), grad_scale);
    __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay);
    __m512 mi = _mm512_loadu_ps(m + i);
    mi = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gi, mi), _mm512_mask_blend_ps(base_is_m, gi, mi));
    const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gi), gi, _mm512_mul_ps(_mm512_loadu_ps(v + i), beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step_size, mi), denom));
    _mm512_storeu_ps(p + i, pi);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    if constexpr (has_out) {
#if defined(STRONGHOLD_NO_STREAM)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), pack16<W>(pi));
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(w + i), pack16<W>(pi));
#endif
    }
  }
  adamw_range_generic<G, W>(p + i, m + i, v + i, g + i, has_out ? w + i : nullptr, n - i, c);
  if constexpr (has_out) stream_fence();
}
#else
template <typename G, typename W>
void adamw_range(float* p, float* m, float* v, const typename G::T* g, void* out, int64_t n, const Consts& c) {
  adamw_range_generic<G, W>(p, m, v, g, out, n, c);
}
#endif

template <typename G, typename W>
void adamw_parallel(float* p, float* m, float* v, const void* g, void* out, int64_t n, const Consts& c) {
  const auto* gt = static_cast<const typename G::T*>(g);
  const int64_t out_size = std::is_same_v<W, NoOut> ? 0 : 2;
  auto* ob = static_cast<char*>(out);
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrain, [&](int64_t b0, int64_t b1) {
    const int64_t s = b0 * kBlock, e = std::min(b1 * kBlock, n);
    adamw_range<G, W>(p + s, m + s, v + s, gt + s, out_size ? ob + s * out_size : nullptr, e - s, c);
  });
}

template <typename G>
void dispatch_out(float* p, float* m, float* v, const void* g, void* out, at::ScalarType out_type,
                  int64_t n, const Consts& c) {
  if (out == nullptr) return adamw_parallel<G, NoOut>(p, m, v, g, out, n, c);
  if (out_type == at::kBFloat16) return adamw_parallel<G, BF16>(p, m, v, g, out, n, c);
  return adamw_parallel<G, FP16>(p, m, v, g, out, n, c);
}

// --- The other layouts: bf16 moments and/or a remainder master ---

struct Store {
  float* master;           // fp32 master, or nullptr: weights + remainder + ties hold it
  void* exp_avg;           // fp32, or bf16 when m_bf16
  void* exp_avg_sq;        // fp32, or bf16 when v_bf16
  bool m_bf16, v_bf16;
  const void* grad;
  void* weights;           // out (fp32 master; may be null), or the bf16 weights read and written
  int16_t* remainder;      // remainder master: the low 16 bits of the master
  const int64_t* ties;     // remainder master: sorted indices whose code 0x8000 means -0x8000
  int64_t nties;
};

constexpr int16_t kTieCode = INT16_MIN;  // the remainder code of both exact ties, +-0x8000

// The 16-bit parts of a tile into fp32 buffers, in one loop of 16-bit loads and fp32 stores (a
// shape the compiler vectorises; with fp32 loads beside them it would not): the gradient, the
// master joined from weight << 16 + remainder (the code 0x8000 read as +0x8000; listed ties are
// patched after), the bf16 moments.
template <typename G, bool kRem, bool kM, bool kV>
void widen_tile(const typename G::T* __restrict g, const uint16_t* __restrict w, const int16_t* __restrict r,
                const uint16_t* __restrict m, const uint16_t* __restrict v, float* __restrict gb,
                float* __restrict pb, float* __restrict mb, float* __restrict vb, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (!std::is_same_v<G, F32>) gb[i] = G::load(g[i]);
    if constexpr (kRem) {
      const int32_t d = r[i] == kTieCode ? 0x8000 : static_cast<int32_t>(r[i]);
      pb[i] = bits_to_f32((static_cast<uint32_t>(w[i]) << 16) + static_cast<uint32_t>(d));
    }
    if constexpr (kM) mb[i] = load_bf16(m[i]);
    if constexpr (kV) vb[i] = load_bf16(v[i]);
  }
}

// And back, in one loop of fp32 loads and 16-bit stores: the weight, bf16(master) rounded to
// nearest even; the remainder, bits(master) - weight << 16, whose 16-bit code is the master's low
// half (the weight's part has none); the bf16 moments.
template <bool kRem, bool kM, bool kV>
void narrow_tile(const float* __restrict pb, const float* __restrict mb, const float* __restrict vb,
                 uint16_t* __restrict w, int16_t* __restrict r, uint16_t* __restrict m, uint16_t* __restrict v,
                 int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kRem) {
      w[i] = store_bf16(pb[i]);
      r[i] = static_cast<int16_t>(static_cast<uint16_t>(f32_to_bits(pb[i]) & 0xFFFFu));
    }
    if constexpr (kM) m[i] = store_bf16(mb[i]);
    if constexpr (kV) v[i] = store_bf16(vb[i]);
  }
}

// The moments' dtypes, fixed for a whole call, pick the instantiation once per tile.
template <typename G, bool kRem, typename... A>
void widen_any(bool m_bf16, bool v_bf16, A... a) {
  if (m_bf16 && v_bf16) widen_tile<G, kRem, true, true>(a...);
  else if (m_bf16) widen_tile<G, kRem, true, false>(a...);
  else if (v_bf16) widen_tile<G, kRem, false, true>(a...);
  else widen_tile<G, kRem, false, false>(a...);
}

template <bool kRem, typename... A>
void narrow_any(bool m_bf16, bool v_bf16, A... a) {
  if (m_bf16 && v_bf16) narrow_tile<kRem, true, true>(a...);
  else if (m_bf16) narrow_tile<kRem, true, false>(a...);
  else if (v_bf16) narrow_tile<kRem, false, true>(a...);
  else narrow_tile<kRem, false, false>(a...);
}

inline bool any_tie_code(const int16_t* __restrict r, int64_t n) {
  int found = 0;
#pragma omp simd reduction(| : found)
  for (int64_t i = 0; i < n; ++i) found |= r[i] == kTieCode;
  return found != 0;
}

// Elements [s0, e0) of the other layouts, portable: per tile of kTile elements, the 16-bit parts
// widened into L1-resident fp32 buffers (fp32 parts are used in place), adamw_core, and the 16-bit
// parts narrowed back. A remainder master appends the indices of its new ties (exact ties that
// rounded up) to new_ties.
template <typename G, typename W, bool kRem>
void tiled_range(const Store& st, int64_t s0, int64_t e0, const Consts& c, std::vector<int64_t>& new_ties) {
  constexpr bool widen = !std::is_same_v<G, F32>, stream = !kRem && !std::is_same_v<W, NoOut>;
  alignas(64) float gbuf[widen ? kTile : 1], pbuf[kRem ? kTile : 1], mbuf[kTile], vbuf[kTile];
  alignas(64) uint16_t wbuf[stream ? kTile : 1];
  const auto* g = static_cast<const typename G::T*>(st.grad);
  auto* w = static_cast<typename W::T*>(st.weights);
  auto* m16 = static_cast<uint16_t*>(st.exp_avg);
  auto* v16 = static_cast<uint16_t*>(st.exp_avg_sq);
  const bool m_bf16 = st.m_bf16, v_bf16 = st.v_bf16;
  // The first tie at or after s0; the ties are sorted, so a cursor follows the tiles.
  int64_t tie = kRem ? std::lower_bound(st.ties, st.ties + st.nties, s0) - st.ties : 0;
  for (int64_t s = s0; s < e0; s += kTile) {
    const int64_t len = std::min(kTile, e0 - s);
    widen_any<G, kRem>(m_bf16, v_bf16, g + s, reinterpret_cast<const uint16_t*>(w + s), st.remainder + s,
                       m16 + s, v16 + s, gbuf, pbuf, mbuf, vbuf, len);
    const float* gt = widen ? gbuf : reinterpret_cast<const float*>(g + s);
    float* pt = kRem ? pbuf : st.master + s;
    if constexpr (kRem) {
      for (; tie < st.nties && st.ties[tie] < s + len; ++tie) {
        const int64_t j = st.ties[tie] - s;
        pbuf[j] = bits_to_f32((static_cast<uint32_t>(w[s + j]) << 16) - 0x8000u);
      }
    }
    float* mt = m_bf16 ? mbuf : static_cast<float*>(st.exp_avg) + s;
    float* vt = v_bf16 ? vbuf : static_cast<float*>(st.exp_avg_sq) + s;

    if constexpr (stream) {
      adamw_core<W>(pt, mt, vt, gt, wbuf, len, c);
      stream_copy_u16(w + s, wbuf, len);
    } else {
      adamw_core<NoOut>(pt, mt, vt, gt, nullptr, len, c);
    }

    // With a remainder master the weights' lines were read by this tile: plain stores (a streaming
    // store would save nothing).
    narrow_any<kRem>(m_bf16, v_bf16, pbuf, mbuf, vbuf, reinterpret_cast<uint16_t*>(w + s), st.remainder + s,
                     m16 + s, v16 + s, len);
    if constexpr (kRem) {
      const uint16_t* ws = w + s;
      const int16_t* rs = st.remainder + s;
      if (any_tie_code(rs, len)) {  // about one tile in 32: then find which code is -0x8000
        for (int64_t i = 0; i < len; ++i) {
          const int32_t diff = static_cast<int32_t>(f32_to_bits(pbuf[i]) - (static_cast<uint32_t>(ws[i]) << 16));
          if (diff == -0x8000) new_ties.push_back(s + i);
        }
      }
    }
  }
  if constexpr (stream) stream_fence();
}

#if defined(__AVX512F__) && !defined(STRONGHOLD_GENERIC)
// bf16(x) rounded to nearest even as pack16<BF16>. With AVX512-BF16 (Cooper Lake, Sapphire Rapids,
// Zen 4) one vcvtneps2bf16 does it for every value but NaN (kept quiet, not 0x7FC0) and denormals
// (flushed to zero): a vector holding either, rare, takes the integer path. The saving matters
// here: this loop is bound by the two ports that run 512-bit operations, not by memory.
inline __m256i pack_bf16(__m512 x) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x01 | 0x80 | 0x20) == 0, 1))  // QNaN | SNaN | denormal
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#endif
  return pack16<BF16>(x);
}

// The other layouts on AVX-512: one loop, 16 elements a step, everything in registers. The
// conversions of the 16-bit parts then run beside the divisions and the square root; as separate
// passes over L1 (tiled_range) they add about one cycle per element to the 1.5 of the update
// (remainders and bf16 moments, in cache, Sapphire Rapids).
// The same operations as tiled_range, so the same bits. Heads (to the first 32-byte aligned
// streamed weight) and tails (< 16 elements) go through tiled_range.
template <typename G, typename W, bool kRem>
void layout_range(const Store& st, int64_t s0, int64_t e0, const Consts& c, std::vector<int64_t>& new_ties) {
  constexpr bool stream = !kRem && !std::is_same_v<W, NoOut>;
  auto* w = static_cast<typename W::T*>(st.weights);
  int64_t i = s0;
  if constexpr (stream) {
    const int64_t head = std::min<int64_t>(e0 - s0, ((32 - reinterpret_cast<uintptr_t>(w + s0) % 32) % 32) / 2);
    tiled_range<G, W, kRem>(st, s0, s0 + head, c, new_ties);
    i = s0 + head;
  }
  const __m512 grad_scale = _mm512_set1_ps(c.grad_scale), decay = _mm512_set1_ps(c.decay),
               coeff = _mm512_set1_ps(c.lerp_coeff), beta2 = _mm512_set1_ps(c.beta2), c2 = _mm512_set1_ps(c.c2),
               bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt), eps = _mm512_set1_ps(c.eps),
               neg_step_size = _mm512_set1_ps(c.neg_step_size);
  const __mmask16 base_is_m = c.lerp_from_m ? 0xFFFF : 0;
  const __m512i tie_code = _mm512_set1_epi32(kTieCode), plus_half = _mm512_set1_epi32(0x8000),
                minus_half = _mm512_set1_epi32(-0x8000);
  const auto* g = static_cast<const typename G::T*>(st.grad);
  float* const m32 = static_cast<float*>(st.exp_avg);
  float* const v32 = static_cast<float*>(st.exp_avg_sq);
  uint16_t* const m16 = static_cast<uint16_t*>(st.exp_avg);
  uint16_t* const v16 = static_cast<uint16_t*>(st.exp_avg_sq);
  const bool m_bf16 = st.m_bf16, v_bf16 = st.v_bf16;
  int16_t* const rem = st.remainder;
  const int64_t* const ties = st.ties;
  const int64_t nties = st.nties;
  int64_t tie = kRem ? std::lower_bound(ties, ties + nties, i) - ties : 0;
  int64_t next_tie = tie < nties ? ties[tie] : INT64_MAX;
  for (; i + 16 <= e0; i += 16) {
    const __m512 gi = _mm512_mul_ps(load16<G>(g + i), grad_scale);
    __m512 pi;
    if constexpr (kRem) {  // join: weight << 16 + remainder, the code 0x8000 as +0x8000 unless listed
      const __m512i hi = _mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i))), 16);
      const __m512i r = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rem + i)));
      __m512i d = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(r, tie_code), r, plus_half);
      if (next_tie < i + 16) {
        __mmask16 listed = 0;
        for (; tie < nties && ties[tie] < i + 16; ++tie) listed |= static_cast<__mmask16>(1u << (ties[tie] - i));
        next_tie = tie < nties ? ties[tie] : INT64_MAX;
        d = _mm512_mask_blend_epi32(listed, d, minus_half);
      }
      pi = _mm512_castsi512_ps(_mm512_add_epi32(hi, d));
    } else {
      pi = _mm512_loadu_ps(st.master + i);
    }
    pi = _mm512_mul_ps(pi, decay);
    __m512 mi, v0;  // branches on the layout: always taken the same way
    if (m_bf16) mi = load16<BF16>(m16 + i);
    else mi = _mm512_loadu_ps(m32 + i);
    if (v_bf16) v0 = load16<BF16>(v16 + i);
    else v0 = _mm512_loadu_ps(v32 + i);
    mi = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gi, mi), _mm512_mask_blend_ps(base_is_m, gi, mi));
    const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gi), gi, _mm512_mul_ps(v0, beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step_size, mi), denom));
    if (m_bf16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(m16 + i), pack_bf16(mi));
    else _mm512_storeu_ps(m32 + i, mi);
    if (v_bf16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(v16 + i), pack_bf16(vi));
    else _mm512_storeu_ps(v32 + i, vi);
    if constexpr (kRem) {  // split: the weight, the low half, and the ties that rounded up
      const __m256i wn = pack_bf16(pi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), wn);
      const __m512i u = _mm512_castps_si512(pi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rem + i), _mm512_cvtepi32_epi16(u));
      const __m512i diff = _mm512_sub_epi32(u, _mm512_slli_epi32(_mm512_cvtepu16_epi32(wn), 16));
      uint32_t found = _mm512_cmpeq_epi32_mask(diff, minus_half);
      for (; found != 0; found &= found - 1) new_ties.push_back(i + __builtin_ctz(found));
    } else {
      _mm512_storeu_ps(st.master + i, pi);
      if constexpr (stream) {
#if defined(STRONGHOLD_NO_STREAM)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), pack16<W>(pi));
#else
        _mm256_stream_si256(reinterpret_cast<__m256i*>(w + i), pack16<W>(pi));
#endif
      }
    }
  }
  tiled_range<G, W, kRem>(st, i, e0, c, new_ties);
  if constexpr (stream) stream_fence();
}
#else
template <typename G, typename W, bool kRem>
void layout_range(const Store& st, int64_t s0, int64_t e0, const Consts& c, std::vector<int64_t>& new_ties) {
  tiled_range<G, W, kRem>(st, s0, e0, c, new_ties);
}
#endif

// Runs layout_range over [0, n) on the intra-op pool; returns the new ties in index order.
template <typename G, typename W, bool kRem>
std::vector<int64_t> layout_parallel(const Store& st, int64_t n, const Consts& c) {
  std::mutex mutex;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> found;  // (range start, its new ties)
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, nblocks, kGrain, [&](int64_t b0, int64_t b1) {
    const int64_t s = b0 * kBlock, e = std::min(b1 * kBlock, n);
    std::vector<int64_t> local;
    layout_range<G, W, kRem>(st, s, e, c, local);
    if (!local.empty()) {
      std::lock_guard<std::mutex> lock(mutex);
      found.emplace_back(s, std::move(local));
    }
  });
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<int64_t> ties;
  for (auto& part : found) ties.insert(ties.end(), part.second.begin(), part.second.end());
  return ties;
}

template <typename G>
std::vector<int64_t> dispatch_tiled(const Store& st, at::ScalarType out_type, int64_t n, const Consts& c) {
  if (st.weights == nullptr) return layout_parallel<G, NoOut, false>(st, n, c);
  if (out_type == at::kBFloat16) return layout_parallel<G, BF16, false>(st, n, c);
  return layout_parallel<G, FP16, false>(st, n, c);
}

void check_f32(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous CPU float32 tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, master has ", n);
}

void check_moment(const at::Tensor& t, const char* name, int64_t n) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && (dt == at::kFloat || dt == at::kBFloat16) && t.is_contiguous(),
              name, " must be a contiguous CPU float32/bfloat16 tensor, got ", dt, " on ", t.device());
  TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, master has ", n);
}

// Constants exactly as torch's fused AdamW forms them: double, then cast to float at use.
Consts make_consts(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                   double grad_scale) {
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
  const double step_size = lr / bias_correction1;
  const float w = static_cast<float>(1 - beta1);
  Consts c;
  c.grad_scale = static_cast<float>(grad_scale);
  c.decay = weight_decay != 0.0 ? static_cast<float>(1 - lr * weight_decay) : 1.0f;
  c.lerp_from_m = std::abs(w) < 0.5f;
  c.lerp_coeff = c.lerp_from_m ? w : w - 1.0f;
  c.beta2 = static_cast<float>(beta2);
  c.c2 = static_cast<float>(1 - beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-step_size);
  return c;
}

}  // namespace

std::optional<at::Tensor> adamw_step(std::optional<at::Tensor> master_opt, at::Tensor exp_avg,
                                     at::Tensor exp_avg_sq, at::Tensor grad,
                                     std::optional<at::Tensor> weights_out, double lr, double beta1, double beta2,
                                     double eps, double weight_decay, int64_t step, double grad_scale,
                                     std::optional<at::Tensor> remainder_opt, std::optional<at::Tensor> ties_opt) {
  const bool has_master = master_opt.has_value() && master_opt->defined();
  const bool rem = remainder_opt.has_value() && remainder_opt->defined();
  const bool has_out = weights_out.has_value() && weights_out->defined();
  TORCH_CHECK(has_master != rem, "pass either an fp32 master or (master=None) a remainder with its ties");
  TORCH_CHECK(rem || !(ties_opt.has_value() && ties_opt->defined()), "ties go with a remainder");
  TORCH_CHECK(!rem || has_out, "a remainder master needs weights_out: the bf16 weights it completes");
  const int64_t n = rem ? weights_out->numel() : master_opt->numel();
  if (has_master) check_f32(*master_opt, "master", n);
  check_moment(exp_avg, "exp_avg", n);
  check_moment(exp_avg_sq, "exp_avg_sq", n);
  const auto gt = grad.scalar_type();
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() &&
              (gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf),
              "grad must be a contiguous CPU float32/bfloat16/float16 tensor, got ", gt, " on ", grad.device());
  TORCH_CHECK(grad.numel() == n, "grad has ", grad.numel(), " elements, master has ", n);
  void* out = nullptr;
  at::ScalarType ot = at::kBFloat16;
  if (has_out) {
    const at::Tensor& w = *weights_out;
    ot = w.scalar_type();
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && (ot == at::kBFloat16 || ot == at::kHalf),
                "weights_out must be a contiguous CPU bfloat16/float16 tensor, got ", ot, " on ", w.device());
    TORCH_CHECK(w.numel() == n, "weights_out has ", w.numel(), " elements, master has ", n);
    out = w.data_ptr();
  }
  int16_t* remainder = nullptr;
  const int64_t* ties = nullptr;
  int64_t nties = 0;
  if (rem) {
    const at::Tensor& r = *remainder_opt;
    TORCH_CHECK(ot == at::kBFloat16, "a remainder master needs bfloat16 weights_out, got ", ot);
    TORCH_CHECK(gt == at::kFloat || gt == at::kBFloat16, "a remainder master takes a float32/bfloat16 grad, got ", gt);
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == at::kShort && r.is_contiguous() && r.numel() == n,
                "remainder must be a contiguous CPU int16 tensor of ", n, " elements");
    TORCH_CHECK(ties_opt.has_value() && ties_opt->defined(), "a remainder master needs its ties (may be empty)");
    const at::Tensor& t = *ties_opt;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
                "ties must be a contiguous 1-D CPU int64 tensor");
    remainder = r.data_ptr<int16_t>();
    ties = t.data_ptr<int64_t>();
    nties = t.numel();
    for (int64_t k = 0; k < nties; ++k)  // the tile loop's cursor relies on it
      TORCH_CHECK(ties[k] >= 0 && ties[k] < n && (k == 0 || ties[k - 1] <= ties[k]),
                  "ties must be sorted indices in [0, ", n, ")");
  }
  TORCH_CHECK(step >= 1, "step must be >= 1 (already incremented), got ", step);
  const Consts c = make_consts(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  const bool m_bf16 = exp_avg.scalar_type() == at::kBFloat16, v_bf16 = exp_avg_sq.scalar_type() == at::kBFloat16;
  const void* g = grad.data_ptr();

  if (!rem && !m_bf16 && !v_bf16) {  // fp32 master and moments: the streaming kernel
    if (n == 0) return std::nullopt;
    float* p = master_opt->data_ptr<float>();
    float* m = exp_avg.data_ptr<float>();
    float* v = exp_avg_sq.data_ptr<float>();
    if (gt == at::kFloat) dispatch_out<F32>(p, m, v, g, out, ot, n, c);
    else if (gt == at::kBFloat16) dispatch_out<BF16>(p, m, v, g, out, ot, n, c);
    else dispatch_out<FP16>(p, m, v, g, out, ot, n, c);
    return std::nullopt;
  }

  Store st{has_master ? master_opt->data_ptr<float>() : nullptr, exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
           m_bf16, v_bf16, g, out, remainder, ties, nties};
  std::vector<int64_t> new_ties;
  if (n > 0) {
    if (rem) {
      new_ties = gt == at::kFloat ? layout_parallel<F32, BF16, true>(st, n, c)
                                  : layout_parallel<BF16, BF16, true>(st, n, c);
    } else if (gt == at::kFloat) {
      dispatch_tiled<F32>(st, ot, n, c);
    } else if (gt == at::kBFloat16) {
      dispatch_tiled<BF16>(st, ot, n, c);
    } else {
      dispatch_tiled<FP16>(st, ot, n, c);
    }
  }
  if (!rem) return std::nullopt;
  at::Tensor result = at::empty({static_cast<int64_t>(new_ties.size())}, at::TensorOptions().dtype(at::kLong));
  if (!new_ties.empty()) std::memcpy(result.data_ptr<int64_t>(), new_ties.data(), new_ties.size() * sizeof(int64_t));
  return result;
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "StrongHold one-pass host AdamW (torch fused AdamW numerics, compute-dtype grad in, weights out)";
  mod.def("adamw_step", &adamw_step, py::call_guard<py::gil_scoped_release>(),
          "One AdamW step in place. master fp32, or None with remainder (int16) + ties (sorted int64): the "
          "master is then join(weights_out, remainder, ties), split again after the step, and the new ties "
          "are returned (else None). exp_avg, exp_avg_sq: fp32 or bf16. grad fp32|bf16|fp16 is multiplied by "
          "grad_scale; writes bf16|fp16(master) to weights_out unless None. step: already incremented.",
          py::arg("master"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad"),
          py::arg("weights_out"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
          py::arg("weight_decay"), py::arg("step"), py::arg("grad_scale") = 1.0,
          py::arg("remainder") = py::none(), py::arg("ties") = py::none());
}
