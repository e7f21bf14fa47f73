// The AVX2 build of the CPU unscale loop, chosen at run time when the processor has AVX2+FMA.
// ATen's own CPU kernels are compiled per instruction set the same way (CPU_CAPABILITY).
#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2_target.h"  // first: the rest of this file compiles for AVX2
#define MIXPREC_CPU_NS avx2
#include "unscale_kernel.h"

namespace mixprec::cpu {
bool unscale_span_avx2(at::ScalarType dtype, void* data, int64_t n, float inv_scale) {
  return avx2::unscale_span_dispatch(dtype, data, n, inv_scale);
}
}  // namespace mixprec::cpu
#endif
