// Argument validation shared by the CPU and CUDA kernels. Everything is checked before any
// tensor is written, so a bad call leaves grads, found_inf and the scaler state untouched.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace mixprec {

inline bool is_supported_grad_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A one-element fp32 tensor (found_inf, inv_scale, scale).
inline void check_scalar_tensor(const at::Tensor& t, const char* op, const char* name,
                                at::ScalarType dtype) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ",
              t.layout());
  // Integers go into messages as std::string: streaming an int64_t through c10::str crashed
  // (SIGSEGV) with torch 2.11's prebuilt c10 on the GPU machine.
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must be a 1-element tensor, got ",
              std::to_string(t.numel()), " elements");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be a ", c10::toString(dtype),
              " tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const std::string& name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(),
              "; group tensors by device and call once per device (GradScaler does this)");
}

inline void check_unscale_args(at::TensorList grads, const at::Tensor& found_inf,
                               const at::Tensor& inv_scale) {
  const char* op = "mixprec.non_finite_check_and_unscale_";
  check_scalar_tensor(found_inf, op, "found_inf", at::kFloat);
  check_scalar_tensor(inv_scale, op, "inv_scale", at::kFloat);
  check_same_device(inv_scale, found_inf, op, "inv_scale", "found_inf");
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const std::string name = "grads[" + std::to_string(i) + "]";
    TORCH_CHECK(g.defined(), op, ": ", name, " is undefined (None)");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": ", name, " is a ", g.layout(),
                " tensor; pass a dense gradient (for sparse grads, unscale grad._values())");
    TORCH_CHECK(is_supported_grad_dtype(g.scalar_type()), op, ": ", name, " has dtype ",
                g.scalar_type(), "; expected float32, float16, bfloat16 or float64");
    check_same_device(g, found_inf, op, name, "found_inf");
    TORCH_CHECK(at::has_internal_overlap(g) != at::MemOverlap::Yes, op, ": ", name,
                " has elements that share memory (e.g. an expanded tensor); unscaling it in "
                "place would scale them more than once");
  }
}

inline void check_update_scale_args(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                     const at::Tensor& hysteresis_tracker,
                                     const at::Tensor& counters, const at::Tensor& found_inf,
                                     double growth_factor, double backoff_factor,
                                     int64_t growth_interval, int64_t hysteresis,
                                     double min_scale, double max_scale) {
  const char* op = "mixprec.update_scale_";
  check_scalar_tensor(scale, op, "scale", at::kFloat);
  check_scalar_tensor(growth_tracker, op, "growth_tracker", at::kInt);
  check_scalar_tensor(hysteresis_tracker, op, "hysteresis_tracker", at::kInt);
  check_scalar_tensor(found_inf, op, "found_inf", at::kFloat);
  TORCH_CHECK(counters.layout() == at::kStrided && counters.numel() == 2 &&
                  counters.scalar_type() == at::kLong && counters.is_contiguous(),
              op, ": counters must be a contiguous int64 tensor of 2 elements, got ",
              counters.scalar_type(), " with ", std::to_string(counters.numel()), " elements");
  check_same_device(growth_tracker, scale, op, "growth_tracker", "scale");
  check_same_device(hysteresis_tracker, scale, op, "hysteresis_tracker", "scale");
  check_same_device(counters, scale, op, "counters", "scale");
  check_same_device(found_inf, scale, op, "found_inf", "scale");
  TORCH_CHECK(growth_interval >= 1, op, ": growth_interval must be >= 1, got ",
              std::to_string(growth_interval));
  TORCH_CHECK(hysteresis >= 1, op, ": hysteresis must be >= 1, got ", std::to_string(hysteresis));
  TORCH_CHECK(min_scale >= 0 && min_scale <= max_scale, op,
              ": need 0 <= min_scale <= max_scale, got min_scale=", std::to_string(min_scale),
              " max_scale=", std::to_string(max_scale));
  (void)growth_factor;  // torch accepts any factors at this level; GradScaler validates them.
  (void)backoff_factor;
}

}  // namespace mixprec
