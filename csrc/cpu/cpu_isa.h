// Which instruction set the CPU kernels run with. Kernels that have an AVX2 build (compiled in
// a *_avx2.cpp file under `#pragma GCC target`, like ATen's CPU_CAPABILITY builds) use it when
// the processor has AVX2, FMA and F16C. MIXPREC_CPU_VECTOR=0 forces the portable build: for
// experiments, and for the test that the two give the same bits.
#pragma once
#include <cstdlib>
#include <cstring>

namespace mixprec::cpu {

inline bool have_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// Read on every call (a short scan of the environment) so a test can flip it between calls.
inline bool use_avx2() {
  if (!have_avx2()) return false;
  const char* env = std::getenv("MIXPREC_CPU_VECTOR");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

}  // namespace mixprec::cpu
