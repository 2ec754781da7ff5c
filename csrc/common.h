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

// GRPO advantage per row, computed in double on the host: (o - mean_g) / (std + eps) with the
// unbiased std of the group (kGroup) or of the batch (kBatch), or o - mean_g (kNone). A zero std
// gives 0 (every centred value is then 0), also with eps = 0.
inline std::vector<double> group_advantages_host(const at::Tensor& outcome, int64_t G, int64_t scale, double eps) {
  auto o = outcome.to(at::kCPU, at::kDouble).contiguous();
  const double* p = o.data_ptr<double>();
  const int64_t B = o.numel();
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
    double m = 0.0;
    for (int64_t i = g0; i < g0 + G; ++i) m += p[i];
    m /= G;
    double den = 1.0;
    if (scale == kGroup) {
      double v = 0.0;
      for (int64_t i = g0; i < g0 + G; ++i) v += (p[i] - m) * (p[i] - m);
      den = std::sqrt(v / std::max<int64_t>(G - 1, 1)) + eps;
    } else if (scale == kBatch) {
      den = batch_std + eps;
    }
    for (int64_t i = g0; i < g0 + G; ++i) adv[i] = scale == kNone ? p[i] - m : safe_div(p[i] - m, den);
  }
  return adv;
}

}  // namespace p2t
