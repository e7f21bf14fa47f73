// The per-element maths of the fused optimizers, shared verbatim by the CPU and CUDA kernels.
// Each function follows the order of operations (and the fp32 roundings) of torch.optim's
// foreach implementation, so results agree with it to an ulp or two: scalars torch computes in
// Python doubles (bias corrections, step size, 1 - lr * wd) are computed here in double and
// rounded to float once; everything per element is fp32.
#pragma once
#include <cmath>
#include <cstdint>

#ifndef MIXPREC_HOST_DEVICE
#if defined(__CUDACC__)
#define MIXPREC_HOST_DEVICE __host__ __device__
#else
#define MIXPREC_HOST_DEVICE
#endif
#endif

namespace mixprec {

// The gradient as the update sees it: grad * inv_scale (unscale), then * clip_coef (clipping),
// each rounded to fp32 like torch's unscale_ followed by clip_grad_norm_ on fp32 grads.
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
  return weight < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
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
MIXPREC_HOST_DEVICE inline void adam_element(const AdamStepScalars& s, float g, float& p,
                                             float& m, float& v, float* v_max) {
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      p = p * s.decay;
    } else {
      g = g + s.weight_decay * p;
    }
  }
  m = lerp(m, g, s.one_minus_beta1);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * (g * g);
  float second = v;
  if (s.amsgrad) {
    // torch.maximum propagates NaN.
    const float mx = (*v_max != *v_max || *v_max > v) ? *v_max : v;
    *v_max = mx;
    second = mx;
  }
  const float denom = sqrtf(second) / s.bias_correction2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
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
  if (s.weight_decay != 0.0f) g = g + s.weight_decay * p;
  if (buf != nullptr) {
    float b;
    if (first) {
      b = g;
    } else {
      b = *buf * s.momentum;
      b = b + s.one_minus_dampening * g;
    }
    *buf = b;
    g = s.nesterov ? g + s.momentum * b : b;
  }
  p = p + s.neg_lr * g;
}

}  // namespace mixprec
