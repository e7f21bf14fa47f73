// CPU kernels of mixprec::adam_step_ and mixprec::sgd_step_: one at::parallel_for over every
// element of every tensor, the per-element maths from optim_math.h (shared with CUDA). The
// per-element loops here are the reference; the vector loops (optim_vector_loops.h, built for
// AVX2 and AVX-512) run the same operations 8 or 16 elements at a time and give the same bits. A set found_inf skips the whole
// update (params, state and step counts untouched).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "cpu_isa.h"
#include "mixprec/optim_checks.h"
#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"
#include "optim_span.h"
#include "parallel_spans.h"

namespace mixprec::cpu {
namespace {

// Elements per thread at least: below this a second thread costs more than it saves.
constexpr int64_t kGrain = 32768;

float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

template <typename T>
T* ptr_or_null(at::TensorList list, size_t i) {
  return list.empty() ? nullptr : list[i].data_ptr<T>();
}

// The scalars every fused step reads: all CPU tensors, so plain reads (no synchronisation).
struct StepInputs {
  bool skip;
  double lr;
  GradTransform transform;
};

StepInputs read_step_inputs(const char* op, at::TensorList params, double lr,
                            const c10::optional<at::Tensor>& lr_tensor,
                            const c10::optional<at::Tensor>& inv_scale,
                            const c10::optional<at::Tensor>& clip_coef,
                            const c10::optional<at::Tensor>& found_inf, bool maximize) {
  TORCH_CHECK(params.empty() || params[0].is_cpu(), op, ": params are on ", params[0].device(),
              "; the CPU kernel needs CPU tensors");
  StepInputs in;
  in.skip = found_inf.has_value() && *f32(*found_inf) != 0.0f;
  in.lr = lr_tensor.has_value() ? static_cast<double>(*f32(*lr_tensor)) : lr;
  in.transform = GradTransform{inv_scale.has_value() ? *f32(*inv_scale) : 1.0f,
                               clip_coef.has_value() ? *f32(*clip_coef) : 1.0f, maximize};
  return in;
}

uint32_t step_of(at::TensorList steps, size_t t) {
  return steps.empty() ? 0u : static_cast<uint32_t>(*steps[t].data_ptr<float>());
}

// The random word of element i for stochastic rounding (the same word the CUDA kernel draws for
// it), none unless rounding is stochastic.
template <typename T>
struct RandomWords {
  bool active;
  RandomStream stream;

  RandomWords(const WeightIO<T>& io, RandomStream s)
      : active(!std::is_same_v<T, float> && io.rounding == Rounding::kStochastic), stream(s) {}

  uint32_t operator()(int64_t i) const { return active ? stream.word(i) : 0u; }
};

std::vector<int64_t> numels_of(at::TensorList params) {
  std::vector<int64_t> n;
  for (const at::Tensor& p : params) n.push_back(p.numel());
  return n;
}

WeightSlice weight_slice(at::TensorList params, at::TensorList grads, at::TensorList masters,
                         at::TensorList compensations, at::TensorList steps, int64_t seed,
                         size_t t) {
  return WeightSlice{params[t].data_ptr(), grads[t].data_ptr(),
                     ptr_or_null<float>(masters, t),
                     compensations.empty() ? nullptr : compensations[t].data_ptr(),
                     RandomStream::of(static_cast<uint64_t>(seed), step_of(steps, t),
                                      static_cast<uint32_t>(t))};
}

// The gradient for the update; with store_grads, also written back unscaled and clipped, as
// torch's fused kernels leave p.grad.
template <typename T>
float take_grad(const StepRule& rule, T& grad) {
  const float u = rule.transform.unscaled(static_cast<float>(grad));
  if (rule.store_grads) grad = static_cast<T>(u);
  return rule.transform.maximize ? -u : u;
}

template <typename T>
void adam_loop(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
  const WeightIO<T> io{rule.rounding};
  T* param = static_cast<T*>(a.w.param);
  T* grad = static_cast<T*>(a.w.grad);
  float* master = a.w.master;
  T* comp = static_cast<T*>(a.w.compensation);
  float* v_max = a.max_exp_avg_sq;
  RandomWords random(io, a.w.random);
  float no_v_max = 0.0f;  // adam_element touches v_max only with amsgrad
  for (int64_t i = begin; i < end; ++i) {
    float p = io.load(param[i], master ? master + i : nullptr, comp ? comp + i : nullptr);
    adam_element(a.scalars, take_grad(rule, grad[i]), p, a.exp_avg[i], a.exp_avg_sq[i],
                 v_max ? v_max[i] : no_v_max);
    io.store(p, param[i], master ? master + i : nullptr, comp ? comp + i : nullptr, random(i));
  }
}

template <typename T>
void sgd_loop(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a, int64_t begin,
              int64_t end) {
  const WeightIO<T> io{rule.rounding};
  T* param = static_cast<T*>(a.w.param);
  T* grad = static_cast<T*>(a.w.grad);
  float* master = a.w.master;
  T* comp = static_cast<T*>(a.w.compensation);
  float* buf = a.momentum_buffer;
  RandomWords random(io, a.w.random);
  for (int64_t i = begin; i < end; ++i) {
    float p = io.load(param[i], master ? master + i : nullptr, comp ? comp + i : nullptr);
    sgd_element(s, take_grad(rule, grad[i]), p, buf ? buf + i : nullptr, a.first);
    io.store(p, param[i], master ? master + i : nullptr, comp ? comp + i : nullptr, random(i));
  }
}

}  // namespace

void adam_slice_portable(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rule.dtype, "adam_cpu",
                                  [&] { adam_loop<scalar_t>(rule, a, begin, end); });
}

void sgd_slice_portable(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                        int64_t begin, int64_t end) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rule.dtype, "sgd_cpu",
                                  [&] { sgd_loop<scalar_t>(rule, s, a, begin, end); });
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList master_params, at::TensorList compensations,
                   at::TensorList steps, double lr, const c10::optional<at::Tensor>& lr_tensor,
                   double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled_weight_decay, bool maximize,
                   const c10::optional<at::Tensor>& inv_scale,
                   const c10::optional<at::Tensor>& clip_coef,
                   const c10::optional<at::Tensor>& found_inf, c10::string_view rounding_name,
                   int64_t seed, bool store_grads) {
  const char* op = "mixprec.adam_step_";
  const Rounding rounding = parse_rounding(op, rounding_name);
  check_optim_args(op, params, grads,
                   {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
                    {"max_exp_avg_sqs", max_exp_avg_sqs, false}},
                   master_params, compensations, rounding, steps, true, lr_tensor, inv_scale,
                   clip_coef, found_inf);
  if (params.empty()) return;
  const StepInputs in =
      read_step_inputs(op, params, lr, lr_tensor, inv_scale, clip_coef, found_inf, maximize);
  if (in.skip) return;
  const AdamConfig config{beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                          !max_exp_avg_sqs.empty()};
  std::vector<AdamStepScalars> scalars;
  for (const at::Tensor& s : steps) {
    *f32(s) += 1.0f;  // torch: state_steps += 1 (an fp32 tensor), before the update uses it
    scalars.push_back(adam_step_scalars(config, in.lr, *f32(s)));
  }
  const StepRule rule{params[0].scalar_type(), in.transform, rounding, store_grads};
  const CpuVector vector = rule.dtype == at::kDouble ? CpuVector::kPortable : cpu_vector();
  Concatenation(numels_of(params)).parallel_walk(kGrain, [&](size_t t, int64_t begin, int64_t end) {
    const AdamSlice slice{
        weight_slice(params, grads, master_params, compensations, steps, seed, t),
        f32(exp_avgs[t]), f32(exp_avg_sqs[t]), ptr_or_null<float>(max_exp_avg_sqs, t), scalars[t]};
#if defined(__x86_64__) && defined(__GNUC__)
    if (vector == CpuVector::kAvx512) return adam_slice_avx512(rule, slice, begin, end);
    if (vector == CpuVector::kAvx2) return adam_slice_avx2(rule, slice, begin, end);
#endif
    adam_slice_portable(rule, slice, begin, end);
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList master_params, at::TensorList compensations, at::TensorList steps,
                  double lr, const c10::optional<at::Tensor>& lr_tensor, double momentum,
                  double dampening, double weight_decay, bool nesterov, bool maximize,
                  const c10::optional<at::Tensor>& inv_scale,
                  const c10::optional<at::Tensor>& clip_coef,
                  const c10::optional<at::Tensor>& found_inf, c10::string_view rounding_name,
                  int64_t seed, bool store_grads) {
  const char* op = "mixprec.sgd_step_";
  const Rounding rounding = parse_rounding(op, rounding_name);
  check_optim_args(op, params, grads, {{"momentum_buffers", momentum_buffers, false}},
                   master_params, compensations, rounding, steps,
                   sgd_needs_steps(params, momentum_buffers, master_params, rounding), lr_tensor,
                   inv_scale, clip_coef, found_inf);
  if (params.empty()) return;
  const StepInputs in =
      read_step_inputs(op, params, lr, lr_tensor, inv_scale, clip_coef, found_inf, maximize);
  if (in.skip) return;
  const SgdStepScalars scalars =
      sgd_step_scalars(SgdConfig{momentum, dampening, weight_decay, nesterov}, in.lr);
  std::vector<char> first(params.size(), 0);
  for (size_t t = 0; t < steps.size(); ++t) {
    *f32(steps[t]) += 1.0f;
    first[t] = *f32(steps[t]) == 1.0f;  // the momentum buffer starts as a copy of the grad
  }
  const StepRule rule{params[0].scalar_type(), in.transform, rounding, store_grads};
  const CpuVector vector = rule.dtype == at::kDouble ? CpuVector::kPortable : cpu_vector();
  Concatenation(numels_of(params)).parallel_walk(kGrain, [&](size_t t, int64_t begin, int64_t end) {
    const SgdSlice slice{weight_slice(params, grads, master_params, compensations, steps, seed, t),
                         ptr_or_null<float>(momentum_buffers, t), first[t] != 0};
#if defined(__x86_64__) && defined(__GNUC__)
    if (vector == CpuVector::kAvx512) return sgd_slice_avx512(rule, scalars, slice, begin, end);
    if (vector == CpuVector::kAvx2) return sgd_slice_avx2(rule, scalars, slice, begin, end);
#endif
    sgd_slice_portable(rule, scalars, slice, begin, end);
  });
}

}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("adam_step_", &mixprec::cpu::adam_step_cpu);
  m.impl("sgd_step_", &mixprec::cpu::sgd_step_cpu);
}
