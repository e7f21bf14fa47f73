// Which instruction set the CPU kernels run with. Kernels that have vector builds (compiled in
// *_avx2.cpp / *_avx512.cpp files under `#pragma GCC target`, like ATen's CPU_CAPABILITY builds)
// use the widest the processor has: AVX-512 (F, BW, VL, DQ) where a kernel has that build, else
// AVX2 with FMA and F16C. MIXPREC_CPU_VECTOR caps it: 0 forces the portable build and avx2 the
// AVX2 one (for experiments, and for the tests that every build gives the same bits).
#pragma once
#include <cstdlib>
#include <cstring>

namespace mixprec::cpu {

enum class CpuVector { kPortable, kAvx2, kAvx512 };

inline bool have_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

inline bool have_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// The widest build to use now. Read on every call (a short scan of the environment) so a test
// can flip it between calls.
inline CpuVector cpu_vector() {
  const char* env = std::getenv("MIXPREC_CPU_VECTOR");
  if (!have_avx2() || (env != nullptr && std::strcmp(env, "0") == 0)) return CpuVector::kPortable;
  if (!have_avx512() || (env != nullptr && std::strcmp(env, "avx2") == 0)) return CpuVector::kAvx2;
  return CpuVector::kAvx512;
}

// Kernels with an AVX2 build only.
inline bool use_avx2() { return cpu_vector() != CpuVector::kPortable; }

}  // namespace mixprec::cpu
