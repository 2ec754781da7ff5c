// The schemas of every p2t op, in one place: csrc/p2t.cpp defines them in TORCH_LIBRARY(p2t), and the
// host emulation of the CUDA file (a CPU test) defines the same ones in its own namespace. omega_neg, the weight of
// the signed blame term, is the last scalar of segment_redistribute and p2t_advantages (0: the term is skipped).
#pragma once

#include <torch/library.h>

namespace p2t {

inline void define_ops(torch::Library& m) {
  m.def("token_attribution(Tensor grad, Tensor embeds, Tensor null_embed, Tensor? mask) -> Tensor");
  m.def("segment_redistribute(Tensor scores, Tensor segment_ids, Tensor segment_rewards, float omega, "
        "float temperature, bool standardize, bool normalize_sum, float omega_neg) -> Tensor");
  m.def("token_advantages(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
        "float alpha, int scale, float eps) -> Tensor");
  m.def("token_advantages_out(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
        "float alpha, int scale, float eps, Tensor(a!) out) -> ()");
  m.def("p2t_advantages(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
        "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, float omega, "
        "float alpha, float temperature, bool standardize, bool normalize_sum, int scale, float eps, "
        "float omega_neg) -> Tensor");
  m.def("p2t_advantages_out(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
        "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, float omega, "
        "float alpha, float temperature, bool standardize, bool normalize_sum, int scale, float eps, "
        "float omega_neg, Tensor(a!) out) -> ()");
}

}  // namespace p2t
