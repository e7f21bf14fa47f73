// The per-element maths of the fused optimizers (Adam/AdamW, SGD, the gradient transform),
// shared by the CPU and CUDA kernels. Each device follows torch's fused kernel for that device,
// rounding for rounding, so `mixprec.optim.AdamW` equals `torch.optim.AdamW(fused=True)` bit for
// bit on fp32 params on both:
// - the CPU (adam_element, sgd_element): torch's fused CPU kernel, which follows the foreach
//   order: scalars torch computes in Python doubles (bias corrections, step size, 1 - lr * wd)
//   are computed in double and rounded to float once, everything per element is fp32, and the
//   fused multiply-adds of its Vectorized code are explicit fmaf calls here;
// - CUDA Adam/AdamW (fused_cuda::adam_element): torch's FusedAdamKernel rounds every scalar to
//   float and computes the bias corrections on the device with powf; its fused multiply-adds
//   are written out as fmaf here, and the host build has contraction off (-ffp-contract=off), so
//   no compiler choice changes our bits. Adam's L2 decay is the exception (1 ulp on < 3 % of
//   elements, see adam_element below);
// - CUDA SGD (sgd_element): the fma chain scripts/fused_formulas.py finds in torch's fused CUDA
//   SGD (torch 2.11). Two cases of torch's kernel match no candidate on every element: a grad
//   scale (99.8-99.9 %), and maximize with momentum (the momentum update: neither contraction
//   order holds on an H100 in tests/test_optim.py, though a probe had found one). There
//   tests/test_optim.py compares CUDA SGD within a few ulps; everywhere else bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mixprec/host_device.h"
#include "mixprec/inverse_divisor.h"

namespace mixprec {

// The gradient as the update sees it: grad * inv_scale (unscale), then * clip_coef (clipping),
// each rounded to fp32 like torch's unscale_ followed by clip_grad_norm_ on fp32 grads.
struct GradTransform {
  float inv_scale;  // 1 when there is none
  float clip_coef;  // 1 when there is none
  bool maximize;

  // The gradient torch.amp leaves in p.grad after unscale_ and clip_grad_norm_ (and what a
  // fused torch optimizer writes back): unscaled and clipped, not negated for maximize.
  MIXPREC_HOST_DEVICE float unscaled(float g) const {
    g = g * inv_scale;
    return g * clip_coef;
  }
  // The gradient the update uses.
  MIXPREC_HOST_DEVICE float operator()(float g) const {
    g = unscaled(g);
    return maximize ? -g : g;
  }
};

// torch.lerp's formula (two branches keep it exact at both ends).
MIXPREC_HOST_DEVICE inline float lerp(float self, float end, float weight) {
  return weight < 0.5f ? fmaf(weight, end - self, self) : fmaf(weight - 1.0f, end - self, end);
}

// a + s * b * c (torch.addcmul on the CPU)
MIXPREC_HOST_DEVICE inline float addcmul(float a, float s, float b, float c) { return fmaf(s * b, c, a); }

// a + s * b / c (torch.addcdiv on the CPU)
MIXPREC_HOST_DEVICE inline float addcdiv(float a, float s, float b, float c) { return a + (s * b) / c; }

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

// One element of Adam/AdamW on the CPU (torch's fused CPU kernel). p is the fp32 (master) weight.
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
  v = addcmul(v * s.beta2, s.one_minus_beta2, g, g);
  float second = v;
  if (s.amsgrad) {
    // torch.maximum propagates NaN.
    const float mx = (v_max != v_max || v_max > v) ? v_max : v;
    v_max = mx;
    second = mx;
  }
  // std::sqrt(float): the same correctly rounded root as sqrtf, and the form gcc vectorizes
  // (compressed_block_loops.h; a call to sqrtf stays a call there).
  const float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
  p = addcdiv(p, s.neg_step_size, m, denom);
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

// One element of SGD (torch's fused CPU kernel, and its fused CUDA kernel's fma chain). `first`:
// the momentum buffer is new (torch's "momentum_buffer is None"), so it starts as a copy of the
// gradient. `momentum_fma`: the buffer's update fuses the momentum product instead of the
// gradient's, as torch 2.11's CUDA kernel is compiled to do under maximize
// (scripts/fused_formulas.py on an H100: 100 % of elements that way, 72 % the other).
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

// torch's fused CUDA Adam kernel (FusedAdamKernel.cu / fused_adam_utils.cuh). SGD on CUDA uses
// sgd_element above.
namespace fused_cuda {

// Per tensor and step, on the device: every scalar rounded to float, the bias corrections with
// float powf of the step count, as torch's kernel computes them per block.
struct AdamScalars {
  float lr, beta1, beta2, weight_decay, eps;
  float bias_correction1, bias_correction2_sqrt;
  bool decoupled, amsgrad;
};

MIXPREC_HOST_DEVICE inline AdamScalars adam_scalars(const AdamConfig& c, float lr, float step) {
  AdamScalars s;
  s.lr = lr;
  s.beta1 = static_cast<float>(c.beta1);
  s.beta2 = static_cast<float>(c.beta2);
  s.weight_decay = static_cast<float>(c.weight_decay);
  s.eps = static_cast<float>(c.eps);
  s.bias_correction1 = 1.0f - powf(s.beta1, step);
  s.bias_correction2_sqrt = sqrtf(1.0f - powf(s.beta2, step));
  s.decoupled = c.decoupled_weight_decay;
  s.amsgrad = c.amsgrad;
  return s;
}

// sqrt(v) / bias_correction2_sqrt, torch's division.
struct DivideBiasCorrection2 {
  MIXPREC_HOST_DEVICE float operator()(const AdamScalars& s, float root) const {
    return root / s.bias_correction2_sqrt;
  }
};

// One element of Adam/AdamW; g is the unscaled, clipped gradient, negated for maximize.
// `divide` divides the root of the second moment by the bias correction (the compressed step's
// whole blocks pass one by a reciprocal with the same bits).
template <typename Divide = DivideBiasCorrection2>
MIXPREC_HOST_DEVICE inline void adam_element(const AdamScalars& s, float g, float& p, float& m,
                                             float& v, float& v_max, Divide divide = {}) {
  if (s.weight_decay != 0.0f) {
    if (s.decoupled) {
      p = fmaf(-(s.lr * s.weight_decay), p, p);  // param -= lr * weight_decay * param
    } else {
      // grad += param * weight_decay. torch's kernel is not matched bit for bit here: on the H200
      // (torch 2.11, scripts/fused_formulas.py) this fma equals its decayed grad on 99.6 % of
      // elements at wd 0.01 (97.9 % at 0.1), the rest 1 ulp apart; no candidate we tried (float or
      // double, fused or not, float or double wd) does better.
      g = fmaf(p, s.weight_decay, g);
    }
  }
  m = fmaf(s.beta1, m, fmaf(-s.beta1, g, g));
  const float g2 = g * g;
  v = fmaf(s.beta2, v, fmaf(-s.beta2, g2, g2));
  const float step_size = s.lr / s.bias_correction1;
  float second = v;
  if (s.amsgrad) {
    v_max = v_max < v ? v : v_max;  // std::max(max_exp_avg_sq, exp_avg_sq)
    second = v_max;
  }
  const float denom = divide(s, sqrtf(second)) + s.eps;
  p = p - step_size * m / denom;
}

// DivideBiasCorrection2 by the bias correction's reciprocal (InverseDivisor): the division's bits
// for a correction in [2^-20, 1] (`applies`; it is >= 2^-12 for every float beta2 < 1 whose powf
// stays below 1) and every root the step takes, 0 and the normals in [2^-76, 2^65) (the root of
// any float), checked on all of them for 259 corrections (scripts/check_inverse_divide.c); an
// infinite or NaN root is passed through as the division passes it.
struct DivideBiasCorrection2ByInverse {
  InverseDivisor by;

  MIXPREC_HOST_DEVICE static bool applies(const AdamScalars& s) {
    return s.bias_correction2_sqrt >= 0x1p-20f && s.bias_correction2_sqrt <= 1.0f;
  }
  MIXPREC_HOST_DEVICE explicit DivideBiasCorrection2ByInverse(const AdamScalars& s)
      : by(InverseDivisor::of(s.bias_correction2_sqrt)) {}
  MIXPREC_HOST_DEVICE float operator()(const AdamScalars&, float root) const {
    return root < INFINITY ? by(root) : root;
  }
};

}  // namespace fused_cuda

}  // namespace mixprec
