// Shared by the CPU and CUDA kernels: dtype rules, the group statistics of GRPO, small checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <vector>

namespace p2t {

// Scale modes of the group advantage (the Python layer maps "group", "batch", "none").
enum Scale : int64_t { kGroup = 0, kBatch = 1, kNone = 2 };

// A segment whose population variance is at most (kZeroStdRtol * |mean|)^2 counts as constant: its
// standardised scores are 0. Same constant as p2t/ops/reference.py (ZERO_STD_RTOL).
constexpr double kZeroStdRtol = 1e-6;

// A GRPO group is constant when max - min <= rtol * max(1, |mean|): its advantages are 0 for every scale.
// rtol by compute dtype, as p2t/ops/reference.py (CONST_RTOL).
constexpr double kConstRtolFloat = 1e-6;
constexpr double kConstRtolDouble = 1e-12;
inline double const_rtol(at::ScalarType cd) { return cd == at::kDouble ? kConstRtolDouble : kConstRtolFloat; }

// Results are float32, float64 when every floating input is float64.
inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts) {
    if (t.scalar_type() != at::kDouble) return at::kFloat;
  }
  return at::kDouble;
}

// Inputs of a float32 computation that arrive as float64 are read as float32 (as the reference does).
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType cd) {
  return (cd == at::kFloat && t.scalar_type() == at::kDouble) ? t.to(at::kFloat) : t;
}

// Last dimension unit-stride (rows may have any stride): the kernels read rows with a row stride.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", st);
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int64 or int32, got ",
              t.scalar_type());
}

inline void check_mask(const c10::optional<at::Tensor>& mask, at::IntArrayRef shape, const char* name) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, name, " must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->sizes() == shape, name, " must have shape ", shape, ", got ", mask->sizes());
}

inline void check_group(const at::Tensor& outcome, int64_t group_size, int64_t scale) {
  TORCH_CHECK(outcome.dim() == 1, "outcome_rewards must be 1-D, got shape ", outcome.sizes());
  TORCH_CHECK(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK(outcome.size(0) % group_size == 0, "outcome_rewards has ", outcome.size(0),
              " rows, not a multiple of group_size=", group_size);
  TORCH_CHECK(scale >= 0 && scale <= 2, "scale must be 0 (group), 1 (batch) or 2 (none), got ", scale);
}

// ---- argument checks shared by the CPU and CUDA twins (shapes, dtypes; devices are the CUDA side's) ----
inline void check_attribution_args(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                                   const c10::optional<at::Tensor>& mask) {
  check_float(grad, "grad");
  check_float(embeds, "embeds");
  check_float(null_embed, "null_embed");
  TORCH_CHECK(grad.dim() == 2, "grad must be [R, D], got shape ", grad.sizes());
  TORCH_CHECK(embeds.sizes() == grad.sizes(), "embeds must have the shape of grad ", grad.sizes(), ", got ",
              embeds.sizes());
  TORCH_CHECK(null_embed.dim() == 1 && null_embed.size(0) == grad.size(1), "null_embed must have shape [",
              grad.size(1), "], got ", null_embed.sizes());
  check_mask(mask, {grad.size(0)}, "mask");
}

inline void check_segment_args(const at::Tensor& scores, const at::Tensor& ids, const at::Tensor& rewards,
                               double temperature) {
  check_float(scores, "scores");
  check_index(ids, "segment_ids");
  check_float(rewards, "segment_rewards");
  TORCH_CHECK(scores.dim() == 1, "scores must be 1-D [R], got shape ", scores.sizes());
  TORCH_CHECK(ids.sizes() == scores.sizes(), "segment_ids must have the shape of scores");
  TORCH_CHECK(rewards.dim() == 1, "segment_rewards must be 1-D [S]");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// The weight of the signed blame term: finite and >= 0 (the Python layer names it for users).
inline void check_omega_neg(double omega_neg) {
  TORCH_CHECK(std::isfinite(omega_neg) && omega_neg >= 0, "omega_neg must be finite and >= 0, got ", omega_neg);
}

inline void check_out(const at::Tensor& out, at::IntArrayRef shape) {
  TORCH_CHECK(out.sizes() == shape && out.is_contiguous(), "out must be a contiguous tensor of shape ", shape);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, "out must be float32 or float64");
}

inline void check_token_advantages_args(const at::Tensor& outcome, const at::Tensor& token_rewards,
                                        const c10::optional<at::Tensor>& mask, int64_t group_size, int64_t scale,
                                        const at::Tensor& out) {
  check_float(outcome, "outcome_rewards");
  check_float(token_rewards, "token_rewards");
  check_group(outcome, group_size, scale);
  TORCH_CHECK(token_rewards.dim() == 2 && token_rewards.size(0) == outcome.size(0),
              "token_rewards must be [B, N] with B = outcome_rewards.size(0), got ", token_rewards.sizes());
  check_mask(mask, token_rewards.sizes(), "mask");
  check_out(out, token_rewards.sizes());
}

inline void check_p2t_args(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                           const at::Tensor& ids, const at::Tensor& rewards, const at::Tensor& outcome,
                           const c10::optional<at::Tensor>& mask, int64_t group_size, double temperature,
                           int64_t scale, const at::Tensor& out) {
  check_float(grad, "grad");
  check_float(embeds, "embeds");
  check_float(null_embed, "null_embed");
  check_index(ids, "segment_ids");
  check_float(rewards, "segment_rewards");
  check_float(outcome, "outcome_rewards");
  check_group(outcome, group_size, scale);
  TORCH_CHECK(grad.dim() == 3, "grad must be [B, N, D], got shape ", grad.sizes());
  TORCH_CHECK(embeds.sizes() == grad.sizes(), "embeds must have the shape of grad");
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2);
  TORCH_CHECK(null_embed.dim() == 1 && null_embed.size(0) == D, "null_embed must have shape [", D, "]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == B && ids.size(1) == N, "segment_ids must be [B, N]");
  TORCH_CHECK(rewards.dim() == 1, "segment_rewards must be 1-D [S]");
  TORCH_CHECK(outcome.size(0) == B, "outcome_rewards must have B = ", B, " rows");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  check_mask(mask, {B, N}, "mask");
  check_out(out, {B, N});
}

// The [B, N] result of p2t_advantages in the compute dtype (the functional twins allocate it).
inline at::Tensor new_p2t_out(const at::Tensor& grad, const at::Tensor& embeds, const at::Tensor& null_embed,
                              const at::Tensor& rewards, const at::Tensor& outcome) {
  check_float(grad, "grad");
  TORCH_CHECK(grad.dim() == 3, "grad must be [B, N, D], got shape ", grad.sizes());
  check_float(embeds, "embeds");
  check_float(null_embed, "null_embed");
  check_float(rewards, "segment_rewards");
  check_float(outcome, "outcome_rewards");
  return at::empty({grad.size(0), grad.size(1)},
                   grad.options().dtype(compute_dtype({grad, embeds, null_embed, rewards, outcome})));
}


// GRPO advantage per row, computed in double on the host: (o - mean_g) / (std + eps) with the
// unbiased std of the group (kGroup) or of the batch (kBatch), or o - mean_g (kNone). A constant group
// (max - min <= rtol * max(1, |mean_g|), rtol of the compute dtype cd) gives 0; so does a zero std
// (every centred value is then 0), also with eps = 0.
inline std::vector<double> group_advantages_host(const at::Tensor& outcome, int64_t G, int64_t scale, double eps,
                                                 at::ScalarType cd) {
  auto o = outcome.to(at::kCPU, at::kDouble).contiguous();
  const double* p = o.data_ptr<double>();
  const int64_t B = o.numel();
  const double rtol = const_rtol(cd);
  std::vector<double> adv(B);
  auto safe_div = [](double c, double den) { return den == 0.0 ? 0.0 : c / den; };
  double batch_std = 0.0;
  if (scale == kBatch && B > 0) {
    double m = 0.0;
    for (int64_t i = 0; i < B; ++i) m += p[i];
    m /= B;
    double v = 0.0;
    for (int64_t i = 0; i < B; ++i) v += (p[i] - m) * (p[i] - m);
    batch_std = std::sqrt(v / std::max<int64_t>(B - 1, 1));
  }
  for (int64_t g0 = 0; g0 < B; g0 += G) {
    double m = 0.0, lo = p[g0], hi = p[g0];
    for (int64_t i = g0; i < g0 + G; ++i) {
      m += p[i];
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    m /= G;
    const bool constant = hi - lo <= rtol * std::max(1.0, std::abs(m));
    double den = 1.0;
    if (scale == kGroup) {
      double v = 0.0;
      for (int64_t i = g0; i < g0 + G; ++i) v += (p[i] - m) * (p[i] - m);
      den = std::sqrt(v / std::max<int64_t>(G - 1, 1)) + eps;
    } else if (scale == kBatch) {
      den = batch_std + eps;
    }
    for (int64_t i = g0; i < g0 + G; ++i) {
      adv[i] = constant ? 0.0 : scale == kNone ? p[i] - m : safe_div(p[i] - m, den);
    }
  }
  return adv;
}

}  // namespace p2t
