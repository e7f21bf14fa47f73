// The per-element maths of the fused optimizers (Adam/AdamW, SGD, the gradient transform),
// shared by the CPU and CUDA kernels. Each function follows the order of operations and the fp32
// roundings of torch.optim's foreach implementation, so results agree with it to an ulp or two:
// scalars torch computes in Python doubles (bias corrections, step size, 1 - lr * wd) are
// computed here in double and rounded to float once; everything per element is fp32. Where
// torch's kernels fuse a multiply-add (its CUDA kernels through nvcc's contraction, its CPU
// kernels through Vectorized fmadd) we call fmaf explicitly, and where they round in between we
// do too, so no compiler choice can change our results. torch's CPU and CUDA addcmul/addcdiv
// associate differently; the Order tag picks the device's.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mixprec/host_device.h"

namespace mixprec {

// The gradient as the update sees it: grad * inv_scale (unscale), then * clip_coef (clipping),
// each rounded to fp32 like torch's unscale_ followed by clip_grad_norm_ on fp32 grads.
struct CudaOrder {};  // addcmul: a + s * (b * c); addcdiv: a + s * (b / c), fused
struct CpuOrder {};   // addcmul: a + (s * b) * c, fused; addcdiv: a + (s * b) / c

struct GradTransform {
  float inv_scale;  // 1 when there is none
  float clip_coef;  // 1 when there is none
  bool maximize;

  MIXPREC_HOST_DEVICE float operator()(float g) const {
    g = g * inv_scale;
    g = g * clip_coef;
    return maximize ? -g : g;
  }
};

// torch.lerp's formula (two branches keep it exact at both ends).
MIXPREC_HOST_DEVICE inline float lerp(float self, float end, float weight) {
  return weight < 0.5f ? fmaf(weight, end - self, self) : fmaf(weight - 1.0f, end - self, end);
}

// a + s * b * c (torch.addcmul)
template <typename Order>
MIXPREC_HOST_DEVICE inline float addcmul(float a, float s, float b, float c) {
  if constexpr (std::is_same_v<Order, CpuOrder>) return fmaf(s * b, c, a);
  return fmaf(s, b * c, a);
}

// a + s * b / c (torch.addcdiv)
template <typename Order>
MIXPREC_HOST_DEVICE inline float addcdiv(float a, float s, float b, float c) {
  if constexpr (std::is_same_v<Order, CpuOrder>) return a + (s * b) / c;
  return fmaf(s, b / c, a);
}

struct AdamConfig {
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool amsgrad;
};

// Per tensor and step: what torch computes on the host in double.
struct AdamStepScalars {
  float one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float decay;          // 1 - lr * weight_decay (AdamW)
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bias_correction2_sqrt;
  bool decoupled, amsgrad;
};

MIXPREC_HOST_DEVICE inline AdamStepScalars adam_step_scalars(const AdamConfig& c, double lr,
                                                             double step) {
  AdamStepScalars s;
  s.one_minus_beta1 = static_cast<float>(1.0 - c.beta1);
  s.beta2 = static_cast<float>(c.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  s.eps = static_cast<float>(c.eps);
  s.weight_decay = static_cast<float>(c.weight_decay);
  s.decay = static_cast<float>(1.0 - lr * c.weight_decay);
  s.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(c.beta1, step))));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(c.beta2, step)));
  s.decoupled = c.decoupled_weight_decay;
  s.amsgrad = c.amsgrad;
  return s;
}

// One element of Adam/AdamW (torch's _multi_tensor_adam). p is the fp32 (master) weight.
template <typename Order>
// v_max (max_exp_avg_sq) is read and written only when s.amsgrad. A reference, not a pointer
// that may be null: on CUDA a conditional pointer into a register pack puts the pack in local
// memory.
MIXPREC_HOST_DEVICE inline void adam_element(const AdamStepScalars& s, float g, float& p,
                                             float& m, float& v, float& v_max) {
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      p = p * s.decay;
    } else {
      g = fmaf(s.weight_decay, p, g);  // torch._foreach_add(grads, params, alpha=wd)
    }
  }
  m = lerp(m, g, s.one_minus_beta1);
  v = addcmul<Order>(v * s.beta2, s.one_minus_beta2, g, g);
  float second = v;
  if (s.amsgrad) {
    // torch.maximum propagates NaN.
    const float mx = (v_max != v_max || v_max > v) ? v_max : v;
    v_max = mx;
    second = mx;
  }
  const float denom = sqrtf(second) / s.bias_correction2_sqrt + s.eps;
  p = addcdiv<Order>(p, s.neg_step_size, m, denom);
}

struct SgdConfig {
  double momentum, dampening, weight_decay;
  bool nesterov;
};

struct SgdStepScalars {
  float momentum, one_minus_dampening, weight_decay, neg_lr;
  bool nesterov;
};

MIXPREC_HOST_DEVICE inline SgdStepScalars sgd_step_scalars(const SgdConfig& c, double lr) {
  return SgdStepScalars{static_cast<float>(c.momentum), static_cast<float>(1.0 - c.dampening),
                        static_cast<float>(c.weight_decay), static_cast<float>(-lr), c.nesterov};
}

// One element of SGD (torch's _multi_tensor_sgd). `first`: the momentum buffer is new (torch's
// "momentum_buffer is None"), so it starts as a copy of the gradient.
MIXPREC_HOST_DEVICE inline void sgd_element(const SgdStepScalars& s, float g, float& p,
                                            float* buf, bool first) {
  if (s.weight_decay != 0.0f) g = fmaf(s.weight_decay, p, g);
  if (buf != nullptr) {
    const float b = first ? g : fmaf(s.one_minus_dampening, g, *buf * s.momentum);
    *buf = b;
    g = s.nesterov ? fmaf(s.momentum, b, g) : b;
  }
  p = fmaf(s.neg_lr, g, p);
}

}  // namespace mixprec
