// The CPU unscale loop over one flat span. Included once per instruction set (generic and
// AVX2, see unscale_cpu_avx2.cpp): ATen's Vectorized<T> picks its width from CPU_CAPABILITY,
// and MIXPREC_CPU_NS keeps the two compilations in separate namespaces.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace mixprec::cpu::MIXPREC_CPU_NS {

// Fetches the span 4 KiB ahead of element i. The hardware prefetchers stop at every 4 KiB page:
// without this, unscaling GPT-2 124M's bf16 grads ran at 7.6 GB/s on the 2-core CI machine, with
// it 29.8 GB/s (fp16 21.5 -> 38-40, fp32 37 -> 43-44; benchmarks/bench_unscale.py --device cpu). The
// address is formed as an integer; past the span's end it is fetched harmlessly.
template <typename T>
inline void fetch_ahead(const T* p, int64_t i) {
  constexpr uintptr_t kAheadBytes = 4096;
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p + i) + kAheadBytes));
}

template <typename V>
inline bool any_nan(const V& acc) {
  using T = typename V::value_type;
  T lanes[V::size()];
  acc.store(lanes);
  for (int i = 0; i < V::size(); ++i)
    if (lanes[i] != lanes[i]) return true;
  return false;
}

// Multiplies p[0..n) by inv_scale in opmath (fp32, or fp64 for double) and returns whether any
// element was inf/NaN. x - x is +0 for finite x and NaN otherwise, so OR-ing its bits into an
// accumulator flags a bad element with no branch and only a 1-cycle dependency chain (a
// running sum would make the loop latency-bound). inv_scale == 1 only reads (torch writes the
// same values back).
template <typename T>
bool unscale_span(T* p, int64_t n, float inv_scale) {
  using namespace at::vec;
  const bool write = inv_scale != 1.0f;
  bool found = false;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    using bVec = Vectorized<T>;
    using fVec = Vectorized<float>;
    const fVec inv(inv_scale);
    fVec acc(0.0f);
    for (; i + bVec::size() <= n; i += bVec::size()) {
      fetch_ahead(p, i);
      auto [lo, hi] = convert_to_float<T>(bVec::loadu(p + i));
      acc = acc | (lo - lo) | (hi - hi);
      if (write) convert_from_float<T>(lo * inv, hi * inv).store(p + i);
    }
    found = any_nan(acc);
  } else {
    using opmath = T;  // float or double; double grads use fp64 arithmetic, like torch
    using Vec = Vectorized<T>;
    const Vec inv(static_cast<opmath>(inv_scale));
    Vec acc(0);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      fetch_ahead(p, i);
      Vec v = Vec::loadu(p + i);
      acc = acc | (v - v);
      if (write) (v * inv).store(p + i);
    }
    found = any_nan(acc);
  }
  using opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (; i < n; ++i) {
    const opmath v = static_cast<opmath>(p[i]);
    if (!std::isfinite(v)) found = true;
    if (write) p[i] = static_cast<T>(v * static_cast<opmath>(inv_scale));
  }
  return found;
}

inline bool unscale_span_dispatch(at::ScalarType dtype, void* data, int64_t n, float inv_scale) {
  switch (dtype) {
    case at::kFloat: return unscale_span(static_cast<float*>(data), n, inv_scale);
    case at::kDouble: return unscale_span(static_cast<double*>(data), n, inv_scale);
    case at::kHalf: return unscale_span(static_cast<c10::Half*>(data), n, inv_scale);
    case at::kBFloat16: return unscale_span(static_cast<c10::BFloat16*>(data), n, inv_scale);
    default: return false;  // unreachable: dtypes are validated before any kernel runs
  }
}

}  // namespace mixprec::cpu::MIXPREC_CPU_NS
