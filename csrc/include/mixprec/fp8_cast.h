// The fp8 cast shared by the CPU and CUDA kernels of mixprec::fp8_amax / fp8_cast (the "fp8"
// autocast rule): per-tensor scaling to a format's range and torch's own rounding to fp8.
//   scale = min(fp8_max / amax * shrink, FLT_MAX)   (1 * shrink where amax is 0 or not finite)
//   fp8   = round_to_nearest_even(clamp(x * scale, -fp8_max, fp8_max))   (NaN stays NaN)
// which is what `(x.float() * scale).clamp(-m, m).to(float8)` gives in torch, bit for bit: the
// conversion is c10's own (c10::Float8_e4m3fn / Float8_e5m2 from float), on both devices.
#pragma once
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <cstdint>
#include <cstring>

#include "mixprec/host_device.h"

namespace mixprec::fp8 {

enum class Format { kE4M3, kE5M2 };

MIXPREC_HOST_DEVICE inline float max_of(Format f) { return f == Format::kE4M3 ? 448.0f : 57344.0f; }

// |x|'s bit pattern: for non-negative floats (and NaN above inf) integer order is value order,
// so amax reduces with integer max: exact, order-free (deterministic) and NaN-sticky.
MIXPREC_HOST_DEVICE inline uint32_t abs_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x) & 0x7FFFFFFFu;
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b & 0x7FFFFFFFu;
#endif
}

MIXPREC_HOST_DEVICE inline float from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// fp8_max / amax (fp32 division, as torch's) where amax is finite and positive, else 1; times
// shrink (delayed scaling's 2^-margin); FLT_MAX where that overflows. An amax below
// fp8_max / FLT_MAX (1.3e-36 for e4m3, the smallest normal floats) would give an infinite scale,
// and 0 * inf made every zero of the tensor NaN; with FLT_MAX its largest value lands below
// fp8_max instead, and 1 / scale is a subnormal float, not 0.
MIXPREC_HOST_DEVICE inline float scale_of(float amax, Format f, float shrink) {
  constexpr float kFloatMax = 3.402823466e38f;
  const bool usable = amax > 0.0f && amax <= kFloatMax;  // false for 0, inf and NaN
  const float scale = (usable ? max_of(f) / amax : 1.0f) * shrink;
  return scale < kFloatMax ? scale : kFloatMax;
}

// The amax a delayed-scaling history gives: its first entry (the most recent cast's) or its max,
// NaN-sticky as torch's max() is (a NaN entry wins; `v > m` is false once m is NaN).
MIXPREC_HOST_DEVICE inline float history_amax(const float* history, int64_t len, bool most_recent) {
  float m = history[0];
  for (int64_t i = 1; i < len && !most_recent; ++i) {
    const float v = history[i];
    if (v != v || v > m) m = v;
  }
  return m;
}

// Delayed scaling's bookkeeping after a cast that saw amax `seen` with scale `scale`: the history
// moves down one place (the oldest entry drops) and takes `seen` first, and a scale overflow
// (`seen` beyond what the scale represents, so the largest values saturated, or NaN) is counted.
// 1 / scale is the same fp32 division the cast reports.
MIXPREC_HOST_DEVICE inline void roll_history(float* history, int64_t len, float seen, float scale, Format f,
                                             int64_t* overflows) {
  for (int64_t i = len - 1; i > 0; --i) history[i] = history[i - 1];
  history[0] = seen;
  if (!(seen <= (1.0f / scale) * max_of(f))) *overflows += 1;
}

MIXPREC_HOST_DEVICE inline uint8_t to_fp8(float x, float scale, Format f) {
  const float m = max_of(f);
  float v = x * scale;
  v = v > m ? m : (v < -m ? -m : v);  // NaN fails both compares and stays NaN, as in torch.clamp
  return f == Format::kE4M3 ? c10::Float8_e4m3fn(v).x : c10::Float8_e5m2(v).x;
}

}  // namespace mixprec::fp8
