// Every schema of the mixprec namespace, in one place. Kernels live in cpu/ and cuda/;
// fake (meta) kernels for torch.compile live in mixprec/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mixprec, m) {
  // grads[i] *= inv_scale (fp32 arithmetic); found_inf = 1 if any element of any grad is inf/NaN.
  // inv_scale == 1 only checks (no writes). All grads on found_inf's device; any float dtype mix.
  m.def(
      "non_finite_check_and_unscale_(Tensor(a!)[] grads, Tensor(b!) found_inf, "
      "Tensor inv_scale) -> ()");
  // torch._amp_update_scale_'s rule, plus hysteresis (back off only after `hysteresis`
  // consecutive overflows) and clamping to [min_scale, max_scale].
  // counters (int64[2]): [0] += 1 on every overflow, [1] += 1 on an overflow at min_scale.
  m.def(
      "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
      "Tensor(d!) counters, Tensor found_inf, float growth_factor, float backoff_factor, "
      "int growth_interval, int hysteresis, float min_scale, float max_scale) -> ()");
}

// `import mixprec._C` loads this library, which runs the registrations above.
static PyModuleDef mixprec_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mixprec_module); }
