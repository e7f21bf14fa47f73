// The AVX2 build of the CPU unscale loop, chosen at run time when the processor has AVX2+FMA.
// ATen's own CPU kernels are compiled per instruction set the same way (CPU_CAPABILITY).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
// The target pragma enables the instructions but not the feature macros that sleef.h (pulled
// in by ATen's AVX2 Vectorized<float>) tests; define them for this file only.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MIXPREC_CPU_NS avx2
#include "unscale_kernel.h"

namespace mixprec::cpu {
bool unscale_span_avx2(at::ScalarType dtype, void* data, int64_t n, float inv_scale) {
  return avx2::unscale_span_dispatch(dtype, data, n, inv_scale);
}
}  // namespace mixprec::cpu
#endif
