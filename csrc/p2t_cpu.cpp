// C++ CPU kernels of the p2t ops (registered under TORCH_LIBRARY_IMPL(p2t, CPU, m)).
//
// attribution:  I_r = sum_d (embeds[r, d] - null[d]) * grad[r, d], fp32 accumulation (fp64 when all
//               inputs are fp64), rows split over threads, the inner loop a SIMD reduction.
// segments:     a segment is the set of tokens with its id >= 0 (ids >= S count as -1); its tokens may form
//               several runs (holes between them). Pass 1: threads take chunks of tokens and list the
//               runs starting in them (a run is never split, no atomics). Pass 2: the runs grouped by
//               segment, in token order (a counting sort, skipped when every segment is one run).
//               Pass 3, one task per segment (or several small ones): (standardise), / temperature, max,
//               sum of exp, write r_i = c (R_s + omega R_s w_i) through an epilogue. With omega_neg > 0 the same
//               passes also take the min and the sum of exp(min - x): r_i = c (R_s + omega R_s w_i
//               - omega_neg (1 - R_s) v_i), v = softmax(-x); omega_neg = 0 runs the unsigned passes alone.
// ISA clones:   the attribution row loop, the segment passes and the advantage loop each have a portable, an
//               AVX2 + FMA and an AVX-512 clone; cpu_isa() (csrc/cpu_isa.h) picks one per call: the best the CPU
//               has, or the one P2T_CPU_ISA names. Only the attribution's clones differ in their results (the
//               width of the reduction, FMAs); the others run the same scalar arithmetic (no contraction).
// threads:      work is cut into many small tasks, each thread a fixed block of them, leftovers taken by
//               whichever thread is running (csrc/parallel.h): a core kept busy by another process delays
//               one small task, not a static half of the work; no more threads than free cores.
// advantages:   A~ = A^_b + alpha r (0 where mask is False), A^ from group statistics on the host.
// p2t_advantages runs the attribution into a [R] buffer and the segment pass with the advantage
// epilogue: one read of grad/embeds, no [B, N, D] intermediate.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu_isa.h"
#include "parallel.h"

namespace p2t {
namespace {

// ------------------------------------------------------------------------------------------------
// attribution
// ------------------------------------------------------------------------------------------------
// Element loads as the accumulation type. bf16 -> fp32 is a 16-bit shift, written out so the
// compiler vectorises it (c10::BFloat16's conversion goes through memcpy and does not).
template <typename acc_t, typename T>
inline acc_t load_as(const T* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}
template <>
inline float load_as<float, c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// n_t: null's type in memory (the embeddings' bf16 / fp16 when null comes in it: half the cache footprint
// of an fp32 copy, read once per row), else acc_t. FMA: fused multiply-adds (the clones for CPUs that have
// them; the file is built with -ffp-contract=off, so nothing else is fused and every clone of the segment
// and advantage passes rounds as the portable code does).
template <typename g_t, typename e_t, typename acc_t, typename n_t, bool FMA>
__attribute__((always_inline)) inline acc_t row_dot(const g_t* __restrict__ gr, const e_t* __restrict__ er,
                                                    const n_t* __restrict__ nul, int64_t D) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (FMA) {
      acc = std::fma(load_as<acc_t>(er, d) - load_as<acc_t>(nul, d), load_as<acc_t>(gr, d), acc);
    } else {
      acc += (load_as<acc_t>(er, d) - load_as<acc_t>(nul, d)) * load_as<acc_t>(gr, d);
    }
  }
  return acc;
}

#if P2T_X86_CLONES
// The same loop compiled for AVX2 + FMA and for AVX-512, picked at run time (cpu_isa.h), one call per row. GCC
// sizes an `omp simd` loop's lanes by the ISA of the function that holds the loop when it lowers the pragma,
// before inlining: the AVX2 clone inlines row_dot (16 lanes, as 2 x 256-bit vectors), the AVX-512 clone holds
// its own copy of the loop (512-bit vectors).
template <typename g_t, typename e_t, typename acc_t, typename n_t>
P2T_TARGET_AVX2 acc_t row_dot_avx2(const g_t* gr, const e_t* er, const n_t* nul, int64_t D) {
  return row_dot<g_t, e_t, acc_t, n_t, true>(gr, er, nul, D);
}
// The two common cases in intrinsics: all bf16 (null in bf16) and all fp32. Four accumulators (64 bf16 or 32 fp32
// values per step), the row's tail through masked loads (no scalar remainder loop). bf16 -> fp32 is one unpack
// with zeros per 32 values (each 32-bit lane gets bf16 << 16), in the unpack's interleaved order, the same for
// grad, embeds and null: a dot product does not see the order.
P2T_TARGET_AVX512 inline __m512 bf16_lo(__m512i v) {
  return _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
}
P2T_TARGET_AVX512 inline __m512 bf16_hi(__m512i v) {
  return _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}

// acc_lo / acc_hi += (e - n) * g over the 32 bf16 values of each vector
P2T_TARGET_AVX512 inline void bf16_step(__m512i g, __m512i e, __m512i n, __m512& lo, __m512& hi) {
  lo = _mm512_fmadd_ps(_mm512_sub_ps(bf16_lo(e), bf16_lo(n)), bf16_lo(g), lo);
  hi = _mm512_fmadd_ps(_mm512_sub_ps(bf16_hi(e), bf16_hi(n)), bf16_hi(g), hi);
}

P2T_TARGET_AVX512 inline __m512i load32(const c10::BFloat16* p) {
  return _mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

P2T_TARGET_AVX512 inline float row_dot_bf16_avx512(const c10::BFloat16* gr, const c10::BFloat16* er,
                                                  const c10::BFloat16* nul, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    bf16_step(load32(gr + d), load32(er + d), load32(nul + d), a0, a1);
    bf16_step(load32(gr + d + 32), load32(er + d + 32), load32(nul + d + 32), a2, a3);
  }
  for (; d < D; d += 32) {
    const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (D - d)) - 1);
    bf16_step(_mm512_maskz_loadu_epi16(m, gr + d), _mm512_maskz_loadu_epi16(m, er + d),
              _mm512_maskz_loadu_epi16(m, nul + d), a0, a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

P2T_TARGET_AVX512 inline __m512 f32_step(const float* g, const float* e, const float* n, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(e), _mm512_loadu_ps(n)), _mm512_loadu_ps(g), acc);
}

P2T_TARGET_AVX512 inline float row_dot_f32_avx512(const float* gr, const float* er, const float* nul, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    a0 = f32_step(gr + d, er + d, nul + d, a0);
    a1 = f32_step(gr + d + 16, er + d + 16, nul + d + 16, a1);
    a2 = f32_step(gr + d + 32, er + d + 32, nul + d + 32, a2);
    a3 = f32_step(gr + d + 48, er + d + 48, nul + d + 48, a3);
  }
  for (; d < D; d += 16) {
    const __mmask16 m = D - d >= 16 ? ~__mmask16(0) : static_cast<__mmask16>((1u << (D - d)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, er + d), _mm512_maskz_loadu_ps(m, nul + d)),
                         _mm512_maskz_loadu_ps(m, gr + d), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename g_t, typename e_t, typename acc_t, typename n_t>
P2T_TARGET_AVX512 acc_t row_dot_avx512(const g_t* __restrict__ gr, const e_t* __restrict__ er,
                                       const n_t* __restrict__ nul, int64_t D) {
  if constexpr (std::is_same_v<g_t, c10::BFloat16> && std::is_same_v<e_t, c10::BFloat16> &&
                std::is_same_v<n_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return row_dot_bf16_avx512(gr, er, nul, D);
  } else if constexpr (std::is_same_v<g_t, float> && std::is_same_v<e_t, float> && std::is_same_v<n_t, float> &&
                       std::is_same_v<acc_t, float>) {
    return row_dot_f32_avx512(gr, er, nul, D);
  } else {
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      acc = std::fma(load_as<acc_t>(er, d) - load_as<acc_t>(nul, d), load_as<acc_t>(gr, d), acc);
    }
    return acc;
  }
}
#endif

template <typename g_t, typename e_t, typename acc_t, typename n_t = acc_t>
void attribution_kernel(const g_t* __restrict__ g, int64_t g_stride, const e_t* __restrict__ e, int64_t e_stride,
                        const n_t* __restrict__ nul, const bool* __restrict__ mask, acc_t* __restrict__ out,
                        int64_t R, int64_t D, Isa isa) {
  // ~128 KB of grad + embeds per task (~5 us at one core's memory bandwidth)
  const int64_t grain = grain_for_bytes(D * static_cast<int64_t>(sizeof(g_t) + sizeof(e_t)));
  parallel_ranges(R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (mask != nullptr && !mask[r]) {
        out[r] = acc_t(0);
        continue;
      }
      const g_t* gr = g + r * g_stride;
      const e_t* er = e + r * e_stride;
#if P2T_X86_CLONES
      out[r] = isa == Isa::kAvx512 ? row_dot_avx512<g_t, e_t, acc_t, n_t>(gr, er, nul, D)
               : isa == Isa::kAvx2 ? row_dot_avx2<g_t, e_t, acc_t, n_t>(gr, er, nul, D)
                                   : row_dot<g_t, e_t, acc_t, n_t, false>(gr, er, nul, D);
#else
      out[r] = row_dot<g_t, e_t, acc_t, n_t, false>(gr, er, nul, D);
#endif
    }
  });
}

// Writes I [R] (compute dtype) into `out`; grad/embeds [R, D] with unit stride on the last dim.
void attribution_into(const at::Tensor& grad_in, const at::Tensor& embeds_in, const at::Tensor& null_in,
                      const bool* mask, at::Tensor& out, Isa isa) {
  const auto cd = out.scalar_type();
  auto grad = rows_unit_stride(as_compute(grad_in, cd));
  auto embeds = rows_unit_stride(as_compute(embeds_in, cd));
  const int64_t R = grad.size(0), D = grad.size(1);
  if (R == 0) return;
  // bf16 / fp16 grad, embeds and null of one dtype: null read in that dtype (exact: no rounding involved)
  const auto st = embeds.scalar_type();
  if (cd == at::kFloat && (st == at::kBFloat16 || st == at::kHalf) && grad.scalar_type() == st &&
      null_in.scalar_type() == st) {
    auto nul = null_in.contiguous();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "p2t_attribution_reduced", [&] {
      attribution_kernel<scalar_t, scalar_t, float, scalar_t>(grad.data_ptr<scalar_t>(), grad.stride(0),
                                                               embeds.data_ptr<scalar_t>(), embeds.stride(0),
                                                               nul.data_ptr<scalar_t>(), mask, out.data_ptr<float>(),
                                                               R, D, isa);
    });
    return;
  }
  // Rows read at 4 or 8 bytes per element are bound by memory bandwidth, not by instructions: measured on a
  // 2-core AMD EPYC with AVX-512 (benchmarks/NOTES.md, 2026-12-07), the AVX-512 clone was no faster than the
  // AVX2 one on fp32 rows (fastest call 3.39 vs 2.77 ms at 8x1024x1000) while it wins on bf16 rows (the
  // widening is compute: 1.06 vs 1.31 ms). So the automatic choice runs these rows with the AVX2 clone, which
  // also rounds exactly as before the AVX-512 clone existed; P2T_CPU_ISA=avx512 still forces the wide one.
  if (isa == Isa::kAvx512 && !cpu_isa_forced()) isa = Isa::kAvx2;
  auto nul = null_in.to(cd).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "p2t_attribution_grad", [&] {
    using g_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, embeds.scalar_type(), "p2t_attribution_embeds", [&] {
      using e_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(cd, "p2t_attribution_acc", [&] {
        using acc_t = scalar_t;
        attribution_kernel<g_t, e_t, acc_t>(grad.data_ptr<g_t>(), grad.stride(0), embeds.data_ptr<e_t>(),
                                            embeds.stride(0), nul.data_ptr<acc_t>(), mask, out.data_ptr<acc_t>(),
                                            R, D, isa);
      });
    });
  });
}

at::Tensor token_attribution_cpu(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                                 const c10::optional<at::Tensor>& mask) {
  check_attribution_args(grad, embeds, null_embed, mask);
  auto out = at::empty({grad.size(0)}, grad.options().dtype(compute_dtype({grad, embeds, null_embed})));
  at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  attribution_into(grad, embeds, null_embed, m.defined() ? m.data_ptr<bool>() : nullptr, out, cpu_isa());
  return out;
}

// ------------------------------------------------------------------------------------------------
// segments
// ------------------------------------------------------------------------------------------------
struct SegmentOptions {
  double omega, temperature;
  bool standardize, normalize_sum;
  double omega_neg;  // 0: the blame term is skipped (the paper's formula, unchanged code path)
  Isa isa;           // the clone that runs passes 1 and 3
};

// Effective id of token i: -1 when masked out, negative, or >= S.
template <typename id_t>
struct EffectiveIds {
  const id_t* ids;
  const bool* mask;
  int64_t S;
  inline int64_t operator()(int64_t i) const {
    if (mask != nullptr && !mask[i]) return -1;
    const int64_t s = static_cast<int64_t>(ids[i]);
    return (s < 0 || s >= S) ? -1 : s;
  }
};

struct Run {
  int64_t s, begin, end;  // tokens [begin, end) of segment s
};

// Calls epi(i, r_i, in_segment) once for every token i in [0, R).
template <typename s_t, typename acc_t, typename Ids, typename Epi>
void segment_kernel(const s_t* __restrict__ scores, const Ids& eff, const acc_t* __restrict__ rewards, int64_t R,
                    const SegmentOptions& o, const Epi& epi) {
  const acc_t omega = static_cast<acc_t>(o.omega);
  const acc_t omega_neg = static_cast<acc_t>(o.omega_neg);
  const bool signed_ = o.omega_neg != 0.0;
  const acc_t inv_t = static_cast<acc_t>(1.0 / o.temperature);
  const int64_t S = eff.S;
  // pass 1: the runs of each chunk (a chunk owns the runs that start in it); tokens in no segment
  constexpr int64_t kChunk = 4096;
  const int64_t n_chunks = (R + kChunk - 1) / kChunk;
  std::vector<std::vector<Run>> chunk_runs(n_chunks);
  parallel_tasks(n_chunks, [&](int64_t c) { with_isa(o.isa, [&] {
    const int64_t end = std::min(R, (c + 1) * kChunk);
    int64_t i = c * kChunk;
    if (i > 0) {  // a run that started in the previous chunk belongs to that chunk
      const int64_t prev = eff(i - 1);
      while (i < end && prev >= 0 && eff(i) == prev) ++i;
    }
    auto& runs = chunk_runs[c];
    while (i < end) {
      const int64_t s = eff(i);
      if (s < 0) {
        epi(i, acc_t(0), false);
        ++i;
        continue;
      }
      int64_t j = i + 1;
      while (j < R && eff(j) == s) ++j;
      runs.push_back({s, i, j});
      i = j;
    }
  }); });
  std::vector<Run> runs;
  for (auto& v : chunk_runs) runs.insert(runs.end(), v.begin(), v.end());
  if (runs.empty()) return;
  // pass 2: runs grouped by segment (segment k = runs [first[k], first[k + 1]) of `runs`), token order kept
  std::vector<int64_t> first;
  {
    std::vector<int64_t> count(S, 0);
    bool split = false;
    for (const auto& r : runs) split |= ++count[r.s] > 1;
    if (!split) {
      first.resize(runs.size() + 1);
      for (size_t k = 0; k <= runs.size(); ++k) first[k] = static_cast<int64_t>(k);
    } else {
      std::vector<int64_t> at(S + 1, 0);
      for (int64_t s = 0; s < S; ++s) at[s + 1] = at[s] + count[s];
      std::vector<Run> sorted(runs.size());
      std::vector<int64_t> fill(at.begin(), at.end() - 1);
      for (const auto& r : runs) sorted[fill[r.s]++] = r;
      runs.swap(sorted);
      for (int64_t s = 0; s < S; ++s) {
        if (count[s] > 0) first.push_back(at[s]);
      }
      first.push_back(static_cast<int64_t>(runs.size()));
    }
  }
  const int64_t n_seg = static_cast<int64_t>(first.size()) - 1;
  auto segment = [&](int64_t k) {
    const Run* r0 = runs.data() + first[k];
    const Run* r1 = runs.data() + first[k + 1];
    auto each = [&](auto&& f) {
      for (const Run* r = r0; r != r1; ++r) {
        for (int64_t t = r->begin; t < r->end; ++t) f(t);
      }
    };
    const int64_t s = r0->s;
    int64_t n = 0;
    for (const Run* r = r0; r != r1; ++r) n += r->end - r->begin;
    acc_t mean = 0, inv_std = 1;
    if (o.standardize) {
      each([&](int64_t t) { mean += static_cast<acc_t>(scores[t]); });
      mean /= n;
      acc_t var = 0;
      each([&](int64_t t) {
        const acc_t d = static_cast<acc_t>(scores[t]) - mean;
        var += d * d;
      });
      var /= n;
      const acc_t tol = static_cast<acc_t>(kZeroStdRtol) * std::abs(mean);
      inv_std = var <= tol * tol ? acc_t(0) : acc_t(1) / std::sqrt(var);
    }
    auto x = [&](int64_t t) -> acc_t {
      const acc_t v = static_cast<acc_t>(scores[t]);
      return (o.standardize ? (v - mean) * inv_std : v) * inv_t;
    };
    const acc_t Rs = rewards[s];
    const acc_t c = o.normalize_sum ? acc_t(1) / (static_cast<acc_t>(n) + omega) : acc_t(1);
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    if (!signed_) {
      each([&](int64_t t) { mx = std::max(mx, x(t)); });
      acc_t den = 0;
      each([&](int64_t t) { den += std::exp(x(t) - mx); });
      const acc_t inv_den = acc_t(1) / den;
      each([&](int64_t t) { epi(t, c * (Rs + omega * Rs * (std::exp(x(t) - mx) * inv_den)), true); });
      return;
    }
    // both softmaxes in the same passes: max and min of x, then the sums of exp(x - max) and exp(min - x)
    acc_t mn = std::numeric_limits<acc_t>::infinity();
    each([&](int64_t t) {
      const acc_t v = x(t);
      mx = std::max(mx, v);
      mn = std::min(mn, v);
    });
    acc_t den = 0, den_neg = 0;
    each([&](int64_t t) {
      const acc_t v = x(t);
      den += std::exp(v - mx);
      den_neg += std::exp(mn - v);
    });
    const acc_t inv_den = acc_t(1) / den, inv_den_neg = acc_t(1) / den_neg;
    const acc_t blame = omega_neg * (acc_t(1) - Rs);
    each([&](int64_t t) {
      const acc_t v = x(t);
      const acc_t w = std::exp(v - mx) * inv_den, u = std::exp(mn - v) * inv_den_neg;
      epi(t, c * (Rs + omega * Rs * w - blame * u), true);
    });
  };
  // pass 3: tasks of whole segments, ~4096 tokens each
  std::vector<int64_t> task_first{0};
  int64_t tokens = 0;
  for (int64_t k = 0; k < n_seg; ++k) {
    for (int64_t r = first[k]; r < first[k + 1]; ++r) tokens += runs[r].end - runs[r].begin;
    if (tokens >= kChunk) {
      task_first.push_back(k + 1);
      tokens = 0;
    }
  }
  if (task_first.back() != n_seg) task_first.push_back(n_seg);
  parallel_tasks(static_cast<int64_t>(task_first.size()) - 1, [&](int64_t t) {
    with_isa(o.isa, [&] {
      for (int64_t k = task_first[t]; k < task_first[t + 1]; ++k) segment(k);
    });
  });
}

// Dispatches on scores dtype, id dtype and compute dtype; `body` gets (scores*, EffectiveIds, rewards*).
template <typename acc_t, typename Body>
void with_segments(const at::Tensor& scores, const at::Tensor& ids, const bool* mask, const at::Tensor& rewards,
                   const Body& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "p2t_segment_scores", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "p2t_segment_ids", [&] {
      EffectiveIds<index_t> eff{ids.data_ptr<index_t>(), mask, rewards.size(0)};
      body(scores.data_ptr<s_t>(), eff, rewards.data_ptr<acc_t>());
    });
  });
}

at::Tensor segment_redistribute_cpu(const at::Tensor& scores_in, const at::Tensor& ids_in,
                                    const at::Tensor& rewards_in, double omega, double temperature, bool standardize,
                                    bool normalize_sum, double omega_neg) {
  check_segment_args(scores_in, ids_in, rewards_in, temperature);
  check_omega_neg(omega_neg);
  const auto cd = compute_dtype({scores_in, rewards_in});
  auto scores = as_compute(scores_in, cd).contiguous();
  auto ids = ids_in.contiguous();
  auto rewards = rewards_in.to(cd).contiguous();
  auto out = at::empty(scores.sizes(), scores.options().dtype(cd));
  const int64_t R = scores.numel();
  const SegmentOptions o{omega, temperature, standardize, normalize_sum, omega_neg, cpu_isa()};
  AT_DISPATCH_FLOATING_TYPES(cd, "p2t_segment_acc", [&] {
    using acc_t = scalar_t;
    acc_t* po = out.data_ptr<acc_t>();
    with_segments<acc_t>(scores, ids, nullptr, rewards, [&](auto* ps, const auto& eff, const acc_t* pr) {
      segment_kernel(ps, eff, pr, R, o, [&](int64_t k, acc_t r, bool) { po[k] = r; });
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// advantages
// ------------------------------------------------------------------------------------------------
void token_advantages_into(const at::Tensor& outcome, const at::Tensor& token_rewards_in,
                           const c10::optional<at::Tensor>& mask_in, int64_t group_size, double alpha, int64_t scale,
                           double eps, at::Tensor& out) {
  check_token_advantages_args(outcome, token_rewards_in, mask_in, group_size, scale, out);
  const auto adv = group_advantages_host(outcome, group_size, scale, eps, compute_dtype({outcome, token_rewards_in}));
  const auto tr = token_rewards_in.contiguous();  // a no-op when tr is out (aliasing is elementwise-safe)
  const auto mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool* pm = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t N = tr.size(1);
  if (tr.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tr.scalar_type(), "p2t_token_advantages", [&] {
    using t_t = scalar_t;
    const t_t* pt = tr.data_ptr<t_t>();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "p2t_token_advantages_out", [&] {
      scalar_t* po = out.data_ptr<scalar_t>();
      using acc_t = scalar_t;  // float32 math for a float32 out
      const acc_t a = static_cast<acc_t>(alpha);
      const int64_t B = tr.size(0);
      const Isa isa = cpu_isa();
      parallel_ranges(B, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t b0, int64_t b1) {
        with_isa(isa, [&] { for (int64_t b = b0; b < b1; ++b) {
          const acc_t ab = static_cast<acc_t>(adv[b]);
          const t_t* row = pt + b * N;
          scalar_t* orow = po + b * N;
          if (pm == nullptr) {
            _Pragma("omp simd")
            for (int64_t i = 0; i < N; ++i) orow[i] = ab + a * load_as<acc_t>(row, i);
          } else {
            const bool* mrow = pm + b * N;
            _Pragma("omp simd")
            for (int64_t i = 0; i < N; ++i) orow[i] = mrow[i] ? ab + a * load_as<acc_t>(row, i) : acc_t(0);
          }
        } });
      });
    });
  });
}

at::Tensor token_advantages_cpu(const at::Tensor& outcome, const at::Tensor& token_rewards,
                                const c10::optional<at::Tensor>& mask, int64_t group_size, double alpha, int64_t scale,
                                double eps) {
  check_float(outcome, "outcome_rewards");
  check_float(token_rewards, "token_rewards");
  auto out = at::empty(token_rewards.sizes(),
                       token_rewards.options().dtype(compute_dtype({outcome, token_rewards})));
  token_advantages_into(outcome, token_rewards, mask, group_size, alpha, scale, eps, out);
  return out;
}

void token_advantages_out_cpu(const at::Tensor& outcome, const at::Tensor& token_rewards,
                              const c10::optional<at::Tensor>& mask, int64_t group_size, double alpha, int64_t scale,
                              double eps, at::Tensor out) {
  token_advantages_into(outcome, token_rewards, mask, group_size, alpha, scale, eps, out);
}

// ------------------------------------------------------------------------------------------------
// fused pipeline
// ------------------------------------------------------------------------------------------------
void p2t_advantages_into(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                         const at::Tensor& ids_in, const at::Tensor& rewards_in, const at::Tensor& outcome,
                         const c10::optional<at::Tensor>& mask_in, int64_t group_size, double omega, double alpha,
                         double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                         double omega_neg, at::Tensor& out) {
  check_p2t_args(grad, embeds, null_embed, ids_in, rewards_in, outcome, mask_in, group_size, temperature, scale, out);
  check_omega_neg(omega_neg);
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2);
  const int64_t R = B * N;
  if (R == 0) return;
  const auto cd = compute_dtype({grad, embeds, null_embed, rewards_in, outcome});
  const auto mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const bool* pm = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  // attribution of every token (masked tokens are skipped: they get advantage 0 anyway)
  const Isa isa = cpu_isa();
  auto scores = at::empty({R}, grad.options().dtype(cd));
  attribution_into(grad.reshape({R, D}), embeds.reshape({R, D}), null_embed, pm, scores, isa);
  const auto adv = group_advantages_host(outcome, group_size, scale, eps, cd);
  auto ids = ids_in.reshape({R}).contiguous();
  auto rewards = rewards_in.to(cd).contiguous();
  const SegmentOptions o{omega, temperature, standardize, normalize_sum, omega_neg, isa};
  AT_DISPATCH_FLOATING_TYPES(cd, "p2t_fused_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "p2t_fused_out", [&] {
      using o_t = scalar_t;
      o_t* po = out.data_ptr<o_t>();
      with_segments<acc_t>(scores, ids, pm, rewards, [&](auto* ps, const auto& eff, const acc_t* pr) {
        segment_kernel(ps, eff, pr, R, o, [&](int64_t k, acc_t r, bool) {
          po[k] = (pm != nullptr && !pm[k]) ? o_t(0)
                                            : static_cast<o_t>(adv[k / N] + alpha * static_cast<double>(r));
        });
      });
    });
  });
}

at::Tensor p2t_advantages_cpu(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                              const at::Tensor& ids, const at::Tensor& rewards, const at::Tensor& outcome,
                              const c10::optional<at::Tensor>& mask, int64_t group_size, double omega, double alpha,
                              double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                              double omega_neg) {
  auto out = new_p2t_out(grad, embeds, null_embed, rewards, outcome);
  p2t_advantages_into(grad, embeds, null_embed, ids, rewards, outcome, mask, group_size, omega, alpha, temperature,
                      standardize, normalize_sum, scale, eps, omega_neg, out);
  return out;
}

void p2t_advantages_out_cpu(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                            const at::Tensor& ids, const at::Tensor& rewards, const at::Tensor& outcome,
                            const c10::optional<at::Tensor>& mask, int64_t group_size, double omega, double alpha,
                            double temperature, bool standardize, bool normalize_sum, int64_t scale, double eps,
                            double omega_neg, at::Tensor out) {
  p2t_advantages_into(grad, embeds, null_embed, ids, rewards, outcome, mask, group_size, omega, alpha, temperature,
                      standardize, normalize_sum, scale, eps, omega_neg, out);
}

std::string cpu_isa_op() { return isa_name(cpu_isa()); }

std::string cpu_isas_op() {
  std::string out;
  for (Isa isa : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (cpu_supports(isa)) out += (out.empty() ? "" : ",") + std::string(isa_name(isa));
  }
  return out;
}

}  // namespace

// Which clone of the CPU kernels runs (P2T_CPU_ISA, else the best this CPU and build have), and which exist here.
TORCH_LIBRARY_FRAGMENT(p2t_host, m) {
  m.def("cpu_isa() -> str", &cpu_isa_op);
  m.def("cpu_isas() -> str", &cpu_isas_op);
}

TORCH_LIBRARY_IMPL(p2t, CPU, m) {
  m.impl("token_attribution", &token_attribution_cpu);
  m.impl("segment_redistribute", &segment_redistribute_cpu);
  m.impl("token_advantages", &token_advantages_cpu);
  m.impl("token_advantages_out", &token_advantages_out_cpu);
  m.impl("p2t_advantages", &p2t_advantages_cpu);
  m.impl("p2t_advantages_out", &p2t_advantages_out_cpu);
}

}  // namespace p2t
