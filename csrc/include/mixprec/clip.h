// The clipping coefficient of torch.nn.utils.clip_grad_norm_, shared by the CPU and CUDA kernels
// (clip_coef, clip_grad_norm_scaled).
#pragma once
#include "mixprec/host_device.h"

namespace mixprec {

// clamp(max_norm / (total_norm + 1e-6), max=1.0) with torch's fp32 roundings: the 1e-6 and
// max_norm become floats, and Python's `max_norm / tensor` is tensor.reciprocal() * max_norm.
// clamp keeps NaN.
MIXPREC_HOST_DEVICE inline float clip_coefficient(float total_norm, double max_norm) {
  const float coef = (1.0f / (total_norm + static_cast<float>(1e-6))) * static_cast<float>(max_norm);
  return (coef != coef || coef <= 1.0f) ? coef : 1.0f;
}

}  // namespace mixprec
