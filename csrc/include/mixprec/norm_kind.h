// How grad_norm accumulates each element (|x|^p) and combines partial results: the kernels of
// every device specialise on the kind, so the common norms (2, 1, inf) avoid powf.
#pragma once
#include <cmath>

namespace mixprec {

enum class NormKind { kL2, kL1, kInf, kP };

inline NormKind norm_kind(double p) {
  if (p == 2.0) return NormKind::kL2;
  if (p == 1.0) return NormKind::kL1;
  if (std::isinf(p)) return NormKind::kInf;
  return NormKind::kP;
}

}  // namespace mixprec
