// x / d for many x and one d, by one reciprocal and an fma correction: q = x * r with r = 1 / d
// correctly rounded, then q + (x - q * d) * r rounded once. By Markstein's theorem this is the
// correctly rounded quotient, the division's bits, wherever the residual x - q * d (exact by fma)
// does not underflow and nothing overflows: three instructions where a CUDA division takes about
// ten (a range check, a branch and a slow path beside them). The kernels use it only on ranges
// checked exhaustively against the division, each caller naming its own (quant_ratio_by_inverse
// in compressed_state.h, fused_cuda::DivideBiasCorrection2ByInverse in optim_math.h; checked by
// scripts/check_inverse_divide.c and the 8-bit ratio's check of 2026-12-07). x = inf gives NaN
// here (inf / d is inf): callers that can see one keep it out.
#pragma once
#include <cmath>

#include "mixprec/host_device.h"

namespace mixprec {

struct InverseDivisor {
  float divisor, inverse;

  MIXPREC_HOST_DEVICE static InverseDivisor of(float d) { return {d, 1.0f / d}; }
  MIXPREC_HOST_DEVICE float operator()(float x) const {
    const float q = x * inverse;
    return fmaf(fmaf(-q, divisor, x), inverse, q);
  }
};

}  // namespace mixprec
