// Argument validation of the fused optimizer ops and grad_norm, shared by the CPU and CUDA
// kernels. Everything is checked before any tensor is written: a bad call changes nothing.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>
#include <vector>

#include "mixprec/checks.h"
#include "mixprec/rounding_names.h"

namespace mixprec {

// A list that travels beside params, element for element (exp_avgs, master_params, ...).
struct ParallelList {
  const char* name;
  at::TensorList tensors;
  bool required;  // otherwise it may also be empty (feature off)
};

inline std::string item_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// "[2, 3]": built with std::to_string, never by streaming int64s (see check_scalar_tensor).
inline std::string dims_str(at::IntArrayRef dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

inline void check_optional_scalar(const c10::optional<at::Tensor>& t, const at::Tensor& ref,
                                  const char* op, const char* name) {
  if (!t.has_value()) return;
  check_scalar_tensor(*t, op, name, at::kFloat);
  check_same_device(*t, ref, op, name, "params[0]");
}

inline void check_same_layout(const at::Tensor& t, const at::Tensor& p, const char* op,
                              const std::string& name, const std::string& pname) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " is a ", t.layout(),
              " tensor; the fused optimizers take dense tensors only (no sparse gradients)");
  check_same_device(t, p, op, name, pname.c_str());
  TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), op, ": ", name,
              " must have the shape and strides of ", pname, ", got shape ", dims_str(t.sizes()),
              " strides ", dims_str(t.strides()), " vs ", dims_str(p.sizes()), " ",
              dims_str(p.strides()));
}

// Checks one fused-optimizer call. Params: one dtype (fp32, fp16 or bf16), one device, dense.
// fp16/bf16 params either have fp32 master_params, or are updated directly with `rounding`
// (nearest, stochastic, or kahan: then one compensation per param, in the params' dtype).
// fp32 params take neither.
inline void check_optim_args(const char* op, at::TensorList params, at::TensorList grads,
                             const std::vector<ParallelList>& states, at::TensorList masters,
                             at::TensorList compensations, Rounding rounding, at::TensorList steps,
                             bool steps_required, const c10::optional<at::Tensor>& lr_tensor,
                             const c10::optional<at::Tensor>& inv_scale,
                             const c10::optional<at::Tensor>& clip_coef,
                             const c10::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", std::to_string(n), " params but ",
              std::to_string(grads.size()), " grads");
  for (const ParallelList& s : states) {
    TORCH_CHECK(s.tensors.size() == n || (!s.required && s.tensors.empty()), op, ": got ",
                std::to_string(n), " params but ", std::to_string(s.tensors.size()), " ", s.name);
  }
  TORCH_CHECK(steps.size() == n || (!steps_required && steps.empty()), op, ": got ",
              std::to_string(n), " params but ", std::to_string(steps.size()), " steps");
  if (n == 0) return;
  const at::Tensor& p0 = params[0];
  const at::ScalarType dtype = p0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": params must be float32, float16 or bfloat16, got ", dtype,
              (p0.is_complex() ? " (complex params are not supported; use torch.optim)" : ""));
  const bool low_precision = dtype != at::kFloat;
  const bool with_masters = !masters.empty();
  TORCH_CHECK(!with_masters || (low_precision && masters.size() == n), op, ": ",
              (low_precision ? "give one float32 master_params entry per param (or none)"
                             : "float32 params take no master_params"),
              "; got ", std::to_string(masters.size()), " for ", std::to_string(n), " params");
  const bool kahan = low_precision && !with_masters && rounding == Rounding::kKahan;
  TORCH_CHECK(compensations.size() == (kahan ? n : 0), op, ": ",
              (kahan ? "rounding=kahan needs one compensation tensor per param"
                     : "compensations are only used by fp16/bf16 params with rounding=kahan and "
                       "no master_params"),
              "; got ", std::to_string(compensations.size()), " for ", std::to_string(n), " params");
  check_optional_scalar(lr_tensor, p0, op, "lr");
  check_optional_scalar(inv_scale, p0, op, "inv_scale");
  check_optional_scalar(clip_coef, p0, op, "clip_coef");
  check_optional_scalar(found_inf, p0, op, "found_inf");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string pname = item_name("params", i);
    TORCH_CHECK(p.defined(), op, ": ", pname, " is undefined (None)");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": ", pname, " must be a dense tensor");
    TORCH_CHECK(p.scalar_type() == dtype, op, ": ", pname, " is ", p.scalar_type(),
                " but params[0] is ", dtype, "; call once per dtype");
    check_same_device(p, p0, op, pname, "params[0]");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": ", pname,
                " is not dense in memory (a strided view?); fused optimizers update whole "
                "blocks of memory");
    check_same_layout(grads[i], p, op, item_name("grads", i), pname);
    TORCH_CHECK(grads[i].scalar_type() == dtype, op, ": ", item_name("grads", i), " is ",
                grads[i].scalar_type(), " but ", pname, " is ", dtype);
    for (const ParallelList& s : states) {
      if (s.tensors.empty()) continue;
      const std::string name = item_name(s.name, i);
      check_same_layout(s.tensors[i], p, op, name, pname);
      TORCH_CHECK(s.tensors[i].scalar_type() == at::kFloat, op, ": ", name,
                  " must be float32 (optimizer state is kept in fp32), got ",
                  s.tensors[i].scalar_type());
    }
    if (with_masters) {
      const std::string name = item_name("master_params", i);
      check_same_layout(masters[i], p, op, name, pname);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, op, ": ", name,
                  " must be float32, got ", masters[i].scalar_type());
    }
    if (kahan) {
      const std::string name = item_name("compensations", i);
      check_same_layout(compensations[i], p, op, name, pname);
      TORCH_CHECK(compensations[i].scalar_type() == dtype, op, ": ", name, " must be ", dtype,
                  " like the params, got ", compensations[i].scalar_type());
    }
    if (!steps.empty()) check_scalar_tensor(steps[i], op, item_name("steps", i).c_str(), at::kFloat);
    if (!steps.empty()) check_same_device(steps[i], p, op, item_name("steps", i), pname.c_str());
  }
}

// SGD keeps step counts when momentum buffers need a first-step flag, or when stochastic
// rounding keys its random stream on the step.
inline bool sgd_needs_steps(at::TensorList params, at::TensorList momentum_buffers,
                            at::TensorList master_params, Rounding rounding) {
  const bool direct_low_precision =
      !params.empty() && params[0].scalar_type() != at::kFloat && master_params.empty();
  return !momentum_buffers.empty() || (direct_low_precision && rounding == Rounding::kStochastic);
}

// grads for a norm: dense fp32/fp16/bf16 tensors on `ref`'s device.
inline void check_norm_grads(const char* op, at::TensorList grads, const at::Tensor& ref,
                             const char* ref_name, double norm_type) {
  TORCH_CHECK(norm_type > 0, op, ": norm_type must be positive or inf, got ",
              std::to_string(norm_type));
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const std::string name = item_name("grads", i);
    TORCH_CHECK(g.defined(), op, ": ", name, " is undefined (None)");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": ", name, " is a ", g.layout(),
                " tensor; pass a dense gradient");
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kHalf ||
                    g.scalar_type() == at::kBFloat16,
                op, ": ", name, " has dtype ", g.scalar_type(),
                "; expected float32, float16 or bfloat16");
    check_same_device(g, ref, op, name, ref_name);
  }
}

inline void check_grad_norm_args(at::TensorList grads, const at::Tensor& found_inf,
                                 const at::Tensor& inv_scale, double norm_type) {
  const char* op = "mixprec.grad_norm";
  check_scalar_tensor(found_inf, op, "found_inf", at::kFloat);
  check_scalar_tensor(inv_scale, op, "inv_scale", at::kFloat);
  check_same_device(inv_scale, found_inf, op, "inv_scale", "found_inf");
  check_norm_grads(op, grads, found_inf, "found_inf", norm_type);
}

inline void check_clip_grad_norm_scaled_args(at::TensorList grads, const at::Tensor& scale,
                                             double norm_type) {
  const char* op = "mixprec.clip_grad_norm_scaled";
  check_scalar_tensor(scale, op, "scale", at::kFloat);
  check_norm_grads(op, grads, scale, "scale", norm_type);
}

inline void check_clip_coef_args(const at::Tensor& total_norm) {
  check_scalar_tensor(total_norm, "mixprec.clip_coef", "total_norm", at::kFloat);
}

}  // namespace mixprec
