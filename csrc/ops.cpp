// Every schema of the mixprec namespace, in one place. Kernels live in cpu/ and cuda/;
// fake (meta) kernels for torch.compile live in mixprec/ops.py.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

// Our ops write their Tensor(a!) arguments in place; like torch's own in-place ops they must bump
// those tensors' version counters, or autograd's saved-tensor check and mixprec.autocast's
// persistent weight cache would miss the write. One boxed kernel at ADInplaceOrView does that,
// then hands the call on; VersionBumpingDefs registers it for every op whose schema writes an argument,
// so no list of op names is kept by hand.
static void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                                  torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size();
  for (size_t i = 0; i < n; ++i) {
    if (!args[i].alias_info() || !args[i].alias_info()->isWrite()) continue;
    const c10::IValue& v = (*stack)[stack->size() - n + i];
    if (v.isTensor()) {
      v.toTensor().unsafeGetTensorImpl()->bump_version();
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList().vec()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
  op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::ADInplaceOrView), stack);
}

// The library's def(), plus the version-bump kernel for every schema that writes an argument.
struct VersionBumpingDefs {
  torch::Library& lib;
  void def(const char* text) {
    c10::FunctionSchema schema = torch::schema(text);
    const std::string name = schema.name();
    bool writes = false;
    for (const c10::Argument& arg : schema.arguments()) {
      writes = writes || (arg.alias_info() && arg.alias_info()->isWrite());
    }
    lib.def(std::move(schema));
    if (writes) {
      lib.impl(name.c_str(), c10::DispatchKey::ADInplaceOrView,
               torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
    }
  }
};

TORCH_LIBRARY(mixprec, lib) {
  VersionBumpingDefs m{lib};
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
  // The p-norm (p > 0 or inf) of all grads * inv_scale, accumulated in fp32, as a 0-dim fp32
  // tensor; found_inf = 1 if any element is inf/NaN (one read does both). Deterministic.
  m.def(
      "grad_norm(Tensor[] grads, Tensor(a!) found_inf, Tensor inv_scale, float norm_type) -> "
      "Tensor");
  // torch.nn.utils.clip_grad_norm_'s clip coefficient from a 0-dim fp32 total norm, bit for bit:
  // clamp(max_norm / (total_norm + 1e-6), max=1), in one kernel instead of torch's four.
  m.def("clip_coef(Tensor total_norm, float max_norm) -> Tensor");
  // What a GradScaler's clip_grad_norm_ needs from scaled grads, in one read and two kernels:
  // (total norm of grads / scale, clip_coef(total norm, max_norm), found_inf (0 or 1), 1 / scale),
  // each a 0-dim fp32 tensor, bit for bit what grad_norm + clip_coef + torch.amp's inv_scale give.
  m.def(
      "clip_grad_norm_scaled(Tensor[] grads, Tensor scale, float norm_type, float max_norm) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // Fused optimizer steps over one dtype of params on one device (the maths of torch's fused CPU
  // kernels, and of its fused CUDA Adam: optim_math.h). The grad used is grad * inv_scale * clip_coef (each
  // optional); store_grads writes that back into grads (torch's fused kernels leave p.grad
  // unscaled). A nonzero found_inf skips everything (params, state, steps, grads). fp16/bf16 params are updated through
  // their fp32 master_params (written back rounded to nearest), or, with no master_params,
  // directly, by `rounding` (keyword-only, by name): "nearest", "stochastic" (random stream of
  // seed, step, tensor, element; rounding.h), or "kahan" (weight = param + compensation, both in the params'
  // dtype); the names are parsed once, in C++ (rounding.h). fp32 params take
  // neither. steps (fp32, one per param) are incremented first, as in torch. lr_tensor, when
  // given, replaces lr (schedulers may keep lr on the device).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(h!)[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor(g!)[] compensations, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool maximize, "
      "Tensor? inv_scale, Tensor? clip_coef, Tensor? found_inf, *, str rounding=\"nearest\", "
      "int seed=0, bool store_grads=False) -> ()");
  // Adam/AdamW with compressed state (issue 15). `moments` by name: "fp32", "bf16" (stochastically
  // rounded with the moment stream of seed, step, tensor), "8bit" (uint8 codes of the
  // signed_map / unsigned_map entries times one fp32 absmax per 256-element block, requantized in
  // the same pass) or "fp8" (float8_e4m3fn values times that absmax / 256, see
  // compressed_state.h; the maps are not read). `weights` by name: "plain" (fp32, or fp16/bf16
  // rounded to nearest), "master" (fp32 master_params), "remainder" (bf16 params + int16 remainders: together the fp32 master,
  // bit for bit), "stochastic" (fp16/bf16 rounded stochastically). Otherwise as adam_step_ (no
  // amsgrad): found_inf skips everything, steps are incremented first, store_grads writes the
  // unscaled, clipped grads back.
  m.def(
      "adam_step_compressed_(Tensor(a!)[] params, Tensor(h!)[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_absmax, "
      "Tensor(g!)[] master_params, Tensor(i!)[] remainders, Tensor(f!)[] steps, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, bool maximize, Tensor? inv_scale, Tensor? clip_coef, "
      "Tensor? found_inf, Tensor signed_map, Tensor unsigned_map, *, str moments, str weights, "
      "int seed=0, bool store_grads=False) -> ()");
  // Block-wise 8-bit quantization (256 elements a block, absmax scaling, nearest map entry) and
  // its inverse: checkpoints convert fp32 moments with these, bit for bit the step's own codes.
  m.def("quantize_blockwise(Tensor x, Tensor map) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor map) -> Tensor");
  // fp8 casts (the "fp8" autocast rule, mixprec/fp8.py). fp8_amax: max |x| as a 0-dim fp32 tensor
  // (NaN if x holds one). fp8_cast: x * scale rounded to `dtype` (float8_e4m3fn or float8_e5m2)
  // the way torch's (x * scale).clamp(-max, max).to(dtype) rounds it, with scale = max / amax *
  // shrink (1 * shrink where amax is 0 or not finite), computed on the device; returns (the fp8
  // copy, its transpose when `transpose` (2-d x; else an empty tensor), 1 / scale as a 0-dim fp32
  // tensor). fp8_cast_delayed: the same cast with amax = max(history) (reduce "max") or
  // history[0] ("most_recent"), in one pass that also reduces max |x|, after which history becomes
  // [max |x|, history[:-1]] and `overflows` (int64) counts 1 if max |x| > max / scale or is NaN.
  m.def("fp8_amax(Tensor x) -> Tensor");
  m.def(
      "fp8_cast(Tensor x, Tensor amax, ScalarType dtype, *, float shrink=1.0, bool transpose=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "fp8_cast_delayed(Tensor x, Tensor(a!) history, Tensor(b!) overflows, ScalarType dtype, *, "
      "float shrink=1.0, str reduce=\"max\", bool transpose=False) -> (Tensor, Tensor, Tensor)");
  // SGD: momentum_buffers empty when momentum == 0; otherwise steps say which buffers are new
  // (step 1: the buffer starts as the grad, torch's "momentum_buffer is None"). Stochastic
  // rounding needs steps (the random stream is keyed on them).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] master_params, Tensor(e!)[] compensations, Tensor(d!)[] steps, float lr, "
      "Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, Tensor? inv_scale, Tensor? clip_coef, Tensor? found_inf, *, "
      "str rounding=\"nearest\", int seed=0, bool store_grads=False) -> ()");
}

namespace mixprec::autocast {
PyMethodDef* python_methods();  // autocast/autocast_python.cpp: the thread-local policy switch and its tables
}

// `import mixprec._C` loads this library, which runs the registrations above. The module's own
// functions are autocast's hot-path switches (plain CPython calls: torch.ops costs microseconds).
// TORCH_EXTENSION_NAME is _C from setup.py and the JIT module's name from torch's loader.
#define MIXPREC_STR2(x) #x
#define MIXPREC_STR(x) MIXPREC_STR2(x)
#define MIXPREC_INIT2(name) PyInit_##name
#define MIXPREC_INIT(name) MIXPREC_INIT2(name)
static PyModuleDef mixprec_module = {
    PyModuleDef_HEAD_INIT, MIXPREC_STR(TORCH_EXTENSION_NAME), nullptr, -1,
    mixprec::autocast::python_methods()};
PyMODINIT_FUNC MIXPREC_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&mixprec_module); }
