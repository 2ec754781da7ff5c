// One TORCH_LIBRARY block holds every p2t op schema. The CPU twins live in csrc/*.cpp under
// TORCH_LIBRARY_IMPL(p2t, CPU, m), the CUDA twins in csrc/cuda/*.cu under TORCH_LIBRARY_IMPL(p2t, CUDA, m).
// Shapes are the normalised ones p2t/ops passes (see p2t/ops/_custom.py); argument errors for users
// are raised in Python with the argument's name, the TORCH_CHECKs here guard direct callers.
#include <torch/library.h>

#ifndef P2T_NO_PYTHON  // the CMake build for libtorch users defines it: no Python there
#include <Python.h>
extern "C" {
// `import p2t._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(p2t, m) {
  m.def("token_attribution(Tensor grad, Tensor embeds, Tensor null_embed, Tensor? mask) -> Tensor");
  m.def("segment_redistribute(Tensor scores, Tensor segment_ids, Tensor segment_rewards, float omega, "
        "float temperature, bool standardize, bool normalize_sum) -> Tensor");
  m.def("token_advantages(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
        "float alpha, int scale, float eps) -> Tensor");
  m.def("token_advantages_out(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
        "float alpha, int scale, float eps, Tensor(a!) out) -> ()");
  m.def("p2t_advantages(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
        "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, float omega, "
        "float alpha, float temperature, bool standardize, bool normalize_sum, int scale, float eps) -> Tensor");
  m.def("p2t_advantages_out(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
        "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, float omega, "
        "float alpha, float temperature, bool standardize, bool normalize_sum, int scale, float eps, "
        "Tensor(a!) out) -> ()");
}
