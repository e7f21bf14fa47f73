// The per-element maths of the fused optimizers, shared by the CPU and CUDA kernels. Each
// function follows the order of operations and the fp32 roundings of torch.optim's foreach
// implementation, so results agree with it to an ulp or two: scalars torch computes in Python
// doubles (bias corrections, step size, 1 - lr * wd) are computed here in double and rounded to
// float once; everything per element is fp32. Where torch's kernels fuse a multiply-add (its
// CUDA kernels through nvcc's contraction, its CPU kernels through Vectorized fmadd) we call
// fmaf explicitly, and where they round in between we do too, so no compiler choice can
// change our results. torch's CPU and CUDA addcmul/addcdiv associate differently; the Order
// tag picks the device's.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>

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
MIXPREC_HOST_DEVICE inline void adam_element(const AdamStepScalars& s, float g, float& p,
                                             float& m, float& v, float* v_max) {
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
    const float mx = (*v_max != *v_max || *v_max > v) ? *v_max : v;
    *v_max = mx;
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

// torch.nn.utils.clip_grad_norm_'s coefficient, clamp(max_norm / (total_norm + 1e-6), max=1.0),
// with torch's fp32 roundings: the 1e-6 and max_norm become floats, and Python's
// `max_norm / tensor` is tensor.reciprocal() * max_norm. clamp keeps NaN.
MIXPREC_HOST_DEVICE inline float clip_coefficient(float total_norm, double max_norm) {
  const float coef = (1.0f / (total_norm + static_cast<float>(1e-6))) * static_cast<float>(max_norm);
  return (coef != coef || coef <= 1.0f) ? coef : 1.0f;
}

// -- Writing the updated weight back to a low-precision model without fp32 master weights. -------

// How an fp32 result becomes an fp16/bf16 weight (schema: int rounding).
enum class Rounding : int64_t {
  kNearest = 0,     // plain round-to-nearest: updates below half an ulp are lost
  kStochastic = 1,  // round up with probability (x - down) / (up - down): unbiased
  kKahan = 2,       // nearest, and keep the rounding error in a compensation buffer
};

// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, so the random number of an
// element is a pure function of (seed, step, tensor, element): reproducible, parallel, and
// CUDA-graph safe (no generator state to advance).
MIXPREC_HOST_DEVICE inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * ctr[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr[0] = hi1 ^ ctr[1] ^ k0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ ctr[3] ^ k1;
    ctr[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Four random words for elements [4 * block, 4 * block + 4) of one tensor at one step.
struct RandomStream {
  uint64_t seed;
  uint32_t step, tensor;

  MIXPREC_HOST_DEVICE void block(int64_t block_index, uint32_t out[4]) const {
    out[0] = static_cast<uint32_t>(block_index);
    out[1] = static_cast<uint32_t>(static_cast<uint64_t>(block_index) >> 32);
    out[2] = step;
    out[3] = tensor;
    philox4x32_10(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }
};

// The neighbour of a finite fp16/bf16 value one ulp further from zero (both formats are
// sign-magnitude, so that is the next bit pattern).
template <typename T>
MIXPREC_HOST_DEVICE inline T away_from_zero(T v) {
  return T(static_cast<uint16_t>(v.x + 1), T::from_bits());
}

template <typename T>
MIXPREC_HOST_DEVICE inline T toward_zero(T v) {
  return T(static_cast<uint16_t>(v.x - 1), T::from_bits());
}

MIXPREC_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

// Unbiased stochastic rounding of x to T: E[result] = x for every x within T's range; a finite x
// never rounds to inf. `random` is a uniform 32-bit word.
template <typename T>
MIXPREC_HOST_DEVICE inline T round_stochastic(float x, uint32_t random) {
  const float ax = fabsf(x);
  if (!(ax == ax) || ax == INFINITY) return static_cast<T>(x);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the top half of fp32's bit pattern, and between two neighbouring bf16 values (in
    // any binade, subnormals too) the fp32 values are evenly spaced, 2^16 of them to a gap. So
    // adding 16 uniform bits to the low half and truncating carries into the next bf16 value with
    // probability exactly (x - down) / (up - down): a few integer ops instead of a division.
    uint16_t out = static_cast<uint16_t>((float_bits(x) + (random >> 16)) >> 16);
    if ((out & 0x7FFFu) == 0x7F80u) --out;  // carried from the largest finite value into inf
    return T(out, T::from_bits());
  } else {
    T down = static_cast<T>(ax);  // nearest; step back if it went up
    if (static_cast<float>(down) > ax) down = toward_zero(down);
    const float lo = static_cast<float>(down);
    T result = down;
    if (lo != ax) {
      const T up = away_from_zero(down);
      const float p = (ax - lo) / (static_cast<float>(up) - lo);  // up == inf gives p = 0
      const float u = static_cast<float>(random >> 8) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
      if (u < p) result = up;
    }
    return x < 0 ? T(static_cast<uint16_t>(result.x | 0x8000u), T::from_bits()) : result;
  }
}

// Reads the weight the update starts from and writes the new one, for every storage scheme:
// fp32 params; fp16/bf16 params with an fp32 master copy; or fp16/bf16 alone, rounded to
// nearest, stochastically, or with a Kahan compensation (weight = param + compensation).
template <typename T>
struct WeightIO {
  Rounding rounding;

  MIXPREC_HOST_DEVICE float load(const T& param, const float* master, const T* comp) const {
    if (master) return *master;
    if (comp) return static_cast<float>(param) + static_cast<float>(*comp);
    return static_cast<float>(param);
  }

  MIXPREC_HOST_DEVICE void store(float p, T& param, float* master, T* comp, uint32_t random) const {
    if constexpr (!std::is_same_v<T, c10::Half> && !std::is_same_v<T, c10::BFloat16>) {
      param = static_cast<T>(p);  // fp32 params (the kernels' dispatch also instantiates fp64)
    } else {
      if (master) {
        *master = p;
        param = static_cast<T>(p);
      } else if (comp) {
        const T rounded = static_cast<T>(p);
        param = rounded;
        *comp = static_cast<T>(p - static_cast<float>(rounded));
      } else if (rounding == Rounding::kStochastic) {
        param = round_stochastic<T>(p, random);
      } else {
        param = static_cast<T>(p);
      }
    }
  }
};

}  // namespace mixprec
