// MIXPREC_HOST_DEVICE marks the maths shared by the CPU and CUDA kernels: __host__ __device__
// under nvcc, nothing under the host compiler. Every shared-maths header includes this one.
#pragma once

#if defined(__CUDACC__)
#define MIXPREC_HOST_DEVICE __host__ __device__
#else
#define MIXPREC_HOST_DEVICE
#endif

// A bit cast on the host (`To` and `From` of one size): __builtin_bit_cast where the compiler has
// it, since the vectorizer gives up on loops that call memcpy; memcpy elsewhere.
#if !defined(__CUDA_ARCH__)
#include <cstring>
namespace mixprec {
template <typename To, typename From>
inline To host_bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "host_bit_cast: sizes differ");
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define MIXPREC_HAS_BUILTIN_BIT_CAST 1
#endif
#endif
#if defined(MIXPREC_HAS_BUILTIN_BIT_CAST)
  return __builtin_bit_cast(To, x);
#else
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
#endif
}
}  // namespace mixprec
#endif
