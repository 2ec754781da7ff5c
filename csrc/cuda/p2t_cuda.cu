// CUDA kernels of the p2t ops (registered under TORCH_LIBRARY_IMPL(p2t, CUDA, m)); they mirror the
// Triton kernels of p2t_kernels/ one for one.
//
// attribution:  I_r = sum_d (embeds[r, d] - null[d]) * grad[r, d]; one warp per row, 16-byte vector loads
//               when D, the row strides and the base pointers allow it (scalar loads otherwise), fp32
//               accumulation (fp64 when every input is fp64), warp-shuffle reduction.
// segments:     a segment is the set of tokens with its id (ids outside [0, S) and masked tokens count as
//               -1); its tokens may form several runs (holes between them). A bounds pass folds each run's
//               first and past-the-end token into pos[2S] by atomic minima (pos[s] = first token,
//               pos[S+s] = -(last token + 1), pos filled with INT32_MAX first); then one block per
//               segment runs over [pos[s], -pos[S+s]), skipping the tokens of other ids: (standardise),
//               / temperature, max, sum of exp, write r_i = R_s (1 + omega w_i) [/ (n_s + omega)], or
//               A^_b + alpha r_i. With omega_neg > 0 the same passes take the max of -x and the sum of
//               exp(-x - max) too, and r_i gets - omega_neg (1 - R_s) softmax(-x)_i (before the division).
//               Extra blocks, one per (row, chunk), write the tokens in no segment.
//               That path serves segment_redistribute beyond kRowStageMaxFlat tokens (its ids have no
//               rows); up to it, and in p2t_advantages, the row stage does it all in one launch.
// row stage:    one block per row: the row's steps in shared-memory slots by shared-memory atomics
//               (count, sum, max, [variance,] sum of exp), then r_i and, in p2t_advantages, the advantage
//               epilogue A^_b + alpha r_i; no run bounds, no fill.
// advantages:   A^_b from the outcome rewards of b's group (or the batch) on the device, per block.
// p2t_advantages: the attribution kernel, then the row stage with the advantage epilogue: two launches,
//               no host synchronisation, no [B, N, D] intermediate.
//
// With P2T_HOST_EMULATION defined, the same file compiles with a C++ compiler against host_emulation.h:
// the kernels then run on CPU tensors under the op namespace p2t_cuda_emulated (a test on machines
// without a GPU). Launches, streams, device guards and device checks go through the P2T_* macros below.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifdef P2T_HOST_EMULATION
#include "host_emulation.h"
#define P2T_LAUNCH(kernel, grid, block, stream, ...) p2t_emu::launch(grid, block, kernel, __VA_ARGS__)
#define P2T_STREAM() 0
#define P2T_LAUNCH_CHECK()
#define P2T_DEVICE_GUARD(device)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define P2T_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define P2T_STREAM() at::cuda::getCurrentCUDAStream()
#define P2T_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define P2T_DEVICE_GUARD(device) c10::cuda::CUDAGuard device_guard_(device)
#endif

#include "common.h"
#include "schemas.h"

namespace p2t {
namespace {

constexpr int kWarp = 32;
constexpr int kAttrWarps = 8;      // rows (one per warp) per attribution block
constexpr int kSegThreads = 128;   // threads of a segment / fill / advantage block
constexpr int kFillChunk = 1024;   // tokens per fill or advantage block
constexpr int kBoundsThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum / max over the whole block; every thread of the block must call it, and gets the result.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T shm[kWarp];
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();  // the previous call's reads of shm are done
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = shm[0];
  for (int i = 1; i < nw; ++i) r += shm[i];
  return r;
}

template <typename T>
__device__ T block_max(T v) {
  __shared__ T shm[kWarp];
  v = warp_max(v);
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = shm[0];
  for (int i = 1; i < nw; ++i) r = max(r, shm[i]);
  return r;
}

// Segment ids as the kernels see them: -1 outside [0, S) and where the mask is False.
struct Ids {
  const void* ids;
  bool is64;
  const bool* mask;  // nullptr: no mask
  int64_t S;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    const int64_t s = is64 ? static_cast<const int64_t*>(ids)[i] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
    if (s < 0 || s >= S) return -1;
    if (mask != nullptr && !mask[i]) return -1;
    return s;
  }
};

// Folds the run of token i (flat [R] array made of rows of N tokens; a run never crosses a row boundary)
// into its segment's bounds: pos[s] = min first token, pos[S + s] = -max(last token + 1), atomic minima
// over a pos filled with INT32_MAX.
__device__ __forceinline__ void scatter_run_bounds(const Ids& ids, int32_t* pos, int64_t i, int64_t R, int64_t N) {
  const int64_t s = ids(i);
  if (s < 0) return;
  const int64_t prv = (i % N != 0) ? ids(i - 1) : -1;
  const int64_t nxt = (i + 1 < R && (i + 1) % N != 0) ? ids(i + 1) : -1;
  if (prv != s) atomicMin(pos + s, static_cast<int32_t>(i));
  if (nxt != s) atomicMin(pos + ids.S + s, -static_cast<int32_t>(i + 1));
}

// A^_b of GRPO (block-wide): (o_b - mean_g) / (std + eps), std the unbiased std of the group (scale 0)
// or the batch (scale 1), 0 when its variance is 0 or there is one value; scale 2: o_b - mean_g.
// 0 for a constant group: max - min <= rtol * max(1, |mean_g|) (const_rtol of common.h).
template <typename acc_t>
__device__ acc_t group_advantage(const acc_t* o, int64_t b, int64_t B, int64_t G, int64_t scale, acc_t eps) {
  const int64_t g0 = (b / G) * G;
  acc_t t = 0, hi = acc_t(-INFINITY), lw = acc_t(INFINITY);
  for (int64_t i = threadIdx.x; i < G; i += blockDim.x) {
    const acc_t v = o[g0 + i];
    t += v;
    hi = max(hi, v);
    lw = min(lw, v);
  }
  const acc_t mean_g = block_sum(t) / static_cast<acc_t>(G);
  const acc_t spread = block_max(hi) + block_max(-lw);
  const acc_t rtol = std::is_same<acc_t, double>::value ? acc_t(kConstRtolDouble) : acc_t(kConstRtolFloat);
  if (spread <= rtol * max(acc_t(1), abs(mean_g))) return acc_t(0);  // uniform over the block
  const acc_t centered = o[b] - mean_g;
  if (scale == kNone) return centered;
  int64_t lo = g0, n = G;
  acc_t mean = mean_g;
  if (scale == kBatch) {
    lo = 0;
    n = B;
    acc_t tb = 0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) tb += o[i];
    mean = block_sum(tb) / static_cast<acc_t>(B);
  }
  acc_t v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t c = o[lo + i] - mean;
    v += c * c;
  }
  const acc_t var = block_sum(v) / static_cast<acc_t>(n > 1 ? n - 1 : 1);
  const acc_t den = (var == acc_t(0) ? acc_t(0) : sqrt(var)) + eps;
  return den == acc_t(0) ? acc_t(0) : centered / den;  // zero std: centred values are 0 (no 0/0 at eps = 0)
}

// ------------------------------------------------------------------------------------------------
// attribution
// ------------------------------------------------------------------------------------------------
// One warp per row r: out[r] = sum_d (e[r, d] - nul[d]) * g[r, d]. VEC > 1: every pointer and row start is
// aligned to VEC elements and D % VEC == 0; each step issues the kUnroll vector loads of grad and embeds of a
// lane before any arithmetic (bytes in flight, not dependent round trips), then reads null (L1/L2 hits:
// every row shares it). A masked row (mask, or ids.mask in p2t_advantages) is not read: it gets 0 (its
// score is unused by the segment stage).
// kUnroll 16-byte loads per tensor per step: 4 for 4-byte types, 2 for 2-byte ones (8 values each), so
// that a thread stays within the register cap of kAttrMinBlocks without spilling.
template <int VEC>
constexpr int attr_unroll() { return VEC >= 8 ? 2 : 4; }

// kAttrMinBlocks blocks per SM: at most 64 registers a thread, 32 warps (50%) an SM, each with all of a
// step's loads (kUnroll x 2 x 512 bytes) issued together.
constexpr int kAttrMinBlocks = 4;

//
// HEAD (odd D, or rows not starting on 16 bytes, e.g. D = 1531): grad and embeds have one element size and
// every row starts at the same offset within 16 bytes in both; each row is read in 16-byte vectors from its
// start rounded down to 16 bytes, the elements before the row start and after its end masked off (those
// bytes lie in the same 16-byte block as a row element, so in the same allocation page); null is read by
// element (L1 hits).
//
// n_t: null's type in memory: the embeddings' type when null comes in it (bf16 / fp16: half the bytes of an
// fp32 copy per vector, one 16-byte load per step instead of two), else acc_t.
template <typename g_t, typename e_t, typename acc_t, int VEC, bool HEAD = false, typename n_t = acc_t>
__global__ void __launch_bounds__(kAttrWarps * kWarp, kAttrMinBlocks)
attribution_kernel(const g_t* __restrict__ g, int64_t g_stride, const e_t* __restrict__ e, int64_t e_stride,
                   const n_t* __restrict__ nul, const bool* __restrict__ mask, acc_t* __restrict__ out,
                   int64_t R, int64_t D) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kAttrWarps + threadIdx.x / kWarp;
  if (r >= R) return;  // whole warps leave together: the shuffles below see full warps
  const bool skip = mask != nullptr && !mask[r];
  const g_t* gr = g + r * g_stride;
  const e_t* er = e + r * e_stride;
  acc_t acc = 0;
  if (!skip) {
    if constexpr (VEC > 1 && HEAD) {
      constexpr int kUnroll = attr_unroll<VEC>();
      constexpr int64_t kStep = static_cast<int64_t>(kWarp) * VEC;
      const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(gr) / sizeof(g_t)) % VEC);
      const g_t* ga = gr - mis;  // 16-byte aligned; element d of the row is ga[d + mis]
      const e_t* ea = er - mis;
#pragma unroll 1
      for (int64_t d0 = static_cast<int64_t>(lane) * VEC; d0 < D + mis; d0 += kStep * kUnroll) {
        Vec<g_t, VEC> gv[kUnroll];
        Vec<e_t, VEC> ev[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t d = d0 + u * kStep;
          if (d < D + mis) {
            gv[u] = *reinterpret_cast<const Vec<g_t, VEC>*>(ga + d);
            ev[u] = *reinterpret_cast<const Vec<e_t, VEC>*>(ea + d);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t d = d0 + u * kStep - mis;  // row index of element 0 of this vector
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (d + k >= 0 && d + k < D) {
              acc += (static_cast<acc_t>(ev[u].v[k]) - static_cast<acc_t>(nul[d + k])) *
                     static_cast<acc_t>(gv[u].v[k]);
            }
          }
        }
      }
    } else if constexpr (VEC > 1) {
      constexpr int kUnroll = attr_unroll<VEC>();
      constexpr int64_t kStep = static_cast<int64_t>(kWarp) * VEC;
#pragma unroll 1
      for (int64_t d0 = static_cast<int64_t>(lane) * VEC; d0 < D; d0 += kStep * kUnroll) {
        Vec<g_t, VEC> gv[kUnroll];
        Vec<e_t, VEC> ev[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t d = d0 + u * kStep;
          if (d < D) {
            gv[u] = *reinterpret_cast<const Vec<g_t, VEC>*>(gr + d);
            ev[u] = *reinterpret_cast<const Vec<e_t, VEC>*>(er + d);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t d = d0 + u * kStep;
          if (d < D) {
            const auto nv = *reinterpret_cast<const Vec<n_t, VEC>*>(nul + d);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              acc += (static_cast<acc_t>(ev[u].v[k]) - static_cast<acc_t>(nv.v[k])) * static_cast<acc_t>(gv[u].v[k]);
            }
          }
        }
      }
    } else {
      for (int64_t d = lane; d < D; d += kWarp) {
        acc += (static_cast<acc_t>(er[d]) - static_cast<acc_t>(nul[d])) * static_cast<acc_t>(gr[d]);
      }
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) out[r] = skip ? acc_t(0) : acc;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch_reduced(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16 here, got ", st);
  }
}

template <typename g_t, typename e_t, typename acc_t, typename n_t = acc_t>
void launch_attribution(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& nul, const bool* mask,
                        at::Tensor& out) {
  const int64_t R = grad.size(0), D = grad.size(1);
  const int64_t blocks = (R + kAttrWarps - 1) / kAttrWarps;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "grad has too many rows: ", R);
  constexpr int kBytes = sizeof(g_t) > sizeof(e_t) ? sizeof(g_t) : sizeof(e_t);
  constexpr int VEC = 16 / kBytes;
  const g_t* gp = grad.data_ptr<g_t>();
  const e_t* ep = embeds.data_ptr<e_t>();
  const n_t* np = nul.data_ptr<n_t>();
  const bool vec_ok = D % VEC == 0 && grad.stride(0) % VEC == 0 && embeds.stride(0) % VEC == 0 &&
                      aligned(gp, VEC * sizeof(g_t)) && aligned(ep, VEC * sizeof(e_t)) &&
                      aligned(np, VEC * sizeof(n_t));
  auto* kernel = vec_ok ? &attribution_kernel<g_t, e_t, acc_t, VEC, false, n_t>
                        : &attribution_kernel<g_t, e_t, acc_t, 1, false, n_t>;
  if constexpr (sizeof(g_t) == sizeof(e_t)) {
    // odd D or misaligned rows: aligned vectors with masked head and tail when both tensors' rows start at
    // the same offset within 16 bytes
    const auto gaddr = reinterpret_cast<uintptr_t>(gp), eaddr = reinterpret_cast<uintptr_t>(ep);
    const bool head_ok = (gaddr - eaddr) % 16 == 0 && (grad.stride(0) - embeds.stride(0)) % VEC == 0 &&
                         D >= 2 * VEC;
    if (!vec_ok && head_ok) kernel = &attribution_kernel<g_t, e_t, acc_t, VEC, true, n_t>;
  }
  auto stream = P2T_STREAM();
  P2T_LAUNCH(kernel, blocks, kAttrWarps * kWarp, stream, gp, grad.stride(0), ep, embeds.stride(0), np, mask,
             out.data_ptr<acc_t>(), R, D);
  P2T_LAUNCH_CHECK();
}

// out [R] (compute dtype) = attribution of grad/embeds [R, D]; rows where mask is False get 0 unread.
// Compute dtype float64 means every input is float64; for float32, float64 inputs are read as float32
// (as_compute), so the kernels see float32 / bfloat16 / float16 only.
void attribution_into(const at::Tensor& grad_in, const at::Tensor& embeds_in, const at::Tensor& null_in,
                      const bool* mask, at::Tensor& out) {
  const auto cd = out.scalar_type();
  auto grad = rows_unit_stride(as_compute(grad_in, cd));
  auto embeds = rows_unit_stride(as_compute(embeds_in, cd));
  if (grad.size(0) == 0) return;
  if (cd == at::kDouble) {
    launch_attribution<double, double, double>(grad, embeds, null_in.contiguous(), mask, out);
    return;
  }
  // bf16 / fp16 grad, embeds and null of one dtype: null read in that dtype (exact: no rounding involved)
  const auto st = embeds.scalar_type();
  if ((st == at::kBFloat16 || st == at::kHalf) && grad.scalar_type() == st && null_in.scalar_type() == st) {
    auto nul = null_in.contiguous();
    if (st == at::kBFloat16) {
      launch_attribution<c10::BFloat16, c10::BFloat16, float, c10::BFloat16>(grad, embeds, nul, mask, out);
    } else {
      launch_attribution<c10::Half, c10::Half, float, c10::Half>(grad, embeds, nul, mask, out);
    }
    return;
  }
  auto nul = null_in.to(cd).contiguous();
  dispatch_reduced(grad.scalar_type(), "grad", [&](auto g_tag) {
    dispatch_reduced(embeds.scalar_type(), "embeds", [&](auto e_tag) {
      launch_attribution<decltype(g_tag), decltype(e_tag), float>(grad, embeds, nul, mask, out);
    });
  });
}

// ------------------------------------------------------------------------------------------------
// segments
// ------------------------------------------------------------------------------------------------
__global__ void run_bounds_kernel(Ids ids, int32_t* __restrict__ pos, int64_t R, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < R) scatter_run_bounds(ids, pos, i, R, N);
}

struct SegParams {
  int64_t R, N, S, B, G, n_chunks, scale;
  double omega, temperature, alpha, eps;
  bool standardize, normalize_sum, has_adv;
  double omega_neg;  // 0: the blame term is skipped (the unsigned passes alone)
};

// Blocks 0..S-1: segment s over its run (see the file comment); blocks S..: one per (row b, chunk of
// kFillChunk tokens), writing the tokens in no segment (0, or A^_b / 0 by mask with has_adv).
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kSegThreads)
segment_kernel(const acc_t* __restrict__ x, Ids ids, const acc_t* __restrict__ rewards,
               const acc_t* __restrict__ outcome, const int32_t* __restrict__ pos, out_t* __restrict__ out,
               SegParams p) {
  const int64_t blk = blockIdx.x;
  const acc_t omega = p.omega, temperature = p.temperature, alpha = p.alpha, eps = p.eps;
  if (blk < p.S) {
    const int64_t s = blk;
    const int64_t start = pos[s], end = -static_cast<int64_t>(pos[p.S + s]);
    const bool ok = start >= 0 && start < end && end <= p.R && ids(start) == s;
    if (!ok) return;  // uniform over the block
    const bool sgn = p.omega_neg != 0.0;  // uniform over the block
    // pass 1: count, sum, max (and min with the blame term)
    acc_t cnt = 0, tot = 0, mx = acc_t(-INFINITY), nmx = acc_t(-INFINITY);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      if (ids(i) != s) continue;
      const acc_t v = x[i];
      cnt += 1;
      tot += v;
      mx = max(mx, v);
      if (sgn) nmx = max(nmx, -v);
    }
    const acc_t n = block_sum(cnt);
    const acc_t mean = block_sum(tot) / max(n, acc_t(1));
    acc_t xmax = block_max(mx);
    acc_t nxmax = sgn ? block_max(nmx) : acc_t(0);  // max of -x
    bool cnst = false;
    acc_t sd = 1;
    if (p.standardize) {
      acc_t v2 = 0;
      for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        if (ids(i) != s) continue;
        const acc_t d = x[i] - mean;
        v2 += d * d;
      }
      const acc_t var = block_sum(v2) / max(n, acc_t(1));
      const acc_t lim = acc_t(kZeroStdRtol) * abs(mean);
      cnst = var <= lim * lim;
      sd = cnst ? acc_t(1) : sqrt(var);
      xmax = cnst ? acc_t(0) : (xmax - mean) / sd;
      nxmax = cnst ? acc_t(0) : (nxmax + mean) / sd;
    }
    xmax = xmax / temperature;
    nxmax = nxmax / temperature;
    auto xs = [&](acc_t v) -> acc_t {
      if (p.standardize) v = cnst ? acc_t(0) : (v - mean) / sd;
      return v / temperature;
    };
    // pass 2: softmax denominators
    acc_t se = 0, sne = 0;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      if (ids(i) != s) continue;
      const acc_t z = xs(x[i]);
      se += exp(z - xmax);
      if (sgn) sne += exp(-z - nxmax);
    }
    const acc_t den = block_sum(se);
    const acc_t den_neg = sgn ? block_sum(sne) : acc_t(1);
    const acc_t rew = rewards[s];
    const acc_t c = p.normalize_sum ? acc_t(1) / (n + omega) : acc_t(1);
    acc_t adv = 0;
    if (p.has_adv) adv = group_advantage(outcome, start / p.N, p.B, p.G, p.scale, eps);
    const acc_t blame = static_cast<acc_t>(p.omega_neg) * (acc_t(1) - rew);
    // pass 3: write
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      if (ids(i) != s) continue;
      const acc_t w = exp(xs(x[i]) - xmax) / den;
      acc_t r = rew + omega * rew * w;
      if (sgn) r = r - blame * (exp(-xs(x[i]) - nxmax) / den_neg);
      if (p.normalize_sum) r = r * c;
      if (p.has_adv) r = adv + alpha * r;
      out[i] = static_cast<out_t>(r);
    }
  } else {
    const int64_t f = blk - p.S;
    const int64_t b = f / p.n_chunks, chunk = f % p.n_chunks;
    acc_t adv = 0;
    if (p.has_adv) adv = group_advantage(outcome, b, p.B, p.G, p.scale, eps);
    const int64_t c0 = chunk * kFillChunk;
    const int64_t c1 = min(c0 + static_cast<int64_t>(kFillChunk), p.N);
    for (int64_t col = c0 + threadIdx.x; col < c1; col += blockDim.x) {
      const int64_t i = b * p.N + col;
      if (ids(i) >= 0) continue;
      acc_t v = 0;
      if (p.has_adv && (ids.mask == nullptr || ids.mask[i])) v = adv;
      out[i] = static_cast<out_t>(v);
    }
  }
}

// The segment stage over x [B*N] (compute dtype), run bounds already in pos; out [B*N].
void launch_segment(const at::Tensor& x, const Ids& ids, const at::Tensor& rewards, const at::Tensor* outcome,
                    const at::Tensor& pos, at::Tensor& out, SegParams p) {
  if (p.R == 0) return;
  p.n_chunks = (p.N + kFillChunk - 1) / kFillChunk;
  const int64_t blocks = p.S + p.B * p.n_chunks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many segments or tokens");
  auto stream = P2T_STREAM();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "p2t_segment_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "p2t_segment_out", [&] {
      using out_t = scalar_t;
      auto* kernel = &segment_kernel<acc_t, out_t>;
      P2T_LAUNCH(kernel, blocks, kSegThreads, stream, x.data_ptr<acc_t>(), ids, rewards.data_ptr<acc_t>(),
                 outcome != nullptr ? outcome->data_ptr<acc_t>() : nullptr, pos.data_ptr<int32_t>(),
                 out.data_ptr<out_t>(), p);
      P2T_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------------------------------------
// the row stage: segments + advantages in one launch, one block per row, no run bounds
// ------------------------------------------------------------------------------------------------
// A step is the set of its tokens inside one row (p2t_advantages validates that; with validate=False a
// step crossing rows is taken row by row: unspecified, finite values). Block b owns row b: it first writes
// the row's tokens in no step (A^_b or 0) and finds the row's smallest step id; then, per window of
// kRowSlots consecutive step ids [base, base + kRowSlots) (usually one window: a row's steps have nearby
// ids), shared-memory slots hold each step's count, sum, max, std and sum of exp, filled by warp-aggregated
// shared-memory atomics over passes of the row (count/sum/max, [squared deviations,] sum of exp, write); the next window
// starts at the smallest id >= base + kRowSlots seen, so any id layout is handled (a window per distinct
// cluster of ids). The row is re-read from global memory in each pass (L1 hits for rows of a few
// thousand tokens); the group statistics come from the G outcome values, per block.
constexpr int kRowThreads = 256;
constexpr int kRowSlots = 256;  // step ids per window
// segment_redistribute has no rows: its tokens form one row; up to this many tokens one block of the row
// stage does it in one launch, beyond it the bounds + segment path (one block per segment) is faster.
constexpr int64_t kRowStageMaxFlat = 4096;

#ifdef P2T_HOST_EMULATION
__device__ __forceinline__ unsigned as_bits(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
__device__ __forceinline__ unsigned long long as_bits(double v) { unsigned long long u; std::memcpy(&u, &v, 8); return u; }
__device__ __forceinline__ float from_bits(unsigned u) { float v; std::memcpy(&v, &u, 4); return v; }
__device__ __forceinline__ double from_bits(unsigned long long u) { double v; std::memcpy(&v, &u, 8); return v; }
#else
__device__ __forceinline__ unsigned as_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long as_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v));
}
__device__ __forceinline__ float from_bits(unsigned u) { return __uint_as_float(u); }
__device__ __forceinline__ double from_bits(unsigned long long u) {
  return __longlong_as_double(static_cast<long long>(u));
}
#endif

// *a = max(*a, v) on a float / double in shared memory (compare-and-swap loop; no native float max)
template <typename acc_t>
__device__ __forceinline__ void atomic_max_acc(acc_t* a, acc_t v) {
  using bits_t = decltype(as_bits(v));
  bits_t* p = reinterpret_cast<bits_t*>(a);
  bits_t old = as_bits(*a);
  while (from_bits(old) < v) {
    const bits_t prev = atomicCAS(p, old, as_bits(v));
    if (prev == old) break;
    old = prev;
  }
}

// Adds each lane's v to slot k of s_sum (and 1 to s_cnt, v into the max of s_max) for k >= 0, k = -1: none.
// Warp-aggregated: one round per distinct slot among the warp's lanes (one or two in the usual layouts, where
// a step's tokens are contiguous), a warp reduction per round and one shared-memory atomic by lane 0: the
// float atomics of sm_90's shared memory are compare-and-swap loops, and 32 lanes on one slot would
// serialise. Every lane of the warp must call it.
template <bool kCount, bool kMax, typename acc_t>
__device__ __forceinline__ void warp_add_to_slots(int k, acc_t v, acc_t* s_sum, acc_t* s_cnt, acc_t* s_max) {
  int rest = k;
  while (true) {
    const int kk = warp_max(rest);  // warp-uniform
    if (kk < 0) break;
    const bool mine = rest == kk;
    const acc_t t = warp_sum(mine ? v : acc_t(0));
    acc_t c = 0, mx = 0;
    if constexpr (kCount) c = warp_sum(mine ? acc_t(1) : acc_t(0));
    if constexpr (kMax) mx = warp_max(mine ? v : acc_t(-INFINITY));
    if (threadIdx.x % kWarp == 0) {
      atomicAdd(s_sum + kk, t);
      if constexpr (kCount) atomicAdd(s_cnt + kk, c);
      if constexpr (kMax) atomic_max_acc(s_max + kk, mx);
    }
    if (mine) rest = -1;
  }
}

// s_max[k] = max(s_max[k], v) for each lane's slot k >= 0 (k = -1: none), warp-aggregated as warp_add_to_slots.
// Every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_max_to_slots(int k, acc_t v, acc_t* s_max) {
  int rest = k;
  while (true) {
    const int kk = warp_max(rest);  // warp-uniform
    if (kk < 0) break;
    const bool mine = rest == kk;
    const acc_t mx = warp_max(mine ? v : acc_t(-INFINITY));
    if (threadIdx.x % kWarp == 0) atomic_max_acc(s_max + kk, mx);
    if (mine) rest = -1;
  }
}

// min over the block of an int64 (every thread calls it and gets the result)
__device__ __forceinline__ int64_t block_min_i64(int64_t v) { return -block_max<int64_t>(-v); }

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kRowThreads)
row_stage_kernel(const acc_t* __restrict__ x, Ids ids, const acc_t* __restrict__ rewards,
                 const acc_t* __restrict__ outcome, out_t* __restrict__ out, SegParams p) {
  __shared__ acc_t s_cnt[kRowSlots], s_mean[kRowSlots], s_max[kRowSlots], s_sd[kRowSlots], s_se[kRowSlots];
  __shared__ acc_t s_nmax[kRowSlots], s_nse[kRowSlots];  // max of -x and sum of exp(-x - max), with omega_neg
  __shared__ bool s_const[kRowSlots];
  const bool sgn = p.omega_neg != 0.0;
  const acc_t omega = p.omega, temperature = p.temperature, alpha = p.alpha;
  const int64_t b = blockIdx.x, row0 = b * p.N;
  acc_t adv = 0;
  if (p.has_adv) adv = group_advantage(outcome, b, p.B, p.G, p.scale, static_cast<acc_t>(p.eps));
  constexpr int64_t kNone64 = std::numeric_limits<int64_t>::max();
  // pass 0: tokens in no step; the first window
  int64_t lo = kNone64;
  for (int64_t col = threadIdx.x; col < p.N; col += blockDim.x) {
    const int64_t i = row0 + col;
    const int64_t s = ids(i);
    if (s >= 0) {
      lo = min(lo, s);
      continue;
    }
    out[i] = static_cast<out_t>(p.has_adv && (ids.mask == nullptr || ids.mask[i]) ? adv : acc_t(0));
  }
  int64_t base = block_min_i64(lo);  // its first barrier: no thread still reads shared memory
  while (base < p.S) {  // uniform over the block
    const int64_t top = base + kRowSlots;
    for (int k = threadIdx.x; k < kRowSlots; k += blockDim.x) {
      s_cnt[k] = 0;
      s_mean[k] = 0;
      s_max[k] = acc_t(-INFINITY);
      s_sd[k] = 0;
      s_se[k] = 0;
      s_nmax[k] = acc_t(-INFINITY);
      s_nse[k] = 0;
    }
    __syncthreads();
    // pass 1: count, sum, max per step; the smallest id past the window
    // (the passes with atomics run warp-uniform trip counts: warp_add_to_slots needs whole warps)
    int64_t nxt = kNone64;
    for (int64_t c0 = 0; c0 < p.N; c0 += blockDim.x) {
      const int64_t col = c0 + threadIdx.x, i = row0 + col;
      const int64_t s = col < p.N ? ids(i) : -1;
      if (s >= top) nxt = min(nxt, s);
      const bool in = s >= base && s < top;  // -1 is below base
      const int k = in ? static_cast<int>(s - base) : -1;
      const acc_t v = in ? x[i] : acc_t(0);
      warp_add_to_slots<true, true>(k, v, s_mean, s_cnt, s_max);
      if (sgn) warp_max_to_slots(k, -v, s_nmax);
    }
    __syncthreads();
    for (int k = threadIdx.x; k < kRowSlots; k += blockDim.x) s_mean[k] = s_mean[k] / max(s_cnt[k], acc_t(1));
    __syncthreads();
    if (p.standardize) {  // pass 1b: population variance
      for (int64_t c0 = 0; c0 < p.N; c0 += blockDim.x) {
        const int64_t col = c0 + threadIdx.x, i = row0 + col;
        const int64_t s = col < p.N ? ids(i) : -1;
        const bool in = s >= base && s < top;
        const int k = in ? static_cast<int>(s - base) : -1;
        const acc_t d = in ? x[i] - s_mean[k] : acc_t(0);
        warp_add_to_slots<false, false>(k, d * d, s_sd, s_cnt, s_max);
      }
      __syncthreads();
    }
    for (int k = threadIdx.x; k < kRowSlots; k += blockDim.x) {
      acc_t xmax = s_max[k], nxmax = s_nmax[k];
      bool cnst = false;
      acc_t sd = 1;
      if (p.standardize) {
        const acc_t var = s_sd[k] / max(s_cnt[k], acc_t(1));
        const acc_t lim = acc_t(kZeroStdRtol) * abs(s_mean[k]);
        cnst = var <= lim * lim;
        sd = cnst ? acc_t(1) : sqrt(var);
        xmax = cnst ? acc_t(0) : (xmax - s_mean[k]) / sd;
        nxmax = cnst ? acc_t(0) : (nxmax + s_mean[k]) / sd;
      }
      s_max[k] = xmax / temperature;
      s_nmax[k] = nxmax / temperature;
      s_sd[k] = sd;
      s_const[k] = cnst;
    }
    __syncthreads();
    auto xs = [&](acc_t v, int k) -> acc_t {
      if (p.standardize) v = s_const[k] ? acc_t(0) : (v - s_mean[k]) / s_sd[k];
      return v / temperature;
    };
    // pass 2: softmax denominators
    for (int64_t c0 = 0; c0 < p.N; c0 += blockDim.x) {
      const int64_t col = c0 + threadIdx.x, i = row0 + col;
      const int64_t s = col < p.N ? ids(i) : -1;
      const bool in = s >= base && s < top;
      const int k = in ? static_cast<int>(s - base) : -1;
      const acc_t z = in ? xs(x[i], k) : acc_t(0);
      const acc_t e = in ? exp(z - s_max[k]) : acc_t(0);
      warp_add_to_slots<false, false>(k, e, s_se, s_cnt, s_max);
      if (sgn) warp_add_to_slots<false, false>(k, in ? exp(-z - s_nmax[k]) : acc_t(0), s_nse, s_cnt, s_max);
    }
    __syncthreads();
    // pass 3: write
    for (int64_t col = threadIdx.x; col < p.N; col += blockDim.x) {
      const int64_t i = row0 + col;
      const int64_t s = ids(i);
      if (s < base || s >= top) continue;
      const int k = static_cast<int>(s - base);
      const acc_t w = exp(xs(x[i], k) - s_max[k]) / s_se[k];
      const acc_t rew = rewards[s];
      acc_t r = rew + omega * rew * w;
      if (sgn) r = r - static_cast<acc_t>(p.omega_neg) * (acc_t(1) - rew) * (exp(-xs(x[i], k) - s_nmax[k]) / s_nse[k]);
      if (p.normalize_sum) r = r * (acc_t(1) / (s_cnt[k] + omega));
      if (p.has_adv) r = adv + alpha * r;
      out[i] = static_cast<out_t>(r);
    }
    base = block_min_i64(nxt);  // its first barrier: pass 3's reads of the slots are done
  }
}

// The whole stage over x [B*N] (compute dtype, rows of p.N tokens) in one launch of B blocks; out [B*N].
void launch_row_stage(const at::Tensor& x, const Ids& ids, const at::Tensor& rewards, const at::Tensor* outcome,
                      at::Tensor& out, const SegParams& p) {
  if (p.R == 0 || p.N == 0) return;
  const int64_t blocks = p.R / p.N;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many rows: ", blocks);
  auto stream = P2T_STREAM();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "p2t_row_stage_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "p2t_row_stage_out", [&] {
      using out_t = scalar_t;
      auto* kernel = &row_stage_kernel<acc_t, out_t>;
      P2T_LAUNCH(kernel, blocks, kRowThreads, stream, x.data_ptr<acc_t>(), ids, rewards.data_ptr<acc_t>(),
                 outcome != nullptr ? outcome->data_ptr<acc_t>() : nullptr, out.data_ptr<out_t>(), p);
      P2T_LAUNCH_CHECK();
    });
  });
}

void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* name) {
#ifdef P2T_HOST_EMULATION
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
#else
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
#endif
}

// pos [2S] of scatter_run_bounds, every slot INT32_MAX (one fill launch, no host synchronisation).
at::Tensor new_bounds(int64_t S, const at::Tensor& like) {
  return at::full({2 * std::max<int64_t>(S, 1)}, std::numeric_limits<int32_t>::max(), like.options().dtype(at::kInt));
}

Ids make_ids(const at::Tensor& ids, const at::Tensor* mask, int64_t S) {
  return Ids{ids.data_ptr(), ids.scalar_type() == at::kLong, mask != nullptr ? mask->data_ptr<bool>() : nullptr, S};
}

// ------------------------------------------------------------------------------------------------
// ops
// ------------------------------------------------------------------------------------------------
at::Tensor token_attribution_cuda(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                                  const c10::optional<at::Tensor>& mask) {
  check_attribution_args(grad, embeds, null_embed, mask);
  check_cuda(embeds, grad, "embeds");
  check_cuda(null_embed, grad, "null_embed");
  if (mask.has_value()) check_cuda(*mask, grad, "mask");
  P2T_DEVICE_GUARD(grad.device());
  auto out = at::empty({grad.size(0)}, grad.options().dtype(compute_dtype({grad, embeds, null_embed})));
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  attribution_into(grad, embeds, null_embed, m.defined() ? m.data_ptr<bool>() : nullptr, out);
  return out;
}

at::Tensor segment_redistribute_cuda(const at::Tensor& scores_in, const at::Tensor& ids_in,
                                     const at::Tensor& rewards_in, double omega, double temperature,
                                     bool standardize, bool normalize_sum, double omega_neg) {
  check_segment_args(scores_in, ids_in, rewards_in, temperature);
  check_omega_neg(omega_neg);
  check_cuda(ids_in, scores_in, "segment_ids");
  check_cuda(rewards_in, scores_in, "segment_rewards");
  P2T_DEVICE_GUARD(scores_in.device());
  const auto cd = compute_dtype({scores_in, rewards_in});
  auto x = scores_in.to(cd).contiguous();
  auto ids = ids_in.contiguous();
  auto rewards = rewards_in.to(cd).contiguous();
  const int64_t R = x.size(0), S = rewards.size(0);
  TORCH_CHECK(R < std::numeric_limits<int32_t>::max(), "scores has too many tokens: ", R);
  auto out = at::empty({R}, x.options());
  if (R == 0) return out;
  const Ids id = make_ids(ids, nullptr, S);
  if (R <= kRowStageMaxFlat) {  // one row, one block, one launch
    SegParams p{R, R, S, 1, 1, 0, kNone, omega, temperature, 0.0, 0.0, standardize, normalize_sum, false,
                omega_neg};
    launch_row_stage(x, id, rewards, nullptr, out, p);
    return out;
  }
  auto pos = new_bounds(S, x);
  if (S > 0) {
    auto* kernel = &run_bounds_kernel;
    P2T_LAUNCH(kernel, (R + kBoundsThreads - 1) / kBoundsThreads, kBoundsThreads, P2T_STREAM(), id,
               pos.data_ptr<int32_t>(), R, R);
    P2T_LAUNCH_CHECK();
  }
  SegParams p{R, R, S, 1, 1, 0, kNone, omega, temperature, 0.0, 0.0, standardize, normalize_sum, false,
              omega_neg};
  launch_segment(x, id, rewards, nullptr, pos, out, p);
  return out;
}

// One block per (row b, chunk of kAdvChunk tokens): every thread first loads its kAdvPerThread values of tr
// and mask into registers (all loads in flight together, overlapping the group statistics), then computes
// A^_b block-wide and stores out[b, i] = A^_b + alpha tr[b, i] (0 where ~mask). All of a block's reads of
// tr happen before its first store and each element is read and written by one thread: out may alias tr.
constexpr int kAdvPerThread = 4;
constexpr int kAdvChunk = kSegThreads * kAdvPerThread;

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kSegThreads)
token_advantages_kernel(const acc_t* __restrict__ o, const acc_t* tr, const bool* __restrict__ mask, out_t* out,
                        int64_t B, int64_t N, int64_t G, int64_t n_chunks, int64_t scale, double alpha_d,
                        double eps_d) {
  const int64_t b = blockIdx.x / n_chunks, chunk = blockIdx.x % n_chunks;
  const acc_t alpha = alpha_d;
  const int64_t c0 = chunk * kAdvChunk;
  acc_t v[kAdvPerThread];
  bool keep[kAdvPerThread];
#pragma unroll
  for (int j = 0; j < kAdvPerThread; ++j) {
    const int64_t col = c0 + threadIdx.x + j * kSegThreads;
    const int64_t i = b * N + col;
    v[j] = col < N ? tr[i] : acc_t(0);
    keep[j] = col < N && (mask == nullptr || mask[i]);
  }
  const acc_t adv = group_advantage(o, b, B, G, scale, static_cast<acc_t>(eps_d));
#pragma unroll
  for (int j = 0; j < kAdvPerThread; ++j) {
    const int64_t col = c0 + threadIdx.x + j * kSegThreads;
    if (col < N) out[b * N + col] = static_cast<out_t>(keep[j] ? adv + alpha * v[j] : acc_t(0));
  }
}

void token_advantages_into(const at::Tensor& outcome_in, const at::Tensor& tr_in,
                           const c10::optional<at::Tensor>& mask, int64_t group_size, double alpha, int64_t scale,
                           double eps, at::Tensor& out) {
  check_token_advantages_args(outcome_in, tr_in, mask, group_size, scale, out);
  check_cuda(outcome_in, tr_in, "outcome_rewards");
  check_cuda(out, tr_in, "out");
  if (mask.has_value()) check_cuda(*mask, tr_in, "mask");
  P2T_DEVICE_GUARD(tr_in.device());
  const auto cd = compute_dtype({outcome_in, tr_in});
  auto o = outcome_in.to(cd).contiguous();
  auto tr = tr_in.to(cd).contiguous();  // no copy when already contiguous in cd (out may alias it)
  const int64_t B = tr.size(0), N = tr.size(1);
  if (B == 0 || N == 0) return;
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t n_chunks = (N + kAdvChunk - 1) / kAdvChunk;
  TORCH_CHECK(B * n_chunks <= std::numeric_limits<int32_t>::max(), "token_rewards is too large");
  auto stream = P2T_STREAM();
  AT_DISPATCH_FLOATING_TYPES(cd, "p2t_token_advantages_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "p2t_token_advantages_out", [&] {
      using out_t = scalar_t;
      auto* kernel = &token_advantages_kernel<acc_t, out_t>;
      P2T_LAUNCH(kernel, B * n_chunks, kSegThreads, stream, o.data_ptr<acc_t>(), tr.data_ptr<acc_t>(),
                 m.defined() ? m.data_ptr<bool>() : nullptr, out.data_ptr<out_t>(), B, N, group_size, n_chunks,
                 scale, alpha, eps);
      P2T_LAUNCH_CHECK();
    });
  });
}

at::Tensor token_advantages_cuda(const at::Tensor& outcome, const at::Tensor& token_rewards,
                                 const c10::optional<at::Tensor>& mask, int64_t group_size, double alpha,
                                 int64_t scale, double eps) {
  check_float(outcome, "outcome_rewards");
  check_float(token_rewards, "token_rewards");
  auto out = at::empty(token_rewards.sizes(), token_rewards.options().dtype(compute_dtype({outcome, token_rewards})));
  token_advantages_into(outcome, token_rewards, mask, group_size, alpha, scale, eps, out);
  return out;
}

void token_advantages_out_cuda(const at::Tensor& outcome, const at::Tensor& token_rewards,
                               const c10::optional<at::Tensor>& mask, int64_t group_size, double alpha,
                               int64_t scale, double eps, at::Tensor out) {
  token_advantages_into(outcome, token_rewards, mask, group_size, alpha, scale, eps, out);
}

void p2t_advantages_into(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                         const at::Tensor& ids_in, const at::Tensor& rewards_in, const at::Tensor& outcome_in,
                         const c10::optional<at::Tensor>& mask, int64_t group_size, double omega, double alpha,
                         double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                         double omega_neg, at::Tensor& out) {
  check_p2t_args(grad, embeds, null_embed, ids_in, rewards_in, outcome_in, mask, group_size, temperature, scale, out);
  check_omega_neg(omega_neg);
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2), R = B * N;
  TORCH_CHECK(R < std::numeric_limits<int32_t>::max(), "too many tokens: ", R);
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&embeds, "embeds"}, {&null_embed, "null_embed"},
                         {&ids_in, "segment_ids"}, {&rewards_in, "segment_rewards"}, {&outcome_in, "outcome_rewards"},
                         {&out, "out"}}) {
    check_cuda(*t, grad, name);
  }
  if (mask.has_value()) check_cuda(*mask, grad, "mask");
  P2T_DEVICE_GUARD(grad.device());
  if (R == 0) return;
  const auto cd = compute_dtype({grad, embeds, null_embed, rewards_in, outcome_in});
  auto ids = ids_in.contiguous();
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  auto rewards = rewards_in.to(cd).contiguous();
  auto outcome = outcome_in.to(cd).contiguous();
  const int64_t S = rewards.size(0);
  auto scores = at::empty({R}, grad.options().dtype(cd));
  const Ids id = make_ids(ids, m.defined() ? &m : nullptr, S);
  // reshape: a view for the usual contiguous layouts; rows_unit_stride inside copies only when needed
  attribution_into(grad.reshape({R, D}), embeds.reshape({R, D}), null_embed, id.mask, scores);
  SegParams p{R, N, S, B, group_size, 0, scale, omega, temperature, alpha, eps, standardize, normalize_sum, true,
              omega_neg};
  auto flat = out.view({R});
  launch_row_stage(scores, id, rewards, &outcome, flat, p);
}

at::Tensor p2t_advantages_cuda(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                               const at::Tensor& ids, const at::Tensor& rewards, const at::Tensor& outcome,
                               const c10::optional<at::Tensor>& mask, int64_t group_size, double omega, double alpha,
                               double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                               double omega_neg) {
  auto out = new_p2t_out(grad, embeds, null_embed, rewards, outcome);
  p2t_advantages_into(grad, embeds, null_embed, ids, rewards, outcome, mask, group_size, omega, alpha, temperature,
                      standardize, normalize_sum, scale, eps, omega_neg, out);
  return out;
}

void p2t_advantages_out_cuda(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                             const at::Tensor& ids, const at::Tensor& rewards, const at::Tensor& outcome,
                             const c10::optional<at::Tensor>& mask, int64_t group_size, double omega, double alpha,
                             double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                             double omega_neg, at::Tensor out) {
  p2t_advantages_into(grad, embeds, null_embed, ids, rewards, outcome, mask, group_size, omega, alpha, temperature,
                      standardize, normalize_sum, scale, eps, omega_neg, out);
}

}  // namespace

#ifdef P2T_HOST_EMULATION
TORCH_LIBRARY(p2t_cuda_emulated, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(p2t_cuda_emulated, CPU, m) {
#else
TORCH_LIBRARY_IMPL(p2t, CUDA, m) {
#endif
  m.impl("token_attribution", &token_attribution_cuda);
  m.impl("segment_redistribute", &segment_redistribute_cuda);
  m.impl("token_advantages", &token_advantages_cuda);
  m.impl("token_advantages_out", &token_advantages_out_cuda);
  m.impl("p2t_advantages", &p2t_advantages_cuda);
  m.impl("p2t_advantages_out", &p2t_advantages_out_cuda);
}

}  // namespace p2t
