// One TORCH_LIBRARY block registers every p2t op schema (csrc/schemas.h). The CPU twins live in csrc/*.cpp under
// TORCH_LIBRARY_IMPL(p2t, CPU, m), the CUDA twins in csrc/cuda/*.cu under TORCH_LIBRARY_IMPL(p2t, CUDA, m).
// Shapes are the normalised ones p2t/ops passes (see p2t/ops/_custom.py); argument errors for users
// are raised in Python with the argument's name, the TORCH_CHECKs here guard direct callers.
#include <torch/library.h>

#include "schemas.h"

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

TORCH_LIBRARY(p2t, m) { p2t::define_ops(m); }
